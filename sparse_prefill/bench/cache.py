"""Throughput of the FP8 paged KV cache ops on the GPU, next to the device's copy bandwidth.

For 64K..4M tokens, page sizes 64 and 256, V4 layout: ``dequantize_k_cache_paged`` of random
token ids (the sparse-prefill workspace fill) and ``store_k_cache`` to random unique slots, with
value checks off (as engines run them in the hot loop). GB/s counts bytes read plus written:
gather reads 584 cache bytes + a 4-byte id and writes 1024 bytes per token; store reads 1024 +
4 and writes 584. Copy bandwidth: a 1 GiB device-to-device ``copy_`` (read + write bytes).
Times are the median of ``triton.testing.do_bench``. ``--sweep`` also times launch variants of
both kernels (each checked bit for bit against the default first).

    python -m sparse_prefill.bench.cache [--out DIR] [--sweep] [--tokens 65536,...]

(``sparse-prefill bench --only cache`` runs it with the defaults.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch

from sparse_prefill._utils import cdiv, value_checks
from sparse_prefill.bench.common import (
    SILENT,
    BenchResult,
    Progress,
    bench_main,
    markdown_table,
    median_us,
    require_cuda,
)
from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops.cache import dequantize_k_cache_paged, store_k_cache
from sparse_prefill.ops.cache.kernels import (
    GATHER_DEFAULTS,
    STORE_DEFAULTS,
    dequantize_k_cache_paged_triton,
    store_k_cache_triton,
)

LAYOUT = KVCacheLayout.V4
PAGE_SIZES = (64, 256)
TOKENS = (1 << 16, 1 << 18, 1 << 20, 1 << 22)
QUICK_TOKENS = (1 << 20,)
MIN_CAPACITY = 1 << 20  # cache tokens at least: 612 MB of V4 cache, far beyond L2
GATHER_VARIANTS = [
    {"BLOCK_T": 16, "BLOCK_D": 64, "num_warps": 4},
    {"BLOCK_T": 64, "BLOCK_D": 64, "num_warps": 8},
    {"BLOCK_T": 16, "BLOCK_D": 128, "num_warps": 4},
    {"BLOCK_T": 8, "BLOCK_D": 512, "num_warps": 4},
    {"BLOCK_T": 16, "BLOCK_D": 512, "num_warps": 8},
]
STORE_VARIANTS = [
    {"BLOCK_T": 8, "num_warps": 4},
    {"BLOCK_T": 8, "num_warps": 2},
    {"BLOCK_T": 32, "num_warps": 8},
]
ID_BYTES = 4  # int32 ids


def copy_gbs(device: torch.device) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = median_us(lambda: dst.copy_(src))
    return 2 * src.numel() / us / 1e3


def timed_variants(
    op: str, public: Callable[[], object], launch: Callable[..., object], result: torch.Tensor,
    variants: Sequence[dict],
) -> list[dict]:
    """Rows ``{op, config, us}``: the public op (default launch), then each of ``variants`` through
    ``launch(**variant)``. Each variant first runs on a zeroed ``result`` (what the op writes)
    and must reproduce the public op's bytes (RuntimeError otherwise)."""
    rows = [dict(op=op, config="default (public op)", us=median_us(public))]
    expected = result.clone() if variants else None
    for cfg in variants:
        result.zero_()
        launch(**cfg)
        if not torch.equal(result, expected):
            raise RuntimeError(f"{op} variant {cfg} differs from the default")
        rows.append(dict(op=op, config=str(cfg), us=median_us(lambda cfg=cfg: launch(**cfg))))
    return rows


