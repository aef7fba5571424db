"""Benchmarks for wtacrs: memory and speed, estimator variance, per-layer overhead. Run as ``python -m benchmarks.<study>``."""
