"""The cache ops as registered torch ops (``ops/registry.py``). They take validated arguments
(``ops/cache/__init__.py`` checks them) and write into caller buffers; ``layout`` is the
``KVCacheLayout`` member's name and ``impl`` the resolved implementation ("triton" or
"reference")."""

from __future__ import annotations

import torch

from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops.cache.kernels import dequantize_k_cache_paged_triton, store_k_cache_triton
from sparse_prefill.ops.cache.naive import dequantize_k_cache_paged_ref, store_k_cache_ref
from sparse_prefill.ops.registry import define_op, writes_only


def _store_k_cache(
    cache: torch.Tensor, k: torch.Tensor, slot_ids: torch.Tensor, page_size: int, layout: str, impl: str
) -> None:
    """Quantize ``k`` [n, d] into ``cache`` at ``slot_ids`` (see ``store_k_cache``)."""
    if impl == "reference":
        store_k_cache_ref(cache, k, slot_ids, page_size, KVCacheLayout[layout])
    else:
        store_k_cache_triton(cache, k, slot_ids, page_size, KVCacheLayout[layout])


def _dequantize_k_cache_paged(
    cache: torch.Tensor, token_ids: torch.Tensor, page_size: int, layout: str, out: torch.Tensor, impl: str
) -> None:
    """Dequantize tokens ``token_ids`` of ``cache`` into ``out`` [n, 1, d] (see
    ``dequantize_k_cache_paged``)."""
    if impl == "reference":
        out[:, 0].copy_(dequantize_k_cache_paged_ref(cache, token_ids, page_size, KVCacheLayout[layout]))
    else:
        dequantize_k_cache_paged_triton(cache, token_ids, page_size, KVCacheLayout[layout], out[:, 0])


store_k_cache_op = define_op(
    "store_k_cache(Tensor(a!) cache, Tensor k, Tensor slot_ids, int page_size, str layout, str impl) -> ()",
    _store_k_cache, writes_only,
)
dequantize_k_cache_paged_op = define_op(
    "dequantize_k_cache_paged(Tensor cache, Tensor token_ids, int page_size, str layout, Tensor(a!) out, "
    "str impl) -> ()",
    _dequantize_k_cache_paged, writes_only,
)
