"""Eager references of every op (float64-capable), shared by tests and benchmarks."""
