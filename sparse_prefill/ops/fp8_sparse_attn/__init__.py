"""``paged_fp8_sparse_attn_fwd``: sparse MLA attention straight from FP8 paged KV caches (the
"regular path", FlashMLA ``flash_mla_with_kvcache`` sparse FP8 semantics), no bf16 workspace.

Two kernels: ``gluon_kernel.py`` (warp-specialized, Hopper, V4 layout) and ``kernel.py``
(Triton, any CUDA GPU, both layouts); ``naive.py`` is the reference both are tested against.
``impl="flashmla"`` runs FlashMLA's decode kernel instead (``ops/flashmla_impl.py``)."""

from __future__ import annotations

import torch

from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops import kernel_choice
from sparse_prefill.ops.cache import check_cache
from sparse_prefill.ops.fp8_sparse_attn.library import paged_fp8_sparse_attn_fwd_op
from sparse_prefill.ops.sparse_attn import (
    D_V,
    AttnOutputs,
    check_indices,
    check_lengths,
    check_query,
    check_scale_and_d_v,
    check_sink,
    prepare_outputs,
)

__all__ = ["paged_fp8_sparse_attn_fwd"]


def _check_cache(
    name: str, cache: object, page_size_name: str, page_size: object, layout: KVCacheLayout,
    device: torch.device,
) -> None:
    """``cache`` [num_pages >= 1, layout.page_bytes(page_size)] uint8, contiguous (kernels
    address pages by ``page_bytes``)."""
    check_cache(cache, page_size, layout, name=name, page_size_name=page_size_name, device=device)
    if cache.shape[0] < 1:
        raise ValueError(f"{name} must have at least one page, got shape {tuple(cache.shape)}")


