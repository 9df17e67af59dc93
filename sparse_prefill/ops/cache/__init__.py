"""FP8 paged KV cache ops: quantize/store K into the cache, gather-and-dequantize it back.

A cache is a ``[num_pages, page_bytes]`` uint8 tensor in one of the ``KVCacheLayout`` byte
layouts; token id (slot) ``t`` is offset ``t % page_size`` of page ``t // page_size``. The exact
quantization (power-of-two scales, round-to-nearest-even e4m3, rope stored as bf16) is defined
in ``naive.py``; the Triton kernels reproduce it bit for bit.

Checks of shapes, dtypes and devices are free and always run, before any launch. Checks of
index *values* (an id beyond the cache's capacity, duplicate store slots) raise ValueError for
CPU tensors; for CUDA tensors they run on the device without a sync (a device-side assert) unless
``sparse_prefill.value_checks("strict")`` asks for host checks; ``value_checks(False)`` or
``SPARSE_PREFILL_VALUE_CHECKS=0`` switches them off.
"""

from __future__ import annotations

import torch

from sparse_prefill._utils import (
    check_disjoint,
    check_int,
    check_no_overlap,
    check_tensor,
    check_unit_stride,
    device_assert,
    resolve_impl,
    value_check_site,
)
from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops.cache.library import dequantize_k_cache_paged_op, store_k_cache_op

INT32_MAX = 2**31 - 1  # token ids are int32 (or int64 below it): a page holds fewer

__all__ = ["dequantize_k_cache", "dequantize_k_cache_paged", "quantize_k_cache", "store_k_cache"]

_ID_DTYPES = (torch.int32, torch.int64)


def _check_layout(layout: object) -> KVCacheLayout:
    if not isinstance(layout, KVCacheLayout):
        raise TypeError(f"layout must be a KVCacheLayout (V4 or V32), got {type(layout).__name__}")
    return layout


def check_cache(
    cache: object, page_size: object, layout: KVCacheLayout, *, name: str = "cache",
    page_size_name: str = "page_size", device: torch.device | None = None,
) -> int:
    """Check ``cache`` (argument ``name``) against ``page_size`` (argument ``page_size_name``) and
    ``layout``: a contiguous ``[num_pages, layout.page_bytes(page_size)]`` uint8 tensor (on
    ``device`` if given). Return its capacity in tokens."""
    check_int(page_size_name, page_size, lo=1, hi=INT32_MAX)
    check_tensor(name, cache, dtypes=(torch.uint8,), shape=(None, None), device=device)
    if not cache.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tuple(cache.stride())}")
    want = layout.page_bytes(page_size)
    if cache.shape[1] != want:
        fits = layout.page_size_of(cache)
        raise ValueError(
            f"{name} has {cache.shape[1]} bytes per page, but layout {layout.name} with "
            f"{page_size_name}={page_size} needs {want}; page sizes of {layout.name} that fit this "
            f"{name}: {fits if fits else 'none'}"
        )
    return cache.shape[0] * page_size


def _check_ids(name: str, ids: object, n: int | None, device: torch.device) -> torch.Tensor:
    """``ids`` [n] int32/int64 on ``device``; returned contiguous (kernels read it densely)."""
    check_tensor(name, ids, dtypes=_ID_DTYPES, shape=(n,), device=device)
    return ids.contiguous()


def _check_id_values(name: str, ids: torch.Tensor, capacity: int, *, unique: bool) -> None:
    """Value checks: ids < capacity; with ``unique``, no non-negative id twice. On the host or
    the device (no sync) as ``value_check_site`` says."""
    site = value_check_site(ids.device)
    if site is None or ids.numel() == 0:
        return
    if unique:
        ids = ids.sort().values
    if site == "device":
        if capacity <= torch.iinfo(ids.dtype).max:  # else every id fits (and capacity is no int32)
            device_assert(ids < capacity, f"{name} holds an id beyond the cache's capacity of {capacity} tokens")
        if unique:
            no_dup = (ids[1:] != ids[:-1]) | (ids[1:] < 0)
            device_assert(no_dup, f"{name} holds a non-negative slot more than once")
        return
    if unique:
        dup = ((ids[1:] == ids[:-1]) & (ids[1:] >= 0)).any().to(ids.dtype)
        top, has_dup = torch.stack([ids[-1], dup]).tolist()
    else:
        top, has_dup = int(ids.max()), 0
    if top >= capacity:
        raise ValueError(
            f"{name} holds id {top}, beyond the cache's capacity of {capacity} tokens "
            f"(num_pages * page_size); negative ids are padding"
        )
    if has_dup:
        raise ValueError(f"{name} holds a non-negative slot more than once; each slot may be written once")


