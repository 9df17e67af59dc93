"""Warp-specialized Hopper kernel of ``sparse_attn_fwd`` for a few heads (h_q <= 32: the
tensor-parallel shards engines run), in Gluon (validated with Triton 3.6 on an H200).

A wgmma tile has at least 64 rows along M but may be as narrow as 8 along N. With 64 heads per
tile (``gluon_kernel.py``, FlashMLA) a shard of 8 heads pays for 64; here keys run along M and
heads along N instead: ``S^T = K Q^T`` ([64 keys, HN heads]) and ``O^T += V^T P^T`` ([512 value
dims, HN]), HN = h_q rounded up to 16 or 32. The tensor cores then do little, and the kernel's
speed is that of the KV gather:

- the producer (``PRODUCER_WARPS``) gathers each block of 64 KV rows by index with ``cp.async``
  into a ring of ``STAGES`` shared-memory stages (three at d_qk 512), each completing its own
  mbarrier, and loads each token's Q after its first ``Q_LATE`` blocks (``q_late_blocks``);
- the math group (the default 4 warps) runs the online softmax of each block and queues the next
  block's ``S^T`` right behind its ``P V``; the row sums stay per thread until the token's end
  (one cross-warp sum per token, one cross-warp max per block).

Measured and dropped (benchmarks/NOTES.md): two math groups on half the heads each, or on
alternate blocks (each then holds a stage for its whole chain, and the rows come late), freeing
stages before the next block's ``S^T``, loading ids two blocks ahead, and skipping the rescale
of O while the max grows by less than 2**8 (the branch cost more than the multiplies).

Persistent: one CTA per SM walks the tokens. Results are those of the Triton kernel
(``kernel.py``) up to float summation order.
"""

from __future__ import annotations

import functools

import torch

from sparse_prefill.ops.fp8_sparse_attn.gluon_kernel import GLUON_IMPORTED

# Heads this kernel takes (HN 16 or 32 columns of N).
MAX_HEADS = 32
# Producer warps and registers per thread (the math group gets the rest) and Q buffers: one
# measured as fast as two (benchmarks/NOTES.md), and its 16-32 KB go to a third KV stage.
DEFAULT_TUNING = {"Q_BUFS": 1, "PRODUCER_WARPS": 4, "PRODUCER_REGS": 80}


def kv_stages(d_qk: int) -> int:
    """KV blocks in flight: three (192 KB) at d_qk 512, 1.25x faster than two; at d_qk 576 a
    third stage of 72 KB does not fit beside Q."""
    return 3 if d_qk == 512 else 2


def q_late_blocks(stages: int) -> int:
    """Blocks of a token the producer copies before the token's Q (``Q_LATE``). Q first made
    the producer wait for the math group's last Q K^T of the previous token before those
    copies (14% of its time, ncu); with three stages, copying two blocks first measured 3-4%
    faster at h_q 8 and within 1% at h_q 16, one block first within 1% of two (d_qk 512,
    benchmarks/NOTES.md). With two stages (d_qk 576) Q stays first: not measured there, and
    the token's second block would wait for the previous token's last one."""
    return 2 if stages >= 3 else 0


