"""Triton kernels of the index ops and their launchers (inputs already validated).

Small per-request vectors ([R]) are computed with torch ops; the kernels do the per-token work:
``_gather_segments_kernel`` (flat token ids of per-request table ranges, for the SWA gather and
the compressed region of a workspace plan) and ``_combine_kernel`` (one combined index row per
query token).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_prefill._utils import cdiv
from sparse_prefill.ops.indices.plan import SwaTokenIds, WorkspacePlan, combined_width, swa_gather_lens

_GATHER_BLOCK = 1024


@triton.jit
def _gather_segments_kernel(
    table_ptr,
    table_stride0,
    table_stride1,
    starts_ptr,
    offsets_ptr,
    out_ptr,
    total,
    num_segments,
    search_steps,
    HAS_STARTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[i] = table[r, starts[r] + i - offsets[r]] for offsets[r] <= i < offsets[r+1]."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    # Segment of each element: the largest r < R with offsets[r] <= idx (empty segments repeat
    # an offset, the largest skips them). Binary search, so any number of requests is cheap.
    lo = tl.zeros([BLOCK], dtype=tl.int32)
    hi = lo + num_segments
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        go = tl.load(offsets_ptr + mid) <= idx
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    col = idx - tl.load(offsets_ptr + lo)
    if HAS_STARTS:
        col += tl.load(starts_ptr + lo)
    src = table_ptr + lo.to(tl.int64) * table_stride0 + col * table_stride1
    tl.store(out_ptr + idx, tl.load(src, mask=mask), mask=mask)


def _gather_segments(
    table: torch.Tensor, starts: torch.Tensor | None, offsets: torch.Tensor, total: int
) -> torch.Tensor:
    out = torch.empty(total, dtype=table.dtype, device=table.device)
    num_segments = offsets.shape[0] - 1
    if total > 0:
        _gather_segments_kernel[(cdiv(total, _GATHER_BLOCK),)](
            table,
            table.stride(0),
            table.stride(1),
            offsets if starts is None else starts,
            offsets,
            out,
            total,
            num_segments,
            num_segments.bit_length(),
            HAS_STARTS=starts is not None,
            BLOCK=_GATHER_BLOCK,
        )
    return out


def _exclusive_cumsum(lens: torch.Tensor) -> torch.Tensor:
    """``[R + 1]`` int64 offsets of ``[R]`` lengths."""
    return torch.nn.functional.pad(lens.cumsum(0), (1, 0))


def build_swa_token_ids_triton(
    seq_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    req_token_table: torch.Tensor,
    swa_window: int,
    total: int,
) -> SwaTokenIds:
    gather = swa_gather_lens(seq_lens, extend_lens, swa_window)
    first_pos = (seq_lens - gather).to(torch.int32)
    gather_lens = gather.to(torch.int32)
    offsets = _exclusive_cumsum(gather)
    token_ids = _gather_segments(req_token_table, first_pos, offsets, total)
    return SwaTokenIds(token_ids, first_pos, gather_lens, offsets)


def build_workspace_plan_triton(
    seq_lens: torch.Tensor,
    swa: SwaTokenIds,
    compress_ratio: int,
    compressed_token_table: torch.Tensor | None,
    num_compressed: int,
) -> WorkspacePlan:
    if compressed_token_table is None:
        offsets = torch.zeros(seq_lens.shape[0] + 1, dtype=torch.int64, device=seq_lens.device)
        compressed_ids = swa.token_ids.new_empty(0)
    else:
        offsets = _exclusive_cumsum((seq_lens // compress_ratio).long())
        compressed_ids = _gather_segments(compressed_token_table, None, offsets, num_compressed)
    return WorkspacePlan(
        compress_ratio=compress_ratio,
        compressed_token_ids=compressed_ids,
        swa_token_ids=swa.token_ids,
        compressed_base=offsets[:-1].to(torch.int32),
        swa_base=(swa.offsets[:-1] + num_compressed).to(torch.int32),
    )


@triton.jit
def _combine_kernel(
    topk_ptr,
    topk_stride0,
    topk_stride1,
    qsl_ptr,
    qpos_ptr,
    seq_ptr,
    gather_ptr,
    cbase_ptr,
    sbase_ptr,
    out_ptr,
    out_stride,
    lens_ptr,
    num_reqs,
    window,
    ratio,
    topk,
    width,
    HAS_TOPK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    q = tl.program_id(0)
    # Request of row q: the number of requests 1..R-1 starting at or before q (one vector
    # compare per BLOCK_R requests, no serial chain of loads).
    r = 0
    for r0 in range(1, num_reqs, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        starts = tl.load(qsl_ptr + rr, mask=rr < num_reqs, other=0)
        r += tl.sum(((rr < num_reqs) & (starts <= q)).to(tl.int32), axis=0)
    p = tl.load(qpos_ptr + q)
    seq = tl.load(seq_ptr + r)
    first = seq - tl.load(gather_ptr + r)
    cbase = tl.load(cbase_ptr + r)
    sbase = tl.load(sbase_ptr + r)
    row = out_ptr + q.to(tl.int64) * out_stride

    # Visible compressed entries, compacted in the indexer's order.
    visible = tl.minimum((p + 1) // ratio, seq // ratio)
    n_valid = 0
    for k0 in range(0, topk, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        in_row = k < topk
        if HAS_TOPK:
            src = topk_ptr + q.to(tl.int64) * topk_stride0 + k.to(tl.int64) * topk_stride1
            ent = tl.load(src, mask=in_row, other=-1)
        else:
            ent = k
        ok = in_row & (ent >= 0) & (ent < visible)
        dest = n_valid + tl.cumsum(ok.to(tl.int32), axis=0) - 1
        tl.store(row + dest, ent + cbase, mask=ok)
        n_valid += tl.sum(ok.to(tl.int32), axis=0)

    # Then the window positions max(0, p-W+1) .. p, then -1: every column written exactly once.
    win_start = tl.maximum(p - window + 1, 0)
    length = n_valid + p - win_start + 1
    for o0 in range(n_valid, width, BLOCK_W):
        o = o0 + tl.arange(0, BLOCK_W)
        val = tl.where(o < length, sbase + (win_start - first) + (o - n_valid), -1)
        tl.store(row + o, val, mask=o < width)
    tl.store(lens_ptr + q, length)


def combine_topk_swa_indices_triton(
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
    out_indices: torch.Tensor,
    out_lens: torch.Tensor,
) -> None:
    num_tokens = query_pos.shape[0]
    if num_tokens == 0:
        return
    num_reqs = seq_lens.shape[0]
    _combine_kernel[(num_tokens,)](
        query_pos if topk_indices is None else topk_indices,
        *((0, 0) if topk_indices is None else topk_indices.stride()),
        query_start_loc,
        query_pos,
        seq_lens,
        gather_lens,
        compressed_base,
        swa_base,
        out_indices,
        out_indices.stride(0),
        out_lens,
        num_reqs,
        window_size,
        compress_ratio,
        topk,
        combined_width(topk, window_size),
        HAS_TOPK=topk_indices is not None,
        BLOCK_R=min(max(triton.next_power_of_2(num_reqs - 1), 16), 1024),
        BLOCK_K=min(max(triton.next_power_of_2(topk), 16), 1024),
        BLOCK_W=256,
    )
