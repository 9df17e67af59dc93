"""PyTorch reference of ``paged_fp8_sparse_attn_fwd``: the definition of truth.

Each query row's tokens are gathered from the FP8 paged caches and dequantized exactly as the
cache ops define it (``ops/cache/naive.py``), the main scope's then the extra scope's; the
attention over that union is ``sparse_attn_fwd``'s reference math (``ops/sparse_attn/naive.py``).
"""

from __future__ import annotations

import torch

from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops.cache.naive import dequantize_k_cache_paged_ref
from sparse_prefill.ops.sparse_attn.naive import attend_chunked, valid_positions


def paged_fp8_sparse_attn_fwd_naive(
    q: torch.Tensor,
    cache: torch.Tensor,
    indices: torch.Tensor,
    page_size: int,
    sm_scale: float,
    *,
    extra_cache: torch.Tensor | None = None,
    extra_indices: torch.Tensor | None = None,
    extra_page_size: int | None = None,
    topk_length: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    layout: KVCacheLayout = KVCacheLayout.V4,
    d_v: int = 512,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of ``paged_fp8_sparse_attn_fwd`` (same arguments, validated), float32 results.

    Returns (out [s_q, h_q, d_v], max_logits [s_q, h_q], lse [s_q, h_q]), all float32.
    """
    scopes = [(cache, indices, page_size, topk_length)]
    if extra_indices is not None:
        scopes.append((extra_cache, extra_indices, extra_page_size, extra_topk_length))
    width = sum(ids.shape[1] for _, ids, _, _ in scopes)

    def gather(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, valids = [], []
        for scope_cache, scope_ids, scope_page_size, lengths in scopes:
            ids = scope_ids[start:stop].long()
            capacity = scope_cache.shape[0] * scope_page_size
            valid = valid_positions(ids, capacity, None if lengths is None else lengths[start:stop])
            # Invalid entries become id -1, which dequantizes to a zero row.
            tokens = dequantize_k_cache_paged_ref(
                scope_cache, ids.masked_fill(~valid, -1).flatten(), scope_page_size, layout
            )
            rows.append(tokens.view(stop - start, ids.shape[1], layout.dim))
            valids.append(valid)
        return torch.cat(rows, dim=1), torch.cat(valids, dim=1)

    return attend_chunked(q, width, gather, sm_scale, d_v, attn_sink)
