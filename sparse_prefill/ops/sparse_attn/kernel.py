"""Triton kernel of ``sparse_attn_fwd``: sparse MLA (MQA form) over a bf16 KV workspace.

One program owns one query token and ``BLOCK_H`` of its heads. It walks the token's index row in
blocks of ``BLOCK_N``, gathers those KV rows once and uses the same tile for ``Q K^T`` and for
``P V`` (K and V are one tensor in MLA), with an online softmax in base 2. The scope loop (which
also reads paged FP8 caches) and the epilogue are shared with ``ops/fp8_sparse_attn/kernel.py``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparse_prefill._utils import INTERPRET, cdiv, mma_operand, to_bf16
from sparse_prefill.ops.cache.tiles import load_kv_dims, token_offsets

LOG2E = math.log2(math.e)


@triton.jit
def qk_scores(q, q_tail, k, k_tail, D_TAIL: tl.constexpr, UPCAST: tl.constexpr):
    """[BH, BN] float32 ``q @ k^T`` over all d_qk dims (main part plus the tail, if any)."""
    s = tl.dot(mma_operand(q, UPCAST), mma_operand(tl.trans(k), UPCAST))
    if D_TAIL > 0:
        s += tl.dot(mma_operand(q_tail, UPCAST), mma_operand(tl.trans(k_tail), UPCAST))
    return s


@triton.jit
def attend_tile(q, q_tail, k, k_tail, valid, live, m_i, l_i, acc, qk_scale_log2,
                D_TAIL: tl.constexpr, UPCAST: tl.constexpr, SPLIT_QK: tl.constexpr):
    """One online-softmax step over a tile of ``BLOCK_N`` keys.

    q [BH, D_MAIN] / q_tail [BH, D_TAIL], k [BN, D_MAIN] / k_tail [BN, D_TAIL] bf16 (``k`` is
    also the value tile: d_v = D_MAIN = 512), valid [BN]. m_i (running max, log2 units) and l_i
    (running sum) are [BH] float32, acc [BH, D_MAIN] float32. Returns the updated
    (m_i, l_i, acc). Probabilities are rounded to bf16 for ``P @ V``, as FlashMLA does.

    ``SPLIT_QK`` (with ``live``, a runtime True): compute ``Q K^T`` inside a branch the compiler
    cannot fold. Triton gives a dot whose result feeds another dot (here ``P @ V``) all warps
    along M; with 8 warps and 64 heads both warp groups then compute the same 64 x 64 scores.
    Seen from inside the branch the chain ends at the branch's yield, so the scores are split
    over the two warp groups by key (half the QK work each) and the pipelined gather is kept:
    +9-18% for ``sparse_attn_fwd``, +40-46% for the fused FP8 kernel on the H100
    (benchmarks/NOTES.md, v7). Same result either way.
    """
    if SPLIT_QK:
        if live:
            s = qk_scores(q, q_tail, k, k_tail, D_TAIL, UPCAST)
        else:  # never taken; differs from the taken arm so the compiler cannot merge the two
            s = qk_scores(q, q_tail, k, k_tail, D_TAIL, UPCAST) * 0.0
    else:
        s = qk_scores(q, q_tail, k, k_tail, D_TAIL, UPCAST)
    s = tl.where(valid[None, :], s * qk_scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with no valid key yet keeps m = -inf; subtract 0 there so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    # Accumulate in place: the MMA adds into the rescaled acc.
    acc = tl.dot(mma_operand(to_bf16(p, UPCAST), UPCAST), mma_operand(k, UPCAST), acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def attend_scope(q, q_tail, m_i, l_i, acc, qk_scale_log2, kv_ptr, idx_row, n_keys, capacity,
                 stride_kv_s, page_size, page_bytes,
                 BLOCK_N: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
                 FP8_PAGED: tl.constexpr, IS_V4: tl.constexpr, UPCAST: tl.constexpr,
                 NUM_STAGES: tl.constexpr, SPLIT_QK: tl.constexpr):
    """Fold the first ``n_keys`` entries of one index row into the softmax state.

    An entry is a key when ``0 <= id < capacity``. Keys come from a bf16 ``[capacity, d]``
    tensor with row stride ``stride_kv_s`` or, with ``FP8_PAGED``, from a paged FP8 cache
    (``page_size``, ``page_bytes``, layout ``IS_V4``) dequantized in registers. ``SPLIT_QK``: see
    ``attend_tile``.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_MAIN)
    offs_t = D_MAIN + tl.arange(0, D_TAIL if D_TAIL > 0 else 16)
    # Index blocks are loaded one iteration ahead, so the KV gather's addresses are known when
    # the software pipeliner issues it.
    idx_next = tl.load(idx_row + offs_n, mask=offs_n < n_keys, other=-1)
    for start in tl.range(0, n_keys, BLOCK_N, num_stages=NUM_STAGES):
        valid = (start + offs_n < n_keys) & (idx_next >= 0) & (idx_next < capacity)
        safe = tl.where(valid, idx_next, 0)  # int32: token_offsets divides in int32
        if FP8_PAGED:
            data_off, scale_off = token_offsets(safe, page_size, page_bytes, IS_V4)
            k = load_kv_dims(kv_ptr, data_off, scale_off, valid, 0, D_MAIN, IS_V4).to(tl.bfloat16)
            k_tail = k
            if D_TAIL > 0:
                k_tail = load_kv_dims(kv_ptr, data_off, scale_off, valid, D_MAIN, D_TAIL, IS_V4).to(tl.bfloat16)
        else:
            kv_rows = kv_ptr + safe.to(tl.int64)[:, None] * stride_kv_s
            k = tl.load(kv_rows + offs_d[None, :], mask=valid[:, None], other=0.0)
            k_tail = k
            if D_TAIL > 0:
                k_tail = tl.load(kv_rows + offs_t[None, :], mask=valid[:, None], other=0.0)
        offs_next = start + BLOCK_N + offs_n
        idx_next = tl.load(idx_row + offs_next, mask=offs_next < n_keys, other=-1)
        m_i, l_i, acc = attend_tile(q, q_tail, k, k_tail, valid, n_keys > 0, m_i, l_i, acc, qk_scale_log2,
                                    D_TAIL, UPCAST, SPLIT_QK)
    return m_i, l_i, acc


