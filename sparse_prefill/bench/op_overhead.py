"""What the public ``sparse_attn_fwd`` costs on top of its kernel's launch (CUDA only).

    python -m sparse_prefill.bench.op_overhead [--out DIR]

``bench.sparse_attn``'s "public op us" column (the kernel through ``sparse_attn_fwd``: checks,
kernel choice, the registered op) came out 1-6% above the kernel alone on the 128-head rows in
one run. On those rows and one 64-head row, the kernel's launcher and the public op are timed
three ways, interleaved ``ROUNDS`` times (medians):

* ``do_bench us``: as ``bench.sparse_attn`` (``triton.testing.do_bench``, which clears the L2
  before every call: the host has only that clear's time to queue the call, so host time past
  it shows up as device time);
* ``back to back us``: ``CALLS`` calls between two CUDA events, nothing in between, so the host
  queues ahead of the GPU as it does in an engine's forward: the device time per call;
* ``host us``: host time per call over ``CALLS`` calls, no sync inside.

Under the table, the host profile of the public op on the last row (``cProfile``, the functions
with the most time of their own): where its host time goes. Prints markdown; ``--out DIR`` also
writes DIR/op_overhead.md and .json. Exits 2 without CUDA.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from collections.abc import Callable, Sequence

import torch

from sparse_prefill.bench.common import (
    BenchResult,
    Progress,
    bench_main,
    host_profile,
    host_us,
    markdown_table,
    require_cuda,
)
from sparse_prefill.bench.sparse_attn import D_V, S_Q, bench_us, new_outputs, random_bf16, unique_indices

ROUNDS = 3
CALLS = 20
# d_qk, h_q, topk, s_kv: bench.sparse_attn's rows with the largest gaps, and one 64-head row
ROWS = [(512, 128, 1024, 65536), (576, 128, 2048, 131072), (512, 64, 512, 8192)]
WAYS = ("do_bench", "back_to_back", "host")
PROFILE_LINES = 20


def back_to_back_us(fn: Callable[[], object], calls: int = CALLS) -> float:
    """Device time per call of ``calls`` calls of ``fn`` queued back to back (after a warm-up
    call): CUDA events around the whole loop, no sync or cache clear inside."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def measure_ways(fns: dict[str, Callable[[], object]], rounds: int = ROUNDS) -> dict[str, dict[str, float]]:
    """``{name: {way: median us}}`` over ``rounds`` interleaved rounds of every way and function."""
    timers = {"do_bench": bench_us, "back_to_back": back_to_back_us, "host": functools.partial(host_us, calls=CALLS)}
    times: dict[str, dict[str, list[float]]] = {name: {way: [] for way in WAYS} for name in fns}
    for _ in range(rounds):
        for way in WAYS:
            for name, fn in fns.items():
                times[name][way].append(timers[way](fn))
    return {name: {way: statistics.median(t) for way, t in by_way.items()} for name, by_way in times.items()}


def run(*, rows: Sequence[tuple[int, int, int, int]] = ROWS, progress: Progress) -> BenchResult:
    from sparse_prefill.ops.sparse_attn import sparse_attn_fwd
    from sparse_prefill.ops.sparse_attn.gluon_kernel import auto_picks_gluon
    from sparse_prefill.ops.sparse_attn.library import launcher

    progress.section("op_overhead", len(rows))
    table, out_rows = [], []
    for d_qk, h_q, topk, s_kv in rows:
        progress.step(f"d_qk {d_qk} h_q {h_q} topk {topk} s_kv {s_kv}")
        q, kv = random_bf16(S_Q, h_q, d_qk), random_bf16(s_kv, d_qk)
        idx = unique_indices(S_Q, s_kv, topk)
        sink = torch.randn(h_q, device="cuda")
        kernel = "gluon" if auto_picks_gluon(q.device, h_q) else "triton"
        fns = {
            "kernel": functools.partial(launcher(kernel), q, kv, idx, d_qk**-0.5, sink, None, *new_outputs(S_Q, h_q)),
            "public op": functools.partial(sparse_attn_fwd, q, kv[:, None], idx[:, None], d_qk**-0.5, D_V, sink,
                                           out=new_outputs(S_Q, h_q)[0], impl=kernel),
        }
        us = measure_ways(fns)
        over = {way: us["public op"][way] / us["kernel"][way] - 1 for way in WAYS}
        table.append([d_qk, h_q, topk, s_kv, kernel]
                     + [f"{us[name][way]:.0f}" for way in WAYS for name in fns]
                     + [f"{100 * over['do_bench']:+.1f}%", f"{100 * over['back_to_back']:+.1f}%"])
        out_rows.append(dict(d_qk=d_qk, h_q=h_q, topk=topk, s_kv=s_kv, s_q=S_Q, kernel=kernel, us=us, overhead=over))
        if len(out_rows) == len(rows):  # only the last row's profile is reported
            profile = host_profile(fns["public op"], CALLS, PROFILE_LINES)
        del q, kv, idx, fns
        torch.cuda.empty_cache()
    columns = ["d_qk", "h_q", "topk", "s_kv", "kernel"] + [
        f"{name} {way.replace('_', ' ')} us" for way in WAYS for name in ("kernel", "public op")
    ] + ["public op over kernel, do_bench", "public op over kernel, back to back"]
    markdown = "\n".join([
        f"s_q {S_Q}, attn_sink on; medians of {ROUNDS} interleaved rounds; back to back and host: {CALLS} calls.",
        "", *markdown_table(columns, table), "",
        f"Host profile of the public op, last row ({CALLS} calls):", "", "```", profile, "```", "",
    ])
    return BenchResult("op_overhead", "sparse_attn_fwd's wrapper against its kernel's launch", markdown, out_rows,
                       extra=dict(host_profile=profile))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="directory for op_overhead.md / .json")
    args = ap.parse_args(argv)
    return bench_main(args.out, lambda progress: run(progress=progress), require_cuda("op_overhead"))


if __name__ == "__main__":
    sys.exit(main())
