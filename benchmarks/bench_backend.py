"""Moved to ``sparse_prefill.bench.backend``; this keeps ``python benchmarks/bench_backend.py`` working."""
import runpy

runpy.run_module("sparse_prefill.bench.backend", run_name="__main__")
