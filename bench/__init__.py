"""Benchmarks: the pack measured side by side with its references, reported as ratios.

Run everything with `python -m bench.run [--quick]` from the repository root (see bench/README.md).
Shared timing, memory and output helpers live in `bench.common`.
"""
