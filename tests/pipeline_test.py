"""The pipelined QAT-TSLD loss and gradients equal the unpipelined single-device ones: 2 and 4
stages, alone and with data, fsdp and tensor parallelism, on conftest's `mesh_devices`."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tiny_models
import train_test
from jax.sharding import NamedSharding, PartitionSpec

from tsld_jax import sharding, train_step
from tsld_jax.models import decoder, pipeline
from tsld_jax.quant import rules

# Four layers (two or four stages), a batch of 8 (4 microbatches of 2 rows; one row per data x
# fsdp device), some left padding so that the per-microbatch masks and positions matter.
SPEC = tiny_models.llama_spec(
    vocab_size=64,
    hidden_size=16,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
    mlp_size=32,
    num_layers=4,
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "tsld_jax_test_jit")
LOSS = ml_collections.ConfigDict({"kind": "tsld", "temperature": 10.0, "chunk_size": 8})


def _setup():
    teacher = decoder.init_params(jax.random.key(0), SPEC, std=0.2)
    student = jax.tree.map(lambda x: x + 0.01, teacher)
    tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, SPEC.vocab_size)
    attention = jnp.ones_like(tokens).at[1, :3].set(0).at[6, :5].set(0)
    batch = {"tokens": tokens, "attention_mask": attention, "loss_mask": attention}
    return student, teacher, batch


def _grad_fn(pipe=None):
    loss_fn = train_step.make_loss_fn(
        SPEC, rules.default_rules(), LOSS, remat="dots", pipeline=pipe
    )
    return jax.value_and_grad(loss_fn, has_aux=True)


@pytest.fixture(scope="module")
def reference(mesh_devices):
    student, teacher, batch = _setup()
    args = jax.device_put((student, teacher, batch), mesh_devices[0])
    (loss, _), grads = jax.jit(_grad_fn())(*args)
    return loss, grads


def _check(loss, grads, reference):
    ref_loss, ref_grads = reference
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_schedule_on_one_device(reference, mesh_devices):
    # The schedule alone (no mesh, no ppermute): 4 stages of one layer, 4 microbatches.
    student, teacher, batch = _setup()
    args = jax.device_put((student, teacher, batch), mesh_devices[0])
    (loss, _), grads = jax.jit(_grad_fn(pipeline.Pipeline(4, 4)))(*args)
    _check(loss, grads, reference)


# (stage, data, fsdp, tensor)
MESHES = [(2, 1, 1, 1), (4, 1, 1, 1), (2, 2, 2, 1), (2, 1, 2, 2), (4, 1, 1, 2)]


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "stage{}_data{}_fsdp{}_tensor{}".format(*s))
def test_pipelined_step_equals_single_device(shape, reference, mesh_devices):
    stage, data, fsdp, tensor = shape
    if stage * data * fsdp * tensor > len(mesh_devices):
        pytest.skip(f"needs {stage * data * fsdp * tensor} devices")
    devices = mesh_devices[: stage * data * fsdp * tensor]
    mesh = sharding.make_mesh(data, fsdp, tensor, devices=devices, stage=stage)
    student, teacher, batch = _setup()
    param_sh = sharding.param_shardings(student, mesh)
    kernel = param_sh["layers"]["attn"]["q"]["kernel"].spec
    assert kernel[0] == "stage"  # the layers really are split over the stages
    replicated = NamedSharding(mesh, PartitionSpec())
    fn = jax.jit(
        _grad_fn(pipeline.Pipeline(stage, 2, mesh)),
        in_shardings=(param_sh, param_sh, sharding.batch_sharding(mesh)),
        out_shardings=((replicated, replicated), param_sh),
    )
    (loss, _), grads = fn(student, teacher, batch)
    _check(loss, grads, reference)


def _train_py(workdir, shared_data, devices, *flags):
    # train.py on the smoke config in a subprocess with `devices` fake CPU devices (keeping
    # conftest's scheduler flag: collectives on 2 cores deadlock under the concurrent one).
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
        "--xla_cpu_enable_concurrency_optimized_scheduler=false",
        "JAX_COMPILATION_CACHE_DIR": CACHE,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    command = train_test._command(
        workdir,
        shared_data,
        "--config.train.steps=3",
        "--config.checkpoint.every_steps=3",
        "--config.data.eval_blocks=1",
        *flags,
    )
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _losses(workdir):
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r["loss"] for r in records if "loss" in r]


def test_train_py_two_stages_matches_unpipelined(tmp_path, shared_data):
    plain = _train_py(tmp_path / "plain", shared_data, 1)
    piped = _train_py(
        tmp_path / "piped",
        shared_data,
        2,
        "--config.mesh.stage=2",
        "--config.train.microbatches=2",
    )
    for process in (plain, piped):
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    want, got = _losses(tmp_path / "plain"), _losses(tmp_path / "piped")
    assert len(want) == 3
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides, devices, message",
    [
        ({"mesh.stage": 0}, 8, "config.mesh.stage: must be >= 1"),
        ({"train.microbatches": 3}, 8, "config.train.microbatches: must divide"),
        ({"mesh.stage": 3}, 8, "config.mesh.stage: 3 stages do not divide"),
        ({"mesh.stage": 4}, 8, "config.mesh.stage: 4 stages do not divide model.random"),
        ({"mesh.stage": 2, "loss.kind": "l2l"}, 8, "config.loss.kind: l2l"),
        ({"mesh.stage": 2, "train.microbatches": 4}, 8, "config.train.microbatches: 4 micro"),
    ],
)
def test_pipeline_config_errors_name_the_field(overrides, devices, message):
    import importlib.util

    from tsld_jax import config_utils

    spec = importlib.util.spec_from_file_location(
        "smoke", os.path.join(ROOT, "configs", "smoke.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, ROOT)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(ROOT)
    cfg = module.get_config()
    for key, value in overrides.items():
        section, field = key.split(".")
        cfg[section][field] = value
    with pytest.raises(config_utils.ConfigError, match=message):
        config_utils.validate(cfg)
        config_utils.validate_mesh(cfg, devices)


def test_gemma_layer_pattern_pipelined_equals_unpipelined(mesh_devices):
    """Gemma 3's features through 2 stages: each stage gets its own layers' windows and RoPE
    bases (stage 0 two local layers, stage 1 a local and a global one, so a stage given the
    wrong slice would compute something else), q/k norms and post norms stage-sharded."""
    import dataclasses

    spec = dataclasses.replace(
        SPEC,
        family="gemma3",
        norm_offset=1.0,
        post_norms=True,
        qk_norm=True,
        activation="gelu_pytorch_tanh",
        attn_scale=0.3,
        embed_scale=4.0,
        rope_theta=1000.0,
        local_rope_theta=10.0,
        local_window=3,
        attention_layers=("local", "local", "local", "global"),
        tie_embeddings=True,
    )
    params = decoder.init_params(jax.random.key(3), spec, std=0.2)
    params = jax.tree.map(lambda x: x + 0.1, params)  # norms away from their unit values
    tokens = jax.random.randint(jax.random.key(4), (4, 12), 0, spec.vocab_size)
    mask = jnp.ones_like(tokens).at[1, :3].set(0)
    want = decoder.forward(params, tokens, spec, mask_BxT=mask)
    mesh = sharding.make_mesh(1, 1, 1, devices=mesh_devices[:2], stage=2)
    param_sh = sharding.param_shardings(params, mesh)
    assert param_sh["layers"]["attn"]["q_norm"]["scale"].spec[0] == "stage"
    assert param_sh["layers"]["post_mlp_norm"]["scale"].spec[0] == "stage"
    run = jax.jit(
        lambda p, t, m: decoder.forward(
            p, t, spec, mask_BxT=m, pipeline=pipeline.Pipeline(2, 2, mesh)
        ),
        in_shardings=(param_sh, None, None),
    )
    got = run(params, tokens, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
