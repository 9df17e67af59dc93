"""``sparse_attn_fwd`` as a registered torch op (``ops/registry.py``). It takes validated
arguments (``ops/sparse_attn/__init__.py`` checks them), the resolved ``impl`` and the
preallocated outputs, which it writes."""

from __future__ import annotations

from collections.abc import Callable

import torch

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
    launch = pick_kernel(impl, q, kv)
    launch(q, kv[:, 0], indices[:, 0], sm_scale, attn_sink, topk_length, out, max_logits, lse)


def pick_kernel(impl: str, q: torch.Tensor, kv: torch.Tensor) -> Callable[..., object]:
    """The launcher of ``impl`` ("gluon", "triton", or "auto": the Gluon kernel where
    ``auto_picks_gluon`` says so and the tensors' alignment admits its 16-byte copies, else the
    Triton kernel). "gluon" on misaligned tensors raises ValueError before any launch."""
    from sparse_prefill.ops.sparse_attn import gluon_kernel
    from sparse_prefill.ops.sparse_attn.kernel import sparse_attn_fwd_triton

    if impl == "triton":
        return sparse_attn_fwd_triton
    reason = gluon_kernel.inputs_reason(q, kv)
    if impl == "gluon":
        if reason is not None:
            raise ValueError(f"impl='gluon' cannot run here: {reason}")
        return gluon_kernel.sparse_attn_fwd_gluon
    if reason is None and gluon_kernel.auto_picks_gluon(q.device, q.shape[1]):
        return gluon_kernel.sparse_attn_fwd_gluon
    return sparse_attn_fwd_triton


sparse_attn_fwd_op = define_op(
    "sparse_attn_fwd(Tensor q, Tensor kv, Tensor indices, float sm_scale, int d_v, Tensor? attn_sink, "
    f"Tensor? topk_length, {ATTN_OUTPUTS_SCHEMA}, str impl) -> ()",
    _sparse_attn_fwd, writes_only,
)
