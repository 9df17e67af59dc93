"""Result types and sizes shared by the index ops, their references and the chunk cache.

Index ranges (why each dtype is wide enough):

- lengths and positions (``seq_lens``, ``extend_lens``, ``first_pos``, ``gather_lens``,
  ``query_pos``) are int32: a request holds at most ``2**31 - 1`` tokens.
- ``offsets`` (cumulative SWA gather lengths) are int64, so a sum over requests cannot wrap.
- workspace rows (``compressed_base``, ``swa_base``, every combined index) are int32, as
  ``sparse_attn_fwd`` takes them: a workspace may hold at most ``2**31 - 1`` rows. Building a
  plan beyond that raises. (At 1 KiB per bf16 row that is 2 TiB, far beyond any GPU.)
- query rows (``query_start_loc``) are int32: at most ``2**31 - 1`` query tokens per chunk;
  the combined ``[num_tokens, width]`` tensor itself may exceed ``2**31`` elements (kernels
  address it in int64).
- token ids in the SWA / compressed token tables are opaque int32 cache ids, copied unchanged.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

INT32_MAX = 2**31 - 1

# The most entries a combined row may take from top-k or from the window: a ratio-128 layer of a
# request of 2**31 tokens has 2**24 complete entries. Larger values only add padding, and each
# row of the combined tensor is 4 bytes per entry: a bound, so a typo cannot ask for terabytes.
MAX_ROW_ENTRIES = 2**24

# flash_mla_sparse_fwd needs topk % 64 (h_q = 64) or % 128 (h_q = 128) == 0: pad to 128.
COMBINED_ALIGN = 128


def combined_width(topk: int, window_size: int) -> int:
    """Width of a combined index row: ``topk + window_size`` rounded up to a multiple of 128."""
    return -(-(topk + window_size) // COMBINED_ALIGN) * COMBINED_ALIGN


def swa_gather_len(seq_len: int, extend_len: int, window: int) -> int:
    """Positions of one request's SWA gather, the union of its queries' windows:
    ``min(seq_len, extend_len + window - 1)``, 0 without queries (``extend_len == 0``)."""
    return min(seq_len, extend_len + window - 1) if extend_len > 0 else 0


def swa_gather_lens(seq_lens: torch.Tensor, extend_lens: torch.Tensor, window: int) -> torch.Tensor:
    """``swa_gather_len`` of ``[R]`` integer length tensors, on their device: ``[R]`` int64
    (computed in int64, so nothing wraps)."""
    ext = extend_lens.long()
    return torch.where(ext > 0, torch.minimum(seq_lens.long(), ext + (window - 1)), 0)


class SwaTokenIds(NamedTuple):
    """SWA gather of a chunk (``build_swa_token_ids``); ``R`` requests.

    token_ids:   ``[total]`` int32, request ``r``'s SWA-cache token ids of positions
                 ``first_pos[r] .. first_pos[r] + gather_lens[r] - 1`` at
                 ``offsets[r] .. offsets[r+1] - 1``.
    first_pos:   ``[R]`` int32, first gathered position, ``seq_len - gather_len``.
    gather_lens: ``[R]`` int32, ``min(seq_len, extend_len + W - 1)`` (0 when ``extend_len == 0``).
    offsets:     ``[R + 1]`` int64, exclusive cumulative sum of ``gather_lens``.
    """

    token_ids: torch.Tensor
    first_pos: torch.Tensor
    gather_lens: torch.Tensor
    offsets: torch.Tensor


class WorkspacePlan(NamedTuple):
    """Which cache tokens go to which rows of a layer's bf16 workspace, for one compress ratio.

    The workspace is ``[num_rows, 1, d]``: rows ``compressed_rows`` hold, back to back, every
    request's complete compressed entries ``j < seq_len // ratio`` (request ``r``'s entry ``j``
    at row ``compressed_base[r] + j``), dequantized from ``compressed_token_ids`` of the layer's
    compressed cache; rows ``swa_rows`` hold every request's SWA gather (position ``pos`` of
    request ``r`` at row ``swa_base[r] + pos - first_pos[r]``), dequantized from
    ``swa_token_ids`` of the layer's SWA cache. Ratio 0 (SWA only) has no compressed region.

    compress_ratio:       the ratio this plan is for.
    compressed_token_ids: ``[num_compressed_rows]`` int32 token ids of the ratio's compressed cache.
    swa_token_ids:        ``[num_swa_rows]`` int32 SWA-cache token ids (``SwaTokenIds.token_ids``).
    compressed_base:      ``[R]`` int32 first compressed row of each request.
    swa_base:             ``[R]`` int32 first SWA row of each request.
    """

    compress_ratio: int
    compressed_token_ids: torch.Tensor
    swa_token_ids: torch.Tensor
    compressed_base: torch.Tensor
    swa_base: torch.Tensor

    @property
    def num_compressed_rows(self) -> int:
        return self.compressed_token_ids.shape[0]

    @property
    def num_rows(self) -> int:
        """Rows of the workspace: compressed entries plus SWA gathers of all requests."""
        return self.compressed_token_ids.shape[0] + self.swa_token_ids.shape[0]

    @property
    def compressed_rows(self) -> slice:
        return slice(0, self.num_compressed_rows)

    @property
    def swa_rows(self) -> slice:
        return slice(self.num_compressed_rows, self.num_rows)


class ChunkIndices(NamedTuple):
    """What every layer of a chunk shares (``build_chunk_indices``); ``R`` requests, ``N`` queries.

    query_start_loc: ``[R + 1]`` int32 cumulative extend lengths, from 0.
    query_pos:       ``[N]`` int32 absolute position of each query, request by request.
    swa:             the SWA gather (``build_swa_token_ids``).
    plans:           ratio -> its ``WorkspacePlan`` (``build_workspace_plan``).
    rows:            ratio -> ``(indices [N, width] int32, lens [N] int32)`` of the ratios whose
                     rows take entries ``0 .. topk - 1`` (``combine_topk_swa_indices`` with
                     ``topk_indices=None``): SWA-only and dense ratios.
    """

    query_start_loc: torch.Tensor
    query_pos: torch.Tensor
    swa: SwaTokenIds
    plans: dict[int, WorkspacePlan]
    rows: dict[int, tuple[torch.Tensor, torch.Tensor]]


def flatten_chunk_indices(ci: ChunkIndices) -> list[torch.Tensor]:
    """The chunk build's outputs in a list: query_start_loc, query_pos, the SWA fields, then per
    ratio its plan's compressed_token_ids, compressed_base, swa_base and, where it has rows,
    indices and lens."""
    flat = [ci.query_start_loc, ci.query_pos, *ci.swa]
    for c, plan in ci.plans.items():
        flat += [plan.compressed_token_ids, plan.compressed_base, plan.swa_base, *ci.rows.get(c, ())]
    return flat


def unflatten_chunk_indices(flat: list[torch.Tensor], ratios: list[int], row_topks: list[int]) -> ChunkIndices:
    """The inverse of ``flatten_chunk_indices``."""
    it = iter(flat)
    query_start_loc, query_pos = next(it), next(it)
    swa = SwaTokenIds(next(it), next(it), next(it), next(it))
    plans, rows = {}, {}
    for c, topk in zip(ratios, row_topks):
        plans[c] = WorkspacePlan(c, next(it), swa.token_ids, next(it), next(it))
        if topk >= 0:
            rows[c] = next(it), next(it)
    return ChunkIndices(query_start_loc, query_pos, swa, plans, rows)


_OFFSETS = 5  # the int64 one (SwaTokenIds.offsets) in flatten_chunk_indices' order
_SEGMENT_ALIGN = 4  # int32 elements: a pooled tensor starts 16-byte aligned, as Triton specializes on


def empty_chunk_indices(
    seq_lens: torch.Tensor,
    ratios: list[int],
    row_topks: list[int],
    window_size: int,
    num_tokens: int,
    num_swa: int,
    num_compressed: list[int],
    pooled: bool = False,
) -> ChunkIndices:
    """Uninitialized ``ChunkIndices`` of these sizes (``row_topks[k] < 0``: no rows for
    ``ratios[k]``), on ``seq_lens``' device (fake tensors under ``torch.compile``).

    ``pooled``: every tensor a view of one int32 buffer (each 16-byte aligned), one allocation
    instead of about twenty; the buffer lives as long as any of them. Not for an op's outputs,
    which must not alias one another."""
    num_reqs = seq_lens.shape[0]
    shapes = [(num_reqs + 1,), (num_tokens,), (num_swa,), (num_reqs,), (num_reqs,), (num_reqs + 1,)]
    for topk, n_c in zip(row_topks, num_compressed):
        shapes += [(n_c,), (num_reqs,), (num_reqs,)]
        if topk >= 0:
            shapes += [(num_tokens, combined_width(topk, window_size)), (num_tokens,)]
    if not pooled:
        flat = [seq_lens.new_empty(s, dtype=torch.int64 if i == _OFFSETS else torch.int32)
                for i, s in enumerate(shapes)]
    else:
        sizes, keep = [], []  # int32 elements of each tensor and of the padding it needs
        for i, s in enumerate(shapes):
            n = (2 if i == _OFFSETS else 1) * math.prod(s)
            keep.append(len(sizes))
            sizes += [n, -n % _SEGMENT_ALIGN] if n % _SEGMENT_ALIGN else [n]  # each view costs ~1 us
        pieces = seq_lens.new_empty(sum(sizes), dtype=torch.int32).split_with_sizes(sizes)
        flat = [pieces[k] for k in keep]
        flat[_OFFSETS] = flat[_OFFSETS].view(torch.int64)
        for i, s in enumerate(shapes):
            if len(s) > 1:
                flat[i] = flat[i].view(s)
    return unflatten_chunk_indices(flat, ratios, row_topks)


def check_workspace_rows(num_compressed: int, num_swa: int) -> None:
    """Raise unless the workspace rows fit int32 (combined indices are int32 rows)."""
    if num_compressed + num_swa > INT32_MAX:
        raise ValueError(
            f"workspace of {num_compressed} compressed + {num_swa} SWA rows exceeds the int32 "
            f"row indices of sparse_attn_fwd ({INT32_MAX}); split the chunk"
        )
