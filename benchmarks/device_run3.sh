#!/usr/bin/env bash
# One device call: tuning variants of both attention kernels, the index-plumbing GPU tests and
# benchmark. Usage on the device: bash benchmarks/device_run3.sh (writes under $OUT).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 benchmarks/tune_sparse_attn.py --out "$OUT" 2>&1 | grep -E "TF/s|FAILED|H100" | tee "$OUT/tune.log"
timeout 240 python3 -m pytest -q -m gpu tests/ops/test_indices.py tests/test_chunk_cache.py -x 2>&1 | tail -15 | tee "$OUT/gpu_tests_indices.log"
timeout 120 python3 benchmarks/bench_indices.py --out "$OUT" 2>&1 | tail -20
