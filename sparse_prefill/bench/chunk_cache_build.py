"""The per-forward chunk-cache build alone: what ``bench.backend`` reports as ``chunk_cache_us``.

For the backend benchmark's batches (its ``case_batch``: the ``STACK`` of ratios 0, 4 and 128, 4
requests, W = 128) at each chunk size and cached prefix, it measures ``ChunkCachePipeline.begin``
(``begin_forward`` with the sparse path, i.e. ``SparsePrefillChunkCache.build``, and the workspace
allocation) with value checks off, as ``bench.backend`` does, and on (the default: ``host_lens``
are then checked against the length tensors on the device):

* ``build us``: the median of ``triton.testing.do_bench`` (CUDA-event time of back-to-back
  calls: the host's time when its Python and launches take longer than the GPU's work);
* ``host us``: the host's time per call (``time.perf_counter`` over back-to-back calls, no
  sync inside: what the Python, the dispatcher and the launches cost, whatever the GPU does);
* ``launches``: kernels, copies and memsets the call puts on the GPU (``torch.profiler``);
* ``device us``: their summed GPU time;
* ``cudaMalloc``: segments the caching allocator had to allocate per call, over back-to-back
  calls (0 when every buffer is served from its cache; a build that needs a fresh segment each
  time pays the driver's allocation on the host).

Every case is measured in ``ROUNDS`` rounds over all cases (column ``round``): the H200's host
ran the same build at 190 us in some seconds and over 400 us in others, so one figure per case
says little; the rounds show that spread (benchmarks/NOTES.md, 2026-12-04).

Under the table, the host profile of the last case's build with checks off (``cProfile``, the
functions with the most time of their own; also the last JSON row's ``host_profile``): where the host
time goes.

Prints markdown; ``--out DIR`` also writes DIR/chunk_cache_build.md and .json. Exits 2 without
CUDA (``--smoke`` runs tiny shapes on any device, to check the script itself; no launch counts).

    python -m sparse_prefill.bench.chunk_cache_build [--out DIR] [--shapes 64:512,128:1024]
        [--chunks 8192,32768] [--prefixes 0,16384] [--smoke]
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch

from sparse_prefill import value_checks
from sparse_prefill.bench.backend import (
    CHUNKS,
    PREFIXES,
    SHAPES,
    ChunkCachePipeline,
    case_batch,
    case_main,
    ours_kernel,
)
from sparse_prefill.bench.common import (
    SILENT,
    BenchResult,
    Progress,
    fmt,
    host_profile,
    host_us,
    markdown_table,
    median_us,
)


def device_work(fn: Callable[[], object]) -> tuple[int | None, float | None]:
    """``(launches, device us)`` of one call of ``fn`` (after a warm-up call): the GPU kernels,
    copies and memsets it queues and their summed time; ``(None, None)`` without CUDA."""
    fn()
    if not torch.cuda.is_available():
        return None, None
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(gpu), sum(e.time_range.elapsed_us() for e in gpu)


HOST_CALLS = 50
PROFILE_LINES = 15
ROUNDS = 2


def device_mallocs(fn: Callable[[], object], calls: int = HOST_CALLS) -> float | None:
    """cudaMalloc'd segments per call of ``fn`` over ``calls`` back-to-back calls (after a
    warm-up call); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    fn()
    before = torch.cuda.memory_stats()["segment.all.allocated"]
    for _ in range(calls):
        fn()
    return (torch.cuda.memory_stats()["segment.all.allocated"] - before) / calls


def run_case(pipe: ChunkCachePipeline, case: tuple[int, int, int, int], round_: int, profile: bool) -> dict:
    """The row of ``case`` (h_q, topk, chunk, prefix; ``pipe`` built for it) in round ``round_``;
    with ``profile``, also the host profile of its build with checks off (``row["host_profile"]``)."""
    h_q, topk, chunk, prefix = case
    row = dict(round=round_, h_q=h_q, topk=topk, chunk=chunk, prefix=prefix)
    for suffix, checks in (("", False), ("_checked", True)):
        with value_checks(checks):
            row[f"build_us{suffix}"] = median_us(pipe.begin)
            row[f"host_us{suffix}"] = host_us(pipe.begin, HOST_CALLS)
            row[f"launches{suffix}"], row[f"device_us{suffix}"] = device_work(pipe.begin)
            row[f"mallocs{suffix}"] = device_mallocs(pipe.begin)
    if profile:
        with value_checks(False):
            row["host_profile"] = host_profile(pipe.begin, HOST_CALLS, PROFILE_LINES)
    return row


def markdown(rows: list[dict]) -> str:
    columns = ["round", "h_q/topk", "chunk", "prefix", "build us", "host us", "launches", "device us", "cudaMalloc",
               "build us (checks on)", "host us (checks on)", "launches (checks on)", "device us (checks on)"]
    cells = [[r["round"], f"{r['h_q']}/{r['topk']}", r["chunk"], r["prefix"], fmt(r["build_us"]), fmt(r["host_us"]),
              fmt(r["launches"], "d"), fmt(r["device_us"]), fmt(r["mallocs"], ".2f"), fmt(r["build_us_checked"]),
              fmt(r["host_us_checked"]), fmt(r["launches_checked"], "d"), fmt(r["device_us_checked"])]
             for r in rows]
    last = rows[-1]
    return "\n".join([
        "Median us of do_bench; host us: per call on the host, no sync.", "", *markdown_table(columns, cells), "",
        f"Host profile, round {last['round']}, {last['h_q']}/{last['topk']} chunk {last['chunk']} prefix "
        f"{last['prefix']}, checks off "
        f"({HOST_CALLS} builds):", "", "```", last["host_profile"], "```", "",
    ])


def run(
    *, smoke: bool = False, shapes: Sequence[tuple[int, int]] = SHAPES, chunks: Sequence[int] = CHUNKS,
    prefixes: Sequence[int] = PREFIXES, progress: Progress = SILENT,
) -> BenchResult:
    """Measure on CUDA (``smoke``: tiny shapes on whatever device there is)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if smoke:
        shapes, chunks, prefixes = [(4, 16)], [64], [0, 300]
    cases = [(h, k, c, p) for h, k in shapes for c in chunks for p in prefixes]
    progress.section("chunk_cache_build", ROUNDS * len(cases))
    pipes = [ChunkCachePipeline(case_batch(*case, device, layers=()), ours_kernel) for case in cases]
    rows = []
    for round_ in range(ROUNDS):
        for i, (case, pipe) in enumerate(zip(cases, pipes)):
            progress.step(f"round {round_}: h_q {case[0]} topk {case[1]}, chunk {case[2]}, prefix {case[3]}")
            last = round_ == ROUNDS - 1 and i == len(cases) - 1  # the one build profiled
            rows.append(run_case(pipe, case, round_, profile=last))
    return BenchResult("chunk_cache_build", "The per-forward chunk-cache build (begin_forward, sparse path)",
                       markdown(rows), rows)


def main(argv: Sequence[str] | None = None) -> int:
    return case_main(argv, __doc__, "chunk_cache_build", run)


if __name__ == "__main__":
    sys.exit(main())