def _store(
    cache: torch.Tensor,
    k: torch.Tensor,
    slot_ids: torch.Tensor,
    page_size: int,
    layout: KVCacheLayout,
    impl: str,
) -> None:
    store_k_cache_op(cache, k, slot_ids, page_size, layout.name, impl)


def _gather(
    cache: torch.Tensor,
    token_ids: torch.Tensor,
    page_size: int,
    layout: KVCacheLayout,
    out: torch.Tensor,
    impl: str,
) -> torch.Tensor:
    """Write the dequantized tokens into ``out`` [n, 1, d] and return it."""
    dequantize_k_cache_paged_op(cache, token_ids, page_size, layout.name, out, impl)
    return out


def store_k_cache(
    cache: torch.Tensor,
    k: torch.Tensor,
    slot_ids: torch.Tensor,
    page_size: int,
    layout: KVCacheLayout = KVCacheLayout.V4,
    *,
    impl: str = "auto",
) -> None:
    """Quantize K of ``n`` new tokens and write them into the paged FP8 cache, in place (what an
    engine calls for the new tokens of every forward; vLLM's ``reshape_and_cache`` convention).

    Args:
        cache: [num_pages, layout.page_bytes(page_size)], uint8, contiguous. Modified in place:
            only the data and scale bytes of the written slots change.
        k: [n, layout.dim], bfloat16, unit stride in the last dim. Finite values (NaN/inf are
            unsupported: what they store is unspecified).
        slot_ids: [n], int32 or int64. Token ``i`` goes to slot ``slot_ids[i]``, i.e. offset
            ``slot % page_size`` of page ``slot // page_size``. A negative slot is padding: that
            token is skipped. A slot ``>= num_pages * page_size`` raises ValueError, and so does a
            non-negative slot given twice; both are value checks (see below).
        page_size: tokens per page, ``>= 1``; must match the cache's page bytes.
        layout: ``KVCacheLayout.V4`` (d = 512) or ``KVCacheLayout.V32`` (d = 576).
        impl: "auto" (Triton for CUDA tensors, the PyTorch reference for CPU tensors), "triton"
            (on CPU needs ``TRITON_INTERPRET=1``) or "reference".

    Quantization (bit-exact on every path; ``ops/cache/naive.py`` defines it): per token and
    scale tile, the scale is ``2**k`` with ``k`` the smallest integer such that
    ``max|x| <= 448 * 2**k``, at least -13; the fp8 byte is e4m3fn of ``x * 2**-k`` rounded to
    nearest even (never saturates); rope dims are stored as their bf16 bytes.

    Value checks (slots in range, no duplicates): ValueError for CPU tensors (and CUDA ones in
    ``value_checks("strict")`` mode, one device sync); by default a device-side assert for CUDA
    tensors. Switch them off with ``with sparse_prefill.value_checks(False):`` (or
    ``SPARSE_PREFILL_VALUE_CHECKS=0``); then an
    out-of-range slot writes out of bounds and duplicate slots leave the slot's bytes undefined
    (possibly a mix of the tokens). All other checks run always, before any launch, and raise
    TypeError/ValueError naming the argument.
    """
    layout = _check_layout(layout)
    capacity = check_cache(cache, page_size, layout)
    device = cache.device
    check_tensor("k", k, dtypes=(torch.bfloat16,), shape=(None, layout.dim), device=device)
    check_unit_stride("k", k)
    slot_ids = _check_ids("slot_ids", slot_ids, k.shape[0], device)
    impl = resolve_impl(impl, device)
    _check_id_values("slot_ids", slot_ids, capacity, unique=True)
    _store(cache, k, slot_ids, page_size, layout, impl)


def quantize_k_cache(
    k: torch.Tensor, layout: KVCacheLayout = KVCacheLayout.V4, *, impl: str = "auto"
) -> torch.Tensor:
    """Quantize a whole bf16 K cache into the paged FP8 layout (the form FlashMLA's tests use).

    Args:
        k: [num_pages, page_size, 1, layout.dim], bfloat16, ``page_size >= 1``, unit stride in
            the last dim. Finite values.
        layout: ``KVCacheLayout.V4`` (d = 512) or ``KVCacheLayout.V32`` (d = 576).
        impl: "auto", "triton" or "reference" (see ``store_k_cache``).

    Returns:
        [num_pages, layout.page_bytes(page_size)], uint8, on ``k``'s device: token ``t`` of page
        ``p`` quantized as ``store_k_cache`` does at slot ``p * page_size + t``; page padding
        bytes (and V4's pad byte per token) are zero.

    Bad arguments raise TypeError/ValueError naming the argument, before any launch.
    """
    layout = _check_layout(layout)
    check_tensor("k", k, dtypes=(torch.bfloat16,), shape=(None, None, 1, layout.dim))
    check_unit_stride("k", k)
    num_pages, page_size = k.shape[:2]
    if page_size < 1:
        raise ValueError(f"k must have a page size (dim 1) >= 1, got shape {tuple(k.shape)}")
    impl = resolve_impl(impl, k.device)
    cache = torch.zeros(num_pages, layout.page_bytes(page_size), dtype=torch.uint8, device=k.device)
    slots = torch.arange(num_pages * page_size, device=k.device)
    _store(cache, k.reshape(-1, layout.dim), slots, page_size, layout, impl)
    return cache


