"""Time the per-chunk index plumbing of the sparse prefill path on the GPU.

For one prefill chunk (default 32768 new tokens over 4 requests after cached prefixes), measures
building ``SparsePrefillChunkCache`` (once per chunk: SWA gather, workspace plans of ratios
0/4/128, SWA-only and ratio-128 rows; includes its one host sync) and recombining one ratio-4
layer's rows from its top-k (once per c4 layer), for the DeepSeek-V4 shapes h_q 64 / topk 512 and
h_q 128 / topk 1024 (h_q does not change this work; it names the attention shape to compare
with). Median of ``triton.testing.do_bench``.

    python -m sparse_prefill.bench.indices [--tokens 32768] [--prefixes 0,8192,16384,32768] [--out DIR]

(``sparse-prefill bench --only indices`` runs it with the defaults.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from sparse_prefill.backend.chunk_cache import SparsePrefillChunkCache
from sparse_prefill.bench.common import (
    SILENT,
    BenchResult,
    Progress,
    bench_main,
    markdown_table,
    median_us,
    require_cuda,
)
from sparse_prefill.ops.indices import combined_width

SHAPES = ((64, 512), (128, 1024))  # (h_q, topk)
WINDOW = 128
RATIOS = (0, 4, 128)
TOKENS = 32768
PREFIXES = (0, 8192, 16384, 32768)


def make_chunk(tokens: int, prefixes: list[int], device: torch.device):
    num_reqs = len(prefixes)
    ext = torch.full((num_reqs,), tokens // num_reqs, dtype=torch.int32)
    ext[: tokens % num_reqs] += 1
    seq = torch.tensor(prefixes, dtype=torch.int32) + ext
    longest = int(seq.max())
    # Random ids in a pool twice the size, like pages scattered over a KV pool.
    swa_table = torch.randint(0, 2 * num_reqs * longest, (num_reqs, longest), dtype=torch.int32)
    comp = {
        c: torch.randint(0, 2 * num_reqs * longest // c, (num_reqs, longest // c), dtype=torch.int32)
        for c in RATIOS
        if c > 0
    }
    return dict(
        seq_lens=seq.to(device),
        extend_lens=ext.to(device),
        swa_token_table=swa_table.to(device),
        compressed_token_tables={c: t.to(device) for c, t in comp.items()},
        window_size=WINDOW,
        ratios=RATIOS,
    )


def indexer_picks(seq: list[int], ext: list[int], topk: int, device: torch.device) -> torch.Tensor:
    """Random request-local picks in [0, (p + 1) // 4) (the indexer's -1 padding for short rows)."""
    rows = []
    for s, e in zip(seq, ext):
        p = torch.arange(s - e, s, device=device)[:, None]
        visible = (p + 1) // 4
        j = (torch.rand(e, topk, device=device) * visible).long()
        rows.append(torch.where(torch.arange(topk, device=device) < visible, j, -1))
    return torch.cat(rows).int()


def run(
    *, quick: bool = False, tokens: int = TOKENS, prefixes: Sequence[int] = PREFIXES,
    progress: Progress = SILENT,
) -> BenchResult:
    """Measure (CUDA only). ``quick`` changes nothing: this benchmark takes seconds."""
    device = torch.device("cuda")
    prefixes = list(prefixes)
    chunk = make_chunk(tokens, prefixes, device)
    seq, ext = chunk["seq_lens"].tolist(), chunk["extend_lens"].tolist()
    rows = []
    progress.section("indices", len(SHAPES))
    for h_q, topk in SHAPES:
        progress.step(f"h_q {h_q}, topk {topk}")
        kwargs = dict(chunk, key=1, topk=topk)
        build_us = median_us(lambda: SparsePrefillChunkCache.build(**kwargs))
        cache = SparsePrefillChunkCache.build(**kwargs)
        # Two pick tensors in turn: the same tensor again would reuse the rows (V4.1 sharing).
        picks = [indexer_picks(seq, ext, topk, device) for _ in range(2)]
        combine_us = median_us(lambda: cache.combine_topk(4, picks.reverse() or picks[0], 1))
        plan = cache.plan(4, 1)
        width = combined_width(topk, WINDOW)
        rows.append(
            dict(
                h_q=h_q,
                topk=topk,
                tokens=tokens,
                requests=len(prefixes),
                prefixes=prefixes,
                build_us=round(build_us, 1),
                combine_c4_us=round(combine_us, 1),
                # Bytes the recombine moves: top-k read, combined rows + lens written.
                combine_c4_gbs=round(tokens * (topk + width + 1) * 4 / combine_us / 1e3, 1),
                c4_workspace_rows=plan.num_rows,
                # The original reserved max_seq_len // 4 compressed rows for every request.
                c4_workspace_rows_original=len(seq) * (max(seq) // 4) + plan.swa_token_ids.numel(),
            )
        )
    columns = (
        "h_q", "topk", "tokens", "requests", "build chunk cache (us)", "recombine c4 layer (us)",
        "c4 recombine GB/s", "c4 workspace rows (original)",
    )
    table = markdown_table(columns, [
        (
            r["h_q"], r["topk"], r["tokens"], r["requests"], r["build_us"], r["combine_c4_us"],
            r["combine_c4_gbs"], f"{r['c4_workspace_rows']} ({r['c4_workspace_rows_original']})",
        )
        for r in rows
    ])
    text = f"Prefixes {prefixes}, W = {WINDOW}, median of do_bench.\n\n" + "\n".join(table)
    return BenchResult("indices", "Index plumbing of one prefill chunk", text, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=TOKENS, help="new tokens in the chunk")
    parser.add_argument("--prefixes", default=",".join(map(str, PREFIXES)), help="cached prefix per request")
    parser.add_argument("--out", metavar="DIR", help="directory for indices.md and indices.json")
    args = parser.parse_args(argv)
    prefixes = [int(x) for x in args.prefixes.split(",")]
    return bench_main(
        args.out, lambda progress: run(tokens=args.tokens, prefixes=prefixes, progress=progress),
        require_cuda("the indices benchmark"),
    )


if __name__ == "__main__":
    sys.exit(main())
