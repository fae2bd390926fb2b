"""One sharded QAT-TSLD step equals the single-device step, on the devices of conftest's
`mesh_devices` (8 fake CPU devices on a CPU host or beside one GPU; a multi-GPU host's GPUs)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tiny_models
from jax.sharding import NamedSharding, PartitionSpec

from tsld_jax import sharding, train_step
from tsld_jax.models import decoder
from tsld_jax.quant import rules

SPEC = tiny_models.llama_spec(
    vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=4, mlp_size=64
)
LOSS = ml_collections.ConfigDict({"kind": "tsld", "temperature": 10.0, "chunk_size": 8})


def _setup():
    teacher = decoder.init_params(jax.random.key(0), SPEC, std=0.2)
    student = jax.tree.map(lambda x: x + 0.01, teacher)
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, SPEC.vocab_size)
    ones = jnp.ones_like(tokens)
    batch = {"tokens": tokens, "attention_mask": ones, "loss_mask": ones}
    loss_fn = train_step.make_loss_fn(SPEC, rules.default_rules(), LOSS)
    return student, teacher, batch, jax.value_and_grad(loss_fn, has_aux=True)


def _mesh_shape(kind, devices):
    n = len(devices)  # even (conftest); 8 on a CPU host: (2, 1, 4) and (1, 8, 1)
    if kind == "data_tensor":
        data = 2 if n >= 4 else 1
        return (data, 1, n // data)
    return (1, n, 1)


@pytest.fixture(scope="module")
def reference(mesh_devices):
    # On the first mesh device, so that both sides run on one platform (a GPU's float32 dots
    # are not the CPU's, even at the precision conftest pins).
    student, teacher, batch, grad_fn = _setup()
    args = jax.device_put((student, teacher, batch), mesh_devices[0])
    (loss, _), grads = jax.jit(grad_fn)(*args)
    return loss, grads


@pytest.mark.parametrize("kind", ["data_tensor", "fsdp"])
def test_sharded_step_equals_single_device(kind, reference, mesh_devices):
    mesh = sharding.make_mesh(*_mesh_shape(kind, mesh_devices), devices=mesh_devices)
    student, teacher, batch, grad_fn = _setup()
    param_sh = sharding.param_shardings(student, mesh)
    specs = [s.spec for s in jax.tree.leaves(param_sh)]
    assert any(any(axis is not None for axis in spec) for spec in specs)  # really sharded
    replicated = NamedSharding(mesh, PartitionSpec())
    fn = jax.jit(
        grad_fn,
        in_shardings=(param_sh, param_sh, sharding.batch_sharding(mesh)),
        out_shardings=((replicated, replicated), param_sh),
    )
    (loss, _), grads = fn(student, teacher, batch)
    ref_loss, ref_grads = reference
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_indivisible_axes_are_replicated(mesh_devices):
    n = len(mesh_devices)
    mesh = sharding.make_mesh(1, 1, n, devices=mesh_devices)
    rows = n + n // 2  # 12 rows do not split 8 ways
    shardings = sharding.param_shardings({"embed": {"tokens": jnp.zeros((rows, 32))}}, mesh)
    assert shardings["embed"]["tokens"].spec[0] is None


def test_bad_mesh_is_a_clear_error(mesh_devices):
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.make_mesh(2, 3, 1, devices=mesh_devices[:4])