def dequantize_k_cache_paged(
    cache: torch.Tensor,
    token_ids: torch.Tensor,
    page_size: int,
    layout: KVCacheLayout = KVCacheLayout.V4,
    out: torch.Tensor | None = None,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Gather ``n`` tokens from the paged FP8 cache and dequantize them to bf16 (fills the
    sparse-prefill workspace).

    Args:
        cache: [num_pages, layout.page_bytes(page_size)], uint8, contiguous.
        token_ids: [n], int32 or int64. Row ``i`` is token ``token_ids[i]``; a negative id is
            padding and yields a zero row. An id ``>= num_pages * page_size`` raises ValueError
            (a value check, see ``store_k_cache``; off under
            ``sparse_prefill.value_checks(False)``, and then such an id reads out of bounds).
        page_size: tokens per page, ``>= 1``; must match the cache's page bytes.
        layout: ``KVCacheLayout.V4`` (d = 512) or ``KVCacheLayout.V32`` (d = 576).
        out: optional, [n, 1, layout.dim], bfloat16, unit stride in the last dim, any other
            strides (e.g. rows of a larger workspace) as long as no two elements share memory
            (no stride 0 / ``expand``). Written and returned.
        impl: "auto", "triton" or "reference" (see ``store_k_cache``).

    Returns:
        [n, 1, layout.dim], bfloat16 (``out`` when given): row ``i`` is token ``token_ids[i]``,
        each nope dim ``bf16(float32(fp8) * scale)`` (exact), rope dims as stored; zeros for a
        negative id.

    All checks other than the value check run always, before any launch, and raise
    TypeError/ValueError naming the argument.
    """
    layout = _check_layout(layout)
    capacity = check_cache(cache, page_size, layout)
    device = cache.device
    token_ids = _check_ids("token_ids", token_ids, None, device)
    n = token_ids.shape[0]
    if out is None:
        out = torch.empty(n, 1, layout.dim, dtype=torch.bfloat16, device=device)
    else:
        check_tensor("out", out, dtypes=(torch.bfloat16,), shape=(n, 1, layout.dim), device=device)
        check_unit_stride("out", out)
        check_no_overlap("out", out)
        check_disjoint("out", out, cache=cache, token_ids=token_ids)
    impl = resolve_impl(impl, device)
    _check_id_values("token_ids", token_ids, capacity, unique=False)
    return _gather(cache, token_ids, page_size, layout, out, impl)


def dequantize_k_cache(
    cache: torch.Tensor, layout: KVCacheLayout, page_size: int, *, impl: str = "auto"
) -> torch.Tensor:
    """Dequantize a whole paged FP8 cache (the inverse of ``quantize_k_cache``).

    Args:
        cache: [num_pages, layout.page_bytes(page_size)], uint8, contiguous.
        layout: ``KVCacheLayout.V4`` (d = 512) or ``KVCacheLayout.V32`` (d = 576).
        page_size: tokens per page, ``>= 1``; must match the cache's page bytes.
        impl: "auto", "triton" or "reference" (see ``store_k_cache``).

    Returns:
        [num_pages, page_size, 1, layout.dim], bfloat16: token ``t`` of page ``p`` dequantized as
        ``dequantize_k_cache_paged`` does for id ``p * page_size + t``.

    Bad arguments raise TypeError/ValueError naming the argument, before any launch.
    """
    layout = _check_layout(layout)
    capacity = check_cache(cache, page_size, layout)
    impl = resolve_impl(impl, cache.device)
    out = torch.empty(capacity, 1, layout.dim, dtype=torch.bfloat16, device=cache.device)
    token_ids = torch.arange(capacity, device=cache.device)
    _gather(cache, token_ids, page_size, layout, out, impl)
    return out.view(cache.shape[0], page_size, 1, layout.dim)
