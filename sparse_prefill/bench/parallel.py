"""Prefill across GPUs: context and head parallelism on 1, 2 and 4 GPUs (NCCL).

One prefill chunk of 131072 new tokens (one request, no cached prefix, by default) over the
10-layer stack of ``sparse_prefill.bench.backend`` (ratios 0, 4, 128, 4, 4, 128, 4, 0, 4, 128; W 128, page
size 64, h_q 128 / topk 1024). Synthetic batch: ``make_synthetic_batch`` (the same seed on every
rank, so every rank holds the same batch and caches), value checks off.

Per world size ``w`` (one spawned process per GPU, NCCL group) and mode it measures the slowest
rank's wall time of one forward of the whole stack (median of ``--iters`` after ``--warmup``):

* **baseline** (w = 1): the single-GPU backend: per layer ``store_k_cache`` of the chunk's K
  into the layer's caches, then ``forward``; and the attention alone.
* **cp** (context parallel): per layer ``store_kv`` (each rank's K, exchanged) and ``forward``
  of the rank's rows, outputs left per rank (the rest of a layer works per row); the attention
  alone; and the attention with outputs gathered into engine order on every rank.
* **hp** (head parallel, ``h_q / w`` heads per rank): per layer ``store_k_cache`` of the whole
  chunk's K (every rank holds the same KV) and ``forward``, outputs left per rank (tensor
  parallelism keeps them so); the attention alone; and with outputs gathered along heads.

and reports speedup ``t_1 / t_w``, scaling efficiency ``t_1 / (w * t_w)``, the bytes each
forward's collectives moved (``CommStats``: every rank's shard once; a rank receives all but its
own), rows per rank and peak GPU memory.

NVLink multicast stays off: ``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` and
``NVSHMEM_DISABLE_NVLS=1`` are set below, before any process group, symmetric-memory buffer or
child process exists (children inherit them; NCCL and torch read them there, not at import, and
``sparse_prefill.bench.device_session`` sets them for its children before torch starts).

Prints markdown; ``--out DIR`` also writes DIR/parallel.md and DIR/parallel.json. Exits 2 when
fewer GPUs than the largest world size are visible (``--smoke`` runs tiny shapes on the CPU
with gloo, to check the script itself).

    python -m sparse_prefill.bench.parallel [--out DIR] [--worlds 1,2,4] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparse_prefill import value_checks
from sparse_prefill.backend import ModelConfig, SparsePrefillBackend, make_synthetic_batch
from sparse_prefill.bench.common import NVLS_ENV, write_outputs
from sparse_prefill.ops.cache import store_k_cache
from sparse_prefill.parallel import ContextParallelPrefill, HeadParallelPrefill, new_slots

os.environ.update(NVLS_ENV)

STACK = (0, 4, 128, 4, 4, 128, 4, 0, 4, 128)
D = 512


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=131072, help="new tokens in the chunk (all requests)")
    p.add_argument("--requests", type=int, default=1, help="requests sharing the chunk equally")
    p.add_argument("--prefix", type=int, default=0, help="cached prefix of every request")
    p.add_argument("--heads", type=int, default=128, help="h_q of the model (all heads)")
    p.add_argument("--topk", type=int, default=1024)
    p.add_argument("--ratios", default=",".join(map(str, STACK)), help="compress ratio of each layer")
    p.add_argument("--worlds", default="1,2,4", help="GPU counts to run (1 is the baseline)")
    p.add_argument("--modes", default="cp,hp")
    p.add_argument("--path", default="auto", choices=("auto", "sparse", "regular"))
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=None, help="write OUT/parallel.md and OUT/parallel.json")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU with gloo (checks the script)")
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens, args.heads, args.topk, args.iters, args.warmup = 300, 8, 16, 1, 0
        args.worlds = "1,2" if args.worlds == "1,2,4" else args.worlds
    args.ratios = tuple(int(r) for r in args.ratios.split(","))
    args.worlds = tuple(int(w) for w in args.worlds.split(","))
    args.modes = tuple(m for m in args.modes.split(",") if m)
    if 1 not in args.worlds:
        p.error("--worlds must include 1 (the baseline every speedup is measured against)")
    if set(args.modes) - {"cp", "hp"}:
        p.error(f"--modes takes cp and/or hp, got {args.modes}")
    return args


def model(args) -> tuple[ModelConfig, list[int], list[int]]:
    window, page = (8, 16) if args.smoke else (128, 64)
    cfg = ModelConfig(
        num_heads=args.heads, compress_ratios=args.ratios, topk=args.topk, window_size=window,
        swa_page_size=page, compressed_page_size=page,
    )
    per_req = args.tokens // args.requests
    extend = [per_req] * args.requests
    extend[-1] += args.tokens - per_req * args.requests
    return cfg, [args.prefix] * args.requests, extend


# ---------------------------------------------------------------------------------------------
# One rank


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, args, device) -> float:
    """Median seconds of ``fn`` over ``args.iters`` runs, the slowest rank's each time."""
    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.iters):
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        _sync(device)
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(float(t))
    return statistics.median(times)


