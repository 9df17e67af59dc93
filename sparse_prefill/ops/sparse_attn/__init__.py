"""``sparse_attn_fwd``: sparse MLA prefill attention, ``flash_mla_sparse_fwd`` compatible.

The argument checks below are shared with ``paged_fp8_sparse_attn_fwd``
(``ops/fp8_sparse_attn``), which has the same query, scale, sink, length and output contract.
"""

from __future__ import annotations

import torch

from sparse_prefill._utils import (
    check_disjoint,
    check_float32_scale,
    check_int,
    check_no_overlap,
    check_tensor,
    check_unit_stride,
    device_assert,
    value_check_site,
)
from sparse_prefill.ops import kernel_choice
from sparse_prefill.ops.sparse_attn.library import sparse_attn_fwd_op

__all__ = ["sparse_attn_fwd"]

MAX_HEADS = 128
D_V = 512
INT32_MAX = 2**31 - 1

AttnOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def check_query(q: object, head_dims: tuple[int, ...]) -> tuple[int, int, int]:
    """Check ``q`` [s_q, h_q, d_qk] bf16 with 1 <= h_q <= 128; return (s_q, h_q, d_qk)."""
    check_tensor("q", q, dtypes=(torch.bfloat16,), shape=(None, None, None))
    s_q, h_q, d_qk = q.shape
    if not 1 <= h_q <= MAX_HEADS:
        raise ValueError(f"q must have 1..{MAX_HEADS} heads (dim 1), got {h_q}")
    if d_qk not in head_dims:
        raise ValueError(f"q must have head dim (dim 2) in {head_dims}, got {d_qk}")
    check_unit_stride("q", q)
    return s_q, h_q, d_qk


def check_scale_and_d_v(sm_scale: object, d_v: object) -> float:
    """``sm_scale`` must be a real number float32 holds (``check_float32_scale``), ``d_v`` 512;
    return ``sm_scale`` as float."""
    sm_scale = check_float32_scale("sm_scale", sm_scale)
    check_int("d_v", d_v)
    if d_v != D_V:
        raise ValueError(f"d_v must be {D_V} (the value dims of DeepSeek MLA), got {d_v}")
    return sm_scale


def check_sink(attn_sink: object, h_q: int, device: torch.device) -> torch.Tensor | None:
    """``attn_sink`` is None or [h_q] float32; returned contiguous (kernels read it densely)."""
    if attn_sink is None:
        return None
    check_tensor("attn_sink", attn_sink, dtypes=(torch.float32,), shape=(h_q,), device=device)
    return attn_sink.contiguous()


def check_lengths(
    name: str, lengths: object, s_q: int, width: int, device: torch.device
) -> torch.Tensor | None:
    """``lengths`` is None or [s_q] int32 with values in [0, width] (a value check, on the host
    or the device as ``value_check_site`` says); returned contiguous (kernels read it densely)."""
    if lengths is None:
        return None
    check_tensor(name, lengths, dtypes=(torch.int32,), shape=(s_q,), device=device)
    site = value_check_site(device)
    if site == "device" and s_q > 0:
        in_range = (lengths >= 0) & (lengths <= width)
        device_assert(in_range, f"{name} values must be in [0, {width}] (the width of its index rows)")
    elif site == "host" and s_q > 0:
        lo, hi = torch.stack(torch.aminmax(lengths)).tolist()
        if lo < 0 or hi > width:
            raise ValueError(
                f"{name} values must be in [0, {width}] (the width of its index rows), "
                f"got values in [{lo}, {hi}]"
            )
    return lengths.contiguous()


def check_indices(name: str, indices: object, shape: tuple[int | None, ...], device: torch.device) -> int:
    """``indices`` int32 of ``shape`` (last dim free, >= 1), unit stride in it; return its width."""
    check_tensor(name, indices, dtypes=(torch.int32,), shape=shape, device=device)
    if indices.shape[-1] < 1:
        raise ValueError(f"{name} must have at least one entry per row (last dim), got {tuple(indices.shape)}")
    check_unit_stride(name, indices)
    return indices.shape[-1]


def prepare_outputs(
    out: object, s_q: int, h_q: int, d_v: int, device: torch.device, **inputs: torch.Tensor | None
) -> AttnOutputs:
    """Check or allocate ``out`` [s_q, h_q, d_v] bf16 (a given one must share no memory with the
    call's ``inputs``, by argument name); allocate max_logits and lse [s_q, h_q]."""
    if out is None:
        out = torch.empty(s_q, h_q, d_v, dtype=torch.bfloat16, device=device)
    else:
        check_tensor("out", out, dtypes=(torch.bfloat16,), shape=(s_q, h_q, d_v), device=device)
        check_unit_stride("out", out)
        check_no_overlap("out", out)
        check_disjoint("out", out, **inputs)
    max_logits = torch.empty(s_q, h_q, dtype=torch.float32, device=device)
    lse = torch.empty(s_q, h_q, dtype=torch.float32, device=device)
    return out, max_logits, lse


