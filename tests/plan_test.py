"""`train.py --plan`: the deviceless memory plan, checked against a real CPU step."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from tsld_jax import config_utils, plan, recipe, sharding, train_step
from tsld_jax.models import decoder, named

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _config():
    cfg = smoke.get_config()
    cfg.model.random.hidden_size = 64
    cfg.model.random.mlp_size = 128
    cfg.model.teacher_dtype = "bfloat16"
    return cfg


def test_plan_matches_a_real_cpu_step():
    # The plan's argument parts must be exactly the bytes the real state and teacher hold, and
    # its total within 10% of the real step's: the real step is the trainer's jit over concrete
    # arrays (real weights, a real batch), compiled by the same XLA:CPU, so the two can differ
    # only where buffer assignment sees different inputs (committed arrays, donation of a real
    # buffer), which moves temporaries by a few buffers of the model's small size, never by
    # 10% of the total (measured: the totals agree to within 1%).
    cfg = _config()
    out = plan.plan(cfg, "cpu:1")
    p = out["plan"]
    assert p["fits"] and not p["error"] and out["alternatives"] == []

    spec = named.random_spec(cfg.model.random)
    params = decoder.init_params(jax.random.key(0), spec)
    rules = recipe.quant_rules(cfg)
    state, optimizer, _ = recipe.abstract_state(cfg, params, 1000)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices("cpu")[:1])
    shardings = sharding.state_shardings(state, optimizer, mesh)
    state = jax.jit(lambda p: train_step.init_state(p, optimizer, 0), out_shardings=shardings)(
        params
    )
    teacher_shardings = sharding.param_shardings(params, mesh)
    teacher = recipe.teacher_params(params, cfg, teacher_shardings)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    assert p["parameters"] == nbytes(state.params)
    assert p["optimizer_state"] == nbytes(state.opt_state)
    assert p["teacher"] == nbytes(teacher)

    step = jax.jit(
        train_step.make_train_step(spec, rules, cfg.loss, optimizer, 1, jnp.float32, "dots"),
        in_shardings=(shardings, sharding.batch_sharding(mesh), teacher_shardings),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )
    tokens = np.random.default_rng(0).integers(0, 256, (4, 32), dtype=np.int32)
    batch = {"tokens": tokens, "attention_mask": np.ones_like(tokens)}
    batch["loss_mask"] = np.ones_like(tokens)
    compiled = step.lower(state, batch, teacher).compile()
    stats = compiled.memory_analysis()
    real = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
        + stats.generated_code_size_in_bytes
    )
    assert abs(p["total"] - real) <= 0.10 * real, (p["total"], real)
    _, metrics = compiled(state, batch, teacher)  # and the real step runs
    assert np.isfinite(float(metrics["loss"]))


def _total(compiled) -> int:
    stats = compiled.memory_analysis()
    return (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
        + stats.generated_code_size_in_bytes
    )


def test_pipelined_plan_is_the_pipelined_step():
    # mesh.stage=2 and train.microbatches=2 on two fake CPU devices. The reference is the
    # pipelined step jitted by hand (make_train_step with a decoder.Pipeline, the trainer's
    # shardings spelled out): the plan must be of that program, byte for byte, and its
    # parameters must be what one stage holds (the layers halved), not the unpipelined step's.
    cfg = _config()
    cfg.mesh.stage = 2
    cfg.train.microbatches = 2
    out = plan.plan(cfg, "cpu:2")
    p = out["plan"]
    assert not p["error"], p["error"]
    assert (p["stages"], p["microbatches"], p["mesh"]) == (
        2,
        2,
        {"data": 1, "fsdp": 1, "tensor": 1},
    )
    assert "mesh stage=2 x data=1 x fsdp=1 x tensor=1" in plan.format_plan(out)
    assert "2 microbatches" in plan.format_plan(out)

    spec = named.random_spec(cfg.model.random)
    params = jax.eval_shape(lambda: decoder.init_params(jax.random.key(0), spec))
    rules = recipe.quant_rules(cfg)
    state, optimizer, _ = recipe.abstract_state(cfg, params, 1000)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices("cpu")[:2], stage=2)
    shardings = sharding.state_shardings(state, optimizer, mesh)
    teacher_shardings = sharding.param_shardings(params, mesh)
    batch_sharding = sharding.batch_sharding(mesh)

    def compiled_step(pipeline):
        step = jax.jit(
            train_step.make_train_step(
                spec, rules, cfg.loss, optimizer, 1, jnp.float32, "dots", pipeline
            ),
            in_shardings=(shardings, batch_sharding, teacher_shardings),
            out_shardings=(shardings, None),
            donate_argnums=(0,),
        )
        place = lambda tree, s, dtype=None: jax.tree.map(  # noqa: E731
            lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=s), tree, s
        )
        batch = {
            k: jax.ShapeDtypeStruct((4, 32), jnp.int32, sharding=batch_sharding)
            for k in ("tokens", "attention_mask", "loss_mask")
        }
        teacher = place(params, teacher_shardings, jnp.bfloat16)
        return step.lower(place(state, shardings), batch, teacher).compile()

    pipelined = _total(compiled_step(decoder.Pipeline(2, 2, mesh)))
    assert p["total"] == pipelined, (p["total"], pipelined)
    assert _total(compiled_step(None)) != pipelined  # the unpipelined step is another program

    # One stage's parameters: half of every stacked layer, all of the rest (numpy's count).
    layers = sum(np.prod(a.shape) * 4 for a in jax.tree.leaves(params["layers"]))
    rest = sum(np.prod(a.shape) * 4 for k, v in params.items() if k != "layers"
               for a in jax.tree.leaves(v))  # fmt: skip
    assert layers % 2 == 0 and p["parameters"] == layers // 2 + rest


def test_plan_suggests_what_fits():
    # A mesh that cannot split the batch (4 rows over 8 data devices) does not compile; the plan
    # then tries meshes that do, and says which one fits.
    cfg = _config()
    out = plan.plan(cfg, "cpu:8")
    assert "data.batch_size" in out["plan"]["error"]
    assert out["alternatives"] and out["alternatives"][-1]["fits"]
    assert "fits with: --config.mesh.data=" in plan.format_plan(out)


@pytest.mark.parametrize(
    "target, message",
    [
        ("tpu:8", "unknown target 'tpu'"),
        ("h200", "needs a device count"),
        ("a100-40gb:x", "needs a device count"),
    ],
)
def test_bad_target_is_one_line(target, message):
    with pytest.raises(config_utils.ConfigError, match=message):
        plan.parse_target(target)


def test_tpu_target_without_libtpu_is_one_line():
    # jax finding no libtpu (here: told so, whether or not this venv has it) -> PluginMissing,
    # one line with the pip command.
    code = (
        "from jax._src import xla_bridge; xla_bridge.get_tpu_library_path = lambda: None\n"
        "from tsld_jax import aot\n"
        "try:\n    aot.tpu_devices('v5e:8')\n"
        "except aot.PluginMissing as error:\n    print(error)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(run.stdout.strip().splitlines()) == 1
    assert f"pip install 'jax[tpu]=={jax.__version__}'" in run.stdout


def test_cli_plan_writes_json(tmp_path):
    path = tmp_path / "plan.json"
    run = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/smoke.py", "--plan", "cpu:2"]
        + ["--config.data.batch_size=2", "--plan-json", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "plan for random on cpu:2" in run.stdout and "fits" in run.stdout
    assert json.loads(path.read_text())["plan"]["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
    bad = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/smoke.py", "--plan", "tpu:1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --plan")


def test_paper_rows_plan_offline_from_their_recorded_architecture(monkeypatch):
    """--plan reads only the architecture (configs/paper.HF_CONFIGS): a hub id needs no network,
    while a training run of the same config still refuses an unreachable model in one line."""
    from configs import paper

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = paper.config("llama3.2_1b", "tsld", "1xh100")
    with pytest.raises(config_utils.ConfigError, match="HF_HUB_OFFLINE is set"):
        config_utils.validate(cfg)
    config_utils.validate(cfg, weights=False)
    spec = plan.model_spec(cfg)
    assert (spec.family, spec.rope_type, spec.rope_factor) == ("llama", "llama3", 32.0)
