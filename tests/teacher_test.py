"""The teacher: sharded like the student, passed with explicit shardings, optionally in bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import llama_spec

from tsld_jax import aot, qat, recipe, sharding
from tsld_jax.models import decoder
from tsld_jax.quant import rules as rules_lib

SPEC = llama_spec(
    vocab_size=256,
    hidden_size=64,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    mlp_size=128,
)
# The bf16 teacher's relative change of the TSLD loss: 3x the largest change bench/tolerances.py
# measured over seeds 0-5 (docs/tolerances.md). The change spreads over two decades between
# seeds, and another backend's bf16 matmuls accumulate in another order, hence the margin; the
# first-order rounding bound, (4L + 2) x 2^-8 = 0.07 for L = 4 (every rounding on the teacher's
# path to its logits adds at most the unit roundoff), is 200 times what bf16 does here and would
# let through a teacher rounded far more coarsely.
BF16_TEACHER_BOUND = 1e-3


def bf16_teacher_change(seed):
    """(relative change of the TSLD loss, the f32 teacher's parts, the bf16 teacher's parts)."""
    teacher = decoder.init_params(jax.random.key(seed), SPEC, std=0.2)
    student = jax.tree.map(
        lambda x: x + 0.01 * jax.random.normal(jax.random.key(seed + 9), x.shape), teacher
    )
    batch = {"tokens": jax.random.randint(jax.random.key(seed + 1), (4, 64), 0, 256)}
    cfg = type("C", (), {})()
    cfg.model = type("M", (), {"teacher_dtype": "bfloat16"})()
    teacher16 = recipe.teacher_params(teacher, cfg)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(teacher16))

    def loss(t):
        return qat.qat_loss(student, t, batch, SPEC, rules_lib.default_rules(), "tsld")

    (l32, p32), (l16, p16) = loss(teacher), loss(teacher16)
    return abs(float(l16) - float(l32)) / abs(float(l32)), p32, p16


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_teacher_changes_tsld_loss_within_the_measured_bound(seed):
    relative, p32, p16 = bf16_teacher_change(seed)
    assert relative <= BF16_TEACHER_BOUND
    assert float(p16["gt"]) == float(p32["gt"])  # the student's own term does not move
    assert float(p16["tsld"]) != float(p32["tsld"])  # bf16 did reach the teacher's forward


def test_teacher_sharded_over_fsdp(mesh_devices):
    # The trainer's step with 8-way fsdp: the teacher arrives with the student's shardings, in
    # bf16, and every device holds 1/8 of each of its kernels (in_shardings=None used to take
    # it whole on every device).
    mesh = sharding.make_mesh(1, 8, 1, devices=mesh_devices[:8])
    params = decoder.init_params(jax.random.key(0), SPEC)
    shardings = sharding.param_shardings(params, mesh)
    cfg = type("C", (), {})()
    cfg.model = type("M", (), {"teacher_dtype": "bfloat16"})()
    placed = recipe.teacher_params(params, cfg, shardings)
    kernel = placed["layers"]["mlp"]["up"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    # Layers map to the pipeline's "stage" axis (size 1 here: not split).
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("stage", "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (4, 64 // 8, 128)
    np.testing.assert_array_equal(
        np.asarray(kernel, np.float32),
        np.asarray(params["layers"]["mlp"]["up"]["kernel"].astype(jnp.bfloat16), np.float32),
    )

    program = aot.train_step_program(SPEC, mesh, batch_size=8, length=32, teacher_dtype="bfloat16")
    compiled, memory = aot.compile_program(program)
    teacher_in = compiled.input_shardings[0][2]
    assert teacher_in["layers"]["mlp"]["up"]["kernel"].spec == kernel.sharding.spec
    # The teacher's share of the arguments is 1/8 of its bf16 bytes (plus replicated norms).
    per_device = sum(
        np.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
        for a, s in zip(jax.tree.leaves(program.args[2]), jax.tree.leaves(teacher_in), strict=True)
    )
    whole = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(program.args[2]))
    assert per_device < whole / 6
    compiled(
        *jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype, device=a.sharding), program.args)
    )  # runs on the 8 fake devices


def test_teacher_dtype_is_validated_and_not_resumable():
    from configs import base
    from tsld_jax import checkpoint, config_utils

    cfg = base.get_config()
    cfg.model.teacher_dtype = "float16"
    with pytest.raises(config_utils.ConfigError, match="model.teacher_dtype"):
        config_utils.validate(cfg)
    new = base.get_config().to_dict()
    old = base.get_config().to_dict()
    del old["model"]["teacher_dtype"]  # a run from before the field existed ran in float32
    assert checkpoint.config_changes(old, new) == ([], [])
    new["model"]["teacher_dtype"] = "bfloat16"
    identity, _ = checkpoint.config_changes(old, new)
    assert [name for name, *_ in identity] == ["model.teacher_dtype"]
