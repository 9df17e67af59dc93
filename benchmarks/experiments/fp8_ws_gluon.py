"""EXPERIMENT, not used by the library: a warp-specialized Hopper kernel (Gluon, Triton 3.6) of
``paged_fp8_sparse_attn_fwd`` for the V4 layout, kept with its probe (``fp8_ws_probe.py``) and
its results (benchmarks/NOTES.md, "Fused FP8 kernel: warp-specialized Gluon experiment").

Each persistent CTA walks work items (a query token and 64 of its heads) and hands KV tiles of
64 keys through a two-slot ring in shared memory between three warp groups:

- the score group (the default 4 warps) gathers and dequantizes the next tile from the FP8 paged
  caches while the tensor cores compute this tile's ``Q K^T``, runs the online softmax and
  publishes P and the rescale factor;
- two value groups (4 warps each) run ``P V`` for value dims 0..255 and 256..511.

It is exact (the probe checks it against the reference) but slower than the Triton kernel
(``ops/fp8_sparse_attn/kernel.py``): 0.29x instead of 0.48x of FlashMLA. Triton 3.6 compiles the
whole kernel to the launch's register cap (168 with 384 threads; ptxas ignores ``setmaxnreg``), so
a group holding a 64 x 256 accumulator cannot also hold the scores: the layout with a separate
producer group serialized every wgmma, and this one puts the latency-bound gather on the score
group's critical path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_prefill.ops.sparse_attn.kernel import LOG2E

try:  # Gluon's Hopper API as of Triton 3.6
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    GLUON_IMPORTED = hasattr(gl, "warp_specialize") and hasattr(gl, "NVMMADistributedLayout")
except ImportError:  # pragma: no cover - depends on the installed Triton
    GLUON_IMPORTED = False

BLOCK_H = tl.constexpr(64)  # one wgmma M tile
BLOCK_N = tl.constexpr(64)  # keys per tile
NUM_BUF = tl.constexpr(2)  # KV tiles in flight between the producer and the MMA groups
V_LOW, V_HIGH = tl.constexpr(0), tl.constexpr(256)  # first value dim of each value group


if GLUON_IMPORTED:
    from triton.experimental.gluon.language.nvidia.hopper import async_copy

    from sparse_prefill.ops.cache.tiles import V4_DATA_BYTES, V4_NOPE, V4_ROPE_OFFSET, V4_SCALE_BYTES, V4_TILE

    @gluon.jit
    def _work_item(item, topk, xtopk, topk_len_ptr, xtopk_len_ptr, NUM_HEAD_BLOCKS: gl.constexpr,
                   HAS_EXTRA: gl.constexpr, HAS_TOPK_LEN: gl.constexpr, HAS_XTOPK_LEN: gl.constexpr):
        """Work item ``item`` (a token and 64 of its heads): (tok, head0, n_keys, n_xkeys,
        main-scope tiles, all tiles). Every partition derives it itself."""
        tok = item // NUM_HEAD_BLOCKS
        head0 = (item % NUM_HEAD_BLOCKS) * BLOCK_H
        n_keys = topk
        if HAS_TOPK_LEN:
            n_keys = gl.minimum(gl.load(topk_len_ptr + tok), topk)
        n_keys = gl.maximum(n_keys, 0)
        n_xkeys = n_keys * 0
        if HAS_EXTRA:
            n_xkeys = xtopk + n_xkeys
            if HAS_XTOPK_LEN:
                n_xkeys = gl.minimum(gl.load(xtopk_len_ptr + tok), xtopk)
            n_xkeys = gl.maximum(n_xkeys, 0)
        n_main_tiles = gl.cdiv(n_keys, BLOCK_N)
        return tok, head0, n_keys, n_xkeys, n_main_tiles, n_main_tiles + gl.cdiv(n_xkeys, BLOCK_N)

    @gluon.jit
    def _scope_of_tile(j, n_main_tiles, cache_ptr, idx_row, n_keys, capacity, page_size, page_bytes,
                       xcache_ptr, xidx_row, n_xkeys, xcapacity, xpage_size, xpage_bytes):
        """Tile ``j`` of the concatenated scopes: (cache, index pointer of its first key, keys left
        in its scope, capacity, page size, page bytes)."""
        if j < n_main_tiles:
            start = j * BLOCK_N
            res = (cache_ptr, idx_row + start, n_keys - start, capacity, page_size, page_bytes)
        else:
            start = (j - n_main_tiles) * BLOCK_N
            res = (xcache_ptr, xidx_row + start, n_xkeys - start, xcapacity, xpage_size, xpage_bytes)
        return res

    @gluon.jit
    def _gather_chunk(kb, valid_smem, c: gl.constexpr, ids, pos, left, cap, base, psize, pbytes,
                      CHUNK: gl.constexpr, l3: gl.constexpr):
        """Dequantize keys ``c * CHUNK ..`` of a tile into rows of ``kb`` (bf16 [BLOCK_N, 512]) and
        their valid flags into ``valid_smem``. ``ids``/``pos``: [CHUNK] ids and positions in
        the scope, ``left``: keys left in the scope from the tile's start."""
        NUM_SLOTS: gl.constexpr = V4_NOPE // V4_TILE + 1
        l2: gl.constexpr = gl.SliceLayout(2, l3)
        slot = gl.arange(0, NUM_SLOTS, layout=gl.SliceLayout(0, l2))[None, :]
        is_fp8 = slot < NUM_SLOTS - 1
        valid = (pos < left) & (ids >= 0) & (ids < cap)
        # tiles.token_offsets' arithmetic, reordered so the page's byte offset is shared: calling
        # it here measured 100 -> 83 TFLOP/s (the gather is on this group's critical path).
        tok = gl.where(valid, ids, 0)
        page = tok // psize
        slot_in_page = tok - page * psize
        page_off = page.to(gl.int64) * pbytes
        data_off = page_off + slot_in_page * V4_DATA_BYTES
        scale_off = page_off + psize * V4_DATA_BYTES + slot_in_page * V4_SCALE_BYTES
        v2 = valid[:, None]
        # ue8m0 byte b is the float32 exponent field of 2**(b - 127).
        e8 = gl.load(base + scale_off[:, None] + slot, mask=v2 & is_fp8, other=0)
        scale = (e8.to(gl.int32) << 23).to(gl.float32, bitcast=True)
        row = base + data_off[:, None, None]
        v3 = v2[:, :, None]
        # A thread owns 8 consecutive dims of one slot: 8 FP8 bytes, or 8 rope values (16 bytes).
        dim = gl.arange(0, V4_TILE, layout=gl.SliceLayout(0, gl.SliceLayout(1, l3)))[None, None, :]
        fp8 = gl.load(row + (slot * V4_TILE)[:, :, None] + dim, mask=v3 & is_fp8[:, :, None], other=0)
        rope_ptr = (row + V4_ROPE_OFFSET).to(gl.pointer_type(gl.bfloat16), bitcast=True)
        rope = gl.load(rope_ptr + dim, mask=v3 & (~is_fp8)[:, :, None], other=0.0)
        deq = (fp8.to(gl.float8e4nv, bitcast=True).to(gl.float32) * scale[:, :, None]).to(gl.bfloat16)
        tile = gl.where(is_fp8[:, :, None], deq, rope)
        kb.slice(c * CHUNK, CHUNK, dim=0).store(gl.reshape(tile, [CHUNK, NUM_SLOTS * V4_TILE]))
        valid_smem.slice(c * CHUNK, CHUNK).store(valid.to(gl.int32))

    @gluon.jit
    def _gather_tile(k_smem, valid_smem, k_free, g, j, n_main_tiles, cache_ptr, idx_row, n_keys, capacity,
                     page_size, page_bytes, xcache_ptr, xidx_row, n_xkeys, xcapacity, xpage_size, xpage_bytes):
        """Gather and dequantize tile ``j`` of the item (the CTA's ``g``-th tile) into its ring slot,
        once both value groups are done with the tile that used the slot before."""
        CHUNK: gl.constexpr = 32
        # Keys as [key, slot, dim]: slots 0..6 are the FP8 quant tiles, slot 7 the rope dims.
        l3: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 8, 4], [4, 1, 1], [2, 1, 0])
        offs_n = gl.arange(0, CHUNK, layout=gl.SliceLayout(1, gl.SliceLayout(2, l3)))
        buf = g % NUM_BUF
        base, idx_tile, left, cap, psize, pbytes = _scope_of_tile(
            j, n_main_tiles, cache_ptr, idx_row, n_keys, capacity, page_size, page_bytes,
            xcache_ptr, xidx_row, n_xkeys, xcapacity, xpage_size, xpage_bytes)
        ids0 = gl.load(idx_tile + offs_n, mask=offs_n < left, other=-1)
        ids1 = gl.load(idx_tile + CHUNK + offs_n, mask=CHUNK + offs_n < left, other=-1)
        mbarrier.wait(k_free.index(buf), ((g // NUM_BUF) & 1) ^ 1, pred=g >= NUM_BUF)
        kb = k_smem.index(buf)
        vb = valid_smem.index(buf)
        _gather_chunk(kb, vb, 0, ids0, offs_n, left, cap, base, psize, pbytes, CHUNK, l3)
        _gather_chunk(kb, vb, 1, ids1, CHUNK + offs_n, left, cap, base, psize, pbytes, CHUNK, l3)

    @gluon.jit
    def _score_group(q_smem, k_smem, valid_smem, p_smem, alpha_smem, oscale_smem,
                     k_free, p_ready, p_free, o_ready, o_free, qk_scale_log2,
                     q_ptr, stride_q_s, stride_q_h, max_ptr, lse_ptr, sink_ptr, h_q,
                     topk, xtopk, topk_len_ptr, xtopk_len_ptr, stride_ml_s, n_items,
                     cache_ptr, idx_ptr, stride_i_s, capacity, page_size, page_bytes,
                     xcache_ptr, xidx_ptr, stride_xi_s, xcapacity, xpage_size, xpage_bytes,
                     NUM_HEAD_BLOCKS: gl.constexpr, HAS_EXTRA: gl.constexpr, HAS_TOPK_LEN: gl.constexpr,
                     HAS_XTOPK_LEN: gl.constexpr, HAS_SINK: gl.constexpr):
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        rows_s: gl.constexpr = gl.SliceLayout(1, s_l)
        q_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        offs_qh = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, q_l))
        offs_qd = gl.arange(0, 512, layout=gl.SliceLayout(0, q_l))
        LN2: gl.constexpr = 0.6931471805599453
        s0 = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=s_l)
        g = 0
        it = 0
        for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
            tok, head0, n_keys, n_xkeys, n_main_tiles, n_tiles = _work_item(
                item, topk, xtopk, topk_len_ptr, xtopk_len_ptr, NUM_HEAD_BLOCKS, HAS_EXTRA, HAS_TOPK_LEN, HAS_XTOPK_LEN)
            tok64 = tok.to(gl.int64)
            idx_row = idx_ptr + tok64 * stride_i_s
            xidx_row = xidx_ptr + tok64 * stride_xi_s
            heads = head0 + offs_qh
            q_rows = q_ptr + tok64 * stride_q_s + heads[:, None].to(gl.int64) * stride_q_h
            # The last QK of the previous item has completed (waited on), so Q can be replaced.
            async_copy.async_copy_global_to_shared(q_smem, q_rows + offs_qd[None, :], mask=(heads < h_q)[:, None])
            async_copy.commit_group()
            if n_tiles > 0:
                _gather_tile(k_smem, valid_smem, k_free, g, 0, n_main_tiles, cache_ptr, idx_row, n_keys, capacity,
                             page_size, page_bytes, xcache_ptr, xidx_row, n_xkeys, xcapacity, xpage_size,
                             xpage_bytes)
            async_copy.wait_group(0)
            m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=rows_s)
            l_i = gl.zeros([BLOCK_H], gl.float32, layout=rows_s)
            for j in range(n_tiles):
                buf = g % NUM_BUF
                # This group's stores (Q, the tile) must be visible to the MMA's async proxy.
                fence_async_shared()
                gl.thread_barrier()
                kb = k_smem.index(buf)
                s = warpgroup_mma(q_smem, kb.permute((1, 0)), s0, use_acc=False, is_async=True)
                # The next tile is gathered while the tensor cores compute this one's scores.
                if j + 1 < n_tiles:
                    _gather_tile(k_smem, valid_smem, k_free, g + 1, j + 1, n_main_tiles, cache_ptr, idx_row, n_keys,
                                 capacity, page_size, page_bytes, xcache_ptr, xidx_row, n_xkeys, xcapacity,
                                 xpage_size, xpage_bytes)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
                valid = valid_smem.index(buf).load(gl.SliceLayout(0, s_l)) != 0
                s = gl.where(valid[None, :], s * qk_scale_log2, float("-inf"))
                m_new = gl.maximum(m_i, gl.max(s, 1))
                # A row with no valid key yet keeps m = -inf; subtract 0 there so exp2 gives 0.
                m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
                p = gl.exp2(s - m_safe[:, None])
                alpha = gl.exp2(m_i - m_safe)
                l_i = l_i * alpha + gl.sum(p, 1)
                m_i = m_new
                # Both value groups must have finished with the previous P before it is replaced.
                mbarrier.wait(p_free, (g & 1) ^ 1, pred=g > 0)
                p_smem.store(p.to(gl.bfloat16))
                alpha_smem.store(alpha)
                fence_async_shared()
                gl.thread_barrier()
                mbarrier.arrive(p_ready)
                g += 1

            offs_h = head0 + gl.arange(0, BLOCK_H, layout=rows_s)
            mask_h = offs_h < h_q
            has_any = l_i > 0.0
            l_safe = gl.where(has_any, l_i, 1.0)
            lse = gl.where(has_any, (m_i + gl.log2(l_safe)) * LN2, float("inf"))
            max_logits = gl.where(has_any, m_i * LN2, float("-inf"))
            scale = gl.where(has_any, 1.0 / l_safe, 0.0)
            if HAS_SINK:
                sink = gl.load(sink_ptr + offs_h, mask=mask_h, other=float("-inf"))
                # exp(lse) / (exp(lse) + exp(sink)) without overflow; sink -inf -> 1, +inf -> 0.
                scale = scale / (1.0 + gl.exp(sink - lse))
            # Both value groups must have read the last item's scales.
            mbarrier.wait(o_free, (it & 1) ^ 1, pred=it > 0)
            oscale_smem.store(scale)
            gl.thread_barrier()
            mbarrier.arrive(o_ready)
            gl.store(max_ptr + tok64 * stride_ml_s + offs_h, max_logits, mask=mask_h)
            gl.store(lse_ptr + tok64 * stride_ml_s + offs_h, lse, mask=mask_h)
            it += 1

    @gluon.jit
    def _store_half(out_ptr, o, tok64, head0, h_q, stride_o_s, stride_o_h, D0: gl.constexpr,
                    o_l: gl.constexpr):
        offs_h = head0 + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, o_l))
        offs_v = D0 + gl.arange(0, 256, layout=gl.SliceLayout(0, o_l))
        ptrs = out_ptr + tok64 * stride_o_s + offs_h[:, None].to(gl.int64) * stride_o_h + offs_v[None, :]
        gl.store(ptrs, o.to(gl.bfloat16), mask=(offs_h < h_q)[:, None])

    @gluon.jit
    def _value_group(k_smem, p_smem, alpha_smem, oscale_smem, k_free, p_ready, p_free, o_ready, o_free,
                     out_ptr, h_q, topk, xtopk, topk_len_ptr, xtopk_len_ptr, stride_o_s, stride_o_h, n_items,
                     D0: gl.constexpr, NUM_HEAD_BLOCKS: gl.constexpr, HAS_EXTRA: gl.constexpr,
                     HAS_TOPK_LEN: gl.constexpr, HAS_XTOPK_LEN: gl.constexpr):
        """``P V`` for value dims ``D0 .. D0 + 255`` and their share of the output."""
        o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16])
        g = 0
        it = 0
        for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
            tok, head0, n_keys, n_xkeys, n_main_tiles, n_tiles = _work_item(
                item, topk, xtopk, topk_len_ptr, xtopk_len_ptr, NUM_HEAD_BLOCKS, HAS_EXTRA, HAS_TOPK_LEN, HAS_XTOPK_LEN)
            acc = gl.zeros([BLOCK_H, 256], gl.float32, layout=o_l)
            for j in range(n_tiles):
                buf = g % NUM_BUF
                mbarrier.wait(p_ready, g & 1)
                alpha = alpha_smem.load(gl.SliceLayout(1, o_l))
                acc = acc * alpha[:, None]
                acc = warpgroup_mma(p_smem, k_smem.index(buf).slice(D0, 256, dim=1), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                gl.thread_barrier()
                mbarrier.arrive(p_free)
                mbarrier.arrive(k_free.index(buf))
                g += 1
            mbarrier.wait(o_ready, it & 1)
            scale = oscale_smem.load(gl.SliceLayout(1, o_l))
            gl.thread_barrier()
            mbarrier.arrive(o_free)
            _store_half(out_ptr, acc * scale[:, None], tok.to(gl.int64), head0, h_q, stride_o_s, stride_o_h, D0, o_l)
            it += 1

    # Triton 3.6 fails to lower this kernel when a scalar argument is specialized to the constant
    # 1 (e.g. h_q 1, topk 1, an index row stride 1): keep those arguments runtime values.
    @gluon.jit(do_not_specialize=["h_q", "topk", "xtopk", "capacity", "xcapacity", "page_size", "xpage_size",
                                  "n_items", "stride_i_s", "stride_xi_s", "stride_ml_s"])
    def _paged_fp8_attn_ws_kernel(
        q_ptr, cache_ptr, idx_ptr, xcache_ptr, xidx_ptr,
        out_ptr, max_ptr, lse_ptr, sink_ptr, topk_len_ptr, xtopk_len_ptr,
        h_q, topk, xtopk, capacity, xcapacity, page_size, page_bytes, xpage_size, xpage_bytes,
        qk_scale_log2, n_items,
        stride_q_s, stride_q_h, stride_i_s, stride_xi_s, stride_o_s, stride_o_h, stride_ml_s,
        NUM_HEAD_BLOCKS: gl.constexpr, HAS_EXTRA: gl.constexpr, HAS_SINK: gl.constexpr,
        HAS_TOPK_LEN: gl.constexpr, HAS_XTOPK_LEN: gl.constexpr,
    ):
        nvmma: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        q_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, 512], nvmma)
        k_smem = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUF, BLOCK_N, 512], nvmma)
        p_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, BLOCK_N], nvmma)
        valid_smem = gl.allocate_shared_memory(gl.int32, [NUM_BUF, BLOCK_N], flat)
        alpha_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_H], flat)
        oscale_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_H], flat)
        k_free = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        bars = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
        p_ready, p_free = bars.index(0), bars.index(1)
        o_ready, o_free = bars.index(2), bars.index(3)
        # "ready" barriers have one arrival (the score group), "free" ones two (the value groups).
        for i in gl.static_range(NUM_BUF):
            mbarrier.init(k_free.index(i), count=2)
        mbarrier.init(p_ready, count=1)
        mbarrier.init(p_free, count=2)
        mbarrier.init(o_ready, count=1)
        mbarrier.init(o_free, count=2)

        gl.warp_specialize([
            (_score_group, (q_smem, k_smem, valid_smem, p_smem, alpha_smem, oscale_smem,
                            k_free, p_ready, p_free, o_ready, o_free, qk_scale_log2,
                            q_ptr, stride_q_s, stride_q_h, max_ptr, lse_ptr, sink_ptr, h_q,
                            topk, xtopk, topk_len_ptr, xtopk_len_ptr, stride_ml_s, n_items,
                            cache_ptr, idx_ptr, stride_i_s, capacity, page_size, page_bytes,
                            xcache_ptr, xidx_ptr, stride_xi_s, xcapacity, xpage_size, xpage_bytes,
                            NUM_HEAD_BLOCKS, HAS_EXTRA, HAS_TOPK_LEN, HAS_XTOPK_LEN, HAS_SINK)),
            (_value_group, (k_smem, p_smem, alpha_smem, oscale_smem, k_free, p_ready, p_free, o_ready, o_free,
                            out_ptr, h_q, topk, xtopk, topk_len_ptr, xtopk_len_ptr, stride_o_s, stride_o_h, n_items,
                            V_LOW, NUM_HEAD_BLOCKS, HAS_EXTRA, HAS_TOPK_LEN, HAS_XTOPK_LEN)),
            (_value_group, (k_smem, p_smem, alpha_smem, oscale_smem, k_free, p_ready, p_free, o_ready, o_free,
                            out_ptr, h_q, topk, xtopk, topk_len_ptr, xtopk_len_ptr, stride_o_s, stride_o_h, n_items,
                            V_HIGH, NUM_HEAD_BLOCKS, HAS_EXTRA, HAS_TOPK_LEN, HAS_XTOPK_LEN)),
        ], [4, 4], [168, 168])


