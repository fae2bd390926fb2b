"""tsld-jax: ternary QAT with Token-Scaled Logit Distillation, in JAX."""

__version__ = "0.1.0"