def gather_case(tokens: int, page_size: int, device: torch.device, sweep: bool) -> list[dict]:
    num_pages = cdiv(max(tokens, MIN_CAPACITY), page_size)
    # Timing does not depend on the values: random bytes stand in for a filled cache. Bytes in
    # [0x20, 0x7F) make no NaN and no subnormal (scales >= 2**-95), so variants compare bit for bit.
    shape = (num_pages, LAYOUT.page_bytes(page_size))
    cache = torch.randint(0x20, 0x7F, shape, dtype=torch.uint8, device=device)
    ids = torch.randint(0, num_pages * page_size, (tokens,), dtype=torch.int32, device=device)
    out = torch.empty(tokens, 1, LAYOUT.dim, dtype=torch.bfloat16, device=device)
    nbytes = tokens * (LAYOUT.bytes_per_token + ID_BYTES + 2 * LAYOUT.dim)
    flat = out[:, 0]
    rows = timed_variants(
        "gather", lambda: dequantize_k_cache_paged(cache, ids, page_size, LAYOUT, out),
        lambda **cfg: dequantize_k_cache_paged_triton(cache, ids, page_size, LAYOUT, flat, **cfg),
        flat.view(torch.int16), [GATHER_DEFAULTS] + GATHER_VARIANTS if sweep else [],
    )
    return [dict(r, page_size=page_size, tokens=tokens, bytes=nbytes) for r in rows]


def store_case(tokens: int, page_size: int, device: torch.device, sweep: bool) -> list[dict]:
    num_pages = cdiv(max(tokens, MIN_CAPACITY), page_size)
    cache = torch.zeros(num_pages, LAYOUT.page_bytes(page_size), dtype=torch.uint8, device=device)
    slots = torch.randperm(num_pages * page_size, device=device)[:tokens].int()
    k = torch.randn(tokens, LAYOUT.dim, dtype=torch.bfloat16, device=device)
    nbytes = tokens * (2 * LAYOUT.dim + ID_BYTES + LAYOUT.bytes_per_token)
    rows = timed_variants(
        "store", lambda: store_k_cache(cache, k, slots, page_size, LAYOUT),
        lambda **cfg: store_k_cache_triton(cache, k, slots, page_size, LAYOUT, **cfg),
        cache, [STORE_DEFAULTS] + STORE_VARIANTS if sweep else [],
    )
    return [dict(r, page_size=page_size, tokens=tokens, bytes=nbytes) for r in rows]


def run(
    *, quick: bool = False, tokens: Sequence[int] | None = None, sweep: bool = False,
    progress: Progress = SILENT,
) -> BenchResult:
    """Measure (CUDA only); ``quick`` times one token count (``QUICK_TOKENS``)."""
    tokens = tuple(tokens or (QUICK_TOKENS if quick else TOKENS))
    device = torch.device("cuda")
    progress.section("cache", 1 + len(PAGE_SIZES) * len(tokens))
    progress.step("device copy bandwidth")
    copy = copy_gbs(device)
    rows = []
    with value_checks(False):
        for page_size in PAGE_SIZES:
            for n in tokens:
                progress.step(f"page size {page_size}, {n} tokens")
                rows += gather_case(n, page_size, device, sweep)
                rows += store_case(n, page_size, device, sweep)
                torch.cuda.empty_cache()
    for r in rows:
        r["us"] = round(r["us"], 1)
        r["gbs"] = round(r["bytes"] / r["us"] / 1e3, 1)
        r["pct_of_copy"] = round(100 * r["gbs"] / copy, 1)

    columns = ("op", "page size", "tokens", "config", "time (us)", "GB/s", "% of copy")
    table = markdown_table(columns, [
        (r["op"], r["page_size"], r["tokens"], r["config"], r["us"], r["gbs"], r["pct_of_copy"]) for r in rows
    ])
    title = f"FP8 paged KV cache ops ({LAYOUT.name})"
    text = (
        f"Device copy bandwidth {copy:.0f} GB/s (read + write); median of do_bench, value checks off.\n\n"
        + "\n".join(table)
    )
    return BenchResult("cache", title, text, rows, dict(layout=LAYOUT.name, copy_gbs=round(copy, 1)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", metavar="DIR", help="directory for cache.md and cache.json")
    parser.add_argument("--sweep", action="store_true", help="also time launch variants of both kernels")
    parser.add_argument(
        "--tokens", default=",".join(str(t) for t in TOKENS), help="comma-separated token counts"
    )
    args = parser.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    return bench_main(
        args.out, lambda progress: run(tokens=tokens, sweep=args.sweep, progress=progress),
        require_cuda("the cache benchmark"),
    )


if __name__ == "__main__":
    sys.exit(main())