def _new_k(cfg, rows: tuple[int, int], entry_rows, device):
    """Random K of ``rows`` new tokens and of the new entries per layer (values do not matter)."""
    gen = torch.Generator(device=device).manual_seed(7)
    a, b = rows
    out = []
    for layer, ratio in enumerate(cfg.compress_ratios):
        k = torch.randn(b - a, D, generator=gen, device=device).to(torch.bfloat16)
        ck = None
        if ratio > 0:
            ea, eb = entry_rows(ratio)
            ck = torch.randn(eb - ea, D, generator=gen, device=device).to(torch.bfloat16)
        out.append((k, ck))
    return out


def run_rank(rank: int, world: int, args, tmp: str) -> None:
    if args.smoke:
        device, backend_name = torch.device("cpu"), "gloo"
    else:
        device, backend_name = torch.device("cuda", rank), "nccl"
        torch.cuda.set_device(device)
    # A file rendezvous in the run's temporary folder: no port to pick.
    dist.init_process_group(backend_name, init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        with value_checks(False):
            result = _measure(rank, world, args, device)
        if rank == 0:
            with open(os.path.join(tmp, "result.json"), "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _measure(rank: int, world: int, args, device: torch.device) -> dict:
    cfg, prefix, extend = model(args)
    batch = make_synthetic_batch(cfg, prefix, extend, device=device, seed=0, share_q=True)
    md, q = batch.metadata, batch.q[0]
    backend = SparsePrefillBackend(cfg, args.path)
    layers = range(cfg.num_layers)
    # Slots of the chunk's new tokens and, per ratio, of the entries it completes (baseline).
    swa_slots, comp_slots = new_slots(md, 0), {r: new_slots(md, r) for r in cfg.compressed_ratios}
    all_k = _new_k(cfg, (0, md.num_tokens), lambda r: (0, comp_slots[r].shape[0]), device)

    def store_all(layer):
        """What one GPU (and every head-parallel rank) stores: the whole chunk's K."""
        caches, ratio = batch.caches[layer], cfg.compress_ratios[layer]
        k, ck = all_k[layer]
        store_k_cache(caches.swa, k, swa_slots, cfg.swa_page_size)
        if ck is not None:
            store_k_cache(caches.compressed, ck, comp_slots[ratio], cfg.page_size_of(ratio))

    # mode -> (layer step(layer, store, gather), its begin_forward, CommStats or None, rows, heads)
    modes = {}
    if world == 1:
        def base_step(layer, store, gather):
            if store:
                store_all(layer)
            backend.forward(*batch.layer_inputs(layer))

        modes["baseline"] = (base_step, backend.begin_forward, None, md.num_tokens, cfg.num_heads)
    if world > 1 and "cp" in args.modes:
        cp = ContextParallelPrefill(backend)
        cp.begin_forward(md)
        a, b = cp.rows
        new_k = _new_k(cfg, (a, b), cp.entry_rows, device)
        out = torch.empty(md.num_tokens, cfg.num_heads, D, dtype=torch.bfloat16, device=device)

        def cp_step(layer, store, gather):
            _, _, caches, topk, sink = batch.layer_inputs(layer)
            if store:
                cp.store_kv(layer, caches, *new_k[layer])
            topk = None if topk is None else topk[a:b]
            cp.forward(layer, q[a:b], caches, topk, sink, gather=gather, out=out if gather else None)

        modes["cp"] = (cp_step, cp.begin_forward, cp.stats, b - a, cfg.num_heads)
    if world > 1 and "hp" in args.modes:
        if cfg.num_heads % world:
            print(f"hp: {cfg.num_heads} heads do not split over {world} GPUs; skipped", file=sys.stderr)
        else:
            hp = HeadParallelPrefill(backend)

            def hp_step(layer, store, gather):
                if store:
                    store_all(layer)
                hp.forward(*batch.layer_inputs(layer), gather=gather)

            modes["hp"] = (hp_step, hp.begin_forward, hp.stats, md.num_tokens, cfg.num_heads // world)

    rows = []
    for mode, (step, begin, stats, my_rows, my_heads) in modes.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def forward(store: bool, gather: bool) -> None:
            begin(md)  # per-forward state is rebuilt every forward, as in an engine
            for layer in layers:
                step(layer, store, gather)

        row = {
            "mode": mode,
            "world": world,
            "total_s": _timed(lambda: forward(True, False), args, device),
            "attn_s": _timed(lambda: forward(False, False), args, device),
        }
        if stats is not None:
            row["gathered_s"] = _timed(lambda: forward(False, True), args, device)
            stats.reset()
            forward(True, False)
            row["kv_bytes"] = stats.kv_bytes
            stats.reset()
            forward(False, True)
            row["out_bytes"] = stats.out_bytes
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        per_rank = [None] * world
        dist.all_gather_object(per_rank, (my_rows, my_heads, peak))
        row["rows_per_rank"], row["heads_per_rank"], peaks = (list(x) for x in zip(*per_rank))
        row["peak_bytes"] = max(peaks)
        rows.append(row)
    paths = {str(r): backend.path_for(r, md) for r in sorted(set(cfg.compress_ratios))}
    return {"world": world, "paths": paths, "rows": rows}


# ---------------------------------------------------------------------------------------------
# Driver


def run_world(world: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(run_rank, args=(world, args, tmp), nprocs=world, join=True)
        with open(os.path.join(tmp, "result.json")) as f:
            return json.load(f)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def report(args, results: list[dict]) -> tuple[str, dict]:
    cfg, _, _ = model(args)
    base = next(r for res in results for r in res["rows"] if r["mode"] == "baseline")
    device = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name(0)
    gpus = 0 if args.smoke else torch.cuda.device_count()
    lines = [
        "# Prefill across GPUs: context and head parallelism",
        "",
        f"Device: {gpus} x {device}; torch {torch.__version__}; "
        + ", ".join(f"{k}={os.environ[k]}" for k in NVLS_ENV),
        f"Chunk: {args.tokens} new tokens, {args.requests} request(s), prefix {args.prefix}; "
        f"h_q {cfg.num_heads}, topk {cfg.topk}, W {cfg.window_size}, layers {list(cfg.compress_ratios)}; "
        f"path setting {args.path}, routed {results[0]['paths']}; median of {args.iters}.",
        "",
        "One forward of the whole stack, slowest rank, per-forward state rebuilt each time. total: "
        "storing the chunk's K (baseline, hp: store_k_cache of all of it on every GPU; cp: store_kv, "
        "the K exchange) + attention, outputs left per rank. attn: attention alone. gathered: "
        "attention with every layer's outputs gathered (cp: engine row order; hp: along heads). "
        "Efficiency = t_1 / (GPUs x t_GPUs). MB: every rank's shard once, per forward.",
        "",
        "| mode | GPUs | rows per rank | heads per rank | total ms | speedup | efficiency | attn ms "
        "| attn efficiency | gathered ms | KV exchanged MB | outputs gathered MB | peak GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    table = []
    for res in results:
        for r in res["rows"]:
            w = r["world"]
            speed = base["total_s"] / r["total_s"]
            attn_eff = base["attn_s"] / (w * r["attn_s"])
            row = {**r, "speedup": speed, "efficiency": speed / w, "attn_efficiency": attn_eff}
            table.append(row)
            lines.append(
                f"| {r['mode']} | {w} | {min(r['rows_per_rank'])}-{max(r['rows_per_rank'])} | "
                f"{r['heads_per_rank'][0]} | {_ms(r['total_s'])} | {speed:.2f}x | {row['efficiency']:.0%} | "
                f"{_ms(r['attn_s'])} | {row['attn_efficiency']:.0%} | {_ms(r.get('gathered_s'))} | "
                f"{_mb(r.get('kv_bytes'))} | {_mb(r.get('out_bytes'))} | {r['peak_bytes'] / 2**30:.1f} |"
            )
    payload = {
        "device": device,
        "gpus": gpus,
        "torch": torch.__version__,
        "env": {k: os.environ[k] for k in NVLS_ENV},
        "config": {
            "tokens": args.tokens, "requests": args.requests, "prefix": args.prefix, "h_q": cfg.num_heads,
            "topk": cfg.topk, "window": cfg.window_size, "ratios": list(cfg.compress_ratios), "path": args.path,
            "routed": results[0]["paths"], "iters": args.iters, "warmup": args.warmup,
        },
        "rows": table,
    }
    return "\n".join(lines) + "\n", payload


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.smoke:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        need = max(args.worlds)
        if have < need:
            print(
                f"bench.parallel: needs {need} GPUs for --worlds {','.join(map(str, args.worlds))}, "
                f"{have} visible (use --smoke to check the script on the CPU)",
                file=sys.stderr,
            )
            return 2
    results = [run_world(w, args) for w in sorted(args.worlds)]
    md, payload = report(args, results)
    print(md)
    if args.out:
        write_outputs(args.out, "parallel", md, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
