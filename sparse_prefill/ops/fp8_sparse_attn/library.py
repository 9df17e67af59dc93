"""``paged_fp8_sparse_attn_fwd`` as a registered torch op (``ops/registry.py``). It takes
validated arguments (``ops/fp8_sparse_attn/__init__.py`` checks them), the resolved ``impl``
("auto" on CUDA: ``kernel_choice.pick`` decides here, from the real tensors), ``layout`` as the
``KVCacheLayout`` member's name and the preallocated outputs, which it writes (declared mutated)."""

from __future__ import annotations

import torch

from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops import kernel_choice
from sparse_prefill.ops.flashmla_impl import paged_fp8_sparse_attn_flashmla
from sparse_prefill.ops.fp8_sparse_attn.naive import paged_fp8_sparse_attn_fwd_naive
from sparse_prefill.ops.registry import define_op, writes_only
from sparse_prefill.ops.sparse_attn.library import ATTN_OUTPUTS_SCHEMA, write_reference


def _paged_fp8_sparse_attn_fwd(
    q: torch.Tensor,
    cache: torch.Tensor,
    indices: torch.Tensor,
    page_size: int,
    extra_cache: torch.Tensor | None,
    extra_indices: torch.Tensor | None,
    extra_page_size: int | None,
    topk_length: torch.Tensor | None,
    extra_topk_length: torch.Tensor | None,
    sm_scale: float,
    attn_sink: torch.Tensor | None,
    layout: str,
    d_v: int,
    out: torch.Tensor,
    max_logits: torch.Tensor,
    lse: torch.Tensor,
    impl: str,
) -> None:
    kv_layout = KVCacheLayout[layout]
    if impl == "reference":
        reference = paged_fp8_sparse_attn_fwd_naive(
            q, cache, indices, page_size, sm_scale, extra_cache=extra_cache,
            extra_indices=extra_indices, extra_page_size=extra_page_size, topk_length=topk_length,
            extra_topk_length=extra_topk_length, attn_sink=attn_sink, layout=kv_layout, d_v=d_v,
        )
        write_reference(reference, out, max_logits, lse)
        return
    lengths = topk_length is not None or extra_topk_length is not None
    shape = kernel_choice.paged_fp8_shape(q, indices, kv_layout, extra_cache is not None, lengths)
    impl = kernel_choice.pick(kernel_choice.PAGED_FP8, impl, shape, q, cache)
    scopes = (q, cache, indices, page_size, extra_cache, extra_indices, extra_page_size, topk_length,
              extra_topk_length, sm_scale, attn_sink)
    if impl == "gluon":
        from sparse_prefill.ops.fp8_sparse_attn.gluon_kernel import paged_fp8_sparse_attn_gluon

        paged_fp8_sparse_attn_gluon(*scopes, out, max_logits, lse)
    elif impl == "flashmla":
        paged_fp8_sparse_attn_flashmla(*scopes, kv_layout, out, max_logits, lse)
    else:
        from sparse_prefill.ops.fp8_sparse_attn.kernel import paged_fp8_sparse_attn_triton

        paged_fp8_sparse_attn_triton(*scopes, kv_layout, d_v, out, max_logits, lse)


paged_fp8_sparse_attn_fwd_op = define_op(
    "paged_fp8_sparse_attn_fwd(Tensor q, Tensor cache, Tensor indices, int page_size, Tensor? extra_cache, "
    "Tensor? extra_indices, int? extra_page_size, Tensor? topk_length, Tensor? extra_topk_length, "
    f"float sm_scale, Tensor? attn_sink, str layout, int d_v, {ATTN_OUTPUTS_SCHEMA}, str impl) -> ()",
    _paged_fp8_sparse_attn_fwd, writes_only,
)