@triton.jit
def load_query_block(q_ptr, stride_q_s, stride_q_h, h_q, NUM_HEAD_BLOCKS: tl.constexpr,
                     BLOCK_H: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr):
    """This program's token and heads, and their query rows: (tok, offs_h, mask_h, q, q_tail)."""
    pid = tl.program_id(0)
    # Heads of one token are neighbours in launch order, so their shared KV gathers hit L2.
    tok = pid // NUM_HEAD_BLOCKS
    offs_h = (pid % NUM_HEAD_BLOCKS) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < h_q
    q_rows = q_ptr + tok.to(tl.int64) * stride_q_s + offs_h[:, None].to(tl.int64) * stride_q_h
    q = tl.load(q_rows + tl.arange(0, D_MAIN)[None, :], mask=mask_h[:, None], other=0.0)
    q_tail = q
    if D_TAIL > 0:
        q_tail = tl.load(q_rows + (D_MAIN + tl.arange(0, D_TAIL))[None, :], mask=mask_h[:, None], other=0.0)
    return tok, offs_h, mask_h, q, q_tail


@triton.jit
def store_attn_outputs(out_ptr, max_ptr, lse_ptr, sink_ptr, m_i, l_i, acc, tok, offs_h, mask_h,
                       stride_o_s, stride_o_h, stride_ml_s, offs_v,
                       HAS_SINK: tl.constexpr, UPCAST: tl.constexpr):
    """Epilogue: normalise, apply the sink factor, write out/max_logits/lse (natural units).

    A row with no valid key writes out 0, max_logits -inf, lse +inf. A NaN score (a NaN in the
    query row or in a valid key) made ``l_i`` NaN: that row writes NaN to all three.
    """
    LN2: tl.constexpr = 0.6931471805599453
    # l_i is 0 exactly when no valid key was seen (the largest key adds exp2(0) = 1); a NaN
    # l_i is not 0, so it flows through lse and out.
    has_any = l_i != 0.0
    l_safe = tl.where(has_any, l_i, 1.0)
    lse = tl.where(has_any, (m_i + tl.math.log2(l_safe)) * LN2, float("inf"))
    max_logits = tl.where(has_any, m_i * LN2, float("-inf"))
    # tl.max skips NaN on the GPU, so m_i can be finite in a NaN row: take the NaN from l_i.
    max_logits = tl.where(l_i == l_i, max_logits, l_i)
    scale = 1.0 / l_safe
    if HAS_SINK:
        sink = tl.load(sink_ptr + offs_h, mask=mask_h, other=float("-inf"))
        # exp(lse) / (exp(lse) + exp(sink)) without overflow; sink -inf -> 1, +inf -> 0.
        scale = scale / (1.0 + tl.exp(sink - lse))
    o = tl.where(has_any[:, None], acc * scale[:, None], 0.0)
    tok64 = tok.to(tl.int64)
    o_ptrs = out_ptr + tok64 * stride_o_s + offs_h[:, None].to(tl.int64) * stride_o_h + offs_v[None, :]
    tl.store(o_ptrs, to_bf16(o, UPCAST), mask=mask_h[:, None])
    tl.store(max_ptr + tok64 * stride_ml_s + offs_h, max_logits, mask=mask_h)
    tl.store(lse_ptr + tok64 * stride_ml_s + offs_h, lse, mask=mask_h)


