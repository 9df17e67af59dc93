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
from sparse_prefill.ops.indices.plan import (
    ChunkIndices,
    SwaTokenIds,
    WorkspacePlan,
    combined_width,
    swa_gather_lens,
)

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


# The chunk build: one launch per group of ratios (_SLOTS below). Its programs need per-request
# prefix sums that no earlier launch wrote, so each scans the [R] lengths itself, _SCAN_R
# requests a step: a few vector ops for the usual handful of requests, where a separate launch
# would cost more.
_SCAN_R = 16
_CHUNK_BLOCK = 256  # elements per program of the flat outputs
_ROWS_Q = 16  # combined rows per program
_ROWS_W = 128  # columns per store of the combined rows


@triton.jit
def _request_step(seq_ptr, seq_stride, ext_ptr, ext_stride, r0, num_reqs, window, divisor, has_entries,
                  q_start, s_start, c_start, SCAN_R: tl.constexpr):
    """Requests ``r0 .. r0 + SCAN_R - 1`` (lengths 0 past the last), all int64: index,
    seq_len, extend_len, SWA gather length, complete compressed entries; the first query, SWA
    row and compressed row of each (exclusive prefix sums after the ``*_start`` of the
    requests before ``r0``); and the three starts of the next step."""
    rr = r0 + tl.arange(0, SCAN_R)
    ok = rr < num_reqs
    seq = tl.load(seq_ptr + rr * seq_stride, mask=ok, other=0).to(tl.int64)
    ext = tl.load(ext_ptr + rr * ext_stride, mask=ok, other=0).to(tl.int64)
    gather = tl.where(ext > 0, tl.minimum(seq, ext + (window - 1)), 0)
    entries = (seq // divisor) * has_entries
    q_first = q_start + tl.cumsum(ext, axis=0) - ext
    s_first = s_start + tl.cumsum(gather, axis=0) - gather
    c_first = c_start + tl.cumsum(entries, axis=0) - entries
    return (rr.to(tl.int64), seq, ext, gather, entries, q_first, s_first, c_first,
            q_start + tl.sum(ext, axis=0), s_start + tl.sum(gather, axis=0), c_start + tl.sum(entries, axis=0))


@triton.jit
def _pick(hit, values):
    """``values[r]`` of the one request ``r`` each row of ``hit [rows, SCAN_R]`` hits (else 0)."""
    return tl.sum(tl.where(hit, values[None, :], 0), axis=1)


@triton.jit
def _chunk_vectors(seq_ptr, seq_stride, ext_ptr, ext_stride, num_reqs, window, divisor, has_entries,
                   num_compressed, first, qsl_ptr, first_pos_ptr, gather_ptr, offsets_ptr, cbase_ptr, sbase_ptr,
                   SCAN_R: tl.constexpr):
    """The ``[R]`` vectors: this ratio's bases and, in the first launch, the shared ones."""
    if first:
        tl.store(qsl_ptr, 0)
        tl.store(offsets_ptr, tl.zeros([], tl.int64))
    q_start = tl.zeros([], tl.int64)
    s_start = tl.zeros([], tl.int64)
    c_start = tl.zeros([], tl.int64)
    for r0 in range(0, num_reqs, SCAN_R):
        rr, seq, ext, gather, entries, q_first, s_first, c_first, q_start, s_start, c_start = _request_step(
            seq_ptr, seq_stride, ext_ptr, ext_stride, r0, num_reqs, window, divisor, has_entries,
            q_start, s_start, c_start, SCAN_R,
        )
        ok = rr < num_reqs
        if first:
            tl.store(qsl_ptr + rr + 1, (q_first + ext).to(tl.int32), mask=ok)
            tl.store(first_pos_ptr + rr, (seq - gather).to(tl.int32), mask=ok)
            tl.store(gather_ptr + rr, gather.to(tl.int32), mask=ok)
            tl.store(offsets_ptr + rr + 1, s_first + gather, mask=ok)
        tl.store(cbase_ptr + rr, c_first.to(tl.int32), mask=ok)
        tl.store(sbase_ptr + rr, (s_first + num_compressed).to(tl.int32), mask=ok)


@triton.jit
def _locate(idx, seq_ptr, seq_stride, ext_ptr, ext_stride, num_reqs, window, divisor, has_entries, num_compressed,
            KIND: tl.constexpr, SCAN_R: tl.constexpr):
    """The request of each of the flat indices ``idx`` (0 past the end) when the requests'
    segments lie back to back, KIND 0: extend_len each (query rows), 1: gather_len (SWA ids),
    2: complete entries (compressed ids). Returns per index: the request, the position or column
    its index stands for minus the index, and the request's seq_len, workspace row of its SWA
    position 0 and first compressed row."""
    req = tl.zeros(idx.shape, tl.int64)
    col = tl.zeros(idx.shape, tl.int64)
    seq_of = tl.zeros(idx.shape, tl.int64)
    win_row = tl.zeros(idx.shape, tl.int64)
    cbase = tl.zeros(idx.shape, tl.int64)
    q_start = tl.zeros([], tl.int64)
    s_start = tl.zeros([], tl.int64)
    c_start = tl.zeros([], tl.int64)
    for r0 in range(0, num_reqs, SCAN_R):
        rr, seq, ext, gather, entries, q_first, s_first, c_first, q_start, s_start, c_start = _request_step(
            seq_ptr, seq_stride, ext_ptr, ext_stride, r0, num_reqs, window, divisor, has_entries,
            q_start, s_start, c_start, SCAN_R,
        )
        # Each segment's length, first index and the position (column) that index stands for.
        if KIND == 0:
            lens = ext
            seg_first = q_first
            origin = seq - ext
        elif KIND == 1:
            lens = gather
            seg_first = s_first
            origin = seq - gather
        else:
            lens = entries
            seg_first = c_first
            origin = entries * 0
        hit = (idx[:, None] >= seg_first[None, :]) & (idx[:, None] < (seg_first + lens)[None, :])
        req += _pick(hit, rr)
        col += _pick(hit, origin - seg_first)
        seq_of += _pick(hit, seq)
        win_row += _pick(hit, s_first + num_compressed - (seq - gather))
        cbase += _pick(hit, c_first)
    return req, col, seq_of, win_row, cbase


@triton.jit
def _chunk_segments(block, total, seq_ptr, seq_stride, ext_ptr, ext_stride, num_reqs, window, divisor,
                    has_entries, table_ptr, table_stride0, table_stride1, out_ptr,
                    KIND: tl.constexpr, SCAN_R: tl.constexpr, BLOCK: tl.constexpr):
    """One block of a flat per-token output (``_locate``'s KIND): query positions, or the SWA
    / compressed token ids looked up in the table."""
    idx = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    req, col, _, _, _ = _locate(idx, seq_ptr, seq_stride, ext_ptr, ext_stride, num_reqs, window, divisor,
                                has_entries, 0, KIND, SCAN_R)
    col += idx
    mask = idx < total
    if KIND == 0:
        tl.store(out_ptr + idx, col.to(tl.int32), mask=mask)
    else:
        src = table_ptr + req * table_stride0 + col * table_stride1
        tl.store(out_ptr + idx, tl.load(src, mask=mask), mask=mask)


@triton.jit
def _chunk_rows(block, num_tokens, seq_ptr, seq_stride, ext_ptr, ext_stride, num_reqs, window, divisor,
                has_entries, num_compressed, topk, width, rows_ptr, lens_ptr,
                SCAN_R: tl.constexpr, ROWS_Q: tl.constexpr, ROWS_W: tl.constexpr):
    """Combined rows of queries ``block * ROWS_Q ..`` taking entries ``0 .. topk - 1``: what
    ``_combine_kernel`` writes without top-k picks (the visible entries, the window, then -1)."""
    q = block.to(tl.int64) * ROWS_Q + tl.arange(0, ROWS_Q)
    _, p, seq, win_row, cbase = _locate(q, seq_ptr, seq_stride, ext_ptr, ext_stride, num_reqs, window, divisor,
                                        has_entries, num_compressed, 0, SCAN_R)
    p += q  # the query's absolute position
    visible = tl.minimum(tl.minimum((p + 1) // divisor, seq // divisor) * has_entries, topk)
    win_start = tl.maximum(p - window + 1, 0)
    length = visible + p - win_start + 1
    live = q < num_tokens
    row = rows_ptr + q * width
    for o0 in range(0, width, ROWS_W):
        o = o0 + tl.arange(0, ROWS_W)[None, :]
        win = win_row[:, None] + win_start[:, None] + (o - visible[:, None])
        val = tl.where(o < visible[:, None], cbase[:, None] + o, tl.where(o < length[:, None], win, -1))
        tl.store(row[:, None] + o, val.to(tl.int32), mask=live[:, None] & (o < width))
    tl.store(lens_ptr + q, length.to(tl.int32), mask=live)


@triton.jit
def _slot_blocks(pid, start, seq_ptr, seq_stride, ext_ptr, ext_stride, num_reqs, window, num_tokens,
                 table_ptr, table_stride0, table_stride1, cids_ptr, rows_ptr, lens_ptr,
                 divisor, has_entries, num_compressed, topk, width, rows_first, slot_end,
                 SCAN_R: tl.constexpr, BLOCK: tl.constexpr, ROWS_Q: tl.constexpr, ROWS_W: tl.constexpr):
    """Program ``pid``'s share of one ratio (a slot of the launch): its compressed ids in
    programs ``start .. rows_first - 1``, its combined rows in ``rows_first .. slot_end - 1``."""
    if (pid >= start) & (pid < rows_first):
        _chunk_segments(pid - start, num_compressed, seq_ptr, seq_stride, ext_ptr, ext_stride, num_reqs, window,
                        divisor, has_entries, table_ptr, table_stride0, table_stride1, cids_ptr, 2, SCAN_R, BLOCK)
    elif (pid >= rows_first) & (pid < slot_end):
        _chunk_rows(pid - rows_first, num_tokens, seq_ptr, seq_stride, ext_ptr, ext_stride, num_reqs, window,
                    divisor, has_entries, num_compressed, topk, width, rows_ptr, lens_ptr, SCAN_R, ROWS_Q, ROWS_W)


# Ratios per launch. Each launch costs the host tens of microseconds (Triton's binder and
# launcher), so the usual stack of three ratios (0, 4, 128) is one launch, not three.
_SLOTS = 3
_SLOT_ARGS = 15  # per slot: its table, the table's 2 strides, its 5 outputs, 7 sizes
_SLOT_TENSORS = 8  # the table, its 2 strides, its 5 outputs: None in an unused slot, the sizes 0
# The sizes change every forward: specializing on them (value 1, multiples of 16) would compile
# a new variant for every new pattern of sizes.
_SLOT_SIZES = ("table_stride0", "num_compressed", "topk", "width", "rows_first", "slot_end")


@triton.jit(do_not_specialize=[
    "num_reqs", "swa_stride0", "num_tokens", "num_swa", "qpos_end", "swa_end",
    *(f"{name}{k}" for k in range(_SLOTS) for name in _SLOT_SIZES),
])
def _chunk_kernel(
    seq_ptr, seq_stride, ext_ptr, ext_stride, num_reqs, window,
    swa_table_ptr, swa_stride0, swa_stride1,
    qsl_ptr, qpos_ptr, swa_ids_ptr, first_pos_ptr, gather_ptr, offsets_ptr,
    num_tokens, num_swa, first, qpos_end, swa_end,
    table0, table_stride00, table_stride10, cids0, cbase0, sbase0, rows0, lens0,
    divisor0, has_entries0, num_compressed0, topk0, width0, rows_first0, slot_end0,
    table1, table_stride01, table_stride11, cids1, cbase1, sbase1, rows1, lens1,
    divisor1, has_entries1, num_compressed1, topk1, width1, rows_first1, slot_end1,
    table2, table_stride02, table_stride12, cids2, cbase2, sbase2, rows2, lens2,
    divisor2, has_entries2, num_compressed2, topk2, width2, rows_first2, slot_end2,
    NUM_SLOTS: tl.constexpr, SCAN_R: tl.constexpr, BLOCK: tl.constexpr, ROWS_Q: tl.constexpr,
    ROWS_W: tl.constexpr,
):
    """Up to three ratios' share of the chunk build (slots 0 .. NUM_SLOTS - 1); programs by
    range: 0 the [R] vectors, then (first launch only) query positions and SWA ids, then each
    slot's compressed ids and combined rows (``_slot_blocks``)."""
    pid = tl.program_id(0)
    if pid == 0:
        _chunk_vectors(seq_ptr, seq_stride, ext_ptr, ext_stride, num_reqs, window, divisor0, has_entries0,
                       num_compressed0, first, qsl_ptr, first_pos_ptr, gather_ptr, offsets_ptr,
                       cbase0, sbase0, SCAN_R)
        if NUM_SLOTS > 1:
            _chunk_vectors(seq_ptr, seq_stride, ext_ptr, ext_stride, num_reqs, window, divisor1, has_entries1,
                           num_compressed1, 0, qsl_ptr, first_pos_ptr, gather_ptr, offsets_ptr,
                           cbase1, sbase1, SCAN_R)
        if NUM_SLOTS > 2:
            _chunk_vectors(seq_ptr, seq_stride, ext_ptr, ext_stride, num_reqs, window, divisor2, has_entries2,
                           num_compressed2, 0, qsl_ptr, first_pos_ptr, gather_ptr, offsets_ptr,
                           cbase2, sbase2, SCAN_R)
    elif pid < qpos_end:
        _chunk_segments(pid - 1, num_tokens, seq_ptr, seq_stride, ext_ptr, ext_stride, num_reqs, window,
                        1, 0, swa_table_ptr, swa_stride0, swa_stride1, qpos_ptr, 0, SCAN_R, BLOCK)
    elif pid < swa_end:
        _chunk_segments(pid - qpos_end, num_swa, seq_ptr, seq_stride, ext_ptr, ext_stride, num_reqs, window,
                        1, 0, swa_table_ptr, swa_stride0, swa_stride1, swa_ids_ptr, 1, SCAN_R, BLOCK)
    else:
        _slot_blocks(pid, swa_end, seq_ptr, seq_stride, ext_ptr, ext_stride, num_reqs, window, num_tokens,
                     table0, table_stride00, table_stride10, cids0, rows0, lens0, divisor0, has_entries0,
                     num_compressed0, topk0, width0, rows_first0, slot_end0, SCAN_R, BLOCK, ROWS_Q, ROWS_W)
        if NUM_SLOTS > 1:
            _slot_blocks(pid, slot_end0, seq_ptr, seq_stride, ext_ptr, ext_stride, num_reqs, window, num_tokens,
                         table1, table_stride01, table_stride11, cids1, rows1, lens1, divisor1, has_entries1,
                         num_compressed1, topk1, width1, rows_first1, slot_end1, SCAN_R, BLOCK, ROWS_Q, ROWS_W)
        if NUM_SLOTS > 2:
            _slot_blocks(pid, slot_end1, seq_ptr, seq_stride, ext_ptr, ext_stride, num_reqs, window, num_tokens,
                         table2, table_stride02, table_stride12, cids2, rows2, lens2, divisor2, has_entries2,
                         num_compressed2, topk2, width2, rows_first2, slot_end2, SCAN_R, BLOCK, ROWS_Q, ROWS_W)


def build_chunk_indices_triton(
    seq_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    swa_token_table: torch.Tensor,
    compressed_token_tables: dict[int, torch.Tensor],
    row_topks: list[int],
    window_size: int,
    out: ChunkIndices,
) -> None:
    """Fill ``out`` (``empty_chunk_indices``): one launch per ``_SLOTS`` ratios."""
    num_reqs, num_tokens, num_swa = seq_lens.shape[0], out.query_pos.shape[0], out.swa.token_ids.shape[0]
    swa = out.swa
    ratios = list(out.plans.items())
    for g in range(0, len(ratios), _SLOTS):
        first = g == 0  # the first launch also writes what the ratios share
        qpos_end = 1 + (cdiv(num_tokens, _CHUNK_BLOCK) if first else 0)
        end = swa_end = qpos_end + (cdiv(num_swa, _CHUNK_BLOCK) if first else 0)
        slots = []
        for (c, plan), topk in zip(ratios[g : g + _SLOTS], row_topks[g : g + _SLOTS]):
            table = compressed_token_tables.get(c, swa_token_table)  # ratio 0 reads none
            rows, lens = out.rows.get(c, (out.query_pos, out.query_pos))  # not written without rows
            n_c = plan.num_compressed_rows
            rows_first = end + cdiv(n_c, _CHUNK_BLOCK)
            end = rows_first + (cdiv(num_tokens, _ROWS_Q) if topk >= 0 else 0)
            slots += [
                table, *table.stride(), plan.compressed_token_ids, plan.compressed_base, plan.swa_base, rows, lens,
                max(c, 1), int(c > 0), n_c, max(topk, 0), rows.shape[-1] if topk >= 0 else 0, rows_first, end,
            ]
        num_slots = len(slots) // _SLOT_ARGS
        unused = [None] * _SLOT_TENSORS + [0] * (_SLOT_ARGS - _SLOT_TENSORS)  # never read
        slots += unused * (_SLOTS - num_slots)
        _chunk_kernel[(end,)](
            seq_lens, seq_lens.stride(0), extend_lens, extend_lens.stride(0), num_reqs, window_size,
            swa_token_table, *swa_token_table.stride(),
            out.query_start_loc, out.query_pos, swa.token_ids, swa.first_pos, swa.gather_lens, swa.offsets,
            num_tokens, num_swa, int(first), qpos_end, swa_end, *slots,
            NUM_SLOTS=num_slots, SCAN_R=_SCAN_R, BLOCK=_CHUNK_BLOCK, ROWS_Q=_ROWS_Q, ROWS_W=_ROWS_W,
        )
