#!/usr/bin/env bash
# One device call: attention kernel variants (lazy rescale, FP8 tile loader), cache GPU tests and
# the cache benchmark. Writes under $OUT.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 200 python3 benchmarks/tune_sparse_attn.py --out "$OUT" 2>&1 | grep -E "TF/s|FAILED|H100" | tee "$OUT/tune.log"
timeout 120 python3 -m pytest -q -m gpu tests/ops/test_cache.py -x 2>&1 | tail -5 | tee "$OUT/gpu_tests_cache.log"
timeout 150 python3 benchmarks/bench_cache.py --sweep --out "$OUT" 2>&1 | tail -40
