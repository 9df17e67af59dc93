"""``sparse_attn_fwd`` as a registered torch op (``ops/registry.py``). It takes validated
arguments (``ops/sparse_attn/__init__.py`` checks them), the resolved ``impl`` ("auto" on CUDA:
``kernel_choice.pick`` decides here, from the real tensors) and the preallocated outputs, which
it writes."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparse_prefill.ops import kernel_choice
from sparse_prefill.ops.flashmla_impl import sparse_attn_fwd_flashmla
from sparse_prefill.ops.registry import define_op, writes_only
from sparse_prefill.ops.sparse_attn.naive import sparse_attn_fwd_naive

# The schema's written arguments of both attention ops.
ATTN_OUTPUTS_SCHEMA = "Tensor(a!) out, Tensor(b!) max_logits, Tensor(c!) lse"


def write_reference(reference: tuple[torch.Tensor, ...], out: torch.Tensor, max_logits: torch.Tensor,
                    lse: torch.Tensor) -> None:
    """Store a float32 reference result into the output buffers (out rounded to bf16)."""
    for buffer, value in zip((out, max_logits, lse), reference):
        buffer.copy_(value)


def _sparse_attn_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int,
    attn_sink: torch.Tensor | None,
    topk_length: torch.Tensor | None,
    out: torch.Tensor,
    max_logits: torch.Tensor,
    lse: torch.Tensor,
    impl: str,
) -> None:
    if impl == "reference":
        reference = sparse_attn_fwd_naive(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)
        write_reference(reference, out, max_logits, lse)
        return
    impl = kernel_choice.pick(kernel_choice.SPARSE_ATTN, impl, kernel_choice.sparse_attn_shape(q, indices), q, kv)
    if impl == "flashmla":
        sparse_attn_fwd_flashmla(q, kv, indices, sm_scale, attn_sink, topk_length, out, max_logits, lse)
        return
    launcher(impl)(q, kv[:, 0], indices[:, 0], sm_scale, attn_sink, topk_length, out, max_logits, lse)


def launcher(impl: str) -> Callable[..., object]:
    """The launcher of our kernel ``impl`` ("gluon" or "triton"; see ``kernel_choice``), which
    takes ``kv`` [s_kv, d_qk] and ``indices`` [s_q, topk]."""
    if impl == "gluon":
        from sparse_prefill.ops.sparse_attn.gluon_kernel import sparse_attn_fwd_gluon

        return sparse_attn_fwd_gluon
    from sparse_prefill.ops.sparse_attn.kernel import sparse_attn_fwd_triton

    return sparse_attn_fwd_triton


sparse_attn_fwd_op = define_op(
    "sparse_attn_fwd(Tensor q, Tensor kv, Tensor indices, float sm_scale, int d_v, Tensor? attn_sink, "
    f"Tensor? topk_length, {ATTN_OUTPUTS_SCHEMA}, str impl) -> ()",
    _sparse_attn_fwd, writes_only,
)
