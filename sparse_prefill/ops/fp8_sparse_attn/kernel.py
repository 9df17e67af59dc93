"""Triton kernel of ``paged_fp8_sparse_attn_fwd``: sparse MLA straight from FP8 paged caches.

The same program shape and online softmax as ``sparse_attn_fwd`` (it reuses that kernel's scope
loop and epilogue), but each KV tile is gathered from the paged FP8 cache and dequantized in
registers, so no bf16 workspace exists. Two index scopes (``indices`` into ``cache`` and
``extra_indices`` into ``extra_cache``, e.g. DeepSeek-V4's compressed and SWA caches) feed one
softmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_prefill._utils import INTERPRET, cdiv
from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops.sparse_attn.kernel import (
    LOG2E,
    attend_scope,
    load_query_block,
    pick_config,
    store_attn_outputs,
)


@triton.jit
def _paged_fp8_sparse_attn_kernel(
    q_ptr, cache_ptr, idx_ptr, xcache_ptr, xidx_ptr,
    out_ptr, max_ptr, lse_ptr, sink_ptr, topk_len_ptr, xtopk_len_ptr,
    h_q, topk, xtopk, capacity, xcapacity, page_size, page_bytes, xpage_size, xpage_bytes,
    qk_scale_log2,
    stride_q_s, stride_q_h, stride_i_s, stride_xi_s, stride_o_s, stride_o_h, stride_ml_s,
    NUM_HEAD_BLOCKS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, IS_V4: tl.constexpr,
    HAS_EXTRA: tl.constexpr, HAS_SINK: tl.constexpr, HAS_TOPK_LEN: tl.constexpr,
    HAS_XTOPK_LEN: tl.constexpr, UPCAST: tl.constexpr, NUM_STAGES: tl.constexpr, SPLIT_QK: tl.constexpr,
):
    tok, offs_h, mask_h, q, q_tail = load_query_block(q_ptr, stride_q_s, stride_q_h, h_q, NUM_HEAD_BLOCKS,
                                                      BLOCK_H, D_MAIN, D_TAIL)
    tok64 = tok.to(tl.int64)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D_MAIN], tl.float32)

    n_keys = topk
    if HAS_TOPK_LEN:
        n_keys = tl.minimum(tl.load(topk_len_ptr + tok), topk)
    m_i, l_i, acc = attend_scope(q, q_tail, m_i, l_i, acc, qk_scale_log2, cache_ptr,
                                 idx_ptr + tok64 * stride_i_s, n_keys, capacity, 0, page_size,
                                 page_bytes, BLOCK_N, D_MAIN, D_TAIL, True, IS_V4, UPCAST,
                                 NUM_STAGES, SPLIT_QK)
    if HAS_EXTRA:
        n_xkeys = xtopk
        if HAS_XTOPK_LEN:
            n_xkeys = tl.minimum(tl.load(xtopk_len_ptr + tok), xtopk)
        m_i, l_i, acc = attend_scope(q, q_tail, m_i, l_i, acc, qk_scale_log2, xcache_ptr,
                                     xidx_ptr + tok64 * stride_xi_s, n_xkeys, xcapacity, 0,
                                     xpage_size, xpage_bytes, BLOCK_N, D_MAIN, D_TAIL, True, IS_V4,
                                     UPCAST, NUM_STAGES, SPLIT_QK)

    store_attn_outputs(out_ptr, max_ptr, lse_ptr, sink_ptr, m_i, l_i, acc, tok, offs_h, mask_h,
                       stride_o_s, stride_o_h, stride_ml_s, tl.arange(0, D_MAIN), HAS_SINK, UPCAST)


def paged_fp8_sparse_attn_triton(
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
    layout: KVCacheLayout,
    d_v: int,
    out: torch.Tensor,
    max_logits: torch.Tensor,
    lse: torch.Tensor,
    **tuning: int,
) -> object:
    """Launch on validated inputs (see ``paged_fp8_sparse_attn_fwd``); d_v is 512. Returns
    Triton's handle of the compiled kernel (``n_regs``, ``n_spills``) for diagnostics."""
    s_q, h_q, d_qk = q.shape
    cfg = pick_config(h_q, d_qk, paged_fp8=True, **tuning)
    num_head_blocks = cdiv(h_q, cfg["BLOCK_H"])
    return _paged_fp8_sparse_attn_kernel[(s_q * num_head_blocks,)](
        *launch_args(q, cache, indices, page_size, extra_cache, extra_indices, extra_page_size, topk_length,
                     extra_topk_length, sm_scale, attn_sink, out, max_logits, lse),
        NUM_HEAD_BLOCKS=num_head_blocks, BLOCK_H=cfg["BLOCK_H"], BLOCK_N=cfg["BLOCK_N"],
        D_MAIN=512, D_TAIL=d_qk - 512, IS_V4=layout is KVCacheLayout.V4,
        HAS_EXTRA=extra_indices is not None, HAS_SINK=attn_sink is not None,
        HAS_TOPK_LEN=topk_length is not None, HAS_XTOPK_LEN=extra_topk_length is not None,
        UPCAST=INTERPRET, NUM_STAGES=cfg["NUM_STAGES"], SPLIT_QK=cfg["SPLIT_QK"], num_warps=cfg["num_warps"],
    )


def launch_args(q, cache, indices, page_size, extra_cache, extra_indices, extra_page_size, topk_length,
                extra_topk_length, sm_scale, attn_sink, out, max_logits, lse) -> tuple:
    """The runtime arguments both FP8 kernels (this one and ``gluon_kernel.py``) take, in their
    order, from a launcher's validated arguments (same names and types). An absent optional
    tensor is replaced by a present one its HAS_* flag keeps unread; without the extra scope
    the main one stands in for it."""
    has_extra = extra_indices is not None
    xcache = extra_cache if has_extra else cache
    xidx = extra_indices if has_extra else indices
    xpage = extra_page_size if has_extra else page_size
    return (
        q, cache, indices, xcache, xidx,
        out, max_logits, lse,
        attn_sink if attn_sink is not None else lse,
        topk_length if topk_length is not None else indices,
        extra_topk_length if extra_topk_length is not None else indices,
        q.shape[1], indices.shape[1], xidx.shape[1],
        cache.shape[0] * page_size, xcache.shape[0] * xpage,
        page_size, cache.shape[1], xpage, xcache.shape[1],
        sm_scale * LOG2E,
        q.stride(0), q.stride(1), indices.stride(0), xidx.stride(0), out.stride(0), out.stride(1),
        lse.stride(0),
    )