def sparse_attn_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = D_V,
    attn_sink: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    impl: str = "auto",
) -> AttnOutputs:
    """Sparse attention prefill (MLA in MQA form): each query token attends to its own list of KV
    rows. Drop-in for FlashMLA's ``flash_mla_sparse_fwd``, on any ``h_q`` in 1..128, any
    ``topk >= 1`` and strided inputs.

    Args:
        q: [s_q, h_q, d_qk], bfloat16. ``1 <= h_q <= 128``, ``d_qk`` 512 or 576.
        kv: [s_kv, h_kv, d_qk], bfloat16, ``h_kv`` must be 1 (keys are all ``d_qk`` dims,
            values the first ``d_v``). ``1 <= s_kv <= 2**31 - 1``.
        indices: [s_q, h_kv, topk], int32, ``topk >= 1``. Row ``i`` lists the KV rows query
            token ``i`` attends to. An entry is invalid, and ignored, when it is ``< 0`` or
            ``>= s_kv`` (any int32, INT_MIN and INT_MAX included) or when its position is
            ``>= topk_length[i]``. A valid row listed twice counts twice.
        sm_scale: float, finite as a float32: 0 or a magnitude in ``[2**-126, 2**127]``
            (anything else would overflow to inf or flush to 0 on the device). Scale applied to
            ``q @ k`` before the softmax.
        d_v: value dims, must be 512.
        attn_sink: optional, [h_q], float32. When given, ``out`` of head ``h`` is multiplied by
            ``exp(lse) / (exp(lse) + exp(attn_sink[h]))``: ``-inf`` leaves it unchanged, ``+inf``
            makes it 0. It does not change ``max_logits`` or ``lse``.
        topk_length: optional, [s_q], int32, values in ``[0, topk]``. Token ``i`` only considers
            ``indices[i, :, :topk_length[i]]``; later entries are ignored even when they point at
            rows holding NaN. A value outside ``[0, topk]`` raises ValueError while value checks
            are on (``sparse_prefill.value_checks``; for CUDA tensors, unless in strict mode, a
            device-side assert instead, no sync); with them off, ``> topk`` acts as ``topk``
            and ``< 0`` as 0 (no position is below it).
        out: optional, [s_q, h_q, d_v], bfloat16, preallocated output (e.g. a slice of a larger
            buffer) whose elements do not share memory (no stride 0 / ``expand``) and that shares
            none with an input; written and returned.
        impl: "auto", "gluon", "triton", "flashmla" or "reference" (``ops/kernel_choice.py``
            declares them). "auto": for CUDA tensors FlashMLA's ``flash_mla_sparse_fwd`` where
            ``kernel_choice.AUTO_PREFERS`` says it is faster (no shape since the H200 run of
            2026-12-03: ours was as fast or faster on every row) and "flashmla" can run the
            call, else the
            warp-specialized Hopper kernel (``gluon_kernel.py``) where ``auto_picks_gluon`` says
            so (sm_90, a validated Triton, ``h_q >= MIN_AUTO_HEADS``) and ``q``/``kv`` start
            16-byte aligned with row strides that are multiples of 16 elements, else the Triton
            kernel; the choice is made from the real tensors, once per call, and logged once (INFO)
            when it is FlashMLA's. For CPU tensors "auto" is the PyTorch reference. "gluon": that
            kernel or ValueError saying why it cannot run. "triton": the Triton kernel (on CPU
            needs ``TRITON_INTERPRET=1``). "flashmla": FlashMLA's kernel (``ops/flashmla_impl.py``;
            ``flash_mla`` importable, an sm_90 GPU, h_q 64 or 128, ``topk`` a multiple of 128,
            16-byte aligned rows), else ValueError saying why. The kernels agree up to float
            summation order (FlashMLA: within the tolerances of tests/tolerance.py).

    Every tensor must be on ``q``'s device and have unit stride in its last dim (other dims take
    any stride). Violations raise TypeError/ValueError naming the argument, before any launch.

    Returns:
        (out, max_logits, lse), with ``P = (q @ kv[idx].T) * sm_scale`` over the valid entries:
        - out: [s_q, h_q, d_v], bfloat16, ``softmax(P) @ kv[idx, :d_v]`` times the sink factor;
          0 for a token with no valid entry.
        - max_logits: [s_q, h_q], float32, ``max(P)``; -inf for a token with no valid entry.
        - lse: [s_q, h_q], float32, ``logsumexp(P)`` (natural log); +inf for a token with no
          valid entry.
        NaN propagates as in a float computation: a NaN in ``q[i, h]`` makes all three NaN at
        ``[i, h]`` and a NaN in a KV row that token ``i`` lists validly makes them NaN for every
        head of ``i``; invalid entries (and a token with none valid) are unaffected by NaN.
        ``s_q = 0`` returns empty tensors without launching anything.
    """
    s_q, h_q, d_qk = check_query(q, (512, 576))
    device = q.device
    check_tensor("kv", kv, dtypes=(torch.bfloat16,), shape=(None, 1, d_qk), device=device)
    s_kv = kv.shape[0]
    if not 1 <= s_kv <= INT32_MAX:
        # int32 indices cannot address rows past 2**31 - 1: pass a slice of kv instead.
        raise ValueError(f"kv must have 1..{INT32_MAX} rows (dim 0), got {s_kv}")
    check_unit_stride("kv", kv)
    topk = check_indices("indices", indices, (s_q, 1, None), device)
    sm_scale = check_scale_and_d_v(sm_scale, d_v)
    attn_sink = check_sink(attn_sink, h_q, device)
    topk_length = check_lengths("topk_length", topk_length, s_q, topk, device)
    impl = kernel_choice.resolve(kernel_choice.SPARSE_ATTN, impl, device, kernel_choice.sparse_attn_shape(q, indices))
    out, max_logits, lse = prepare_outputs(out, s_q, h_q, d_v, device, q=q, kv=kv, indices=indices,
                                           attn_sink=attn_sink, topk_length=topk_length)
    if s_q == 0:
        return out, max_logits, lse

    sparse_attn_fwd_op(q, kv, indices, sm_scale, d_v, attn_sink, topk_length, out, max_logits, lse, impl)
    return out, max_logits, lse
