"""Benchmarks of the SaS runtime at op, layer and model level against eager, compiled and PEFT baselines.

``python -m bench`` runs them (``--help`` for flags), ``python -m bench.plot`` draws the
committed results, ``pytest bench/ --benchmark-json=...`` runs the same cases under
pytest-benchmark.
"""
