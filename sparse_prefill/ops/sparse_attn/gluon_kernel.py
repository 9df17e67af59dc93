"""Warp-specialized Hopper kernel of ``sparse_attn_fwd`` (bf16 KV workspace), written in Gluon
(Triton's explicit-layout dialect; validated with Triton 3.6 on an H200).

Each persistent CTA walks work items (a query token and 64 of its heads). Keys come in blocks of
64, two blocks ("slot 0" and "slot 1") per step, and three warp groups split the work the way
FlashMLA's SM90 sparse prefill kernel does:

- the producer (4 warps, few registers) loads Q and gathers the KV rows of each block by index
  with ``cp.async`` straight into the swizzled shared-memory tiles the tensor cores read, in
  halves of 256 dims, each half completing its own mbarrier (no thread waits for the copies);
- math group 0 (the default 4 warps) runs ``S0 = Q K0^T`` for slot 0, math group 1 ``S1 = Q K1^T``
  for slot 1, concurrently. The running row max is handed 0 -> 1 -> 0 through shared memory, so
  both groups' probabilities share one scale;
- each math group owns half of the output (value dims 0..255 or 256..511) and adds both blocks
  to it: its own P from registers, the other group's P from shared memory.

Per step each math group does one ``Q K^T`` and two half ``P V`` products (the same work), and one
group's softmax overlaps the other's MMAs. Being persistent, the producer loads the next item's Q
and first blocks while the math groups finish the current one. Results are those of the Triton
kernel (``kernel.py``) up to float summation order.
"""

from __future__ import annotations

import functools

import torch

from sparse_prefill._utils import cdiv
from sparse_prefill.ops.fp8_sparse_attn.gluon_kernel import GLUON_IMPORTED, alignment_reason, auto_decision, hopper_reason

# Registers per thread of math group 1 and the producer; math group 0 gets the rest of the 504
# Triton shares among three warp groups: 216 / 232 / 56, the smallest producer budget measured
# as fast (FlashMLA's 216 / 216 / 72 spills in math group 0 here; benchmarks/NOTES.md).
DEFAULT_TUNING = {"MATH_REGS": 216, "PRODUCER_REGS": 56}


# Up to this many heads the launcher runs the few-head kernel (gluon_few_heads.py: keys along M,
# heads along N) instead of this one's 64-head tiles.
FEW_HEADS = 16

# "auto" runs the Gluon kernels (this one or the few-head one) for at least this many heads:
# every count since the few-head kernel (1.3-1.4x the Triton kernel at 8 and 16 heads;
# benchmarks/RESULTS.md).
MIN_AUTO_HEADS = 1


def unsupported_reason(device: torch.device) -> str | None:
    """Why this kernel cannot run on ``device`` (None if it can)."""
    return hopper_reason(device)


def inputs_reason(q: torch.Tensor, kv: torch.Tensor) -> str | None:
    """Why the kernel's 16-byte copies cannot read ``q`` / ``kv`` (None if they can): each must
    start 16-byte aligned with row strides that are multiples of 16 elements (what Triton's
    argument specialization proves alignment from)."""
    return alignment_reason(("q", q, 2), ("kv", kv, 1))


@functools.lru_cache(maxsize=None)
def _auto_device_ok(device: torch.device) -> bool:
    return auto_decision("sparse_attn_fwd", unsupported_reason(device), device, True)


def auto_picks_gluon(device: torch.device, h_q: int) -> bool:
    """Whether ``impl="auto"`` runs this kernel for ``h_q`` heads on ``device`` (else the Triton
    one). The device part is cached: every call of the op asks."""
    return h_q >= MIN_AUTO_HEADS and _auto_device_ok(device)


