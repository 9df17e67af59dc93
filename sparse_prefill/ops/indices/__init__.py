"""Index plumbing between an engine's batch metadata and ``sparse_attn_fwd`` (DESIGN.md steps 1-3).

Per chunk: ``build_swa_token_ids`` gathers the SWA-cache token ids every query's window needs;
``build_workspace_plan`` lays out, per compress ratio, which cache tokens are dequantized into
which workspace rows; ``combine_topk_swa_indices`` writes one row of workspace indices per query
token. ``sparse_prefill.backend.chunk_cache.SparsePrefillChunkCache`` builds all of it once per
chunk. Index ranges and the int32 limits are documented in ``plan.py``.
"""

from __future__ import annotations

import torch

from sparse_prefill._utils import (
    check_int,
    check_no_overlap,
    check_tensor,
    check_unit_stride,
    device_assert,
    resolve_impl,
    value_check_site,
    value_checks_enabled,
    values_readable,
)
from sparse_prefill.ops.indices.library import (
    build_chunk_indices,
    build_chunk_indices_op,
    build_swa_token_ids_op,
    build_workspace_plan_op,
    combine_topk_swa_indices_op,
)
from sparse_prefill.ops.indices.plan import (
    INT32_MAX,
    ChunkIndices,
    MAX_ROW_ENTRIES,
    SwaTokenIds,
    WorkspacePlan,
    check_workspace_rows,
    combined_width,
    swa_gather_len,
    swa_gather_lens,
    unflatten_chunk_indices,
)
from sparse_prefill.ops.registry import direct_call_ok

__all__ = [
    "SwaTokenIds",
    "WorkspacePlan",
    "build_swa_token_ids",
    "build_workspace_plan",
    "combine_topk_swa_indices",
    "combined_width",
]

_I32 = (torch.int32,)


def _vector(
    name: str,
    t: object,
    length: int | None,
    device: torch.device | None,
    dtypes: tuple[torch.dtype, ...] = _I32,
) -> torch.Tensor:
    """``t`` must be a ``[length]`` tensor of ``dtypes`` on ``device`` (None: any)."""
    return check_tensor(name, t, dtypes=dtypes, shape=(length,), device=device)


def check_request_lengths(
    seq: list[int], ext: list[int] | None, table_width: int, table_name: str, ratio: int = 1
) -> None:
    """Host-side checks of per-request lengths against a token table of ``table_width`` columns
    (one column per position, or per complete entry of a compressed table of ``ratio``)."""
    for r, s in enumerate(seq):
        if s < 0:
            raise ValueError(f"seq_lens[{r}] must be >= 0, got {s}")
        if ext is not None and not 0 <= ext[r] <= s:
            raise ValueError(f"extend_lens[{r}] must be in [0, seq_lens[{r}]] = [0, {s}], got {ext[r]}")
        if s // ratio > table_width:
            need = f"{s // ratio} (seq_len {s} // {ratio})" if ratio > 1 else str(s)
            raise ValueError(f"{table_name} has {table_width} columns, request {r} needs {need}")


def _need_size_without_values(name: str, size: int | None, device: torch.device) -> None:
    """Meta tensors hold no lengths: a size computed from them must be given (under
    ``torch.compile`` a missing one becomes a data-dependent size)."""
    if size is None and device.type == "meta":
        raise ValueError(f"meta tensors hold no lengths to size the result with: pass {name}")


# ---------------------------------------------------------------------------------------------
# build_swa_token_ids


def swa_token_ids(seq_lens, extend_lens, req_token_table, swa_window, total, impl) -> SwaTokenIds:
    """Dispatch without validation (``impl`` resolved, ``total`` exact)."""
    return SwaTokenIds(*build_swa_token_ids_op(seq_lens, extend_lens, req_token_table, swa_window, total, impl))


