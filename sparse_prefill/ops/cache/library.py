"""The cache ops as registered torch ops (``torch.ops.sparse_prefill.*``), with fake (shape-only)
implementations, so ``torch.compile`` traces through them and meta tensors run them.

They take validated arguments (``ops/cache/__init__.py`` checks them) and write into caller
buffers, declared with ``mutates_args``; ``layout`` is the ``KVCacheLayout`` member's name and
``impl`` the resolved implementation ("triton" or "reference").
"""

from __future__ import annotations

import torch

from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops.cache.kernels import dequantize_k_cache_paged_triton, store_k_cache_triton
from sparse_prefill.ops.cache.naive import dequantize_k_cache_paged_ref, store_k_cache_ref


@torch.library.custom_op("sparse_prefill::store_k_cache", mutates_args=("cache",))
def store_k_cache_op(
    cache: torch.Tensor, k: torch.Tensor, slot_ids: torch.Tensor, page_size: int, layout: str, impl: str
) -> None:
    """Quantize ``k`` [n, d] into ``cache`` at ``slot_ids`` (see ``store_k_cache``)."""
    if impl == "reference":
        store_k_cache_ref(cache, k, slot_ids, page_size, KVCacheLayout[layout])
    else:
        store_k_cache_triton(cache, k, slot_ids, page_size, KVCacheLayout[layout])


@store_k_cache_op.register_fake
def _(cache, k, slot_ids, page_size, layout, impl) -> None:
    return None


@torch.library.custom_op("sparse_prefill::dequantize_k_cache_paged", mutates_args=("out",))
def dequantize_k_cache_paged_op(
    cache: torch.Tensor, token_ids: torch.Tensor, page_size: int, layout: str, out: torch.Tensor, impl: str
) -> None:
    """Dequantize tokens ``token_ids`` of ``cache`` into ``out`` [n, 1, d] (see
    ``dequantize_k_cache_paged``)."""
    if impl == "reference":
        out[:, 0].copy_(dequantize_k_cache_paged_ref(cache, token_ids, page_size, KVCacheLayout[layout]))
    else:
        dequantize_k_cache_paged_triton(cache, token_ids, page_size, KVCacheLayout[layout], out[:, 0])


@dequantize_k_cache_paged_op.register_fake
def _(cache, token_ids, page_size, layout, out, impl) -> None:
    return None
