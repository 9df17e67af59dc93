"""Benchmark the two attention ops against FlashMLA's figures of ANCHORS.md on one CUDA GPU.

    python -m sparse_prefill.bench.sparse_attn [--quick] [--op sparse|fp8|all]
        [--out DIR] [--config KEY=VAL[,KEY=VAL...]]...

(``sparse-prefill bench --only sparse_attn`` runs it with the defaults and plots it.)

sparse_attn_fwd: the eight rows of ANCHORS.md's first table (s_q 4096, random unique indices per
row, attn_sink on), FLOPs ``2 * s_q * topk * h_q * (d_qk + d_v)`` as FlashMLA counts them, and
the ratio ``FlashMLA us / our us`` (> 1: we are faster), FlashMLA timed in the same run when
``flash_mla`` imports. The default row times the kernel ``impl="auto"`` runs among ours, never
FlashMLA's (the Gluon kernel on Hopper from ``MIN_AUTO_HEADS`` heads on), with both kernels' times
beside it. Then h_q 8, 16 and
32 with topk 512 and 1024 (s_kv 32768), which FlashMLA cannot run: an engine pads q to 64 heads
and pays FlashMLA's 64-head time. That padded time is measured when ``flash_mla`` imports; otherwise it is derived
from ANCHORS.md: topk 512 is the h_q 64 / topk 512 / s_kv 32768 row (623 us), topk 1024 is
twice it (the work is linear in topk at a fixed head count; marked "~", an estimate).

paged_fp8_sparse_attn_fwd: the "regular path" rows of ANCHORS.md (s_q 4096, V4 caches, page size
64: top-k unique ids into a compressed cache of 8192 / 16384 tokens plus 128 window ids into an
SWA cache as the extra scope, attn_sink on), FLOPs ``2 * s_q * (topk + 128) * h_q * 1024``,
ratio to FlashMLA's regular-path (FP8 decode kernel) time. The default row times the kernel
``impl="auto"`` runs (the Gluon kernel on Hopper with Triton 3.6), with the Triton kernel's time
beside it; ``--config`` variants tune that same kernel. Next to it, for the routing choice:
our ``sparse_attn_fwd`` (the kernel auto picks) on a bf16 workspace holding the same tokens (combined rows of width
topk + 128, dequantize step not included, like ANCHORS' "sparse_fwd" column).

When ``flash_mla`` imports, ``flash_mla_sparse_fwd`` is timed on the same inputs as ours. The
"public op us" column times the default row's kernel through ``sparse_attn_fwd`` itself (argument
checks, the registered torch op, the default value checks) in the same rounds: the wrapper's
cost on top of the launch.
Every timing is the median of ``triton.testing.do_bench``; on the sparse_attn_fwd rows, FlashMLA
and both of our kernels are timed in turn, ``ROUNDS`` times each, and each reports the median of
its rounds (a kernel's time drifts by several percent within one run). Each row is also checked against the
float32 reference on its first 64 query rows (max abs error of out and lse is printed).

``--config`` passes keyword overrides (e.g. ``BLOCK_N=32,num_warps=4`` for the Triton kernels,
``MATH_REGS=208,PRODUCER_REGS=64`` for the Gluon sparse kernel, ``VALUE_REGS=168,PRODUCER_REGS=128``
for the Gluon FP8 kernel) to the launchers, which take them as ``**tuning``; each
``--config`` is one variant, timed after the default one, so variants compare within one device
call. An empty ``--config ""`` times the default again: interleave it between variants, since
one row's repeated timings can differ by several percent (benchmarks/NOTES.md). ``--out DIR``
writes DIR/sparse_attn.md and DIR/sparse_attn.json (the machine, then ``rows``: one object per
row and variant). Exits 2 without CUDA.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import statistics
import sys
from collections.abc import Callable, Sequence

import torch

from sparse_prefill._utils import cdiv
from sparse_prefill.bench.common import (
    SILENT,
    BenchResult,
    Progress,
    bench_main,
    fmt,
    import_flash_mla,
    markdown_table,
    median_us,
    require_cuda,
)
from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops.cache import dequantize_k_cache_paged, quantize_k_cache
from sparse_prefill.ops.fp8_sparse_attn.naive import paged_fp8_sparse_attn_fwd_naive
from sparse_prefill.ops.sparse_attn.naive import sparse_attn_fwd_naive

S_Q = 4096
D_V = 512
WINDOW = 128
PAGE_SIZE = 64
CHECK_ROWS = 64
ROUNDS = 3  # interleaved timings of FlashMLA and our kernels per row (alternating_us)

# d_qk, h_q, topk, s_kv, FlashMLA us (ANCHORS.md, first table)
SPARSE_ROWS = [
    (512, 64, 512, 8192, 536),
    (512, 64, 512, 32768, 623),
    (512, 64, 512, 65536, 711),
    (512, 128, 1024, 8192, 2102),
    (512, 128, 1024, 32768, 2118),
    (512, 128, 1024, 65536, 2232),
    (576, 128, 2048, 32768, 4196),
    (576, 128, 2048, 131072, 4617),
]
# h_q, topk (d_qk 512, s_kv 32768) and FlashMLA's 64-head time derived from ANCHORS.md
TP_S_KV = 32768
TP_ROWS = [(h, 512, 623, "") for h in (8, 16, 32)] + [(h, 1024, 2 * 623, "~") for h in (8, 16, 32)]
# h_q, topk, compressed tokens, FlashMLA regular path us, FlashMLA sparse_fwd us (ANCHORS.md)
FP8_ROWS = [
    (64, 512, 8192, 993, 686),
    (64, 512, 16384, 1022, 707),
    (128, 1024, 8192, 2880, 2311),
    (128, 1024, 16384, 2839, 2314),
]


def parse_config(text: str) -> dict[str, object]:
    """``"BLOCK_N=32,num_warps=4"`` -> ``{"BLOCK_N": 32, "num_warps": 4}`` (ints, floats,
    True/False, else strings)."""
    config: dict[str, object] = {}
    for item in filter(None, text.split(",")):
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected KEY=VAL pairs, got {item!r}")
        value: object = raw
        for convert in (int, float):
            try:
                value = convert(raw)
                break
            except ValueError:
                pass
        else:
            value = {"True": True, "False": False}.get(raw, raw)
        config[key.strip()] = value
    return config


def accepts_tuning(launcher: Callable) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(launcher).parameters.values())


def tuning_refusal() -> str | None:
    """Why ``--config`` cannot apply (a launcher without ``**tuning``), or None."""
    from sparse_prefill.ops.fp8_sparse_attn.gluon_kernel import paged_fp8_sparse_attn_gluon
    from sparse_prefill.ops.fp8_sparse_attn.kernel import paged_fp8_sparse_attn_triton
    from sparse_prefill.ops.sparse_attn.gluon_kernel import sparse_attn_fwd_gluon
    from sparse_prefill.ops.sparse_attn.kernel import sparse_attn_fwd_triton

    launchers = (sparse_attn_fwd_triton, sparse_attn_fwd_gluon, paged_fp8_sparse_attn_triton, paged_fp8_sparse_attn_gluon)
    for launcher in launchers:
        if not accepts_tuning(launcher):
            return f"{launcher.__name__} takes no **tuning, so --config cannot be applied"
    return None


def variant_name(variant: dict) -> str:
    """A variant's table cell: ``KEY=VAL,...``, or "default" for the default launch."""
    return ",".join(f"{k}={v}" for k, v in variant.items()) or "default"


