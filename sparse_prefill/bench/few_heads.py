"""``sparse_attn_fwd`` with a few heads (the tensor-parallel shards: h_q 8, 16, 32), every
kernel variant beside the floor set by the KV gather alone (CUDA only).

    python -m sparse_prefill.bench.few_heads [--out DIR]

On the TP rows of ``bench.sparse_attn`` (s_q 4096, d_qk 512, s_kv 32768, topk 512 and 1024,
random unique ids) each query row reads ``topk`` rows of 1 KB: 2.1 GB per call at topk 512, and
the tensor cores have little to do. Timed in turn in one process: FlashMLA's kernel with q padded
to 64 heads (what an engine runs; when ``flash_mla`` imports), the Triton kernel's variants, both
Gluon kernels, and two copy-only kernels, the floor of any kernel that gathers these rows: (1)
the Gluon kernels' producer (``cp.async`` of each 64-row block into a ring of shared-memory
stages) with a consumer that frees each stage as soon as it lands, no math; (2) a Triton kernel
that loads the rows into registers and sums them. GB/s counts the gathered rows' bytes only.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
import triton
import triton.language as tl

from sparse_prefill.bench.sparse_attn import S_Q, Report, new_outputs, random_bf16, unique_indices
from sparse_prefill.ops.fp8_sparse_attn.gluon_kernel import GLUON_IMPORTED

S_KV = 32768
D = tl.constexpr(512)

if GLUON_IMPORTED:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import async_copy, mbarrier

    @gluon.jit
    def _copy_producer(k_smem, bars, kv_ptr, stride_kv_s, idx_ptr, stride_i_s, topk, n_items,
                       STAGES: gl.constexpr, PW: gl.constexpr):
        cp_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [PW, 1], [1, 0])
        offs_r = gl.arange(0, 64, layout=gl.SliceLayout(1, cp_l))
        offs_c = gl.arange(0, 64, layout=gl.SliceLayout(0, cp_l))
        g = 0
        for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
            idx_row = idx_ptr + item.to(gl.int64) * stride_i_s
            ids = gl.load(idx_row + offs_r, mask=offs_r < topk, other=0)
            for j in range(gl.cdiv(topk, 64)):
                st = g % STAGES
                ok = j * 64 + offs_r < topk
                rows = kv_ptr + ids.to(gl.int64) * stride_kv_s
                mbarrier.wait(bars.index(STAGES + st), ((g // STAGES) & 1) ^ 1, pred=g >= STAGES)
                for c in gl.static_range(D // 64):
                    async_copy.async_copy_global_to_shared(k_smem.index(st).slice(c * 64, 64, dim=1),
                                                           rows[:, None] + c * 64 + offs_c[None, :], mask=ok[:, None])
                async_copy.mbarrier_arrive(bars.index(st), increment_count=False)
                pos = (j + 1) * 64 + offs_r
                ids = gl.load(idx_row + pos, mask=pos < topk, other=0)
                g += 1

    @gluon.jit
    def _copy_consumer(bars, topk, n_items, STAGES: gl.constexpr):
        g = 0
        for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
            for j in range(gl.cdiv(topk, 64)):
                st = g % STAGES
                mbarrier.wait(bars.index(st), (g // STAGES) & 1)
                mbarrier.arrive(bars.index(STAGES + st))
                g += 1

    @gluon.jit(do_not_specialize=["topk", "n_items"])
    def _copy_only_kernel(kv_ptr, idx_ptr, stride_kv_s, stride_i_s, topk, n_items,
                          STAGES: gl.constexpr, PW: gl.constexpr):
        nvmma: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        k_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, 64, D], nvmma)
        bars = gl.allocate_shared_memory(gl.int64, [2 * STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=32 * PW)
            mbarrier.init(bars.index(STAGES + i), count=1)
        gl.warp_specialize([
            (_copy_consumer, (bars, topk, n_items, STAGES)),
            (_copy_producer, (k_smem, bars, kv_ptr, stride_kv_s, idx_ptr, stride_i_s, topk, n_items, STAGES, PW)),
        ], [PW], [80])


@triton.jit
def _load_sum_kernel(kv_ptr, idx_ptr, out_ptr, stride_kv_s, stride_i_s, topk, BLOCK_N: tl.constexpr,
                     D_: tl.constexpr, STAGES: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_)
    acc = tl.zeros([BLOCK_N, D_], tl.float32)
    for j in tl.range(0, tl.cdiv(topk, BLOCK_N), num_stages=STAGES):
        pos = j * BLOCK_N + offs_n
        ids = tl.load(idx_ptr + tok * stride_i_s + pos, mask=pos < topk, other=0)
        acc += tl.load(kv_ptr + ids.to(tl.int64)[:, None] * stride_kv_s + offs_d[None, :],
                       mask=(pos < topk)[:, None], other=0.0).to(tl.float32)
    tl.store(out_ptr + tok * D_ + offs_d, tl.sum(acc, 0))


TP_HEADS = (8, 16, 32)
TOPKS = (512, 1024)


def gather_runs(kv: torch.Tensor, idx: torch.Tensor, topk: int) -> dict:
    """The copy-only kernels: the floor of any kernel that gathers these rows."""
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    runs = {}
    if GLUON_IMPORTED:
        runs["gather only: Gluon cp.async, 2 stages, 4 warps"] = functools.partial(
            _copy_only_kernel[(n_sm,)], kv, idx, kv.stride(0), idx.stride(0), topk, S_Q, STAGES=2, PW=4, num_warps=4)
    sums = torch.empty(S_Q, D.value, device="cuda")
    runs["gather only: Triton loads + sum, 32 rows, 4 warps"] = functools.partial(
        _load_sum_kernel[(S_Q,)], kv, idx, sums, kv.stride(0), idx.stride(0), topk, BLOCK_N=32, D_=D.value,
        STAGES=3, num_warps=4)
    return runs


# Triton variants of sparse_attn_fwd_triton timed on the few-head rows (launcher overrides).
TRITON_VARIANTS = {"Triton default": {}, "Triton BLOCK_N 32": {"BLOCK_N": 32}}


# Launcher overrides of the few-head Gluon kernel (its keys: gluon_few_heads.tuning_for).
GLUON_VARIANTS = {
    "Gluon few-head kernel": {},
    "Gluon few-head kernel, 2 stages": {"STAGES": 2},
    # The copy-only ring was 1-3% faster with 8 producer warps than with 4 (benchmarks/data/gather_ceiling_h200.md).
    "Gluon few-head kernel, 8 producer warps": {"PRODUCER_WARPS": 8},
    # The default copies a token's Q after its first two blocks (Q_LATE 2; ncu, 2026-12-04: with Q
    # first, the producer waited 14% of its time for Q's buffer ahead of those copies).
    "Gluon few-head kernel, Q first": {"Q_LATE": 0},
    "Gluon few-head kernel, Q after one block": {"Q_LATE": 1},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="directory for few_heads.md")
    args = ap.parse_args()
    from sparse_prefill.bench.sparse_attn import CHECK_ROWS, alternating_us, max_errors
    from sparse_prefill.ops.sparse_attn import gluon_few_heads, gluon_kernel
    from sparse_prefill.ops.sparse_attn.kernel import sparse_attn_fwd_triton
    from sparse_prefill.ops.sparse_attn.naive import sparse_attn_fwd_naive

    try:
        import flash_mla
    except ImportError:
        flash_mla = None
    torch.manual_seed(0)
    report = Report()
    report.table(f"Few heads: s_q {S_Q}, d_qk {D.value}, s_kv {S_KV}, attn_sink on ({torch.cuda.get_device_name()}); "
                 "ratio = FlashMLA us (q padded to 64 heads) / us; medians of 2 interleaved timings",
                 ["h_q", "topk", "what", "us", "GB/s of gathered rows", "ratio", "err out", "err lse"])
    kv = random_bf16(S_KV, D.value)
    gluon_runs = gluon_kernel.unsupported_reason(torch.device("cuda")) is None
    for topk in TOPKS:
        idx = unique_indices(S_Q, S_KV, topk)
        nbytes = S_Q * topk * D.value * 2
        for h_q in TP_HEADS:
            q, sink = random_bf16(S_Q, h_q, D.value), torch.randn(h_q, device="cuda")
            scale = D.value**-0.5
            reference = sparse_attn_fwd_naive(q[:CHECK_ROWS], kv[:, None], idx[:CHECK_ROWS, None], scale, 512, sink)
            runs, outputs = {}, {}
            if h_q == TP_HEADS[0]:
                runs.update(gather_runs(kv, idx, topk))
            if flash_mla is not None:
                q_fm = torch.nn.functional.pad(q, (0, 0, 0, 64 - h_q))
                runs["FlashMLA, 64 heads"] = functools.partial(
                    flash_mla.flash_mla_sparse_fwd, q_fm, kv[:, None], idx[:, None], scale, 512,
                    torch.nn.functional.pad(sink, (0, 64 - h_q)))
            launchers = {name: functools.partial(sparse_attn_fwd_triton, **cfg) for name, cfg in TRITON_VARIANTS.items()}
            if gluon_runs:
                launchers["Gluon 64-head kernel"] = gluon_kernel.sparse_attn_fwd_gluon_wide
                for name, cfg in GLUON_VARIANTS.items():
                    launchers[name] = functools.partial(gluon_few_heads.sparse_attn_fwd_gluon_few_heads, **cfg)
            for name, launch in launchers.items():
                outputs[name] = new_outputs(S_Q, h_q)
                runs[name] = functools.partial(launch, q, kv, idx, scale, sink, None, *outputs[name])
            ok = {}
            for name, fn in runs.items():
                try:
                    fn()
                    torch.cuda.synchronize()
                    ok[name] = fn
                except Exception as e:  # a variant that fails (shared memory, compile) is reported
                    report.say(f"| {h_q} | {topk} | {name} | failed: {type(e).__name__}: {str(e)[:160]} | | | | |")
            times = alternating_us(ok, rounds=2)
            flash_us = times.get("FlashMLA, 64 heads")
            for name, us in times.items():
                errs = max_errors(outputs[name], reference) if name in outputs else None
                ratio = f"{flash_us / us:.2f}" if flash_us else "-"
                err = f"{errs[0]:.1e} | {errs[1]:.1e}" if errs else "- | -"
                report.say(f"| {h_q} | {topk} | {name} | {us:.0f} | {nbytes / us / 1e3:.0f} | {ratio} | {err} |")
            del q, runs, outputs, ok
            torch.cuda.empty_cache()
    text = "\n".join(report.lines)
    print(text)
    if args.out:
        with open(os.path.join(args.out, "few_heads.md"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
