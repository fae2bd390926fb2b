"""The train step compiles for Cloud TPUs (v5e, v6e) without one, and --plan plans TPU slices.

Deviceless AOT through libtpu's XLA:TPU (`tsld_jax.aot`, ../shared/TPU.md): SmolLM2-135M's
real shapes from abstract parameters on one v5e and one v6e chip, and a paper row (OPT-125M,
QAT-TSLD, batch 4 x 512) planned by `plan.plan` on v6e-8 (the configs' `v6e-8` mesh, fsdp=4 x
tensor=2: the sharded program). The three compiles run in one module fixture, two at a time
(XLA compiles without holding the GIL), and the tests read the results; the paper row is not
also planned for v5e, to keep the module within CI's time (a fourth compile of about a minute
of one core), and the v5e slice path is covered by test_plan_of_too_big_a_program_does_not_fit.
Needs libtpu (`make test` installs it).
"""

import concurrent.futures
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import paper, smoke
from tsld_jax import aot, plan

if importlib.util.find_spec("libtpu") is None:
    pytest.skip(f"needs libtpu: pip install 'jax[tpu]=={jax.__version__}'", allow_module_level=True)

pytestmark = [
    pytest.mark.slow,
    # The persistent cache holds TPU executables it cannot load without a TPU; jax then
    # recompiles (as for the deviceless GPU compiles, aot.compile_programs).
    pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry"),
]

ROOT = pathlib.Path(__file__).resolve().parents[1]
GIB = 1024**3
SPEC = aot.SMOLLM2_135M
SMOLLM2_PARAMS = 134_515_008  # 30 layers of 576/1536 (q 576x576, k/v 576x192) + 49152x576


@pytest.fixture(scope="module")
def results():
    """("smollm2", chip) -> (compiled, memory); ("paper", chip) -> plan.plan's answer."""
    jobs = {}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for chip in ("v5e", "v6e"):
            program = aot.train_step_program(SPEC, aot.tpu_mesh(f"{chip}:1"))
            jobs["smollm2", chip] = pool.submit(aot.compile_program, program)
        jobs["paper", "v6e"] = pool.submit(
            plan.plan, paper.config("opt0.1b", "tsld", "v6e-8"), "v6e-8"
        )
        return {key: job.result() for key, job in jobs.items()}


@pytest.mark.parametrize(
    ("name", "topology", "devices", "kind"),
    [
        ("v5e:8", "v5e:2x4", 8, "TPU v5 lite"),
        ("v5e:1", "v5e:2x2", 1, "TPU v5 lite"),
        ("v6e-8", "v6e:2x4", 8, "TPU v6 lite"),
        ("v6e:16", "v6e:4x4", 16, "TPU v6 lite"),
        ("v5p-8", "v5p:2x2x1", 4, "TPU v5"),  # Cloud counts v5p's TensorCores: 2 a chip
        ("v5p:8", "v5p:2x2x2", 8, "TPU v5"),
        ("v5p:32", "v5p:2x4x4", 32, "TPU v5"),
        ("v4:8", "v4:2x2x1", 8, "TPU v4"),  # one device a TensorCore, 4 chips
    ],
)
def test_slices(name, topology, devices, kind):
    target, asked, count = aot.parse_tpu_slice(name)
    assert (asked, count) == (topology, devices)
    found = aot.tpu_devices(name)
    assert len(found) == devices and {d.device_kind for d in found} == {target.device_kind}
    assert target.device_kind == kind
    assert plan.parse_target(name) == plan.Target(target.name, devices, name)


@pytest.mark.parametrize("name", ["v5e:12", "v5p:2x4", "v7:8", "v6e:0"])
def test_bad_slice_is_one_line(name):
    with pytest.raises(ValueError, match=r"^[^\n]+$"):
        aot.parse_tpu_slice(name)


@pytest.mark.parametrize("chip", sorted(aot.TPU_TARGETS))
def test_usable_memory_is_the_compilers_own_limit(chip):
    # XLA:TPU refuses a program over the HBM it makes available and says how much that is: the
    # independent reference for TpuTarget.usable_memory_size (to its two printed decimals).
    target = aot.TPU_TARGETS[chip]
    mesh = jax.sharding.Mesh(aot.tpu_devices(f"{chip}:{target.devices_per_chip}")[:1], ("d",))
    x = jax.ShapeDtypeStruct(
        (1024, 1024),
        np.float32,
        sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
    )
    too_big = jax.jit(lambda x: np.float32(2) * jax.numpy.tile(x, (32 * 1024, 1)))  # 128 GiB
    with pytest.raises(Exception, match="exceeds available HBM") as error:
        too_big.lower(x).compile()
    available = float(re.search(r"available HBM \(([\d.]+)G\)", str(error.value)).group(1))
    assert target.usable_memory_size / GIB == pytest.approx(available, abs=0.005)
    assert available < target.device_memory_size / GIB < available + 1


def test_plan_of_too_big_a_program_does_not_fit():
    # A tiny model whose batch (64 x 2048 tokens over a 32k vocabulary: 16 GiB of float32
    # logits a copy) overflows one v5e chip: XLA:TPU refuses it, and the plan says so.
    cfg = smoke.get_config()
    cfg.model.random.vocab_size = 32768
    cfg.data.batch_size, cfg.data.block_size = 64, 2048
    cfg.data.generated_sequences = 64
    out = plan.plan(cfg, "v5e:1", max_alternatives=0)
    assert not out["plan"]["fits"] and "HBM" in out["plan"]["error"]
    assert out["usable_gib"] == pytest.approx(15.75) and out["device_memory_gib"] == 16


@pytest.mark.parametrize("chip", ["v5e", "v6e"])
def test_smollm2_step_compiles(results, chip):
    _, memory = results["smollm2", chip]
    # Latent f32 weights and two AdamW moments (donated), and the f32 teacher; XLA:TPU lays
    # each array out in tiles of 128 lanes, so the 576-wide matrices take 640 columns in HBM
    # (2.2% more for SmolLM2: 2.1996 GB of arguments against 2.1522 GB unpadded).
    state = 3 * 4 * SMOLLM2_PARAMS
    assert memory.arguments == pytest.approx(state + 4 * SMOLLM2_PARAMS, rel=0.03)
    assert memory.aliased == pytest.approx(state, rel=0.03)
    assert 0 < memory.temporaries < 8 * GIB
    assert memory.total <= aot.TPU_TARGETS[chip].usable_memory_size


def test_paper_row_plans(results):
    out = results["paper", "v6e"]
    p = out["plan"]
    assert not p["error"] and p["fits"] and out["alternatives"] == []
    devices = plan.parse_target(out["target"]).count
    # OPT-125M's parameters (tied head) sharded over every device: fsdp=4 x tensor=2.
    params = 125_239_296
    assert p["parameters"] == pytest.approx(4 * params / devices, rel=0.02)
    assert p["optimizer_state"] == pytest.approx(2 * p["parameters"], rel=0.01)
    assert p["teacher"] == p["parameters"]
    assert 0 < p["activations_and_temporaries"] < p["total"] <= out["usable_gib"] * GIB
    assert p["compile_seconds"] > 0


def test_cli_plan_for_a_tpu_is_quiet():
    # libtpu writes warnings to stderr when it loads; train.py --plan keeps them out (and
    # tsld_jax names the CPU as jax's backend where no TPU or GPU is attached).
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    run = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/smoke.py", "--plan", "v5e:1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and run.stderr == "", run.stderr[-2000:]
    assert run.stdout.startswith("plan for random on v5e:1 (batch 4 x 32; per device; usable 15.8")
    assert run.stdout.rstrip().endswith("-> fits")