def bench_us(fn: Callable[[], object]) -> float:
    return median_us(fn, warmup=50, rep=300)


def alternating_us(fns: dict[str, Callable[[], object]], rounds: int = ROUNDS) -> dict[str, float]:
    """Median of ``rounds`` timings of each of ``fns``, taken in turn: one kernel's time drifts by
    several percent within a run (clocks, L2 state), so times to compare are taken interleaved.
    Round ``r`` starts at the ``r``-th of ``fns`` (rotated), so no function always follows the
    same one (a long, hot kernel can leave the clocks lower for whatever runs next)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        start = r % len(names)
        for name in names[start:] + names[:start]:
            times[name].append(bench_us(fns[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def random_bf16(*shape: int) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") / 10).bfloat16()


def unique_indices(s_q: int, s_kv: int, topk: int) -> torch.Tensor:
    """[s_q, topk] int32, each row ``topk`` distinct random ids below ``s_kv`` (chunked over rows
    so the random keys stay small)."""
    rows = [torch.rand(n, s_kv, device="cuda").topk(topk, dim=1).indices.int()
            for n in (min(256, s_q - i) for i in range(0, s_q, 256))]
    return torch.cat(rows)


def new_outputs(s_q: int, h_q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.empty(s_q, h_q, D_V, dtype=torch.bfloat16, device="cuda"),
            torch.empty(s_q, h_q, device="cuda"), torch.empty(s_q, h_q, device="cuda"))


def max_errors(outputs: tuple, reference: tuple) -> tuple[float, float]:
    """Max abs error of out and of lse on the first CHECK_ROWS rows."""
    out, _, lse = outputs
    ref_out, _, ref_lse = reference
    return ((out[:CHECK_ROWS].float() - ref_out).abs().max().item(),
            (lse[:CHECK_ROWS] - ref_lse).abs().max().item())


class Report:
    """Markdown lines and JSON rows, collected as the rows are measured."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.rows: list[dict] = []

    def say(self, line: str) -> None:
        self.lines.append(line)

    def table(self, title: str, header: list[str]) -> None:
        self.say(f"\n### {title}\n")
        self.lines += markdown_table(header, [])


