"""Pallas kernels, one file per op, each beside its pure-jnp `*_reference`."""

from pallas.quantized_matmul import quantized_matmul, quantized_matmul_reference

__all__ = ["quantized_matmul", "quantized_matmul_reference"]
