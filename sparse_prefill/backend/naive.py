"""Plain PyTorch reference of one attention layer of the backend: the definition of truth.

It follows DESIGN.md's attention table literally, with no workspace, no index rows and no paths:
per request, every cache token a query could see is dequantized (the SWA positions of the
request's query windows, and all its complete compressed entries), and each query attends, in
float32, to the subset the table allows for its absolute position ``p``:

| ratio (kind, ``layer_kinds.py``) | visible to ``p`` |
| --- | --- |
| 0 (SWA) | window positions ``max(0, p - W + 1) .. p`` |
| 1, 2, 4 (top-k) | the window, plus the indexer's picks ``j`` that are complete: ``0 <= j < (p + 1) // ratio`` |
| 128 (dense) | the window, plus every complete entry ``j < (p + 1) // 128`` |

then the per-head sink scales the output by ``exp(lse) / (exp(lse) + exp(attn_sink[h]))``.
Picks are a set here (a duplicate pick counts once); the kernels' paths count a duplicate twice,
so inputs with duplicate picks are outside the backend's contract (the indexer's are unique).
"""

from __future__ import annotations

import torch

from sparse_prefill.backend.config import ModelConfig
from sparse_prefill.backend.layer_kinds import LayerKind
from sparse_prefill.backend.metadata import BatchMetadata, LayerCaches
from sparse_prefill.ops.cache import dequantize_k_cache_paged

# Query rows per block: the float32 scores of a block are rows * h_q * visible-candidates.
_SCORE_ELEMS = 1 << 25


def _dequant(cache: torch.Tensor, ids: torch.Tensor, page_size: int) -> torch.Tensor:
    return dequantize_k_cache_paged(cache, ids, page_size, impl="reference")[:, 0].float()


def naive_layer_forward(
    config: ModelConfig,
    metadata: BatchMetadata,
    layer: int,
    q: torch.Tensor,
    caches: LayerCaches,
    topk_indices: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of ``SparsePrefillBackend.forward`` (same arguments, not validated).

    Args:
        config, metadata: the model and the batch.
        layer: the layer index (its compress ratio comes from ``config``).
        q: ``[num_tokens, h_q, 512]`` bfloat16, the batch's query tokens request by request.
        caches: the layer's SWA cache and (ratio > 0) compressed cache, V4 FP8 paged uint8.
        topk_indices: ``[num_tokens, topk]`` int32 request-local compressed entry ids picked
            for each query (any value; only the complete, causal ones count), top-k layers only.
        attn_sink: ``[h_q]`` float32 or None.

    Returns:
        ``[num_tokens, h_q, 512]`` bfloat16 (computed in float32, rounded once).
    """
    ratio = config.compress_ratios[layer]
    kind = config.kind_of(ratio)
    w, h_q = config.window_size, q.shape[1]
    out = torch.empty_like(q)
    for r in range(metadata.num_requests):
        prefix, seq = metadata.prefix_lens_host[r], metadata.seq_lens_host[r]
        q0 = int(sum(metadata.extend_lens_host[:r]))
        lo = max(0, prefix - w + 1)
        swa_pos = torch.arange(lo, seq, device=q.device)
        kv = _dequant(caches.swa, metadata.swa_token_table[r, lo:seq], config.swa_page_size)
        n_c = seq // ratio if ratio > 0 else 0
        if n_c:
            table = metadata.compressed_token_tables[ratio][r, :n_c]
            kv = torch.cat([_dequant(caches.compressed, table, config.page_size_of(ratio)), kv])
        entries = torch.arange(n_c, device=q.device)

        rows = max(1, _SCORE_ELEMS // (h_q * kv.shape[0]))
        for a in range(0, seq - prefix, rows):
            b = min(seq - prefix, a + rows)
            pos = torch.arange(prefix + a, prefix + b, device=q.device)[:, None]
            window = (swa_pos <= pos) & (swa_pos > pos - w)
            complete = entries < (pos + 1) // max(ratio, 1)  # no entries for ratio 0
            if kind is LayerKind.TOPK:
                picks = topk_indices[q0 + a : q0 + b].long()
                picked = torch.zeros(b - a, n_c + 1, dtype=torch.bool, device=q.device)
                # Out-of-range picks land in the spare last column, which is dropped.
                picked.scatter_(1, torch.where((picks >= 0) & (picks < n_c), picks, n_c), True)
                complete &= picked[:, :n_c]
            visible = torch.cat([complete, window], dim=1)

            scores = torch.einsum("qhd,kd->qhk", q[q0 + a : q0 + b].float(), kv) * config.sm_scale
            scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
            lse = torch.logsumexp(scores, dim=-1)  # finite: every query sees its own position
            o = torch.einsum("qhk,kd->qhd", torch.softmax(scores, dim=-1), kv)
            if attn_sink is not None:
                o = o * (1.0 / (1.0 + torch.exp(attn_sink.float() - lse)))[..., None]
            out[q0 + a : q0 + b] = o.to(out.dtype)
    return out