if GLUON_IMPORTED:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        async_copy,
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from sparse_prefill.ops.fp8_sparse_attn.gluon_kernel import (
        BLOCK_H,
        BLOCK_N,
        finish_rows,
        key_count,
        load_sink,
        store_half,
        token_and_head,
    )

    HALF = gl.constexpr(256)  # value dims each math group owns; also the producer's copy unit
    TAIL = gl.constexpr(64)  # d_qk 576: the RoPE dims past 512
    # The math groups' layouts: scores S [64 heads, 64 keys], their half of the output [64, 256],
    # and P as the register A operand of the P V wgmma.
    S_L = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                 instr_shape=[16, BLOCK_N.value, 16]))
    O_L = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                 instr_shape=[16, HALF.value, 16]))
    P_L = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=O_L.value, k_width=2))

    @gluon.jit
    def _item(item, topk, topk_len_ptr, NUM_HEAD_BLOCKS: gl.constexpr, HAS_TOPK_LEN: gl.constexpr):
        """Work item ``item``: (token, first head, keys, steps of two blocks). Every group derives
        it itself."""
        tok, head0 = token_and_head(item, NUM_HEAD_BLOCKS)
        n_keys = key_count(tok, topk, topk_len_ptr, HAS_TOPK_LEN)
        return tok, head0, n_keys, gl.cdiv(n_keys, 2 * BLOCK_N)

    @gluon.jit
    def _copy_rows(dst, rows, col0: gl.constexpr, n_cols: gl.constexpr, mask, offs_c):
        """cp.async ``n_cols`` dims from ``col0`` of each row pointer in ``rows`` [64] into
        ``dst`` [64, n_cols], 64 dims (128 bytes a row) per instruction batch; masked rows are
        zero-filled."""
        for c in gl.static_range(n_cols // 64):
            async_copy.async_copy_global_to_shared(
                dst.slice(c * 64, 64, dim=1), rows[:, None] + (col0 + c * 64) + offs_c[None, :], mask=mask[:, None])

    @gluon.jit
    def _copy_k0_hi(k_smem, kt_smem, bars, rows0, ok0, offs_c, phase, g, D_TAIL: gl.constexpr):
        """K0 hi (+ tail, which holds P0 in d576), once math group 1 has read P0 and V0 hi."""
        mbarrier.wait(bars.index(7), phase, pred=g > 0)
        _copy_rows(k_smem.index(0).slice(HALF, HALF, dim=1), rows0, HALF, HALF, ok0, offs_c)
        if D_TAIL > 0:
            _copy_rows(kt_smem.index(0), rows0, 512, TAIL, ok0, offs_c)
        async_copy.mbarrier_arrive(bars.index(3), increment_count=False)

    @gluon.jit
    def _copy_k1_lo(k_smem, kt_smem, bars, rows1, ok1, offs_c, phase, g, D_TAIL: gl.constexpr):
        """K1 lo (+ tail, P1 in d576), once math group 0 has read P1 and V1 lo."""
        mbarrier.wait(bars.index(8), phase, pred=g > 0)
        _copy_rows(k_smem.index(1), rows1, 0, HALF, ok1, offs_c)
        if D_TAIL > 0:
            _copy_rows(kt_smem.index(1), rows1, 512, TAIL, ok1, offs_c)
        async_copy.mbarrier_arrive(bars.index(4), increment_count=False)

    @gluon.jit
    def _producer(q_smem, qt_smem, k_smem, kt_smem, valid_smem, bars,
                  q_ptr, stride_q_s, stride_q_h, h_q, kv_ptr, stride_kv_s, s_kv, idx_ptr, stride_i_s,
                  topk, topk_len_ptr, n_items, NUM_HEAD_BLOCKS: gl.constexpr, HAS_TOPK_LEN: gl.constexpr,
                  D_TAIL: gl.constexpr):
        """Q of each item and the KV halves of each block, in the order the math groups use
        them: K0 lo, K1 hi, K0 hi, K1 lo (each after the group that last read it freed it)."""
        q_ready, q_free = bars.index(0), bars.index(1)
        # A warp covers 4 rows x 64 dims: 16-byte copies, each row's 128 bytes one cache line.
        cp_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        offs_r = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, cp_l))
        offs_c = gl.arange(0, 64, layout=gl.SliceLayout(0, cp_l))
        g = 0
        it = 0
        for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
            tok, head0, n_keys, n_steps = _item(item, topk, topk_len_ptr, NUM_HEAD_BLOCKS, HAS_TOPK_LEN)
            tok64 = tok.to(gl.int64)
            heads = head0 + offs_r
            q_rows = q_ptr + tok64 * stride_q_s + heads.to(gl.int64) * stride_q_h
            # Both math groups have waited on their last Q K^T of the previous item.
            mbarrier.wait(q_free, (it & 1) ^ 1, pred=it > 0)
            _copy_rows(q_smem.index(0), q_rows, 0, 512, heads < h_q, offs_c)
            if D_TAIL > 0:
                _copy_rows(qt_smem.index(0), q_rows, 512, TAIL, heads < h_q, offs_c)
            async_copy.mbarrier_arrive(q_ready, increment_count=False)
            idx_row = idx_ptr + tok64 * stride_i_s
            ids0 = gl.load(idx_row + offs_r, mask=offs_r < n_keys, other=-1)
            ids1 = gl.load(idx_row + BLOCK_N + offs_r, mask=BLOCK_N + offs_r < n_keys, other=-1)
            for step in range(n_steps):
                phase = (g & 1) ^ 1
                pos0 = step * (2 * BLOCK_N) + offs_r
                pos1 = pos0 + BLOCK_N
                ok0 = (pos0 < n_keys) & (ids0 >= 0) & (ids0 < s_kv)
                ok1 = (pos1 < n_keys) & (ids1 >= 0) & (ids1 < s_kv)
                rows0 = kv_ptr + gl.where(ok0, ids0, 0).to(gl.int64) * stride_kv_s
                rows1 = kv_ptr + gl.where(ok1, ids1, 0).to(gl.int64) * stride_kv_s
                # K0 lo and slot 0's valid flags: math group 0 is done with the last block there.
                mbarrier.wait(bars.index(6), phase, pred=g > 0)
                _copy_rows(k_smem.index(0), rows0, 0, HALF, ok0, offs_c)
                async_copy.mbarrier_arrive(bars.index(2), increment_count=False)
                valid_smem.index(0).store(ok0.to(gl.int32))
                # K1 hi and slot 1's flags: math group 1 is done with them.
                mbarrier.wait(bars.index(9), phase, pred=g > 0)
                _copy_rows(k_smem.index(1).slice(HALF, HALF, dim=1), rows1, HALF, HALF, ok1, offs_c)
                async_copy.mbarrier_arrive(bars.index(5), increment_count=False)
                valid_smem.index(1).store(ok1.to(gl.int32))
                gl.thread_barrier()
                mbarrier.arrive(bars.index(10))
                mbarrier.arrive(bars.index(11))
                _copy_k0_hi(k_smem, kt_smem, bars, rows0, ok0, offs_c, phase, g, D_TAIL)
                _copy_k1_lo(k_smem, kt_smem, bars, rows1, ok1, offs_c, phase, g, D_TAIL)
                # The next step's ids, loaded while this step's copies are in flight.
                pos0 = pos0 + 2 * BLOCK_N
                pos1 = pos1 + 2 * BLOCK_N
                ids0 = gl.load(idx_row + pos0, mask=pos0 < n_keys, other=-1)
                ids1 = gl.load(idx_row + pos1, mask=pos1 < n_keys, other=-1)
                g += 1
            it += 1

    # Barrier slots of ``bars`` (see the kernel): 0 q_ready, 1 q_free, 2..5 ready of K0 lo, K0 hi,
    # K1 lo, K1 hi, 6..9 free of the same, 10/11 valid flags of slot 0/1, 12 m0, 13 m1, 14 p0,
    # 15 p1, 16/17 row sums of group 0/1.

    @gluon.jit
    def _wait_ready(bars, i: gl.constexpr, phase):
        mbarrier.wait(bars.index(i), phase)
        # The rows were written by cp.async (generic proxy); the tensor cores read them through
        # the async proxy.
        fence_async_shared()

    @gluon.jit
    def _opaque_zero(g):
        """0 for any step counter ``g >= 0``, which the compiler cannot prove: shared-memory
        views indexed with it are not loop invariant, so the 64-bit wgmma descriptors of every
        K step are recomputed where used instead of hoisted (and spilled) out of the loop."""
        return g >> 31

    @gluon.jit
    def _qk_half(q_smem, k_smem, slot: gl.constexpr, z, half: gl.constexpr, s, use_acc: gl.constexpr):
        """Issue the ``Q K^T`` of value-dim half ``half`` of the block in ``slot`` into ``s``."""
        return warpgroup_mma(q_smem.index(z).slice(half * HALF, HALF, dim=1),
                             k_smem.index(slot + z).slice(half * HALF, HALF, dim=1).permute((1, 0)), s,
                             use_acc=use_acc, is_async=True)

    @gluon.jit
    def _qk_tail(qt_smem, kt_smem, slot: gl.constexpr, z, s, D_TAIL: gl.constexpr):
        """Issue the RoPE tail's ``Q K^T`` (d_qk 576) of the block in ``slot`` into ``s``."""
        if D_TAIL > 0:
            s = warpgroup_mma(qt_smem.index(z), kt_smem.index(slot + z).permute((1, 0)), s, is_async=True)
        return s

    @gluon.jit
    def _scores(q_smem, qt_smem, k_smem, kt_smem, slot: gl.constexpr, z, bars, s_zero, first: gl.constexpr,
                ready_first: gl.constexpr, ready_second: gl.constexpr, phase, D_TAIL: gl.constexpr):
        """Issue ``Q K^T`` of the block in ``slot`` in two halves of dims (``first`` = 0: lo
        first), each after its ready barrier; return the pending accumulator."""
        _wait_ready(bars, ready_first, phase)
        s = _qk_half(q_smem, k_smem, slot, z, first, s_zero, False)
        _wait_ready(bars, ready_second, phase)
        s = _qk_half(q_smem, k_smem, slot, z, 1 - first, s, True)
        return _qk_tail(qt_smem, kt_smem, slot, z, s, D_TAIL)

    @gluon.jit
    def _masked(s, valid_smem, slot: gl.constexpr, bars, phase, qk_scale_log2):
        """Scores in log2 units, -inf where the block's key is invalid."""
        mbarrier.wait(bars.index(10 + slot), phase)
        valid = valid_smem.index(slot).load(gl.SliceLayout(0, S_L)) != 0
        return gl.where(valid[None, :], s * qk_scale_log2, float("-inf"))

    @gluon.jit
    def _epilogue(l_i, m_i, l_smem, bars, mine: gl.constexpr, it, out_ptr, acc, tok, head0, h_q,
                  stride_o_s, stride_o_h, sink, HAS_SINK: gl.constexpr):
        """Exchange the row sums with the other group, normalise and store this group's half;
        returns (max_logits, lse) for group 1 to store. ``sink``: the rows' sink logits, loaded
        when the item started (a load here would hold every store behind its latency)."""
        rows_s: gl.constexpr = gl.SliceLayout(1, S_L)
        # Two buffers by item parity: a group can be one item ahead of the other here.
        l_smem.index((it & 1) * 2 + mine).store(l_i)
        gl.thread_barrier()
        mbarrier.arrive(bars.index(16 + mine))
        mbarrier.wait(bars.index(17 - mine), it & 1)
        l_i = l_i + l_smem.index((it & 1) * 2 + 1 - mine).load(rows_s)
        scale, max_logits, lse = finish_rows(m_i, l_i, sink, HAS_SINK)
        o_scale = gl.convert_layout(scale, gl.SliceLayout(1, O_L))
        store_half(out_ptr, acc * o_scale[:, None], tok.to(gl.int64), head0, h_q, stride_o_s, stride_o_h,
                   mine * HALF, O_L)
        return max_logits, lse

    @gluon.jit
    def _item_state(head0, h_q, sink_ptr, HAS_SINK: gl.constexpr):
        """A math group's state at the start of an item: (row max, row sum, its output half, the
        item's head rows, their sink logits)."""
        rows_s: gl.constexpr = gl.SliceLayout(1, S_L)
        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=rows_s)
        l_i = gl.zeros([BLOCK_H], gl.float32, layout=rows_s)
        acc = gl.zeros([BLOCK_H, HALF], gl.float32, layout=O_L)
        offs_h = head0 + gl.arange(0, BLOCK_H, layout=rows_s)
        return m_i, l_i, acc, offs_h, load_sink(sink_ptr, offs_h, offs_h < h_q, HAS_SINK)

    @gluon.jit
    def _math0(q_smem, qt_smem, k_smem, kt_smem, p_smem, valid_smem, m_smem, l_smem, bars, qk_scale_log2,
               out_ptr, stride_o_s, stride_o_h, sink_ptr, h_q, topk, topk_len_ptr, n_items,
               NUM_HEAD_BLOCKS: gl.constexpr, HAS_TOPK_LEN: gl.constexpr, HAS_SINK: gl.constexpr,
               D_TAIL: gl.constexpr):
        """Slot 0's ``Q K^T`` and softmax, value dims 0..255 of both blocks."""
        rows_s: gl.constexpr = gl.SliceLayout(1, S_L)
        rows_o: gl.constexpr = gl.SliceLayout(1, O_L)
        s_zero = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=S_L)
        g = 0
        it = 0
        for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
            tok, head0, n_keys, n_steps = _item(item, topk, topk_len_ptr, NUM_HEAD_BLOCKS, HAS_TOPK_LEN)
            m_i, l_i, acc, offs_h, sink = _item_state(head0, h_q, sink_ptr, HAS_SINK)
            mbarrier.wait(bars.index(0), it & 1)
            s = s_zero
            if n_steps > 0:
                s = _scores(q_smem, qt_smem, k_smem, kt_smem, 0, _opaque_zero(g), bars, s_zero, 0, 2, 3,
                            g & 1, D_TAIL)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            # Q is free once each group has waited on its last Q K^T of the item.
            mbarrier.arrive(bars.index(1), pred=n_steps <= 1)
            for step in range(n_steps):
                phase = g & 1
                z = _opaque_zero(g)
                s = _masked(s, valid_smem, 0, bars, phase, qk_scale_log2)
                m0 = gl.maximum(m_i, gl.max(s, 1))
                # Rows with no valid key yet keep m = -inf; subtract 0 there so exp2 gives 0.
                m0_safe = gl.where(m0 == float("-inf"), 0.0, m0)
                p = gl.exp2(s - m0_safe[:, None])
                alpha = gl.exp2(m_i - m0_safe)
                l_i = l_i * alpha + gl.sum(p, 1)
                m_smem.index(0).store(m0)
                gl.thread_barrier()
                mbarrier.arrive(bars.index(12))
                acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
                acc = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), P_L), k_smem.index(z).slice(0, HALF, dim=1),
                                    acc, is_async=True)
                # Group 1 folds its block into m0: the step's final max.
                mbarrier.wait(bars.index(13), phase)
                m1 = m_smem.index(1).load(rows_s)
                # m1 >= m0, so beta <= 1; rows still at -inf have p = l = acc = 0 (beta 1 keeps them so).
                beta = gl.where(m0 == float("-inf"), 1.0, gl.exp2(m0 - m1))
                p_smem.index(z).store((p * beta[:, None]).to(gl.bfloat16))
                fence_async_shared()
                gl.thread_barrier()
                mbarrier.arrive(bars.index(14))
                l_i = l_i * beta
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                mbarrier.arrive(bars.index(6))  # K0 lo
                acc = acc * gl.convert_layout(beta, rows_o)[:, None]
                mbarrier.wait(bars.index(15), phase)
                pv = warpgroup_mma(p_smem.index(1 + z), k_smem.index(1 + z).slice(0, HALF, dim=1), acc, is_async=True)
                m_i = m1
                if step + 1 < n_steps:
                    # Next block's lo half queued behind this P V; K1 lo is freed as soon as that
                    # P V is done, before K0 hi lands, so the producer's K1 lo copy (which math
                    # group 1's next Q K^T waits for) does not queue behind K0 hi.
                    _wait_ready(bars, 2, phase ^ 1)
                    s_next = _qk_half(q_smem, k_smem, 0, z, 0, s_zero, False)
                    acc = warpgroup_mma_wait(num_outstanding=1, deps=(pv,))
                    mbarrier.arrive(bars.index(8))  # K1 lo (+ P1)
                    _wait_ready(bars, 3, phase ^ 1)
                    s_next = _qk_half(q_smem, k_smem, 0, z, 1, s_next, True)
                    s_next = _qk_tail(qt_smem, kt_smem, 0, z, s_next, D_TAIL)
                    s = warpgroup_mma_wait(num_outstanding=0, deps=(s_next,))
                    mbarrier.arrive(bars.index(1), pred=step + 2 == n_steps)
                else:
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(pv,))
                    mbarrier.arrive(bars.index(8))
                g += 1
            _epilogue(l_i, m_i, l_smem, bars, 0, it, out_ptr, acc, tok, head0, h_q, stride_o_s, stride_o_h,
                      sink, HAS_SINK)
            it += 1

    @gluon.jit
    def _math1(q_smem, qt_smem, k_smem, kt_smem, p_smem, valid_smem, m_smem, l_smem, bars, qk_scale_log2,
               out_ptr, stride_o_s, stride_o_h, max_ptr, lse_ptr, stride_ml_s, sink_ptr, h_q, topk,
               topk_len_ptr, n_items, NUM_HEAD_BLOCKS: gl.constexpr, HAS_TOPK_LEN: gl.constexpr,
               HAS_SINK: gl.constexpr, D_TAIL: gl.constexpr):
        """Slot 1's ``Q K^T`` and softmax, value dims 256..511 of both blocks, max_logits, lse."""
        rows_s: gl.constexpr = gl.SliceLayout(1, S_L)
        rows_o: gl.constexpr = gl.SliceLayout(1, O_L)
        s_zero = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=S_L)
        g = 0
        it = 0
        for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
            tok, head0, n_keys, n_steps = _item(item, topk, topk_len_ptr, NUM_HEAD_BLOCKS, HAS_TOPK_LEN)
            mbarrier.wait(bars.index(0), it & 1)
            m_i, l_i, acc, offs_h, sink = _item_state(head0, h_q, sink_ptr, HAS_SINK)
            mask_h = offs_h < h_q
            mbarrier.arrive(bars.index(1), pred=n_steps == 0)
            for step in range(n_steps):
                phase = g & 1
                z = _opaque_zero(g)
                s = _scores(q_smem, qt_smem, k_smem, kt_smem, 1, z, bars, s_zero, 1, 5, 4, phase, D_TAIL)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
                mbarrier.arrive(bars.index(1), pred=step + 1 == n_steps)
                s = _masked(s, valid_smem, 1, bars, phase, qk_scale_log2)
                mbarrier.wait(bars.index(12), phase)
                m1 = gl.maximum(m_smem.index(0).load(rows_s), gl.max(s, 1))
                m1_safe = gl.where(m1 == float("-inf"), 0.0, m1)
                p = gl.exp2(s - m1_safe[:, None])
                alpha = gl.exp2(m_i - m1_safe)
                l_i = l_i * alpha + gl.sum(p, 1)
                m_smem.index(1).store(m1)
                gl.thread_barrier()
                mbarrier.arrive(bars.index(13))
                acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
                p_bf16 = p.to(gl.bfloat16)
                acc = warpgroup_mma(gl.convert_layout(p_bf16, P_L), k_smem.index(1 + z).slice(HALF, HALF, dim=1), acc,
                                    is_async=True)
                p_smem.index(1 + z).store(p_bf16)
                fence_async_shared()
                gl.thread_barrier()
                mbarrier.arrive(bars.index(15))
                mbarrier.wait(bars.index(14), phase)
                pv = warpgroup_mma(p_smem.index(z), k_smem.index(z).slice(HALF, HALF, dim=1), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(pv,))
                mbarrier.arrive(bars.index(9))  # K1 hi
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                mbarrier.arrive(bars.index(7))  # K0 hi (+ P0)
                m_i = m1
                g += 1
            max_logits, lse = _epilogue(
                l_i, m_i, l_smem, bars, 1, it, out_ptr, acc, tok, head0, h_q, stride_o_s, stride_o_h,
                sink, HAS_SINK)
            tok64 = tok.to(gl.int64)
            gl.store(max_ptr + tok64 * stride_ml_s + offs_h, max_logits, mask=mask_h)
            gl.store(lse_ptr + tok64 * stride_ml_s + offs_h, lse, mask=mask_h)
            it += 1

    # Triton 3.6 fails to lower a Gluon kernel when a scalar argument is specialized to the
    # constant 1 (h_q 1, topk 1, a row stride 1): keep those arguments runtime values.
    @gluon.jit(do_not_specialize=["s_kv", "h_q", "topk", "stride_i_s", "stride_ml_s", "n_items"])
    def _sparse_attn_ws_kernel(
        q_ptr, kv_ptr, idx_ptr, out_ptr, max_ptr, lse_ptr, sink_ptr, topk_len_ptr,
        s_kv, h_q, topk, qk_scale_log2,
        stride_q_s, stride_q_h, stride_kv_s, stride_i_s, stride_o_s, stride_o_h, stride_ml_s, n_items,
        NUM_HEAD_BLOCKS: gl.constexpr, D_TAIL: gl.constexpr, HAS_SINK: gl.constexpr, HAS_TOPK_LEN: gl.constexpr,
        MATH_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    ):
        nvmma: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        q_smem = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_H, 512], nvmma)
        k_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_N, 512], nvmma)
        if D_TAIL > 0:
            qt_smem = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_H, TAIL], nvmma)
            kt_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_N, TAIL], nvmma)
            # A block's RoPE tail is read only by its own Q K^T: then it holds that block's P.
            p_smem = kt_smem
        else:
            p_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_H, BLOCK_N], nvmma)
            qt_smem = q_smem  # unused without a tail
            kt_smem = p_smem
        valid_smem = gl.allocate_shared_memory(gl.int32, [2, BLOCK_N], flat)
        m_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_H], flat)
        l_smem = gl.allocate_shared_memory(gl.float32, [4, BLOCK_H], flat)
        bars = gl.allocate_shared_memory(gl.int64, [18, 1], mbarrier.MBarrierLayout())
        # cp.async arrivals come from each of the producer's 128 threads; q_free from both math
        # groups; every other barrier from one group (one elected thread).
        mbarrier.init(bars.index(0), count=128)
        mbarrier.init(bars.index(1), count=2)
        for i in gl.static_range(2, 6):
            mbarrier.init(bars.index(i), count=128)
        for i in gl.static_range(6, 18):
            mbarrier.init(bars.index(i), count=1)

        gl.warp_specialize([
            (_math0, (q_smem, qt_smem, k_smem, kt_smem, p_smem, valid_smem, m_smem, l_smem, bars, qk_scale_log2,
                      out_ptr, stride_o_s, stride_o_h, sink_ptr, h_q, topk, topk_len_ptr, n_items,
                      NUM_HEAD_BLOCKS, HAS_TOPK_LEN, HAS_SINK, D_TAIL)),
            (_math1, (q_smem, qt_smem, k_smem, kt_smem, p_smem, valid_smem, m_smem, l_smem, bars, qk_scale_log2,
                      out_ptr, stride_o_s, stride_o_h, max_ptr, lse_ptr, stride_ml_s, sink_ptr, h_q, topk,
                      topk_len_ptr, n_items, NUM_HEAD_BLOCKS, HAS_TOPK_LEN, HAS_SINK, D_TAIL)),
            (_producer, (q_smem, qt_smem, k_smem, kt_smem, valid_smem, bars,
                         q_ptr, stride_q_s, stride_q_h, h_q, kv_ptr, stride_kv_s, s_kv, idx_ptr, stride_i_s,
                         topk, topk_len_ptr, n_items, NUM_HEAD_BLOCKS, HAS_TOPK_LEN, D_TAIL)),
        ], [4, 4], [MATH_REGS, PRODUCER_REGS])


