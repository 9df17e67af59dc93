"""Moved to ``sparse_prefill.bench.cache``; this keeps ``python benchmarks/bench_cache.py`` working."""
import runpy

runpy.run_module("sparse_prefill.bench.cache", run_name="__main__")