@triton.jit
def _sparse_attn_fwd_kernel(
    q_ptr, kv_ptr, idx_ptr, out_ptr, max_ptr, lse_ptr, sink_ptr, topk_len_ptr,
    s_kv, h_q, topk, qk_scale_log2,
    stride_q_s, stride_q_h, stride_kv_s, stride_i_s, stride_o_s, stride_o_h, stride_ml_s,
    NUM_HEAD_BLOCKS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
    HAS_SINK: tl.constexpr, HAS_TOPK_LEN: tl.constexpr, UPCAST: tl.constexpr,
    NUM_STAGES: tl.constexpr, SPLIT_QK: tl.constexpr,
):
    tok, offs_h, mask_h, q, q_tail = load_query_block(q_ptr, stride_q_s, stride_q_h, h_q, NUM_HEAD_BLOCKS,
                                                      BLOCK_H, D_MAIN, D_TAIL)
    tok64 = tok.to(tl.int64)

    n_keys = topk
    if HAS_TOPK_LEN:
        n_keys = tl.minimum(tl.load(topk_len_ptr + tok), topk)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D_MAIN], tl.float32)
    m_i, l_i, acc = attend_scope(q, q_tail, m_i, l_i, acc, qk_scale_log2, kv_ptr,
                                 idx_ptr + tok64 * stride_i_s, n_keys, s_kv, stride_kv_s, 0, 0,
                                 BLOCK_N, D_MAIN, D_TAIL, False, False, UPCAST, NUM_STAGES, SPLIT_QK)
    store_attn_outputs(out_ptr, max_ptr, lse_ptr, sink_ptr, m_i, l_i, acc, tok, offs_h, mask_h,
                       stride_o_s, stride_o_h, stride_ml_s, tl.arange(0, D_MAIN), HAS_SINK, UPCAST)


def pick_config(h_q: int, d_qk: int = 512, paged_fp8: bool = False, **tuning: int) -> dict[str, int]:
    """Block shape and launch knobs, measured on the H100 (benchmarks/NOTES.md); ``tuning``
    overrides them (benchmarks compare variants with it)."""
    block_h = 64 if h_q > 32 else max(16, triton.next_power_of_2(h_q))
    num_warps = 8 if block_h >= 64 else 4
    cfg = {"BLOCK_H": block_h, "BLOCK_N": 64, "num_warps": num_warps, "NUM_STAGES": 2,
           # Two warp groups share the scores only with 8 warps; with d_qk 576 the split
           # measured slower (the tail's dot falls back to duplicated layouts).
           "SPLIT_QK": int(num_warps == 8 and d_qk == 512)}
    if paged_fp8 or INTERPRET:
        # The FP8 tile is dequantized in registers: pipelining its loads only adds pressure.
        cfg["NUM_STAGES"] = 1
    unknown = set(tuning) - set(cfg)
    if unknown:
        raise ValueError(f"unknown tuning keys {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update(tuning)
    return cfg


def launch_args(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    attn_sink: torch.Tensor | None,
    topk_length: torch.Tensor | None,
    out: torch.Tensor,
    max_logits: torch.Tensor,
    lse: torch.Tensor,
) -> tuple:
    """Runtime arguments shared by this kernel and the Gluon one (``gluon_kernel.py``), in their
    signature's order; absent optional tensors are replaced by a placeholder never read."""
    return (
        q, kv, indices, out, max_logits, lse,
        attn_sink if attn_sink is not None else lse,
        topk_length if topk_length is not None else indices,
        kv.shape[0], q.shape[1], indices.shape[1], sm_scale * LOG2E,
        q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), out.stride(1),
        lse.stride(0),
    )


def sparse_attn_fwd_triton(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    attn_sink: torch.Tensor | None,
    topk_length: torch.Tensor | None,
    out: torch.Tensor,
    max_logits: torch.Tensor,
    lse: torch.Tensor,
    **tuning: int,
) -> object:
    """Launch on validated inputs: q [s_q, h_q, d_qk], kv [s_kv, d_qk], indices [s_q, topk] int32,
    outputs preallocated (out [s_q, h_q, 512] bf16, max_logits/lse [s_q, h_q] float32, each with
    unit stride in the last dim; max_logits and lse share strides). Returns Triton's handle of
    the compiled kernel (``n_regs``, ``n_spills``) for diagnostics."""
    s_q, h_q, d_qk = q.shape
    cfg = pick_config(h_q, d_qk, **tuning)
    num_head_blocks = cdiv(h_q, cfg["BLOCK_H"])
    d_main = 512  # also d_v: the wrapper only admits d_v == 512
    grid = (s_q * num_head_blocks,)
    return _sparse_attn_fwd_kernel[grid](
        *launch_args(q, kv, indices, sm_scale, attn_sink, topk_length, out, max_logits, lse),
        NUM_HEAD_BLOCKS=num_head_blocks, BLOCK_H=cfg["BLOCK_H"], BLOCK_N=cfg["BLOCK_N"],
        D_MAIN=d_main, D_TAIL=d_qk - d_main,
        HAS_SINK=attn_sink is not None, HAS_TOPK_LEN=topk_length is not None, UPCAST=INTERPRET,
        NUM_STAGES=cfg["NUM_STAGES"], SPLIT_QK=cfg["SPLIT_QK"], num_warps=cfg["num_warps"],
    )