def build_swa_token_ids(
    seq_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    req_token_table: torch.Tensor,
    swa_window: int,
    *,
    total: int | None = None,
    impl: str = "auto",
) -> SwaTokenIds:
    """Physical SWA-cache token ids of every position some query window of the chunk reaches.

    Request ``r`` has ``seq_lens[r]`` tokens in all, the last ``extend_lens[r]`` of them new in
    this chunk (its queries, at positions ``prefix .. seq_len - 1``, ``prefix = seq_len -
    extend_len``). The window of position ``p`` is ``max(0, p - W + 1) .. p``, so the request
    needs positions ``first_pos = max(0, prefix - W + 1) .. seq_len - 1``:
    ``gather_len = min(seq_len, extend_len + W - 1)`` of them (none when ``extend_len == 0``).

    Args:
        seq_lens: ``[R]`` int32, tokens of each request including the new ones.
        extend_lens: ``[R]`` int32, new tokens of each request, ``0 <= extend_len <= seq_len``.
        req_token_table: ``[R, max_len]`` int32, ``req_token_table[r, pos]`` = SWA-cache token id
            of position ``pos`` of request ``r`` (ids are opaque: any page size); needs
            ``max_len >= seq_len[r]`` for every request. Any strides.
        swa_window: the window ``W >= 1`` (128 for DeepSeek-V4).
        total: the number of ids, ``sum(gather_lens)``, if the caller knows it (it must be
            exact: checked when value checks are on). Otherwise it is computed, which on CUDA
            costs one host sync (value checks compute it from the host copy they make anyway).
        impl: "auto" | "triton" | "reference".

    Returns:
        ``SwaTokenIds(token_ids [total] int32, first_pos [R] int32, gather_lens [R] int32,
        offsets [R + 1] int64)``: request ``r``'s ids, of positions ``first_pos[r] ..
        seq_lens[r] - 1`` in order, at ``token_ids[offsets[r]:offsets[r + 1]]``.

    Raises ValueError when ``total`` exceeds ``2**31 - 1`` (it becomes workspace rows).
    """
    check_int("swa_window", swa_window, lo=1, hi=INT32_MAX)
    check_tensor("seq_lens", seq_lens, dtypes=_I32, shape=(None,))
    num_reqs, device = seq_lens.shape[0], seq_lens.device
    _vector("extend_lens", extend_lens, num_reqs, device)
    check_tensor("req_token_table", req_token_table, dtypes=_I32, shape=(num_reqs, None), device=device)
    if total is not None:
        check_int("total", total, lo=0)
    impl = resolve_impl(impl, device)

    if not values_readable(device):
        _need_size_without_values("total", total, device)
    elif value_checks_enabled():
        seq, ext = torch.stack([seq_lens, extend_lens]).tolist()
        check_request_lengths(seq, ext, req_token_table.shape[1], "req_token_table")
        exact = sum(swa_gather_len(s, e, swa_window) for s, e in zip(seq, ext))
        if total is not None and total != exact:
            raise ValueError(f"total must be sum(gather_lens) = {exact}, got {total}")
        total = exact
    elif total is None:
        total = int(swa_gather_lens(seq_lens, extend_lens, swa_window).sum())
    if total is not None:
        check_workspace_rows(0, total)
    return swa_token_ids(seq_lens, extend_lens, req_token_table, swa_window, total, impl)


# ---------------------------------------------------------------------------------------------
# build_workspace_plan


def workspace_plan(seq_lens, swa, compress_ratio, table, num_compressed, impl) -> WorkspacePlan:
    """Dispatch without validation (``impl`` resolved, ``num_compressed`` exact)."""
    compressed_ids, compressed_base, swa_base = build_workspace_plan_op(
        seq_lens, *swa, compress_ratio, table, num_compressed, impl
    )
    return WorkspacePlan(compress_ratio, compressed_ids, swa.token_ids, compressed_base, swa_base)


