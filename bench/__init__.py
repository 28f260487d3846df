"""Benchmarks on SmolLM2-135M; run each from the repository root as `python -m bench.NAME` (see bench/common.py)."""
