"""Moved to ``sparse_prefill.bench.sparse_attn``; this keeps ``python benchmarks/bench_sparse_attn.py`` working."""
import runpy

runpy.run_module("sparse_prefill.bench.sparse_attn", run_name="__main__")