def check_swa_token_ids(swa: object, num_reqs: int, device: torch.device) -> SwaTokenIds:
    if not isinstance(swa, SwaTokenIds):
        raise TypeError(f"swa must be a SwaTokenIds (build_swa_token_ids), got {type(swa).__name__}")
    check_tensor("swa.token_ids", swa.token_ids, dtypes=_I32, shape=(None,), device=device)
    _vector("swa.first_pos", swa.first_pos, num_reqs, device)
    _vector("swa.gather_lens", swa.gather_lens, num_reqs, device)
    _vector("swa.offsets", swa.offsets, num_reqs + 1, device, dtypes=(torch.int64,))
    return swa


def check_swa_values(seq: list[int], swa: SwaTokenIds) -> None:
    """Value checks of ``swa`` against the host ``seq_lens`` (one host copy of ``swa``'s
    vectors): what ``build_swa_token_ids`` returns for these lengths is consistent, i.e.
    ``0 <= gather_lens <= seq_lens``, ``first_pos = seq_lens - gather_lens``, ``offsets`` the
    cumulative gather lengths from 0, ending at ``len(token_ids)``."""
    host = torch.cat([swa.first_pos.long(), swa.gather_lens.long(), swa.offsets]).tolist()
    n = len(seq)
    first, gather, offsets = host[:n], host[n : 2 * n], host[2 * n :]
    for r, s in enumerate(seq):
        if s < 0:
            raise ValueError(f"seq_lens[{r}] must be >= 0, got {s}")
    for r, (s, f, g) in enumerate(zip(seq, first, gather)):
        if not 0 <= g <= s:
            raise ValueError(f"swa.gather_lens[{r}] must be in [0, seq_lens[{r}]] = [0, {s}], got {g}")
        if f != s - g:
            raise ValueError(
                f"swa.first_pos[{r}] must be seq_lens[{r}] - swa.gather_lens[{r}] = {s - g}, got {f} "
                f"(swa must come from build_swa_token_ids with these seq_lens)"
            )
    total = 0
    for r, (g, o) in enumerate(zip(gather, offsets)):
        if o != total:
            raise ValueError(f"swa.offsets[{r}] must be sum(swa.gather_lens[:{r}]) = {total}, got {o}")
        total += g
    if offsets[-1] != total or total != swa.token_ids.shape[0]:
        raise ValueError(
            f"swa.offsets[-1] and len(swa.token_ids) must both be sum(swa.gather_lens) = {total}, "
            f"got {offsets[-1]} and {swa.token_ids.shape[0]}"
        )