def sparse_attn_fwd_gluon(
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
    """Launch on validated inputs (as ``kernel.sparse_attn_fwd_triton``; ``unsupported_reason``
    must be None), ``s_q >= 1``: up to ``FEW_HEADS`` heads the few-head kernel
    (``gluon_few_heads.py``), else this file's (``sparse_attn_fwd_gluon_wide``). ``tuning``
    overrides the ``DEFAULT_TUNING`` of the kernel that runs. Returns Triton's handle of the
    compiled kernel."""
    if q.shape[1] <= FEW_HEADS:
        from sparse_prefill.ops.sparse_attn.gluon_few_heads import sparse_attn_fwd_gluon_few_heads

        return sparse_attn_fwd_gluon_few_heads(q, kv, indices, sm_scale, attn_sink, topk_length, out, max_logits,
                                               lse, **tuning)
    return sparse_attn_fwd_gluon_wide(q, kv, indices, sm_scale, attn_sink, topk_length, out, max_logits, lse,
                                      **tuning)


def sparse_attn_fwd_gluon_wide(
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
    """This file's kernel (64-head tiles) for any h_q; ``tuning`` overrides ``DEFAULT_TUNING``."""
    from sparse_prefill.ops.sparse_attn.kernel import launch_args

    unknown = set(tuning) - set(DEFAULT_TUNING)
    if unknown:
        raise ValueError(f"unknown tuning keys {sorted(unknown)}; known: {sorted(DEFAULT_TUNING)}")
    s_q, h_q, d_qk = q.shape
    num_head_blocks = cdiv(h_q, 64)
    n_items = s_q * num_head_blocks
    # Persistent: one CTA per SM (its shared memory admits no second one).
    grid = (min(n_items, torch.cuda.get_device_properties(q.device).multi_processor_count),)
    return _sparse_attn_ws_kernel[grid](
        *launch_args(q, kv, indices, sm_scale, attn_sink, topk_length, out, max_logits, lse), n_items,
        NUM_HEAD_BLOCKS=num_head_blocks, D_TAIL=d_qk - 512, HAS_SINK=attn_sink is not None,
        HAS_TOPK_LEN=topk_length is not None, num_warps=4, **{**DEFAULT_TUNING, **tuning},
    )
