"""Compare launch variants of the sparse attention kernel on one GPU in one call.

    python -m sparse_prefill.bench.tune_sparse_attn [--quick] [--out DIR]

For each variant and shape: check against a float32 torch reference on a few rows, then time
with triton.testing.do_bench (median) and print TFLOP/s, registers and spills; the fused FP8
kernel likewise on ANCHORS.md's regular-path rows. ``--out``: the JSON of every row and each
variant's TTGIR (which warp layout the compiler gave each dot). Each study's variants and
results are in benchmarks/NOTES.md; edit ``VARIANTS`` for the next one.
FLOPs as FlashMLA counts them: 2 * s_q * topk * h_q * (d_qk + d_v).
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton

from sparse_prefill.bench.common import refuse_without_cuda, write_json
from sparse_prefill.bench.sparse_attn import FP8_ROWS, SPARSE_ROWS
from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops.cache import quantize_k_cache
from sparse_prefill.ops.fp8_sparse_attn import kernel as F
from sparse_prefill.ops.sparse_attn import kernel as K

# d_qk, h_q, topk, s_kv, FlashMLA us: a spread of bench.sparse_attn's ANCHORS rows
SHAPES = [SPARSE_ROWS[i] for i in (0, 2, 3, 4, 5, 7)]
BASE = dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, NUM_STAGES=2)
VARIANTS = [dict(BASE, SPLIT_QK=0), dict(BASE, SPLIT_QK=1)]  # the v7 study (NOTES.md)


def reference_rows(q, kv, idx, sm_scale, sink, rows):
    outs = []
    for i in rows:
        ids = idx[i].long()
        k = kv[ids].float()
        p = (q[i].float() @ k.T) * sm_scale
        lse = torch.logsumexp(p, 1)
        o = torch.softmax(p, 1) @ k[:, :512]
        outs.append((o * torch.sigmoid(lse - sink)[:, None], lse))
    return outs


# h_q, topk, compressed tokens, FlashMLA FP8 decode us, FlashMLA sparse_fwd us (ANCHORS.md)
FP8_SHAPES = [FP8_ROWS[0], FP8_ROWS[2]]
FP8_BASE = dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, NUM_STAGES=1)
FP8_VARIANTS = [dict(FP8_BASE, SPLIT_QK=0), dict(FP8_BASE, SPLIT_QK=1)]


def tune_fp8(dev, s_q, quick):
    """The fused FP8 paged kernel on ANCHORS' regular-path rows: compressed scope (top-k ids)
    plus an SWA scope of 128 window ids, V4 layout, page size 64."""
    layout, page = KVCacheLayout.V4, 64
    results = []
    for h_q, topk, n_comp, anchor, _ in FP8_SHAPES[:1] if quick else FP8_SHAPES:
        cache = quantize_k_cache(torch.randn(n_comp // page, page, 1, 512, device=dev).bfloat16(), layout)
        n_swa = 4 * 8192
        swa = quantize_k_cache(torch.randn(n_swa // page, page, 1, 512, device=dev).bfloat16(), layout)
        idx = torch.argsort(torch.rand(s_q, n_comp, device=dev), dim=1)[:, :topk].int().contiguous()
        xidx = (torch.arange(128, device=dev)[None, :] + torch.randint(0, n_swa - 128, (s_q, 1), device=dev)).int()
        q = torch.randn(s_q, h_q, 512, device=dev).bfloat16()
        sink = torch.randn(h_q, device=dev)
        flops = 2 * s_q * (topk + 128) * h_q * 1024
        for var in FP8_VARIANTS:
            out = torch.empty(s_q, h_q, 512, device=dev, dtype=torch.bfloat16)
            mx = torch.empty(s_q, h_q, device=dev)
            lse = torch.empty(s_q, h_q, device=dev)
            fn = lambda: F.paged_fp8_sparse_attn_triton(q, cache, idx, page, swa, xidx, page, None, None,
                                                        512 ** -0.5, sink, layout, 512, out, mx, lse, **var)
            try:
                handle = fn()
                torch.cuda.synchronize()
            except Exception as e:
                msg = [ln for ln in str(e).splitlines() if "error" in ln.lower()][:2]
                print(f"fp8 {var} h{h_q}: FAILED {type(e).__name__}: {msg}")
                continue
            ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
            tf = flops / ms / 1e9
            regs, spills = getattr(handle, "n_regs", "?"), getattr(handle, "n_spills", "?")
            results.append(dict(kernel="fp8_paged", h_q=h_q, topk=topk, n_comp=n_comp, us=ms * 1e3,
                                tflops=tf, anchor_us=anchor, regs=regs, spills=spills, **var))
            print(f"fp8 h{h_q} topk{topk}+128 comp{n_comp} {var}: {ms*1e3:8.1f} us {tf:6.1f} TF/s "
                  f"vs FlashMLA decode x{anchor / (ms * 1e3):.2f} regs {regs} spills {spills}", flush=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if refuse_without_cuda("bench.tune_sparse_attn"):
        return 2
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    s_q = 4096
    results = []
    for d_qk, h_q, topk, s_kv, anchor in SHAPES[:2] if args.quick else SHAPES:
        q = torch.randn(s_q, h_q, d_qk, device=dev).bfloat16()
        kv = torch.randn(s_kv, d_qk, device=dev).bfloat16()
        idx = torch.argsort(torch.rand(s_q, s_kv, device=dev), dim=1)[:, :topk].int().contiguous() \
            if s_kv <= 32768 else torch.randint(0, s_kv, (s_q, topk), device=dev, dtype=torch.int32)
        sink = torch.randn(h_q, device=dev)
        sm_scale = d_qk ** -0.5
        refs = reference_rows(q, kv, idx, sm_scale, sink, [0, 1, s_q - 1])
        flops = 2 * s_q * topk * h_q * (d_qk + 512)
        for var in VARIANTS:
            if var["BLOCK_H"] > max(16, triton.next_power_of_2(h_q)) or (h_q >= 64 and var["BLOCK_H"] < 64):
                continue
            out = torch.full((s_q, h_q, 512), float("nan"), device=dev, dtype=torch.bfloat16)
            mx = torch.empty(s_q, h_q, device=dev)
            lse = torch.empty(s_q, h_q, device=dev)
            fn = lambda: K.sparse_attn_fwd_triton(q, kv, idx, sm_scale, sink, None, out, mx, lse, **var)
            try:
                handle = fn()
                torch.cuda.synchronize()
            except Exception as e:  # a variant that does not compile is a result too
                msg = [ln for ln in str(e).splitlines() if "error" in ln.lower()][:2]
                print(f"{var} d{d_qk} h{h_q} topk{topk}: FAILED {type(e).__name__}: {msg}")
                continue
            err = max(((out[i].float() - r[0]).abs().max().item()) for i, r in zip([0, 1, s_q - 1], refs))
            lerr = max(((lse[i] - r[1]).abs().max().item()) for i, r in zip([0, 1, s_q - 1], refs))
            ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
            tf = flops / ms / 1e9
            regs, spills = getattr(handle, "n_regs", "?"), getattr(handle, "n_spills", "?")
            row = dict(d_qk=d_qk, h_q=h_q, topk=topk, s_kv=s_kv, us=ms * 1e3, tflops=tf,
                       anchor_us=anchor, err=err, lse_err=lerr, regs=regs, spills=spills, **var)
            results.append(row)
            if args.out:  # the compiler's layouts (e.g. warpsPerCTA of each dot), for NOTES.md
                tag = "_".join(f"{k}{v}" for k, v in var.items())
                with open(f"{args.out}/kernel_d{d_qk}_h{h_q}_{tag}.ttgir", "w") as f:
                    f.write(handle.asm["ttgir"])
            ratio = f"{anchor / (ms * 1e3):.2f}" if anchor else "-"
            print(f"d{d_qk} h{h_q} topk{topk} skv{s_kv} {var}: {ms*1e3:8.1f} us {tf:6.1f} TF/s "
                  f"vs FlashMLA x{ratio} err {err:.2e} lse_err {lerr:.2e} regs {regs} spills {spills}",
                  flush=True)
    results += tune_fp8(dev, s_q, args.quick)
    if args.out:
        write_json(args.out, "tune_sparse_attn", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
