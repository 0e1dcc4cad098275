"""Triton kernels of kdfast, one module per op (installed as kdfast.kernels)."""
