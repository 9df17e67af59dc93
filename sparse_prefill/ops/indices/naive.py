"""PyTorch references of the index ops: the definition of what the Triton kernels compute."""

from __future__ import annotations

import torch

from sparse_prefill.ops.indices.plan import ChunkIndices, SwaTokenIds, WorkspacePlan, combined_width


def _gather_rows(table: torch.Tensor, starts: list[int], ends: list[int]) -> torch.Tensor:
    """``table[r, starts[r]:ends[r]]`` of every request, concatenated."""
    parts = [table[r, s:e] for r, (s, e) in enumerate(zip(starts, ends))]
    return torch.cat([table.new_empty(0)] + parts)


def build_swa_token_ids_ref(
    seq_lens: torch.Tensor, extend_lens: torch.Tensor, req_token_table: torch.Tensor, swa_window: int
) -> SwaTokenIds:
    """``build_swa_token_ids`` on validated inputs (same arguments and result)."""
    seq, ext = seq_lens.tolist(), extend_lens.tolist()
    # The union of the windows of queries prefix .. seq-1; nothing when a request has no query.
    first = [max(0, s - e - swa_window + 1) if e > 0 else s for s, e in zip(seq, ext)]
    gather = [s - f for s, f in zip(seq, first)]
    offsets = [0]
    for g in gather:
        offsets.append(offsets[-1] + g)
    dev = seq_lens.device
    return SwaTokenIds(
        token_ids=_gather_rows(req_token_table, first, seq),
        first_pos=torch.tensor(first, dtype=torch.int32, device=dev),
        gather_lens=torch.tensor(gather, dtype=torch.int32, device=dev),
        offsets=torch.tensor(offsets, dtype=torch.int64, device=dev),
    )


def build_workspace_plan_ref(
    seq_lens: torch.Tensor,
    swa: SwaTokenIds,
    compress_ratio: int,
    compressed_token_table: torch.Tensor | None,
) -> WorkspacePlan:
    """``build_workspace_plan`` on validated inputs (same arguments and result)."""
    seq = seq_lens.tolist()
    entries = [s // compress_ratio for s in seq] if compress_ratio > 0 else [0] * len(seq)
    compressed_base = []
    rows = 0
    for n in entries:
        compressed_base.append(rows)
        rows += n
    if compressed_token_table is None:
        compressed_ids = swa.token_ids.new_empty(0)
    else:
        compressed_ids = _gather_rows(compressed_token_table, [0] * len(seq), entries)
    swa_base = [rows + o for o in swa.offsets[:-1].tolist()]
    dev = seq_lens.device
    return WorkspacePlan(
        compress_ratio=compress_ratio,
        compressed_token_ids=compressed_ids,
        swa_token_ids=swa.token_ids,
        compressed_base=torch.tensor(compressed_base, dtype=torch.int32, device=dev),
        swa_base=torch.tensor(swa_base, dtype=torch.int32, device=dev),
    )


def combine_topk_swa_indices_ref(
    topk_indices: torch.Tensor | None,
    query_start_loc: torch.Tensor,
    query_pos: torch.Tensor,
    seq_lens: torch.Tensor,
    gather_lens: torch.Tensor,
    compressed_base: torch.Tensor,
    swa_base: torch.Tensor,
    window_size: int,
    compress_ratio: int,
    topk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``combine_topk_swa_indices`` on validated inputs: ``(indices, lens)``, newly allocated."""
    n, dev = query_pos.shape[0], query_pos.device
    width = combined_width(topk, window_size)
    req = torch.repeat_interleave(
        torch.arange(seq_lens.shape[0], device=dev), query_start_loc.diff().long(), output_size=n
    )
    p = query_pos.long()[:, None]
    seq = seq_lens.long()[req][:, None]

    # Compressed candidates, in the indexer's order: entry j is visible iff j < (p+1) // ratio
    # (always within the request's seq_len // ratio complete entries, checked anyway).
    if topk_indices is None:
        entries = torch.arange(topk, device=dev).expand(n, topk)
    else:
        entries = topk_indices.long()
    visible = torch.minimum((p + 1) // compress_ratio, seq // compress_ratio)
    entry_ok = (entries >= 0) & (entries < visible)
    entry_rows = entries + compressed_base.long()[req][:, None]

    # Window candidates, ascending: positions p-W+1 .. p, those >= 0.
    pos = p - window_size + 1 + torch.arange(window_size, device=dev)
    pos_ok = pos >= 0
    first_pos = seq - gather_lens.long()[req][:, None]
    pos_rows = swa_base.long()[req][:, None] + pos - first_pos

    cand = torch.cat([entry_rows, pos_rows], dim=1)
    keep = torch.cat([entry_ok, pos_ok], dim=1)
    # Compact the kept candidates to the front of the row, order preserved; the dropped ones
    # land in a scratch column that is cut off.
    dest = torch.where(keep, keep.long().cumsum(dim=1) - 1, width)
    out = torch.full((n, width + 1), -1, dtype=torch.int64, device=dev)
    out.scatter_(1, dest, cand)
    return out[:, :width].to(torch.int32), keep.sum(dim=1).to(torch.int32)


def build_chunk_indices_ref(
    seq_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    swa_token_table: torch.Tensor,
    compressed_token_tables: dict[int, torch.Tensor],
    ratios: list[int],
    row_topks: list[int],
    window_size: int,
    num_tokens: int,
) -> ChunkIndices:
    """``build_chunk_indices`` on validated inputs: the per-op references composed."""
    n = num_tokens
    query_start_loc = torch.nn.functional.pad(extend_lens.cumsum(0), (1, 0)).to(torch.int32)
    first_query = seq_lens - extend_lens - query_start_loc[:-1]
    query_pos = torch.repeat_interleave(first_query, extend_lens, output_size=n) + torch.arange(
        n, dtype=torch.int32, device=seq_lens.device
    )
    swa = build_swa_token_ids_ref(seq_lens, extend_lens, swa_token_table, window_size)
    plans, rows = {}, {}
    for c, topk in zip(ratios, row_topks):
        plan = plans[c] = build_workspace_plan_ref(seq_lens, swa, c, compressed_token_tables.get(c))
        if topk >= 0:
            rows[c] = combine_topk_swa_indices_ref(
                None, query_start_loc, query_pos, seq_lens, swa.gather_lens, plan.compressed_base,
                plan.swa_base, window_size, max(c, 1), topk,
            )
    return ChunkIndices(query_start_loc, query_pos, swa, plans, rows)
