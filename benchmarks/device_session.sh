#!/usr/bin/env bash
# One device call: FlashMLA from .anchors/ (carried), then the steps named in $STEPS
# (tests | bench | ncu | suite | backend<chunk>), each under a time limit so a hung kernel cannot eat the lease.
set -u
mkdir -p /tmp/fm && tar xzf .anchors/flash_mla-*.tgz -C /tmp/fm
export PYTHONPATH=.:/tmp/fm PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
python3 -c "import torch, triton, flash_mla; print(torch.__version__, triton.__version__, flash_mla.__file__)"
for step in ${STEPS:-tests bench}; do
  case $step in
    tests) timeout "${TEST_S:-240}" python3 -m pytest -x -q -p no:cacheprovider -m gpu tests/ops/test_sparse_attn.py \
             -k "${TEST_K:-gluon}" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    bench) timeout "${BENCH_S:-300}" python3 -m sparse_prefill.bench.sparse_attn --op sparse --out "$OUT" \
             ${BENCH_ARGS:-} 2>&1 | tail -40 ;;
    backend*) chunks=${step#backend}; mkdir -p "$OUT/b$chunks"
             timeout "${BACKEND_S:-420}" python3 -m sparse_prefill.bench.backend --chunks "$chunks" --out "$OUT/b$chunks" \
             2>&1 | tail -45 ;;
    suite) timeout "${SUITE_S:-500}" python3 -m pytest -q -p no:cacheprovider -n "${XDIST:-8}" -m gpu ${SUITE_PATHS:-tests} 2>&1 \
             | tee "$OUT/gpu_suite.log" | tail -30 ;;
    ncu) for k in ${NCU_KERNELS:-gluon flash_mla}; do
           name=$([ "$k" = flash_mla ] && echo sparse_attn_fwd_kernel || echo _sparse_attn_ws_kernel)
           timeout 200 ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
             --section WarpStateStats --section SchedulerStats --section SourceCounters -k "regex:$name" \
             --launch-skip 1 --launch-count 1 python3 benchmarks/profile_sparse_attn.py --kernel "$k" \
             ${NCU_ARGS:-} > "$OUT/ncu_$k.txt" 2>&1; grep -E "Duration|Throughput|Stall|Warp Cycles|Hit Rate|Issued|Eligible|Bank" "$OUT/ncu_$k.txt" | head -40
         done ;;
  esac
done
