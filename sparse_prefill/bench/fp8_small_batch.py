"""Small batches through ``paged_fp8_sparse_attn_fwd``: both kernels' cost per call on the GPU
and on the host, from one query up to ANCHORS.md's s_q 4096 (V4, page size 64, top-k unique ids
into 8192 compressed tokens plus 128 window ids, attn_sink on, value checks off).

    python -m sparse_prefill.bench.fp8_small_batch

"GPU": median of ``triton.testing.do_bench``; "host": wall time per call of 200 calls queued back
to back (the public wrapper's checks and the launch). Table in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import sys
import time

import torch

from sparse_prefill import KVCacheLayout, value_checks
from sparse_prefill.bench.common import refuse_without_cuda
from sparse_prefill.bench.sparse_attn import PAGE_SIZE, bench_us, new_outputs, random_bf16, unique_indices, window_ids
from sparse_prefill.ops.cache import quantize_k_cache
from sparse_prefill.ops.fp8_sparse_attn import paged_fp8_sparse_attn_fwd

V4 = KVCacheLayout.V4
SHAPES = ((64, 512), (128, 1024))
QUERIES = (1, 4, 16, 64, 128, 256, 512, 1024, 4096)
HOST_CALLS = 200


def main() -> int:
    if refuse_without_cuda("bench.fp8_small_batch"):
        return 2
    print("| h_q | s_q | Triton kernel GPU us | host us/call | Gluon kernel GPU us | host us/call |")
    print("| --- | --- | --- | --- | --- | --- |")
    for h_q, topk in SHAPES:
        comp = quantize_k_cache(random_bf16(8192 // PAGE_SIZE, PAGE_SIZE, 1, 512), V4, impl="reference")
        for s_q in QUERIES:
            q = random_bf16(s_q, h_q, 512)
            ids = unique_indices(s_q, 8192, topk)
            swa_ids, swa_pages = window_ids(s_q, PAGE_SIZE)
            swa = quantize_k_cache(random_bf16(swa_pages, PAGE_SIZE, 1, 512), V4, impl="reference")
            sink = torch.randn(h_q, device="cuda")
            out = new_outputs(s_q, h_q)[0]
            cells = []
            for impl in ("triton", "gluon"):
                def call(impl=impl):
                    paged_fp8_sparse_attn_fwd(q, comp, ids, PAGE_SIZE, 512**-0.5, extra_cache=swa,
                                              extra_indices=swa_ids, extra_page_size=PAGE_SIZE, attn_sink=sink,
                                              out=out, impl=impl)
                with value_checks(False):
                    call()
                    torch.cuda.synchronize()
                    gpu = bench_us(call)
                    start = time.perf_counter()
                    for _ in range(HOST_CALLS):
                        call()
                    host = (time.perf_counter() - start) / HOST_CALLS * 1e6
                    torch.cuda.synchronize()
                cells += [f"{gpu:.0f}", f"{host:.0f}"]
            print(f"| {h_q} | {s_q} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
