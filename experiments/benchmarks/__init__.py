"""Benchmark scripts; each writes JSON (and Markdown) under ``experiments/benchmarks/results/``."""
