"""The warp-specialized Gluon FP8 kernel (``fp8_ws_gluon.py``, an experiment outside the library) against the Triton
one, in one device call: correctness on edge cases against the PyTorch reference, then time on
ANCHORS.md's four regular-path rows (s_q 4096, V4, page size 64, attn_sink on).

    PYTHONPATH=. python -m benchmarks.experiments.fp8_ws_probe [--quick] [--out DIR]

FLOPs as ANCHORS.md counts them: 2 * s_q * (topk + 128) * h_q * 1024.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from sparse_prefill.bench.sparse_attn import FP8_ROWS, PAGE_SIZE, WINDOW, bench_us, new_outputs, random_bf16, unique_indices, window_ids
from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops.cache import quantize_k_cache
from benchmarks.experiments.fp8_ws_gluon import paged_fp8_sparse_attn_gluon
from sparse_prefill.ops.fp8_sparse_attn.kernel import paged_fp8_sparse_attn_triton
from sparse_prefill.ops.fp8_sparse_attn.naive import paged_fp8_sparse_attn_fwd_naive

V4 = KVCacheLayout.V4


def poisoned(s_q, h_q):
    out, mx, lse = new_outputs(s_q, h_q)
    out.fill_(float("nan")), mx.fill_(float("nan")), lse.fill_(float("nan"))
    return out, mx, lse


def check_case(name, s_q, h_q, topk, n_comp, page, xtopk, with_len, invalid, sink_on):
    torch.manual_seed(hash(name) % 1000)
    q = random_bf16(s_q, h_q, 512)
    cache = quantize_k_cache(random_bf16(-(-n_comp // page), page, 1, 512), V4, impl="reference")
    cap = cache.shape[0] * page
    idx = torch.randint(0, cap, (s_q, topk), device="cuda", dtype=torch.int32)
    if invalid:
        idx[torch.rand(s_q, topk, device="cuda") < 0.2] = -1
        idx[torch.rand(s_q, topk, device="cuda") < 0.1] = cap + 5
    extra = {}
    if xtopk:
        xcache = quantize_k_cache(random_bf16(7, page, 1, 512), V4, impl="reference")
        xidx = torch.randint(0, 7 * page, (s_q, xtopk), device="cuda", dtype=torch.int32)
        extra = dict(extra_cache=xcache, extra_indices=xidx, extra_page_size=page)
    lens = {}
    if with_len:
        lens["topk_length"] = torch.randint(0, topk + 1, (s_q,), device="cuda", dtype=torch.int32)
        lens["topk_length"][0] = 0
        if xtopk:
            lens["extra_topk_length"] = torch.randint(0, xtopk + 1, (s_q,), device="cuda", dtype=torch.int32)
            lens["extra_topk_length"][0] = 0
    sink = torch.randn(h_q, device="cuda") if sink_on else None
    scale = 512**-0.5
    ref = paged_fp8_sparse_attn_fwd_naive(q, cache, idx, page, scale, attn_sink=sink, layout=V4, **extra, **lens)
    outs = poisoned(s_q, h_q)
    paged_fp8_sparse_attn_gluon(q, cache, idx, page, extra.get("extra_cache"), extra.get("extra_indices"),
                                extra.get("extra_page_size"), lens.get("topk_length"), lens.get("extra_topk_length"),
                                scale, sink, *outs)
    torch.cuda.synchronize()
    err_o = (outs[0].float() - ref[0].float()).abs().max().item()
    same_ml = torch.equal(torch.isinf(outs[1]), torch.isinf(ref[1])) and torch.equal(torch.isinf(outs[2]), torch.isinf(ref[2]))
    fin = torch.isfinite(ref[2])
    err_l = (outs[2][fin] - ref[2][fin]).abs().max().item() if fin.any() else 0.0
    err_m = (outs[1][fin] - ref[1][fin]).abs().max().item() if fin.any() else 0.0
    ok = err_o < 2e-2 and err_l < 1e-3 and err_m < 1e-3 and same_ml and not outs[0].isnan().any().item()
    print(f"check {name}: {'OK' if ok else 'FAIL'} err out {err_o:.2e} lse {err_l:.2e} max {err_m:.2e} inf-pattern {same_ml}", flush=True)
    return ok


CASES = [
    # name, s_q, h_q, topk, n_comp, page, xtopk, with_len, invalid, sink
    ("h64 basic", 37, 64, 512, 4096, 64, 128, False, False, True),
    ("h128 lens invalid", 33, 128, 1024, 8192, 64, 128, True, True, True),
    ("h16 odd topk no extra", 19, 16, 100, 1000, 64, 0, False, True, False),
    ("h100 page 3 odd", 11, 100, 77, 300, 3, 50, True, True, True),
    ("h1 topk 1", 5, 1, 1, 64, 64, 0, False, False, True),
    ("h128 page 1", 9, 128, 130, 200, 1, 65, True, False, False),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    t0 = time.time()
    ok = all([check_case(*c) for c in CASES])
    rows = []
    print("| kernel | h_q | topk + W | compressed tokens | us | TFLOP/s | FlashMLA regular us | ratio | max diff vs Triton |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for h_q, topk, n_comp, regular_us, _ in (FP8_ROWS[:1] if args.quick else FP8_ROWS):
        q = random_bf16(4096, h_q, 512)
        comp_ids = unique_indices(4096, n_comp, topk)
        swa_ids, swa_pages = window_ids(4096, PAGE_SIZE)
        comp, swa = (quantize_k_cache(random_bf16(n, PAGE_SIZE, 1, 512), V4, impl="reference")
                     for n in (n_comp // PAGE_SIZE, swa_pages))
        sink = torch.randn(h_q, device="cuda")
        flops = 2 * 4096 * (topk + WINDOW) * h_q * 1024
        results = {}
        for name, launch in (("triton", lambda o: paged_fp8_sparse_attn_triton(
                q, comp, comp_ids, PAGE_SIZE, swa, swa_ids, PAGE_SIZE, None, None, 512**-0.5, sink, V4, 512, *o)),
                             ("gluon", lambda o: paged_fp8_sparse_attn_gluon(
                q, comp, comp_ids, PAGE_SIZE, swa, swa_ids, PAGE_SIZE, None, None, 512**-0.5, sink, *o))):
            o = poisoned(4096, h_q)
            launch(o)
            results[name] = (o, bench_us(lambda: launch(o)))
        diff = (results["gluon"][0][0].float() - results["triton"][0][0].float()).abs().max().item()
        for name, (o, us) in results.items():
            tf = flops / us / 1e6
            print(f"| {name} | {h_q} | {topk} + {WINDOW} | {n_comp} | {us:.0f} | {tf:.0f} | {regular_us} | {regular_us / us:.2f} | {diff:.1e} |", flush=True)
            rows.append(dict(kernel=name, h_q=h_q, topk=topk, n_comp=n_comp, us=us, tflops=tf, anchor_us=regular_us, diff=diff))
    print(f"all checks {'passed' if ok else 'FAILED'}; {time.time() - t0:.0f} s")
    if args.out:
        with open(f"{args.out}/fp8_ws_probe.json", "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows, checks_ok=ok), f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
