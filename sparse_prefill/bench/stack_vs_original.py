"""Our sparse / auto paths against the original pipeline, whole 10-layer stacks back to back.

    python -m sparse_prefill.bench.stack_vs_original [--reps 5] [--rounds 3] [--out DIR]

``sparse_prefill.bench.backend`` times one stack at a time. An engine runs forward after forward
with the GPU kept busy by the layers around attention, so what matters is whether the host can
queue a forward's work ahead of the GPU: a host sync (the original pipeline reads its request
lengths back from the device) drains the queue, and the GPU then waits for the host. Here each
pipeline runs ``--reps`` stacks back to back between two CUDA events, behind a GPU busy-wait
(no sync in between, per-forward state rebuilt each time); rounds alternate the pipelines and
the median round counts.
Same batches as the backend benchmark (``STACK``, 4 requests, W 128, page size 64).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from sparse_prefill import value_checks
from sparse_prefill.backend import ModelConfig, make_synthetic_batch
from sparse_prefill.bench.backend import (
    NUM_REQS,
    PAGE,
    SHAPES,
    STACK,
    WINDOW,
    BackendPipeline,
    OriginalPipeline,
    ours_kernel,
)
from sparse_prefill.bench.common import refuse_without_cuda, write_json


def stacks_ms(pipe, out, reps: int) -> float:
    """Mean ms of one stack over ``reps`` back-to-back stacks. The GPU starts busy (as it is
    with the layers before attention), so the host's time to queue the first layer is hidden
    unless something makes it wait for the GPU."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # ~30 ms of GPU busy-wait ahead of the timed region
    start.record()
    for _ in range(reps):
        pipe.begin()
        for layer in range(len(STACK)):
            pipe.layer(layer, out)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunks", default="8192,32768")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if refuse_without_cuda("bench.stack_vs_original"):
        return 2
    rows = []
    print("| h_q/topk | chunk | prefix | sparse ms | auto ms | original (ours) ms | original / auto |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for h, topk in SHAPES:
        cfg = ModelConfig(num_heads=h, compress_ratios=STACK, topk=topk, window_size=WINDOW,
                          swa_page_size=PAGE, compressed_page_size=PAGE)
        for chunk in map(int, args.chunks.split(",")):
            for prefix in (0, 16384):
                batch = make_synthetic_batch(cfg, [prefix] * NUM_REQS, [chunk // NUM_REQS] * NUM_REQS,
                                             device="cuda", seed=0, share_q=True, k_std=0.1, k_mean=0.05)
                out = torch.empty_like(batch.q[0])
                pipes = {"sparse": BackendPipeline(batch, "sparse"), "auto": BackendPipeline(batch, "auto"),
                         "original (ours)": OriginalPipeline(batch, ours_kernel)}
                times = {name: [] for name in pipes}
                with value_checks(False):
                    for pipe in pipes.values():
                        stacks_ms(pipe, out, 1)  # warm-up: compiles, allocator
                    for r in range(args.rounds):
                        names = list(pipes)[r % len(pipes):] + list(pipes)[: r % len(pipes)]
                        for name in names:
                            times[name].append(stacks_ms(pipes[name], out, args.reps))
                med = {name: statistics.median(t) for name, t in times.items()}
                row = dict(h_q=h, topk=topk, chunk=chunk, prefix=prefix, ms=med, rounds=times)
                rows.append(row)
                print(f"| {h}/{topk} | {chunk} | {prefix} | {med['sparse']:.2f} | {med['auto']:.2f} | "
                      f"{med['original (ours)']:.2f} | {med['original (ours)'] / med['auto']:.3f} |", flush=True)
                del batch, pipes, out
                torch.cuda.empty_cache()
    if args.out:
        write_json(args.out, "stack_vs_original", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
