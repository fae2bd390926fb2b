"""Quantization: straight-through quantizers (QAT), rules, and packed weights (export)."""

# One re-export per line (`name as name` marks it public for ruff), so additions merge cleanly.
from tsld_jax.quant.qtensor import PackedWeight as PackedWeight
from tsld_jax.quant.qtensor import pack as pack
from tsld_jax.quant.qtensor import unpack as unpack
from tsld_jax.quant.quantizers import QuantSpec as QuantSpec
from tsld_jax.quant.quantizers import fake_quantize as fake_quantize
from tsld_jax.quant.quantizers import scale_shape as scale_shape
from tsld_jax.quant.rules import add_learned_scales as add_learned_scales
from tsld_jax.quant.rules import default_rules as default_rules
from tsld_jax.quant.rules import make_quantizer as make_quantizer
from tsld_jax.quant.rules import match as match
from tsld_jax.quant.rules import match_rules as match_rules
from tsld_jax.quant.rules import preset_rules as preset_rules
from tsld_jax.quant.rules import quantize_params as quantize_params
from tsld_jax.quant.rules import resolve as resolve