def tuning_for(d_qk: int, tuning: dict[str, int]) -> dict[str, int]:
    """The kernel's tuning constants at ``d_qk``: ``DEFAULT_TUNING``, ``STAGES``
    (``kv_stages``) and ``Q_LATE`` (``q_late_blocks`` of the stages), overridden by ``tuning``;
    raises ValueError on an unknown key or an out-of-range value."""
    cfg = {**DEFAULT_TUNING, "STAGES": kv_stages(d_qk), "Q_LATE": None}
    unknown = set(tuning) - set(cfg)
    if unknown:
        raise ValueError(f"unknown tuning keys {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update(tuning)
    if cfg["Q_LATE"] is None:
        cfg["Q_LATE"] = q_late_blocks(cfg["STAGES"])
    if cfg["PRODUCER_WARPS"] not in (1, 2, 4, 8):
        raise ValueError(f"PRODUCER_WARPS must be 1, 2, 4 or 8, got {cfg['PRODUCER_WARPS']}")
    if cfg["Q_LATE"] not in (0, 1, 2):
        raise ValueError(f"Q_LATE must be 0, 1 or 2 (blocks copied before the token's Q), got {cfg['Q_LATE']}")
    return cfg


def heads_tile(h_q: int) -> int:
    """HN: the N width that holds ``h_q`` heads."""
    return 16 if h_q <= 16 else 32


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


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

    from sparse_prefill.ops.fp8_sparse_attn.gluon_kernel import BLOCK_N, finish_rows, key_count, load_sink

    D_V = gl.constexpr(512)
    TAIL = gl.constexpr(64)  # d_qk 576: the RoPE dims past 512

    @gluon.jit
    def _copy_rows(dst, rows, col0: gl.constexpr, n_cols: gl.constexpr, mask, offs_c):
        """cp.async ``n_cols`` dims from ``col0`` of each row pointer in ``rows`` into ``dst``,
        64 dims (128 bytes a row) per instruction batch; masked rows are zero-filled."""
        for c in gl.static_range(n_cols // 64):
            async_copy.async_copy_global_to_shared(
                dst.slice(c * 64, 64, dim=1), rows[:, None] + (col0 + c * 64) + offs_c[None, :], mask=mask[:, None])

    @gluon.jit
    def _load_q(q_smem, qt_smem, bars, it, q_ptr, tok64, stride_q_s, stride_q_h, h_q, offs_h, offs_c,
                Q_BUFS: gl.constexpr, D_TAIL: gl.constexpr):
        """Token ``it``'s Q (``tok64``) into its buffer, once the math group is done with the
        token that last used that buffer."""
        qb = it % Q_BUFS
        mbarrier.wait(bars.index(2 + qb), ((it // Q_BUFS) & 1) ^ 1, pred=it >= Q_BUFS)
        q_rows = q_ptr + tok64 * stride_q_s + offs_h.to(gl.int64) * stride_q_h
        _copy_rows(q_smem.index(qb), q_rows, 0, 512, offs_h < h_q, offs_c)
        if D_TAIL > 0:
            _copy_rows(qt_smem.index(qb), q_rows, 512, TAIL, offs_h < h_q, offs_c)
        async_copy.mbarrier_arrive(bars.index(qb), increment_count=False)

    @gluon.jit
    def _producer(q_smem, qt_smem, k_smem, kt_smem, bars, q_ptr, stride_q_s, stride_q_h, h_q,
                  kv_ptr, stride_kv_s, s_kv, idx_ptr, stride_i_s, topk, topk_len_ptr, s_q,
                  HN: gl.constexpr, STAGES: gl.constexpr, Q_BUFS: gl.constexpr, D_TAIL: gl.constexpr,
                  HAS_TOPK_LEN: gl.constexpr, PW: gl.constexpr, Q_LATE: gl.constexpr):
        # A warp covers 4 rows x 64 dims: 16-byte copies, each row's 128 bytes one cache line.
        cp_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [PW, 1], [1, 0])
        offs_r = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, cp_l))
        offs_c = gl.arange(0, 64, layout=gl.SliceLayout(0, cp_l))
        offs_h = gl.arange(0, HN, layout=gl.SliceLayout(1, cp_l))
        g = 0
        it = 0
        for tok in range(gl.program_id(0), s_q, gl.num_programs(0)):
            n_keys = key_count(tok, topk, topk_len_ptr, HAS_TOPK_LEN)
            tok64 = tok.to(gl.int64)
            # Q after the token's first Q_LATE blocks (0, 1 or 2; a token has 0 or at least 2),
            # so that waiting for the previous token's last Q K^T does not hold up their copies.
            if Q_LATE == 0:
                _load_q(q_smem, qt_smem, bars, it, q_ptr, tok64, stride_q_s, stride_q_h, h_q, offs_h, offs_c,
                        Q_BUFS, D_TAIL)
            else:
                if n_keys <= 0:
                    _load_q(q_smem, qt_smem, bars, it, q_ptr, tok64, stride_q_s, stride_q_h, h_q, offs_h, offs_c,
                            Q_BUFS, D_TAIL)
            idx_row = idx_ptr + tok64 * stride_i_s
            ids = gl.load(idx_row + offs_r, mask=offs_r < n_keys, other=-1)
            # Whole pairs of blocks (the math group's unit): past n_keys, rows are zero-filled.
            for j in range(2 * gl.cdiv(n_keys, 2 * BLOCK_N)):
                st = g % STAGES
                pos = j * BLOCK_N + offs_r
                ok = (pos < n_keys) & (ids >= 0) & (ids < s_kv)
                rows = kv_ptr + gl.where(ok, ids, 0).to(gl.int64) * stride_kv_s
                mbarrier.wait(bars.index(4 + STAGES + st), ((g // STAGES) & 1) ^ 1, pred=g >= STAGES)
                _copy_rows(k_smem.index(st), rows, 0, 512, ok, offs_c)
                if D_TAIL > 0:
                    _copy_rows(kt_smem.index(st), rows, 512, TAIL, ok, offs_c)
                async_copy.mbarrier_arrive(bars.index(4 + st), increment_count=False)
                if Q_LATE > 0:
                    if j + 1 == Q_LATE:
                        _load_q(q_smem, qt_smem, bars, it, q_ptr, tok64, stride_q_s, stride_q_h, h_q, offs_h,
                                offs_c, Q_BUFS, D_TAIL)
                # The next block's ids, loaded while this block's copies are in flight.
                pos = pos + BLOCK_N
                ids = gl.load(idx_row + pos, mask=pos < n_keys, other=-1)
                g += 1
            it += 1

    # Barrier slots of ``bars``: 0/1 Q ready (buffer 0/1), 2/3 Q free (Q_BUFS of each used), 4 .. 4 + STAGES - 1 KV
    # stage ready, 4 + STAGES .. 4 + 2 * STAGES - 1 KV stage free.

    @gluon.jit
    def _scores_t(q_v, qt_v, k_smem, kt_smem, bars, g, s_zero, STAGES: gl.constexpr, D_TAIL: gl.constexpr):
        """Wait for block ``g``'s stage and issue its ``S^T = K Q^T`` (async) for the heads of
        the Q views ``q_v`` / ``qt_v``."""
        st = g % STAGES
        mbarrier.wait(bars.index(4 + st), (g // STAGES) & 1)
        # The rows were written by cp.async (generic proxy); the tensor cores read them through
        # the async proxy.
        fence_async_shared()
        s = warpgroup_mma(k_smem.index(st), q_v.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        if D_TAIL > 0:
            s = warpgroup_mma(kt_smem.index(st), qt_v.permute((1, 0)), s, is_async=True)
        return s

    @gluon.jit
    def _valid_keys(idx_row, pos, n_keys, s_kv):
        ids = gl.load(idx_row + pos, mask=pos < n_keys, other=-1)
        return (pos < n_keys) & (ids >= 0) & (ids < s_kv)

    @gluon.jit
    def _softmax_step(s, valid, m_i, qk_scale_log2):
        """One block's online-softmax step on ``S^T`` [64, HN]: (new max, rescale of the old
        state, probabilities), log2 units."""
        s = gl.where(valid[:, None], s * qk_scale_log2, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 0))
        # Heads with no valid key yet keep m = -inf; subtract 0 there so exp2 gives 0.
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        return m_new, gl.exp2(m_i - m_safe), gl.exp2(s - m_safe[None, :])

    @gluon.jit
    def _issue_pv(k_smem, p_smem, st, pb: gl.constexpr, p, acc):
        """Store ``P^T`` (bf16) into buffer ``pb`` and issue ``O^T += V^T P^T`` on stage ``st``."""
        p_smem.index(pb).store(gl.permute(p.to(gl.bfloat16), (1, 0)))
        fence_async_shared()
        gl.thread_barrier()
        return warpgroup_mma(k_smem.index(st).permute((1, 0)), p_smem.index(pb).permute((1, 0)), acc, is_async=True)

    @gluon.jit
    def _math(q_smem, qt_smem, k_smem, kt_smem, p_smem, bars, qk_scale_log2, idx_ptr, stride_i_s, s_kv,
              out_ptr, stride_o_s, stride_o_h, max_ptr, lse_ptr, stride_ml_s, sink_ptr, h_q, topk,
              topk_len_ptr, s_q, STAGES: gl.constexpr, Q_BUFS: gl.constexpr, D_TAIL: gl.constexpr,
              HAS_TOPK_LEN: gl.constexpr, HAS_SINK: gl.constexpr, HN: gl.constexpr):
        """The math group: the HN heads of every token."""
        # One layout for S^T [64, HN] and O^T [512, HN]: per-head vectors are shared by both.
        mma_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HN, 16])
        keys_l: gl.constexpr = gl.SliceLayout(1, mma_l)
        heads_l: gl.constexpr = gl.SliceLayout(0, mma_l)
        s_zero = gl.zeros([BLOCK_N, HN], gl.float32, layout=mma_l)
        offs_k = gl.arange(0, BLOCK_N, layout=keys_l)
        offs_hd = gl.arange(0, HN, layout=heads_l)
        offs_d = gl.arange(0, D_V, layout=keys_l)
        mask_h = offs_hd < h_q
        sink = load_sink(sink_ptr, offs_hd, mask_h, HAS_SINK)
        g = 0
        it = 0
        for tok in range(gl.program_id(0), s_q, gl.num_programs(0)):
            n_keys = key_count(tok, topk, topk_len_ptr, HAS_TOPK_LEN)
            n_pairs = gl.cdiv(n_keys, 2 * BLOCK_N)
            tok64 = tok.to(gl.int64)
            idx_row = idx_ptr + tok64 * stride_i_s
            qb = it % Q_BUFS
            q_v = q_smem.index(qb)
            qt_v = qt_smem.index(qb)
            m_i = gl.full([HN], float("-inf"), gl.float32, layout=heads_l)
            l_part = gl.zeros([BLOCK_N, HN], gl.float32, layout=mma_l)  # row sums, per thread
            acc = gl.zeros([D_V, HN], gl.float32, layout=mma_l)
            mbarrier.wait(bars.index(qb), (it // Q_BUFS) & 1)
            s_a = s_zero
            if n_pairs > 0:
                s_a = _scores_t(q_v, qt_v, k_smem, kt_smem, bars, g, s_zero, STAGES, D_TAIL)
                s_a = warpgroup_mma_wait(num_outstanding=0, deps=(s_a,))
            else:
                mbarrier.arrive(bars.index(2 + qb))  # Q: no Q K^T reads it
            valid_a = _valid_keys(idx_row, offs_k, n_keys, s_kv)
            # Blocks in pairs (a, b): S^T(b) runs under a's softmax, P V(a) under b's. Nothing
            # stays in flight across iterations; an odd count's last b is all invalid.
            for i in range(n_pairs):
                st_a = g % STAGES
                st_b = (g + 1) % STAGES
                s_b = _scores_t(q_v, qt_v, k_smem, kt_smem, bars, g + 1, s_zero, STAGES, D_TAIL)
                valid_b = _valid_keys(idx_row, (2 * i + 1) * BLOCK_N + offs_k, n_keys, s_kv)
                m_i, alpha, p = _softmax_step(s_a, valid_a, m_i, qk_scale_log2)
                l_part = l_part * alpha[None, :] + p
                acc = _issue_pv(k_smem, p_smem, st_a, 0, p, acc * alpha[None, :])
                s_b = warpgroup_mma_wait(num_outstanding=1, deps=(s_b,))
                mbarrier.arrive(bars.index(2 + qb), pred=i + 1 == n_pairs)  # the token's last Q K^T
                valid_a = _valid_keys(idx_row, (2 * i + 2) * BLOCK_N + offs_k, n_keys, s_kv)
                m_i, alpha, p = _softmax_step(s_b, valid_b, m_i, qk_scale_log2)
                l_part = l_part * alpha[None, :] + p
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                mbarrier.arrive(bars.index(4 + STAGES + st_a))
                pv = _issue_pv(k_smem, p_smem, st_b, 1, p, acc * alpha[None, :])
                if i + 1 < n_pairs:
                    # The next pair's first S^T queued right behind this P V.
                    s_next = _scores_t(q_v, qt_v, k_smem, kt_smem, bars, g + 2, s_zero, STAGES, D_TAIL)
                    acc, s_a = warpgroup_mma_wait(num_outstanding=0, deps=(pv, s_next))
                else:
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(pv,))
                mbarrier.arrive(bars.index(4 + STAGES + st_b))
                g += 2
            scale, max_logits, lse = finish_rows(m_i, gl.sum(l_part, 0), sink, HAS_SINK)
            ptrs = out_ptr + tok64 * stride_o_s + offs_hd[None, :].to(gl.int64) * stride_o_h + offs_d[:, None]
            gl.store(ptrs, (acc * scale[None, :]).to(gl.bfloat16), mask=mask_h[None, :])
            gl.store(max_ptr + tok64 * stride_ml_s + offs_hd, max_logits, mask=mask_h)
            gl.store(lse_ptr + tok64 * stride_ml_s + offs_hd, lse, mask=mask_h)
            it += 1

    # Triton 3.6 fails to lower a Gluon kernel when a scalar argument is specialized to the
    # constant 1 (h_q 1, topk 1, a row stride 1): keep those arguments runtime values.
    @gluon.jit(do_not_specialize=["s_kv", "h_q", "topk", "stride_i_s", "stride_ml_s", "s_q"])
    def _sparse_attn_few_heads_kernel(
        q_ptr, kv_ptr, idx_ptr, out_ptr, max_ptr, lse_ptr, sink_ptr, topk_len_ptr,
        s_kv, h_q, topk, qk_scale_log2,
        stride_q_s, stride_q_h, stride_kv_s, stride_i_s, stride_o_s, stride_o_h, stride_ml_s, s_q,
        HN: gl.constexpr, D_TAIL: gl.constexpr, HAS_SINK: gl.constexpr, HAS_TOPK_LEN: gl.constexpr,
        STAGES: gl.constexpr, Q_BUFS: gl.constexpr, PRODUCER_WARPS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
        Q_LATE: gl.constexpr,
    ):
        nvmma: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        q_smem = gl.allocate_shared_memory(gl.bfloat16, [Q_BUFS, HN, 512], nvmma)
        k_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, 512], nvmma)
        p_smem = gl.allocate_shared_memory(gl.bfloat16, [2, HN, BLOCK_N], nvmma)
        if D_TAIL > 0:
            qt_smem = gl.allocate_shared_memory(gl.bfloat16, [Q_BUFS, HN, TAIL], nvmma)
            kt_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, TAIL], nvmma)
        else:
            qt_smem = q_smem  # unused without a tail
            kt_smem = k_smem
        bars = gl.allocate_shared_memory(gl.int64, [4 + 2 * STAGES, 1], mbarrier.MBarrierLayout())
        # cp.async arrivals come from each of the producer's threads, the frees from the math
        # group (one elected thread).
        for i in gl.static_range(2):
            mbarrier.init(bars.index(i), count=32 * PRODUCER_WARPS)
            mbarrier.init(bars.index(2 + i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(4 + i), count=32 * PRODUCER_WARPS)
            mbarrier.init(bars.index(4 + STAGES + i), count=1)
        gl.warp_specialize([
            (_math, (q_smem, qt_smem, k_smem, kt_smem, p_smem, bars, qk_scale_log2, idx_ptr, stride_i_s, s_kv,
                     out_ptr, stride_o_s, stride_o_h, max_ptr, lse_ptr, stride_ml_s, sink_ptr, h_q, topk,
                     topk_len_ptr, s_q, STAGES, Q_BUFS, D_TAIL, HAS_TOPK_LEN, HAS_SINK, HN)),
            (_producer, (q_smem, qt_smem, k_smem, kt_smem, bars, q_ptr, stride_q_s, stride_q_h, h_q,
                         kv_ptr, stride_kv_s, s_kv, idx_ptr, stride_i_s, topk, topk_len_ptr, s_q,
                         HN, STAGES, Q_BUFS, D_TAIL, HAS_TOPK_LEN, PRODUCER_WARPS, Q_LATE)),
        ], [PRODUCER_WARPS], [PRODUCER_REGS])


def sparse_attn_fwd_gluon_few_heads(
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
    """Launch on validated inputs with ``h_q <= MAX_HEADS`` (as ``gluon_kernel.sparse_attn_fwd_gluon``,
    which calls it), with the constants of ``tuning_for``. Returns Triton's handle of the
    compiled kernel."""
    from sparse_prefill.ops.sparse_attn.kernel import launch_args

    s_q, h_q, d_qk = q.shape
    cfg = tuning_for(d_qk, tuning)
    if h_q > MAX_HEADS:
        raise ValueError(f"the few-head kernel takes at most {MAX_HEADS} heads, got h_q {h_q}")
    grid = (min(s_q, _sm_count(q.device)),)
    return _sparse_attn_few_heads_kernel[grid](
        *launch_args(q, kv, indices, sm_scale, attn_sink, topk_length, out, max_logits, lse), s_q,
        HN=heads_tile(h_q), D_TAIL=d_qk - 512, HAS_SINK=attn_sink is not None,
        HAS_TOPK_LEN=topk_length is not None, num_warps=4, **cfg,
    )