def build_workspace_plan(
    seq_lens: torch.Tensor,
    swa: SwaTokenIds,
    compress_ratio: int,
    compressed_token_table: torch.Tensor | None = None,
    *,
    num_compressed: int | None = None,
    impl: str = "auto",
) -> WorkspacePlan:
    """Rows of the bf16 workspace of every layer of one compress ratio, for one chunk.

    The workspace holds each request's complete compressed entries ``j < seq_len // ratio``,
    exactly, back to back (request ``r`` from row ``compressed_base[r]``), then each request's
    SWA gather (from row ``swa_base[r]``): the sum of what the requests can see, not
    ``R`` times the longest. Layers of one ratio share the plan; each layer dequantizes its own
    caches into a reused workspace with it::

        dequantize_k_cache_paged(compressed_cache, plan.compressed_token_ids, c_page_size,
                                 out=workspace[plan.compressed_rows])
        dequantize_k_cache_paged(swa_cache, plan.swa_token_ids, swa_page_size,
                                 out=workspace[plan.swa_rows])

    Args:
        seq_lens: ``[R]`` int32, tokens of each request (the ``seq_lens`` given to
            ``build_swa_token_ids``).
        swa: the chunk's ``build_swa_token_ids`` result.
        compress_ratio: ``c >= 0``; 0 is an SWA-only layer: no compressed region (SGLang's
            convention; 1 is a compressed cache of one entry per token, DeepSeek-V4.1).
        compressed_token_table: ``[R, max_entries]`` int32, ``[r, j]`` = token id of compressed
            entry ``j`` of request ``r`` in this ratio's compressed cache; needs ``max_entries >=
            seq_len // c``. Required for ``c >= 1``, must be None for ``c == 0``. Any strides.
        num_compressed: ``sum(seq_lens // c)`` if known (exact; checked when value checks are
            on); otherwise computed (one host sync on CUDA, free when value checks are on).
        impl: "auto" | "triton" | "reference".

    Returns:
        ``WorkspacePlan`` (see its docstring): ``compressed_token_ids [sum(seq_len // c)]`` int32,
        ``swa_token_ids`` (= ``swa.token_ids``), ``compressed_base [R]`` int32, ``swa_base [R]``
        int32, and the row slices. Raises ValueError when the rows exceed ``2**31 - 1``.

    Value checks (when on; one host copy): ``swa`` is what ``build_swa_token_ids`` returns for
    ``seq_lens`` (gather lengths within ``seq_lens``, ``first_pos``, ``offsets`` and the id count
    consistent with them) and the table covers every complete entry.
    """
    check_tensor("seq_lens", seq_lens, dtypes=_I32, shape=(None,))
    num_reqs, device = seq_lens.shape[0], seq_lens.device
    check_swa_token_ids(swa, num_reqs, device)
    check_int("compress_ratio", compress_ratio, lo=0, hi=INT32_MAX)
    if compress_ratio == 0:
        if compressed_token_table is not None:
            raise ValueError("compressed_token_table must be None for compress_ratio 0 (SWA only)")
    else:
        if compressed_token_table is None:
            raise ValueError(
                f"compressed_token_table is required for compress_ratio {compress_ratio}; the SWA-only "
                "layer is compress_ratio 0 (ratio 1 is a compressed cache of one entry per token)"
            )
        check_tensor(
            "compressed_token_table", compressed_token_table, dtypes=_I32, shape=(num_reqs, None),
            device=device,
        )
    if num_compressed is not None:
        check_int("num_compressed", num_compressed, lo=0)
    impl = resolve_impl(impl, device)

    readable = values_readable(device)
    if value_checks_enabled() and readable:
        seq = seq_lens.tolist()
        check_swa_values(seq, swa)
    if compress_ratio == 0:
        exact = 0
    elif not readable:
        _need_size_without_values("num_compressed", num_compressed, device)
        exact = num_compressed
    elif value_checks_enabled():
        width = compressed_token_table.shape[1]
        check_request_lengths(seq, None, width, "compressed_token_table", compress_ratio)
        exact = sum(s // compress_ratio for s in seq)
    elif num_compressed is None:
        exact = int((seq_lens // compress_ratio).sum())
    else:
        exact = num_compressed
    if num_compressed is not None and num_compressed != exact:
        want = f"sum(seq_lens // {compress_ratio})" if compress_ratio > 0 else "0 for compress_ratio 0"
        raise ValueError(f"num_compressed must be {want} = {exact}, got {num_compressed}")
    if exact is not None:
        check_workspace_rows(exact, swa.token_ids.shape[0])
    return workspace_plan(seq_lens, swa, compress_ratio, compressed_token_table, exact, impl)


# ---------------------------------------------------------------------------------------------
# combine_topk_swa_indices


def combine(
    topk_indices, query_start_loc, query_pos, seq_lens, gather_lens, compressed_base, swa_base,
    window_size, compress_ratio, topk, out_indices, out_lens, impl,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch without validation into ``out_indices`` / ``out_lens`` (allocated when None)."""
    n, device = query_pos.shape[0], query_pos.device
    if out_indices is None:
        width = combined_width(topk, window_size)
        out_indices = torch.empty((n, width), dtype=torch.int32, device=device)
    if out_lens is None:
        out_lens = torch.empty(n, dtype=torch.int32, device=device)
    combine_topk_swa_indices_op(
        topk_indices, query_start_loc, query_pos, seq_lens, gather_lens, compressed_base, swa_base,
        window_size, compress_ratio, topk, out_indices, out_lens, impl,
    )
    return out_indices, out_lens


def _check_combine_values(
    topk_indices, query_start_loc, query_pos, seq_lens, gather_lens, compressed_base, swa_base,
    window_size, compress_ratio, topk,
) -> None:
    """The value checks of ``combine_topk_swa_indices`` (one host copy)."""
    num_reqs = seq_lens.shape[0]
    host = torch.cat([query_start_loc, seq_lens, gather_lens, compressed_base, swa_base, query_pos])
    host = host.cpu()
    qsl, host = host[: num_reqs + 1], host[num_reqs + 1 :]
    seq, gather, cbase, sbase, pos = host.long().split([num_reqs] * 4 + [query_pos.shape[0]])
    if qsl[0] != 0 or qsl[-1] != pos.shape[0]:
        raise ValueError(
            f"query_start_loc must run from 0 to num_tokens = {pos.shape[0]}, "
            f"got {int(qsl[0])} .. {int(qsl[-1])}"
        )
    ext = qsl.diff().long()
    # Before the per-request checks: a decreasing step would otherwise surface as a wrong
    # gather length of an earlier request.
    down = (ext < 0).nonzero()
    if down.numel():
        r = int(down[0])
        raise ValueError(
            f"query_start_loc must be non-decreasing (cumulative query counts), got "
            f"query_start_loc[{r + 1}] = {int(qsl[r + 1])} < query_start_loc[{r}] = {int(qsl[r])}"
        )
    for r, (s, e, g, cb, sb) in enumerate(zip(*(t.tolist() for t in (seq, ext, gather, cbase, sbase)))):
        if e > s:
            raise ValueError(
                f"query_start_loc[{r + 1}] - query_start_loc[{r}] (extend_len) must be in "
                f"[0, seq_lens[{r}]] = [0, {s}], got {e}"
            )
        need = swa_gather_len(s, e, window_size)
        if not need <= g <= s:
            raise ValueError(
                f"gather_lens[{r}] must be in [{need}, {s}] (window {window_size}), got {g}"
            )
        if e and (sb < 0 or sb + g > INT32_MAX):
            raise ValueError(f"swa_base[{r}] = {sb} puts rows outside [0, 2**31 - 1]")
        entries = s // compress_ratio if topk > 0 else 0  # topk > 0 implies compress_ratio >= 1
        if e and entries and (cb < 0 or cb + entries > INT32_MAX):
            raise ValueError(f"compressed_base[{r}] = {cb} puts rows outside [0, 2**31 - 1]")
        if e and topk_indices is None and compress_ratio > 0 and topk < entries:
            raise ValueError(
                f"topk_indices=None takes entries 0..topk-1, but request {r} sees {entries} "
                f"(seq_len {s} // {compress_ratio}) > topk = {topk}"
            )
    req = torch.repeat_interleave(torch.arange(num_reqs), ext)
    expected = (seq - ext)[req] + torch.arange(pos.shape[0]) - qsl[:-1][req]
    bad = (pos != expected).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"query_pos[{i}] must be its request's prefix + its index there = {int(expected[i])}, "
            f"got {int(pos[i])}"
        )


def _assert_combine_values(
    topk_indices, query_start_loc, query_pos, seq_lens, gather_lens, compressed_base, swa_base,
    window_size, compress_ratio, topk,
) -> None:
    """``_check_combine_values`` on the device, without a sync (``device_assert``)."""
    n = query_pos.shape[0]
    qsl, seq = query_start_loc.long(), seq_lens.long()
    gather, cbase, sbase = gather_lens.long(), compressed_base.long(), swa_base.long()
    device_assert((qsl[0] == 0) & (qsl[-1] == n), f"query_start_loc must run from 0 to num_tokens = {n}")
    if seq.shape[0] == 0:
        return
    ext = qsl.diff()
    device_assert((ext >= 0) & (ext <= seq), "extend lengths (query_start_loc steps) must be in [0, seq_lens]")
    need = torch.where(ext > 0, torch.minimum(seq, ext + (window_size - 1)), 0)
    device_assert((need <= gather) & (gather <= seq), f"gather_lens must cover the window ({window_size}) and fit seq_lens")
    live = ext > 0
    device_assert(~live | ((sbase >= 0) & (sbase + gather <= INT32_MAX)), "swa_base puts rows outside [0, 2**31 - 1]")
    entries = seq // compress_ratio if topk > 0 else torch.zeros_like(seq)
    in_range = (cbase >= 0) & (cbase + entries <= INT32_MAX)
    device_assert(~live | (entries == 0) | in_range, "compressed_base puts rows outside [0, 2**31 - 1]")
    if topk_indices is None and compress_ratio > 0:
        device_assert(~live | (entries <= topk), "topk_indices=None takes entries 0..topk-1, but a request sees more")
    rows = torch.arange(n, device=qsl.device)
    req = torch.searchsorted(qsl[1:], rows, right=True).clamp(max=seq.shape[0] - 1)
    expected = (seq - ext)[req] + rows - qsl[req]
    device_assert(query_pos.long() == expected, "query_pos must be each query's request prefix + its index there")


def combine_topk_swa_indices(
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
    out_indices: torch.Tensor | None = None,
    out_lens: torch.Tensor | None = None,
    *,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row of workspace indices per query token, for ``sparse_attn_fwd``.

    Query ``q`` of request ``r`` (``query_start_loc[r] <= q < query_start_loc[r + 1]``) at
    absolute position ``p = query_pos[q]`` gets, in this order:

    1. its top-k compressed entries ``j = topk_indices[q, k]``, in the indexer's order, those
       with ``0 <= j < (p + 1) // ratio`` (complete and causal; hence also ``j < seq_len //
       ratio``) only, each as workspace row ``compressed_base[r] + j``. Duplicates are kept
       (each occurrence is written, so the softmax counts it twice): the indexer's picks are
       duplicate-free and dropping them would cost a sort per row;
    2. its window positions ``max(0, p - W + 1) .. p`` ascending, each as workspace row
       ``swa_base[r] + pos - (seq_lens[r] - gather_lens[r])``;
    3. -1 up to the row width ``ceil((topk + W) / 128) * 128``.

    Args:
        topk_indices: ``[num_tokens, topk]`` int32 request-local compressed entry ids (any
            value; negative ones mean "no pick"), or None for entries ``0 .. topk - 1`` of
            every row (ratio-128 layers: every complete entry; ``topk`` must then be at least
            each request's ``seq_len // ratio``).
        query_start_loc: ``[R + 1]`` int32, cumulative query counts (extend lengths), from 0.
        query_pos: ``[num_tokens]`` int32 absolute positions, ``seq_len - extend_len + i`` for
            the ``i``-th query of a request.
        seq_lens: ``[R]`` int32 tokens of each request including the new ones.
        gather_lens: ``[R]`` int32 SWA gather lengths (``SwaTokenIds.gather_lens``).
        compressed_base, swa_base: ``[R]`` int32 workspace rows (``WorkspacePlan``).
        window_size: ``W``, ``1 <= W <= 2**24``.
        compress_ratio: ``c >= 0``; ``c == 0`` (SWA only) needs ``topk == 0``.
        topk: entries per row of ``topk_indices``, ``0 <= topk <= 2**24`` (a ratio-128 request
            of ``2**31`` tokens has ``2**24`` entries; the bound keeps a typo from allocating
            terabytes of ``[num_tokens, width]`` rows).
        out_indices: optional ``[num_tokens, width]`` int32 buffer (last dim contiguous, no two
            elements sharing memory), reused per layer; returned filled.
        out_lens: optional ``[num_tokens]`` int32 contiguous buffer.
        impl: "auto" | "triton" | "reference".

    Returns:
        ``(indices [num_tokens, width] int32, lens [num_tokens] int32)``: ``lens[q]`` = number
        of valid entries of row ``q`` (all before the first -1): pass it as ``topk_length``.

    Value checks (when on; one host copy, or for CUDA tensors by default device-side asserts
    without a sync): the lengths are consistent, ``query_pos`` is as above, rows stay below
    ``2**31``, and ``topk_indices=None`` covers every entry.
    """
    check_int("window_size", window_size, lo=1, hi=MAX_ROW_ENTRIES)
    check_int("compress_ratio", compress_ratio, lo=0, hi=INT32_MAX)
    check_int("topk", topk, lo=0, hi=MAX_ROW_ENTRIES)
    if compress_ratio == 0 and topk != 0:
        raise ValueError(f"compress_ratio 0 (SWA only) needs topk == 0, got {topk}")
    check_tensor("query_pos", query_pos, dtypes=_I32, shape=(None,))
    n, device = query_pos.shape[0], query_pos.device
    check_tensor("seq_lens", seq_lens, dtypes=_I32, shape=(None,), device=device)
    num_reqs = seq_lens.shape[0]
    _vector("query_start_loc", query_start_loc, num_reqs + 1, device)
    _vector("gather_lens", gather_lens, num_reqs, device)
    _vector("compressed_base", compressed_base, num_reqs, device)
    _vector("swa_base", swa_base, num_reqs, device)
    if topk_indices is not None:
        check_tensor("topk_indices", topk_indices, dtypes=_I32, shape=(n, topk), device=device)
    width = combined_width(topk, window_size)
    if out_indices is not None:
        check_tensor("out_indices", out_indices, dtypes=_I32, shape=(n, width), device=device)
        if n > 0:  # an empty buffer is never addressed
            check_unit_stride("out_indices", out_indices)
        check_no_overlap("out_indices", out_indices)
    if out_lens is not None:
        check_tensor("out_lens", out_lens, dtypes=_I32, shape=(n,), device=device)
        check_unit_stride("out_lens", out_lens)  # 1-D: unit stride also rules out overlap
    impl = resolve_impl(impl, device)
    args = (
        topk_indices, query_start_loc, query_pos, seq_lens, gather_lens, compressed_base, swa_base,
        window_size, compress_ratio, topk,
    )
    site = value_check_site(device)
    if site == "host":
        _check_combine_values(*args)
    elif site == "device":
        _assert_combine_values(*args)
    return combine(*args, out_indices, out_lens, impl)


# ---------------------------------------------------------------------------------------------
# build_chunk_indices (the chunk cache's build; it validates)


def chunk_indices(
    seq_lens, extend_lens, swa_token_table, compressed_token_tables, ratios, row_topks, window_size,
    num_tokens, num_swa, num_compressed, impl,
) -> ChunkIndices:
    """Every layer-independent index of a chunk at once, without validation (sizes exact): the
    query rows, the SWA gather, the plan of each of ``ratios`` and, for each ratio ``k`` with
    ``row_topks[k] >= 0``, its rows of entries ``0 .. row_topks[k] - 1``. Equal to
    ``build_swa_token_ids``, ``build_workspace_plan`` and ``combine_topk_swa_indices`` with
    ``topk_indices=None`` in turn; the Triton path is one launch per three ratios."""
    tables = [compressed_token_tables[c] for c in ratios if c > 0]
    args = (seq_lens, extend_lens, swa_token_table, tables, ratios, row_topks, window_size, num_tokens, num_swa,
            num_compressed, impl)
    if direct_call_ok(seq_lens):
        # Boxing the op's ~20 outputs through the dispatcher, and allocating each, cost the host
        # tens of microseconds a build: run the implementation on one pooled buffer.
        return build_chunk_indices(*args, pooled=True)
    return unflatten_chunk_indices(build_chunk_indices_op(*args), ratios, row_topks)