def sparse_cases(quick: bool) -> list[tuple]:
    """(d_qk, h_q, topk, s_kv, FlashMLA us, "~" if that is an estimate) per measured row."""
    rows = [(*r, "") for r in SPARSE_ROWS] + [(512, h, k, TP_S_KV, pad, mark) for h, k, pad, mark in TP_ROWS]
    return [rows[0], rows[2], rows[5], rows[6]] if quick else rows


def fp8_cases(quick: bool) -> list[tuple]:
    return FP8_ROWS[:1] if quick else FP8_ROWS


def bench_sparse(report: Report, variants: list[dict], quick: bool, flash_mla, progress: Progress) -> None:
    from sparse_prefill.ops.sparse_attn import gluon_kernel, sparse_attn_fwd
    from sparse_prefill.ops.sparse_attn.kernel import sparse_attn_fwd_triton

    device = torch.device("cuda")
    gluon_runs = gluon_kernel.unsupported_reason(device) is None
    header = ["variant", "kernel", "d_qk", "h_q", "topk", "s_kv", "us", "TFLOP/s", "flash_mla here us",
              "ratio here", "FlashMLA us (ANCHORS)", "Gluon kernel us", "Triton kernel us", "public op us",
              "err out", "err lse"]
    report.table("sparse_attn_fwd (s_q 4096, attn_sink on); default: the kernel impl='auto' runs; "
                 "ratio here = flash_mla us / our us in this run", header)
    for d_qk, h_q, topk, s_kv, anchor_us, mark in sparse_cases(quick):
        progress.step(f"sparse_attn_fwd d_qk {d_qk} h_q {h_q} topk {topk} s_kv {s_kv}")
        q, kv = random_bf16(S_Q, h_q, d_qk), random_bf16(s_kv, d_qk)
        idx = unique_indices(S_Q, s_kv, topk)
        sink = torch.randn(h_q, device="cuda")
        sm_scale = d_qk**-0.5
        reference = sparse_attn_fwd_naive(q[:CHECK_ROWS], kv[:, None], idx[:CHECK_ROWS, None], sm_scale, D_V, sink)
        flops = 2 * S_Q * topk * h_q * (d_qk + D_V)
        launchers = {"triton": sparse_attn_fwd_triton}
        if gluon_runs:
            launchers["gluon"] = gluon_kernel.sparse_attn_fwd_gluon
        kernel = "gluon" if gluon_kernel.auto_picks_gluon(device, h_q) else "triton"
        # Both kernels' default times (the default row's and the two beside it) and FlashMLA's,
        # interleaved.
        timed = {name: functools.partial(launcher, q, kv, idx, sm_scale, sink, None, *new_outputs(S_Q, h_q))
                 for name, launcher in launchers.items()}
        # The same kernel through the public op (checks, registered torch op, default value
        # checks): what its wrapper costs on top of the launch.
        timed["public"] = functools.partial(sparse_attn_fwd, q, kv[:, None], idx[:, None], sm_scale, D_V, sink,
                                            out=new_outputs(S_Q, h_q)[0], impl=kernel)
        if flash_mla is not None:
            # FlashMLA takes h_q 64 or 128 only: fewer heads run padded to 64, as an engine does.
            pad = 0 if h_q in (64, 128) else 64 - h_q
            q_fm, sink_fm = torch.nn.functional.pad(q, (0, 0, 0, pad)), torch.nn.functional.pad(sink, (0, pad))
            timed["flash_mla"] = functools.partial(flash_mla.flash_mla_sparse_fwd, q_fm, kv[:, None], idx[:, None],
                                                   sm_scale, D_V, sink_fm)
        kernel_us = alternating_us(timed)
        flash_us = kernel_us.get("flash_mla")
        for variant in variants:
            outputs = new_outputs(S_Q, h_q)
            run = lambda: launchers[kernel](q, kv, idx, sm_scale, sink, None, *outputs, **variant)
            run()
            err_out, err_lse = max_errors(outputs, reference)
            us = kernel_us[kernel] if not variant else bench_us(run)
            tflops = flops / us / 1e6
            ratio = flash_us / us if flash_us else None
            both = (kernel_us.get("gluon"), kernel_us["triton"]) if not variant else (None, None)
            public_us = kernel_us["public"] if not variant else None
            report.say(f"| {variant_name(variant)} | {kernel} | {d_qk} | {h_q} | {topk} | {s_kv} | {us:.0f} | "
                       f"{tflops:.0f} | {fmt(flash_us)} | {fmt(ratio, '.2f')} | {mark}{anchor_us} | "
                       f"{fmt(both[0])} | {fmt(both[1])} | {fmt(public_us)} | {err_out:.1e} | {err_lse:.1e} |")
            report.rows.append(dict(op="sparse_attn_fwd", variant=variant, kernel=kernel, d_qk=d_qk, h_q=h_q,
                                    topk=topk, s_kv=s_kv, s_q=S_Q, us=us, tflops=tflops, anchor_us=anchor_us,
                                    anchor_estimated=bool(mark), flash_mla_padded_to_64_heads=h_q < 64,
                                    flash_mla_us=flash_us, ratio=ratio, gluon_us=both[0], triton_us=both[1],
                                    public_us=public_us,
                                    err_out=err_out, err_lse=err_lse))
        del q, kv, idx, outputs
        torch.cuda.empty_cache()


