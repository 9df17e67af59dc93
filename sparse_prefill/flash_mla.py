"""A drop-in for FlashMLA's Python interface, on this library's kernels.

An engine that calls ``flash_mla.get_mla_metadata``, ``flash_mla.flash_mla_with_kvcache`` (the
sparse FP8 mode) and ``flash_mla.flash_mla_sparse_fwd`` changes one line::

    import sparse_prefill.flash_mla as flash_mla

The functions take FlashMLA's arguments, in its order, and return what it returns:

- ``flash_mla_sparse_fwd`` is ``sparse_attn_fwd`` (any ``h_q`` in 1..128, any ``topk``; its
  ``impl="auto"``, so FlashMLA's own kernel where that is installed and measured faster).
- ``flash_mla_with_kvcache`` with ``indices`` is ``paged_fp8_sparse_attn_fwd`` over FlashMLA's
  float8 views of the paged caches (``[num_blocks, page_block_size, 1, 584]`` for DeepSeek-V4 /
  "MODEL1", ``[..., 656]`` for V3.2), ``[b, s_q]`` flattened to rows. Its dense mode
  (``block_table`` + ``cache_seqlens``, no ``indices``) is not implemented: NotImplementedError.
- ``get_mla_metadata`` returns ``(FlashMLASchedMeta(), None)``; no scheduling metadata is
  needed, the object only records the first call's shapes, and later calls with the same object
  must match them, as in FlashMLA.

Invalid ids are the kernels' (negative, or past the cache), a superset of FlashMLA's -1.
"""

from __future__ import annotations

import dataclasses

import torch

from sparse_prefill._utils import check_int, check_tensor
from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops.fp8_sparse_attn import paged_fp8_sparse_attn_fwd
from sparse_prefill.ops.sparse_attn import D_V, INT32_MAX, sparse_attn_fwd

__all__ = ["FlashMLASchedMeta", "flash_mla_sparse_fwd", "flash_mla_with_kvcache", "get_mla_metadata"]

# Bytes per token of FlashMLA's float8 cache views -> our layout of the same bytes.
_LAYOUT_OF_TOKEN_BYTES = {KVCacheLayout.V4.bytes_per_token: KVCacheLayout.V4,
                          KVCacheLayout.V32.bytes_per_token: KVCacheLayout.V32}
_CACHE_DTYPES = (torch.float8_e4m3fn, torch.uint8)


@dataclasses.dataclass
class FlashMLASchedMeta:
    """What ``get_mla_metadata`` returns. ``config`` holds the shapes of the first
    ``flash_mla_with_kvcache`` call made with it (b, s_q, h_q, page sizes, topk widths); later
    calls with the same object must have the same ones."""

    config: tuple | None = None


def get_mla_metadata(*args, **kwargs) -> tuple[FlashMLASchedMeta, None]:
    """A fresh ``FlashMLASchedMeta`` and None, as FlashMLA returns; arguments are ignored (they
    are accepted for FlashMLA's older interface)."""
    return FlashMLASchedMeta(), None


def flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = D_V,
    attn_sink: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashMLA's sparse prefill: ``sparse_attn_fwd`` (see it for every argument), returning
    ``(out [s_q, h_q, 512] bf16, max_logits [s_q, h_q] f32, lse [s_q, h_q] f32)``."""
    return sparse_attn_fwd(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)


def _paged_cache(name: str, k_cache: object) -> tuple[torch.Tensor, KVCacheLayout, int, int]:
    """FlashMLA's float8 view ``[num_blocks, P, 1, bytes_per_token]`` -> (our uint8 cache
    ``[num_blocks, page_bytes]`` over the same memory, layout, P, the page size our kernels
    address it with). V3.2 pages may be padded by whole tokens (FlashMLA's tests pad one): they
    are addressed as pages of that many tokens."""
    check_tensor(name, k_cache, dtypes=_CACHE_DTYPES, shape=(None, None, 1, None))
    num_blocks, page_size, _, token_bytes = k_cache.shape
    if token_bytes not in _LAYOUT_OF_TOKEN_BYTES:
        raise ValueError(
            f"{name} must have {sorted(_LAYOUT_OF_TOKEN_BYTES)} bytes per token (dim 3: V4 / V3.2), got {token_bytes}"
        )
    layout = _LAYOUT_OF_TOKEN_BYTES[token_bytes]
    if num_blocks < 1 or page_size < 1:
        raise ValueError(f"{name} must have at least one block of at least one token, got {tuple(k_cache.shape)}")
    if k_cache.stride(3) != 1 or k_cache.stride(1) != token_bytes:
        raise ValueError(
            f"{name} must hold each block's tokens back to back (strides (*, {token_bytes}, *, 1)), "
            f"got {tuple(k_cache.stride())}"
        )
    page_stride = k_cache.stride(0) if num_blocks > 1 else layout.page_bytes(page_size)
    if layout is KVCacheLayout.V4:
        addressed = page_size
        if page_stride != layout.page_bytes(page_size):
            raise ValueError(
                f"{name} blocks must be {layout.page_bytes(page_size)} bytes apart (V4 pages of {page_size} "
                f"tokens, padded to a multiple of 576), got a block stride of {page_stride}"
            )
    else:
        addressed = page_stride // token_bytes
        if page_stride % token_bytes or addressed < page_size:
            raise ValueError(
                f"{name} blocks must be a whole number (>= {page_size}) of {token_bytes}-byte tokens apart, "
                f"got a block stride of {page_stride}"
            )
    raw = k_cache.view(torch.uint8)
    cache = raw.as_strided((num_blocks, layout.page_bytes(addressed)), (page_stride, 1))
    return cache, layout, page_size, addressed


def _rows(name: str, ids: object, b: int, s_q: int, device: torch.device, page_size: int,
          addressed: int) -> torch.Tensor:
    """``ids`` [b, s_q, topk] int32 -> [b * s_q, topk] ids of pages of ``addressed`` tokens."""
    check_tensor(name, ids, dtypes=(torch.int32,), shape=(b, s_q, None), device=device)
    rows = ids.reshape(b * s_q, ids.shape[2])
    if addressed == page_size:
        return rows
    wide = rows.long()
    moved = wide // page_size * addressed + wide % page_size
    return torch.where((wide < 0) | (moved > INT32_MAX), -1, moved).to(torch.int32)


def _per_row_lengths(name: str, lengths: object, b: int, s_q: int, device: torch.device) -> torch.Tensor | None:
    """FlashMLA's per-request ``[b]`` lengths -> one per query row."""
    if lengths is None:
        return None
    check_tensor(name, lengths, dtypes=(torch.int32,), shape=(b,), device=device)
    return lengths.repeat_interleave(s_q) if s_q > 1 else lengths


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    head_dim_v: int,
    tile_scheduler_metadata: FlashMLASchedMeta,
    num_splits: None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    extra_k_cache: torch.Tensor | None = None,
    extra_indices_in_kvcache: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's sparse FP8 decode: every query token attends to the tokens its rows of
    ``indices`` (and ``extra_indices_in_kvcache``) name in the FP8 paged caches, one softmax over
    both scopes (``paged_fp8_sparse_attn_fwd``).

    Args:
        q: [b, s_q, h_q, d], bfloat16; ``d`` 512 (V4) or 576 (V3.2), ``1 <= h_q <= 128``.
        k_cache: [num_blocks, page_block_size, 1, 584 | 656], float8_e4m3fn (or uint8): FlashMLA's
            view of the main scope's paged FP8 cache (584 bytes per token: V4 / "MODEL1", blocks
            ``layout.page_bytes(page_block_size)`` bytes apart; 656: V3.2, blocks a whole number
            of tokens apart).
        block_table, cache_seqlens: the dense mode's arguments; ignored in the sparse mode.
        head_dim_v: 512.
        tile_scheduler_metadata: a ``FlashMLASchedMeta`` from ``get_mla_metadata``.
        num_splits: must be None.
        softmax_scale: scale of ``q @ k``; default ``d ** -0.5``.
        causal: must be False (sparse attention).
        is_fp8_kvcache: must be True (the sparse mode reads FP8 caches).
        indices: [b, s_q, topk], int32, token ids ``block * page_block_size + offset`` into
            ``k_cache``; negative or past the cache: ignored. None (the dense mode) raises
            NotImplementedError.
        attn_sink: optional [h_q] float32: ``out`` times ``exp(lse) / (exp(lse) + exp(sink))``.
        extra_k_cache, extra_indices_in_kvcache: optional second scope, formatted like the
            main one (both or neither).
        topk_length, extra_topk_length: optional [b] int32: request ``i``'s queries consider
            only the first ``topk_length[i]`` entries of their index rows (of each scope).

    Returns:
        (out [b, s_q, h_q, 512] bfloat16, lse [b, h_q, s_q] float32); a query with no valid
        token gets out 0 and lse +inf.
    """
    if not isinstance(tile_scheduler_metadata, FlashMLASchedMeta):
        raise TypeError(
            "tile_scheduler_metadata must be the FlashMLASchedMeta of sparse_prefill.flash_mla.get_mla_metadata, "
            f"got {type(tile_scheduler_metadata).__name__}"
        )
    if num_splits is not None:
        raise ValueError(f"num_splits must be None, got {num_splits!r}")
    if indices is None:
        raise NotImplementedError(
            "sparse_prefill.flash_mla implements the sparse FP8 mode of flash_mla_with_kvcache only "
            "(indices=...); the dense mode (block_table + cache_seqlens) is not implemented"
        )
    if causal:
        raise ValueError("causal must be False in the sparse mode (indices given)")
    if not is_fp8_kvcache:
        raise ValueError("is_fp8_kvcache must be True in the sparse mode (it reads FP8 paged caches)")
    check_int("head_dim_v", head_dim_v)
    check_tensor("q", q, dtypes=(torch.bfloat16,), shape=(None, None, None, None))
    b, s_q, h_q, d = q.shape
    device = q.device
    cache, layout, page_size, addressed = _paged_cache("k_cache", k_cache)
    if d != layout.dim:
        raise ValueError(f"q must have head dim {layout.dim} for k_cache's {layout.name} layout, got {d}")
    rows = _rows("indices", indices, b, s_q, device, page_size, addressed)
    extra = (extra_k_cache, extra_indices_in_kvcache)
    if (extra[0] is None) != (extra[1] is None):
        raise ValueError("extra_k_cache and extra_indices_in_kvcache go together; got only one")
    scope = {}
    extra_page = None
    if extra[0] is not None:
        x_cache, x_layout, extra_page, x_addressed = _paged_cache("extra_k_cache", extra_k_cache)
        if x_layout is not layout:
            raise ValueError(f"extra_k_cache must have k_cache's {layout.name} layout, got {x_layout.name}")
        x_rows = _rows("extra_indices_in_kvcache", extra_indices_in_kvcache, b, s_q, device, extra_page, x_addressed)
        scope = dict(extra_cache=x_cache, extra_indices=x_rows, extra_page_size=x_addressed)
        scope["extra_topk_length"] = _per_row_lengths("extra_topk_length", extra_topk_length, b, s_q, device)
    elif extra_topk_length is not None:
        raise ValueError("extra_topk_length needs the extra scope (extra_k_cache, extra_indices_in_kvcache)")
    shapes = (b, s_q, h_q, page_size, indices.shape[2], extra_page,
              None if extra[1] is None else extra[1].shape[2])
    if tile_scheduler_metadata.config is None:
        tile_scheduler_metadata.config = shapes
    elif tile_scheduler_metadata.config != shapes:
        raise ValueError(
            "tile_scheduler_metadata was first used with (b, s_q, h_q, page_block_size, topk, extra "
            f"page_block_size, extra_topk) = {tile_scheduler_metadata.config}, now {shapes}: use a fresh "
            "get_mla_metadata() per shape, as with FlashMLA"
        )
    sm_scale = d**-0.5 if softmax_scale is None else softmax_scale
    out, _, lse = paged_fp8_sparse_attn_fwd(
        q.reshape(b * s_q, h_q, d), cache, rows, addressed, sm_scale,
        topk_length=_per_row_lengths("topk_length", topk_length, b, s_q, device),
        attn_sink=attn_sink, layout=layout, d_v=head_dim_v, **scope,
    )
    return out.view(b, s_q, h_q, -1), lse.view(b, s_q, h_q).transpose(1, 2).contiguous()