def paged_fp8_sparse_attn_fwd(
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
    d_v: int = D_V,
    out: torch.Tensor | None = None,
    impl: str = "auto",
) -> AttnOutputs:
    """Sparse attention of one query token per row over tokens of FP8 paged KV caches, read and
    dequantized on the fly: FlashMLA's sparse FP8 decode (``flash_mla_with_kvcache`` with
    ``indices`` / ``extra_indices``), with ``[b, s_q]`` flattened to rows, any ``h_q`` in 1..128.

    Args:
        q: [s_q, h_q, layout.dim], bfloat16 (512 for V4, 576 for V3.2), ``1 <= h_q <= 128``.
        cache: [num_pages, layout.page_bytes(page_size)], uint8, contiguous, ``num_pages >= 1``:
            the paged FP8 cache of the main scope (``sparse_prefill.layout``).
        indices: [s_q, topk], int32, ``topk >= 1``: token ids into ``cache`` (token ``t`` is
            offset ``t % page_size`` of page ``t // page_size``). An entry is invalid, and
            ignored, when it is ``< 0`` or ``>= num_pages * page_size`` (any int32) or its
            position is ``>= topk_length[i]``. A token listed twice counts twice.
        page_size: tokens per page of ``cache``, ``>= 1``.
        sm_scale: float, finite as a float32: 0 or a magnitude in ``[2**-126, 2**127]``.
            Scale applied to ``q @ k`` before the softmax.
        extra_cache, extra_indices, extra_page_size: optional second scope (all three or none),
            like the main one: extra_cache [extra_pages, layout.page_bytes(extra_page_size)]
            uint8, extra_indices [s_q, extra_topk] int32, ids into ``extra_cache``. In DeepSeek-V4
            one scope is the compressed cache (top-k ids), the other the SWA cache (window ids).
        topk_length: optional, [s_q], int32, values in ``[0, topk]``: row ``i`` considers only
            ``indices[i, :topk_length[i]]`` (later entries are ignored, whatever they point at).
        extra_topk_length: optional, [s_q], int32, values in ``[0, extra_topk]``, the same for
            ``extra_indices``; needs the extra scope. Length values outside their range raise
            ValueError while value checks are on (``sparse_prefill.value_checks``; for CUDA tensors
            by default a device-side assert, no sync); with them off
            a value past the width acts as the width and a negative one as 0.
        attn_sink: optional, [h_q], float32. ``out`` of head ``h`` is multiplied by
            ``exp(lse) / (exp(lse) + exp(attn_sink[h]))``; -inf leaves it unchanged, +inf makes
            it 0; ``lse`` and ``max_logits`` are not changed.
        layout: ``KVCacheLayout.V4`` or ``KVCacheLayout.V32``, the byte layout of both caches.
        d_v: value dims, must be 512.
        out: optional, [s_q, h_q, d_v], bfloat16, preallocated output whose elements do not
            share memory (no stride 0 / ``expand``); written and returned.
        impl: "auto", "gluon", "triton", "flashmla" or "reference" (``ops/kernel_choice.py``
            declares them). "auto": for CUDA tensors the Gluon kernel where it runs (V4 layout,
            an sm_90 GPU, a Triton version it was validated with: 3.6), else the Triton kernel
            (never FlashMLA's: slower, ``kernel_choice.AUTO_PREFERS``); for CPU tensors the
            PyTorch reference. "gluon": the warp-specialized Hopper kernel (ValueError where it
            cannot run). "triton": the Triton kernel (on CPU needs ``TRITON_INTERPRET=1``).
            "flashmla": FlashMLA's sparse FP8 decode kernel (``flash_mla_with_kvcache``, one
            query per batch row; ``flash_mla`` importable, an sm_90 GPU, h_q 64 or 128, at most
            ``FLASHMLA_DECODE_MAX_ROWS`` = 8192 rows: it aborted the process on 32768), else
            ValueError saying why; it does not compute ``max_logits`` (returned as NaN). All give
            the same out and lse up to float summation order.

    Every tensor must be on ``q``'s device; q, the index rows and out need unit stride in their
    last dim (other dims take any stride). Violations raise TypeError/ValueError naming the
    argument, before any launch.

    Returns:
        (out, max_logits, lse): with ``K`` the valid tokens of both scopes of row ``i``,
        dequantized exactly as ``dequantize_k_cache_paged`` does, and ``P = (q @ K.T) *
        sm_scale``, one softmax over the union:
        - out: [s_q, h_q, d_v], bfloat16, ``softmax(P) @ K[:, :d_v]`` times the sink factor;
          0 for a row with no valid token.
        - max_logits: [s_q, h_q], float32, ``max(P)``; -inf for a row with no valid token.
        - lse: [s_q, h_q], float32, ``logsumexp(P)`` (natural log); +inf for a row with no valid
          token.
        NaN propagates as in ``sparse_attn_fwd`` (a NaN query head, or a validly listed token
        that dequantizes to NaN, gives NaN outputs; invalid entries are ignored) on the
        reference and Triton paths; the Gluon kernel still returns such rows empty (out 0,
        lse +inf): tests/ops/test_nan_semantics.py marks it.
        ``s_q = 0`` returns empty tensors without launching anything.
    """
    if not isinstance(layout, KVCacheLayout):
        raise TypeError(f"layout must be a KVCacheLayout (V4 or V32), got {type(layout).__name__}")
    s_q, h_q, _ = check_query(q, (layout.dim,))
    device = q.device
    _check_cache("cache", cache, "page_size", page_size, layout, device)
    topk = check_indices("indices", indices, (s_q, None), device)
    extra = (extra_cache, extra_indices, extra_page_size)
    if any(x is not None for x in extra):
        if any(x is None for x in extra):
            given = [n for n, x in zip(("extra_cache", "extra_indices", "extra_page_size"), extra) if x is not None]
            raise ValueError(f"extra_cache, extra_indices and extra_page_size go together; got only {given}")
        _check_cache("extra_cache", extra_cache, "extra_page_size", extra_page_size, layout, device)
        extra_topk = check_indices("extra_indices", extra_indices, (s_q, None), device)
    elif extra_topk_length is not None:
        raise ValueError("extra_topk_length needs the extra scope (extra_cache, extra_indices, extra_page_size)")
    sm_scale = check_scale_and_d_v(sm_scale, d_v)
    attn_sink = check_sink(attn_sink, h_q, device)
    topk_length = check_lengths("topk_length", topk_length, s_q, topk, device)
    if extra_indices is not None:
        extra_topk_length = check_lengths("extra_topk_length", extra_topk_length, s_q, extra_topk, device)
    lengths = topk_length is not None or extra_topk_length is not None
    shape = kernel_choice.paged_fp8_shape(q, indices, layout, extra_cache is not None, lengths)
    impl = kernel_choice.resolve(kernel_choice.PAGED_FP8, impl, device, shape)
    out, max_logits, lse = prepare_outputs(
        out, s_q, h_q, d_v, device, q=q, cache=cache, indices=indices, extra_cache=extra_cache,
        extra_indices=extra_indices, attn_sink=attn_sink, topk_length=topk_length, extra_topk_length=extra_topk_length)
    if s_q == 0:
        return out, max_logits, lse

    paged_fp8_sparse_attn_fwd_op(
        q, cache, indices, page_size, extra_cache, extra_indices, extra_page_size, topk_length,
        extra_topk_length, sm_scale, attn_sink, layout.name, d_v, out, max_logits, lse, impl,
    )
    return out, max_logits, lse
