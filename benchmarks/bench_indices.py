"""Moved to ``sparse_prefill.bench.indices``; this keeps ``python benchmarks/bench_indices.py`` working."""
import runpy

runpy.run_module("sparse_prefill.bench.indices", run_name="__main__")
