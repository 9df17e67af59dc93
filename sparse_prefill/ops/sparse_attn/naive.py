"""PyTorch reference of ``sparse_attn_fwd``: plain float32 math, the definition of truth.

``attend`` is the attention of a block of query rows over their gathered KV rows; the FP8 paged
op's reference (``ops/fp8_sparse_attn/naive.py``) reuses it and ``attend_chunked`` with its own
gather. Work is chunked over query rows so memory stays bounded on any ``s_q``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Query rows per chunk are chosen so one chunk's gathered KV stays near 2**24 elements (128 MiB
# in float64); the scores are smaller still (h_q <= 128 < d_qk).
_CHUNK_ELEMS = 1 << 24

Gather = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def attend(
    q: torch.Tensor,
    kv_rows: torch.Tensor,
    valid: torch.Tensor,
    sm_scale: float,
    d_v: int,
    attn_sink: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of ``n`` query rows, each over its own ``width`` gathered KV rows, in float32.

    Args:
        q: [n, h_q, d_qk].
        kv_rows: [n, width, d_qk]; ``kv_rows[i, j]`` is the KV row of row ``i``'s entry ``j``
            (keys are all ``d_qk`` dims, values the first ``d_v``). Entries where ``valid`` is
            False are ignored whatever they hold (NaN included).
        valid: [n, width] bool.
        sm_scale: softmax scale applied to ``q @ k``.
        d_v: value dims.
        attn_sink: [h_q] float32 or None.

    Returns:
        (out [n, h_q, d_v], max_logits [n, h_q], lse [n, h_q]), float32, as ``sparse_attn_fwd``
        defines them: a row with no valid entry gets out 0, max_logits -inf, lse +inf; a NaN
        in ``q`` or in a valid entry's row propagates (plain float math, nothing masks it).
    """
    # Float64 inside: a float32 product rounds differently with the batch shape on some CPUs (the
    # BLAS picks other kernels for 8 heads than for 16), and a head's or row's result must not
    # depend on what is computed beside it (tensor- and context-parallel shards are compared
    # bit for bit); in float64 those differences vanish in the final rounding to float32.
    kv_rows = kv_rows.double().masked_fill(~valid[..., None], 0.0)
    scores = torch.einsum("nhd,nkd->nhk", q.double(), kv_rows) * sm_scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    max_logits = scores.amax(dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    empty = lse == float("-inf")
    probs = torch.exp(scores - lse.masked_fill(empty, 0.0)[..., None])
    out = probs @ kv_rows[..., :d_v]
    if attn_sink is not None:
        # exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink): no overflow, sink -inf -> 1,
        # sink +inf -> 0.
        out = out * torch.sigmoid(lse - attn_sink.double())[..., None]
    out = out.masked_fill(empty[..., None], 0.0)
    return out.float(), max_logits.float(), lse.masked_fill(empty, float("inf")).float()


def attend_chunked(
    q: torch.Tensor,
    width: int,
    gather: Gather,
    sm_scale: float,
    d_v: int,
    attn_sink: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``attend`` over all rows of ``q`` [s_q, h_q, d_qk], a chunk of rows at a time.

    ``gather(start, stop)`` returns ``(kv_rows [stop - start, width, d_qk], valid
    [stop - start, width])`` for query rows ``start .. stop - 1``. Returns float32
    ``(out [s_q, h_q, d_v], max_logits [s_q, h_q], lse [s_q, h_q])``.
    """
    s_q, h_q, d_qk = q.shape
    out = torch.empty(s_q, h_q, d_v, dtype=torch.float32, device=q.device)
    max_logits = torch.empty(s_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(s_q, h_q, dtype=torch.float32, device=q.device)
    rows = max(1, _CHUNK_ELEMS // max(1, width * d_qk))
    for start in range(0, s_q, rows):
        stop = min(s_q, start + rows)
        kv_rows, valid = gather(start, stop)
        chunk = attend(q[start:stop], kv_rows, valid, sm_scale, d_v, attn_sink)
        out[start:stop], max_logits[start:stop], lse[start:stop] = chunk
    return out, max_logits, lse


def valid_positions(
    ids: torch.Tensor, capacity: int, lengths: torch.Tensor | None
) -> torch.Tensor:
    """[n, width] bool: ``0 <= ids < capacity`` and the position is below the row's length."""
    valid = (ids >= 0) & (ids < capacity)
    if lengths is not None:
        positions = torch.arange(ids.shape[1], device=ids.device)
        valid &= positions[None, :] < lengths[:, None]
    return valid


def sparse_attn_fwd_naive(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of ``sparse_attn_fwd`` (same arguments, validated), float32 results.

    Returns (out [s_q, h_q, d_v], max_logits [s_q, h_q], lse [s_q, h_q]), all float32.
    """
    kv2 = kv[:, 0]  # h_kv = 1
    idx = indices[:, 0]
    s_kv = kv2.shape[0]

    def gather(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = idx[start:stop].long()
        lengths = None if topk_length is None else topk_length[start:stop]
        valid = valid_positions(ids, s_kv, lengths)
        return kv2[ids.masked_fill(~valid, 0)], valid

    return attend_chunked(q, idx.shape[1], gather, sm_scale, d_v, attn_sink)
