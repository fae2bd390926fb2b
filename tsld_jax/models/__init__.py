"""Decoder models: specs, the single decoder, and checkpoint import/export."""

from tsld_jax.models.decoder import forward, init_params, linear
from tsld_jax.models.errors import LoadError
from tsld_jax.models.hf import save_hf
from tsld_jax.models.loading import LoadedModel, load_model
from tsld_jax.models.spec import ConfigError, ModelSpec, spec_from_hf_config

__all__ = [
    "ConfigError",
    "LoadError",
    "LoadedModel",
    "ModelSpec",
    "forward",
    "init_params",
    "linear",
    "load_model",
    "save_hf",
    "spec_from_hf_config",
]