def paged_fp8_sparse_attn_gluon(
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
    out: torch.Tensor,
    max_logits: torch.Tensor,
    lse: torch.Tensor,
    **tuning: int,
) -> object:
    """Launch on validated V4 inputs (see ``paged_fp8_sparse_attn_fwd``); returns Triton's handle."""
    s_q, h_q, _ = q.shape
    num_head_blocks = triton.cdiv(h_q, BLOCK_H)
    has_extra = extra_indices is not None
    xcache = extra_cache if has_extra else cache
    xidx = extra_indices if has_extra else indices
    xpage = extra_page_size if has_extra else page_size
    n_items = s_q * num_head_blocks
    grid = (min(n_items, torch.cuda.get_device_properties(q.device).multi_processor_count),)
    return _paged_fp8_attn_ws_kernel[grid](
        q, cache, indices, xcache, xidx,
        out, max_logits, lse,
        attn_sink if attn_sink is not None else lse,
        topk_length if topk_length is not None else indices,
        extra_topk_length if extra_topk_length is not None else indices,
        h_q, indices.shape[1], xidx.shape[1],
        cache.shape[0] * page_size, xcache.shape[0] * xpage,
        page_size, cache.shape[1], xpage, xcache.shape[1],
        sm_scale * LOG2E, n_items,
        q.stride(0), q.stride(1), indices.stride(0), xidx.stride(0), out.stride(0), out.stride(1),
        lse.stride(0),
        NUM_HEAD_BLOCKS=num_head_blocks, HAS_EXTRA=has_extra, HAS_SINK=attn_sink is not None,
        HAS_TOPK_LEN=topk_length is not None, HAS_XTOPK_LEN=extra_topk_length is not None,
        num_warps=4, **tuning,
    )