def window_ids(s_q: int, page_size: int) -> tuple[torch.Tensor, int]:
    """[s_q, WINDOW] int32 SWA-cache token ids: query ``i`` sees positions ``i .. i + 127``,
    mapped through a random page table; and the number of pages."""
    num_pages = cdiv(s_q + WINDOW - 1, page_size)
    table = torch.randperm(num_pages, device="cuda")
    pos = torch.arange(s_q, device="cuda")[:, None] + torch.arange(WINDOW, device="cuda")[None, :]
    return (table[pos // page_size] * page_size + pos % page_size).int(), num_pages


def bench_fp8(report: Report, variants: list[dict], quick: bool, flash_mla, progress: Progress) -> None:
    from sparse_prefill.ops.fp8_sparse_attn import gluon_kernel
    from sparse_prefill.ops.fp8_sparse_attn.kernel import paged_fp8_sparse_attn_triton
    from sparse_prefill.ops.sparse_attn import gluon_kernel as attn_gluon
    from sparse_prefill.ops.sparse_attn.library import launcher

    layout = KVCacheLayout.V4
    use_gluon = gluon_kernel.auto_picks_gluon(torch.device("cuda"), layout)
    header = ["variant", "kernel", "h_q", "topk + W", "compressed tokens", "us", "TFLOP/s",
              "FlashMLA regular us (ANCHORS)", "ratio", "Triton kernel us", "our sparse_fwd on workspace us",
              "FlashMLA sparse_fwd us (ANCHORS)", "flash_mla sparse_fwd here us", "err out", "err lse"]
    report.table("paged_fp8_sparse_attn_fwd, regular path (s_q 4096, V4, page size 64, attn_sink on); "
                 "default: the kernel impl='auto' runs", header)
    for h_q, topk, n_comp, regular_us, sparse_anchor_us in fp8_cases(quick):
        progress.step(f"paged_fp8_sparse_attn_fwd h_q {h_q} topk {topk} + {WINDOW} tokens {n_comp}")
        q = random_bf16(S_Q, h_q, layout.dim)
        comp_ids = unique_indices(S_Q, n_comp, topk)
        swa_ids, swa_pages = window_ids(S_Q, PAGE_SIZE)
        comp_cache, swa_cache = (quantize_k_cache(random_bf16(n, PAGE_SIZE, 1, layout.dim), layout, impl="reference")
                                 for n in (n_comp // PAGE_SIZE, swa_pages))
        sink = torch.randn(h_q, device="cuda")
        sm_scale = layout.dim**-0.5
        reference = paged_fp8_sparse_attn_fwd_naive(
            q[:CHECK_ROWS], comp_cache, comp_ids[:CHECK_ROWS], PAGE_SIZE, sm_scale, extra_cache=swa_cache,
            extra_indices=swa_ids[:CHECK_ROWS], extra_page_size=PAGE_SIZE, attn_sink=sink, layout=layout)
        # The same tokens as one bf16 workspace: compressed tokens, then the SWA cache.
        every_token = [torch.arange(c.shape[0] * PAGE_SIZE, device="cuda") for c in (comp_cache, swa_cache)]
        workspace = torch.cat([dequantize_k_cache_paged(c, ids, PAGE_SIZE, layout, impl="reference")
                               for c, ids in zip((comp_cache, swa_cache), every_token)])[:, 0]
        ws_idx = torch.cat([comp_ids, swa_ids + n_comp], dim=1)
        flops = 2 * S_Q * (topk + WINDOW) * h_q * 1024
        flash_us = None
        if flash_mla is not None:
            flash_us = bench_us(lambda: flash_mla.flash_mla_sparse_fwd(
                q, workspace[:, None], ws_idx[:, None], sm_scale, D_V, sink))
        ws_outputs = new_outputs(S_Q, h_q)
        # What sparse_attn_fwd's "auto" runs on it among our kernels (FlashMLA's time is beside it).
        ws_kernel = launcher("gluon" if attn_gluon.auto_picks_gluon(q.device, h_q) else "triton")
        ws_us = bench_us(lambda: ws_kernel(q, workspace, ws_idx, sm_scale, sink, None, *ws_outputs))
        scopes = (q, comp_cache, comp_ids, PAGE_SIZE, swa_cache, swa_ids, PAGE_SIZE, None, None, sm_scale, sink)
        def launch(outputs: tuple, variant: dict) -> object:
            if use_gluon:
                return gluon_kernel.paged_fp8_sparse_attn_gluon(*scopes, *outputs, **variant)
            return paged_fp8_sparse_attn_triton(*scopes, layout, D_V, *outputs, **variant)

        kernel = "gluon" if use_gluon else "triton"
        triton_us = None
        if use_gluon:  # the fallback kernel's time, next to the default row
            outputs = new_outputs(S_Q, h_q)
            triton_us = bench_us(lambda: paged_fp8_sparse_attn_triton(*scopes, layout, D_V, *outputs))
        for variant in variants:
            outputs = new_outputs(S_Q, h_q)
            launch(outputs, variant)
            err_out, err_lse = max_errors(outputs, reference)
            us = bench_us(lambda: launch(outputs, variant))
            tflops = flops / us / 1e6
            fallback_us = triton_us if not variant else None
            report.say(f"| {variant_name(variant)} | {kernel} | {h_q} | {topk} + {WINDOW} | {n_comp} | {us:.0f} | "
                       f"{tflops:.0f} | {regular_us} | {regular_us / us:.2f} | {fmt(fallback_us)} | {ws_us:.0f} | "
                       f"{sparse_anchor_us} | {fmt(flash_us)} | {err_out:.1e} | {err_lse:.1e} |")
            report.rows.append(dict(op="paged_fp8_sparse_attn_fwd", variant=variant, kernel=kernel, d_qk=layout.dim,
                                    h_q=h_q, topk=topk, extra_topk=WINDOW, s_kv=n_comp, s_q=S_Q, us=us,
                                    tflops=tflops, anchor_us=regular_us, triton_us=fallback_us,
                                    sparse_workspace_us=ws_us, anchor_sparse_us=sparse_anchor_us,
                                    flash_mla_us=flash_us, err_out=err_out, err_lse=err_lse))
        del q, comp_cache, swa_cache, workspace, ws_outputs
        torch.cuda.empty_cache()


OPS = ("sparse", "fp8", "all")


def run(
    *, quick: bool = False, op: str = "all", variants: Sequence[dict] = (), progress: Progress = SILENT,
) -> BenchResult:
    """Measure (CUDA only). ``op``: "sparse" (sparse_attn_fwd), "fp8" (the regular path) or
    "all"; ``variants``: launcher overrides, each timed after the default launch."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    variants = [{}, *variants]
    flash_mla = import_flash_mla()
    report = Report()
    report.say(f"flash_mla {'imported' if flash_mla else 'not available'}; median of triton.testing.do_bench "
               f"(warmup 50 ms, rep 300 ms). ratio = FlashMLA us / our us.")
    total = (len(sparse_cases(quick)) if op != "fp8" else 0) + (len(fp8_cases(quick)) if op != "sparse" else 0)
    progress.section("sparse_attn", total)
    torch.manual_seed(0)
    if op in ("sparse", "all"):
        bench_sparse(report, variants, quick, flash_mla, progress)
    if op in ("fp8", "all"):
        bench_fp8(report, variants, quick, flash_mla, progress)
    return BenchResult("sparse_attn", "Sparse attention kernels against FlashMLA (ANCHORS.md)",
                       "\n".join(report.lines), report.rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few rows only")
    ap.add_argument("--op", choices=OPS, default="all")
    ap.add_argument("--out", metavar="DIR", help="write DIR/sparse_attn.md and DIR/sparse_attn.json")
    ap.add_argument("--config", action="append", type=parse_config, default=[], metavar="KEY=VAL[,KEY=VAL...]",
                    help="launcher overrides (**tuning); each --config is one variant, timed after the default")
    args = ap.parse_args(argv)
    return bench_main(
        args.out, lambda progress: run(quick=args.quick, op=args.op, variants=args.config, progress=progress),
        require_cuda("the sparse attention benchmark") or (tuning_refusal() if args.config else None),
    )


if __name__ == "__main__":
    sys.exit(main())
