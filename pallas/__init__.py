"""Pallas kernels, one module per op, each beside its pure-jnp `*_reference`.

Import the op's module (`from pallas import quantized_matmul`); the package re-exports no
function, so that a function never hides the module of the same name.
"""
