"""Quantization: straight-through quantizers (QAT), rules, and packed weights (export)."""
