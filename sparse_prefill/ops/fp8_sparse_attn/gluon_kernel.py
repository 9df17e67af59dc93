"""Warp-specialized Hopper kernel of ``paged_fp8_sparse_attn_fwd`` for the V4 layout, written in
Gluon (Triton's explicit-layout dialect; validated with Triton 3.6 on an H100).

Each persistent CTA walks work items (a query token and 64 of its heads) and hands KV tiles of 64
keys through a two-slot ring in shared memory between three warp groups, FlashMLA's split of its
sparse FP8 decode kernel:

- the producer (4 warps, few registers) gathers a tile's FP8 bytes, scales and rope dims from the
  paged caches, dequantizes them to bf16 into a ring slot and marks which keys are valid;
- the score group (the default 4 warps) runs ``Q K^T`` on the tensor cores, the online softmax,
  publishes P and the rescale factor, and runs ``P V`` for value dims 0..255;
- the value group (4 warps) runs ``P V`` for value dims 256..511.

So the gather of later tiles overlaps the MMAs of earlier ones, which the single-role Triton
kernel (``kernel.py``) cannot do. Each group gets its own register budget (``setmaxnreg``):
the score group holds a 64 x 256 float32 accumulator plus the 64 x 64 scores, the value group
the other accumulator half, the producer only a tile's raw bytes in flight. Results are those of
the Triton kernel up to float summation order (benchmarks/NOTES.md has the measurements).
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

from sparse_prefill._utils import cdiv
from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops.fp8_sparse_attn.kernel import launch_args

logger = logging.getLogger(__name__)

try:  # Gluon's Hopper API as of Triton 3.6
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        async_copy,
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    GLUON_IMPORTED = hasattr(gl, "warp_specialize") and hasattr(gl, "NVMMADistributedLayout")
except ImportError:  # pragma: no cover - depends on the installed Triton
    GLUON_IMPORTED = False

# "auto" takes this kernel only on the Triton versions it was validated with on the GPU: Gluon's
# API changes between releases.
VALIDATED_TRITON = ("3.6",)

BLOCK_H = tl.constexpr(64)  # one wgmma M tile
BLOCK_N = tl.constexpr(64)  # keys per tile
CHUNK = tl.constexpr(32)  # keys the producer gathers at once (a tile is two chunks)
NUM_BUF = tl.constexpr(2)  # KV tiles in flight between the producer and the MMA groups
# Registers per thread of the value group and the producer; the score group gets the rest of the
# 504 per thread (3 x 168) Triton shares among the three warp groups. Chosen from `ptxas -v` (the smallest budgets
# without spills or serialized wgmma) and measured (benchmarks/NOTES.md).
DEFAULT_TUNING = {"VALUE_REGS": 160, "PRODUCER_REGS": 120}


def hopper_reason(device: torch.device) -> str | None:
    """Why a Gluon Hopper kernel cannot run on ``device`` (None if it can)."""
    if device.type != "cuda":
        return f"it needs CUDA tensors, got {device.type}"
    if not GLUON_IMPORTED:
        return f"Triton {triton.__version__} has no Gluon Hopper API"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return f"it needs an sm_90 (Hopper) GPU, got sm_{major}{minor}"
    return None


def validated_triton() -> bool:
    """Whether the installed Triton is one the Gluon kernels were validated with on the GPU."""
    return ".".join(triton.__version__.split(".")[:2]) in VALIDATED_TRITON


def unsupported_reason(device: torch.device, layout: KVCacheLayout) -> str | None:
    """Why this kernel cannot run tensors of ``device`` in ``layout`` (None if it can)."""
    if layout is not KVCacheLayout.V4:
        return "it reads the V4 layout only"
    return hopper_reason(device)


def alignment_reason(*tensors: tuple[str, torch.Tensor, int]) -> str | None:
    """Why the Gluon kernels' 16-byte copies cannot read these tensors (None if they can): each
    ``(name, tensor, dims)`` must start 16-byte aligned with its first ``dims`` strides multiples
    of 16 elements (what Triton's argument specialization proves alignment from)."""
    for name, t, dims in tensors:
        strides = t.stride()[:dims]
        if t.data_ptr() % 16 or any(st % 16 for st in strides):
            return f"{name} must start 16-byte aligned with strides {tuple(strides)} multiples of 16"
    return None


def inputs_reason(q: torch.Tensor, cache: torch.Tensor) -> str | None:
    """Why this kernel cannot read ``q`` / ``cache`` (None if it can): its ``cp.async`` copies of
    q rows need them 16-byte aligned, and its gathers a cache that starts so."""
    return alignment_reason(("q", q, 2), ("cache", cache, 0))


# Ops whose fallback warning was given (once per process, not per device).
_WARNED: set[str] = set()


def auto_decision(op: str, reason: str | None, device: torch.device, meant_here: bool) -> bool:
    """Whether ``impl="auto"`` runs ``op``'s Gluon kernel, given why that kernel cannot run
    (``reason``, None if it can; the Triton version is checked here). A fallback is logged at
    debug level, and once per process as a warning where the Gluon kernel was meant to run
    (``meant_here`` on an sm_90 GPU: the Triton kernel is about 2x slower there)."""
    if reason is None and not validated_triton():
        reason = f"Triton {triton.__version__} is not one it was validated with {VALIDATED_TRITON}"
    if reason is not None:
        logger.debug("%s: Triton kernel, not the Gluon one: %s", op, reason)
        hopper = device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)
        if meant_here and hopper and op not in _WARNED:
            _WARNED.add(op)
            logger.warning("sparse_prefill: %s falls back to its Triton kernel (about 2x slower) on this sm_90 GPU: %s",
                           op, reason)
    return reason is None


@functools.lru_cache(maxsize=None)
@torch._dynamo.assume_constant_result  # torch.compile runs it once at trace time, as a constant
def auto_picks_gluon(device: torch.device, layout: KVCacheLayout) -> bool:
    """Whether ``impl="auto"`` runs this kernel (else the Triton one; see ``auto_decision``).
    Cached: the answer is fixed per device and layout for a process, and every call of the op
    asks."""
    reason = unsupported_reason(device, layout)
    return auto_decision("paged_fp8_sparse_attn_fwd", reason, device, layout is KVCacheLayout.V4)


if GLUON_IMPORTED:
    from sparse_prefill.ops.cache.tiles import V4_DATA_BYTES, V4_NOPE, V4_ROPE_OFFSET, V4_SCALE_BYTES, V4_TILE

    @gluon.jit
    def key_count(tok, topk, topk_len_ptr, HAS_TOPK_LEN: gl.constexpr):
        """Keys token ``tok`` attends to: ``topk``, or its ``topk_length`` entry clamped to
        ``0 .. topk`` (the ops' definition of the mask)."""
        n_keys = topk
        if HAS_TOPK_LEN:
            n_keys = gl.minimum(gl.load(topk_len_ptr + tok), topk)
        return gl.maximum(n_keys, 0)

    @gluon.jit
    def token_and_head(item, NUM_HEAD_BLOCKS: gl.constexpr):
        """Work item ``item`` of the 64-head kernels: (its token, its first head)."""
        return item // NUM_HEAD_BLOCKS, (item % NUM_HEAD_BLOCKS) * BLOCK_H

    @gluon.jit
    def _work_item(item, topk, xtopk, topk_len_ptr, xtopk_len_ptr, NUM_HEAD_BLOCKS: gl.constexpr,
                   HAS_EXTRA: gl.constexpr, HAS_TOPK_LEN: gl.constexpr, HAS_XTOPK_LEN: gl.constexpr):
        """Work item ``item`` (a token and 64 of its heads): (tok, head0, n_keys, n_xkeys,
        main-scope tiles, all tiles). Every group derives it itself."""
        tok, head0 = token_and_head(item, NUM_HEAD_BLOCKS)
        n_keys = key_count(tok, topk, topk_len_ptr, HAS_TOPK_LEN)
        n_xkeys = n_keys * 0
        if HAS_EXTRA:
            n_xkeys = key_count(tok, xtopk, xtopk_len_ptr, HAS_XTOPK_LEN)
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
    def _load_chunk(ids, pos, left, cap, base, psize, pbytes, l3: gl.constexpr):
        """Issue the loads of ``CHUNK`` keys (``ids``/``pos``: their ids and positions in the
        scope, ``left``: keys left in the scope): (valid [CHUNK], FP8 bytes [CHUNK, 8, 64] u8
        (slot 7 zero), ue8m0 scale bytes [CHUNK, 8] u8, rope [CHUNK, 64] bf16). A thread owns 16
        consecutive dims of one key in every slot, so each load is 8 or 16 bytes wide."""
        slot = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, l3)))[None, :]
        valid = (pos < left) & (ids >= 0) & (ids < cap)
        tok = gl.where(valid, ids, 0)
        # Division in int32 (the ids' dtype); byte offsets in int64.
        page = tok // psize
        slot_in_page = (tok - page * psize).to(gl.int64)
        page_off = page.to(gl.int64) * pbytes
        data_off = page_off + slot_in_page * V4_DATA_BYTES
        scale_off = page_off + psize.to(gl.int64) * V4_DATA_BYTES + slot_in_page * V4_SCALE_BYTES
        v2 = valid[:, None]
        e8 = gl.load(base + scale_off[:, None] + slot, mask=v2, other=0)
        dim = gl.arange(0, V4_TILE, layout=gl.SliceLayout(0, gl.SliceLayout(1, l3)))[None, None, :]
        is_fp8 = (slot < V4_NOPE // V4_TILE)[:, :, None]
        fp8 = gl.load(base + data_off[:, None, None] + (slot * V4_TILE)[:, :, None] + dim,
                      mask=v2[:, :, None] & is_fp8, other=0)
        lr: gl.constexpr = gl.SliceLayout(1, l3)
        rope_ptr = (base + V4_ROPE_OFFSET + gl.convert_layout(data_off, gl.SliceLayout(1, lr))[:, None]).to(
            gl.pointer_type(gl.bfloat16), bitcast=True)
        rope = gl.load(rope_ptr + gl.arange(0, V4_TILE, layout=gl.SliceLayout(0, lr))[None, :],
                       mask=gl.convert_layout(valid, gl.SliceLayout(1, lr))[:, None], other=0.0)
        return valid, fp8, e8, rope

    @gluon.jit
    def _store_chunk(kb, valid_smem, c: gl.constexpr, valid, fp8, e8, rope, l3: gl.constexpr):
        """Dequantize a chunk from ``_load_chunk`` into rows ``c * CHUNK ..`` of the ring slot
        ``kb`` (bf16 [BLOCK_N, 512]) and its valid flags into ``valid_smem``; exactly as
        ``dequantize_k_cache_paged``: ``float32(fp8) * 2**k`` rounded to bf16 (exact)."""
        slot = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, l3)))[None, :, None]
        # ue8m0 byte b is the float32 exponent field of 2**(b - 127).
        scale = (e8.to(gl.int32) << 23).to(gl.float32, bitcast=True)
        deq = (fp8.to(gl.float8e4nv, bitcast=True).to(gl.float32) * scale[:, :, None]).to(gl.bfloat16)
        tile = gl.where(slot < V4_NOPE // V4_TILE, deq, rope[:, None, :])
        kb.slice(c * CHUNK, CHUNK, dim=0).store(gl.reshape(tile, [CHUNK, 8 * V4_TILE]))
        valid_smem.slice(c * CHUNK, CHUNK).store(valid.to(gl.int32))

    @gluon.jit
    def _producer(k_smem, valid_smem, k_ready, k_free, topk, xtopk, topk_len_ptr, xtopk_len_ptr, n_items,
                  cache_ptr, idx_ptr, stride_i_s, capacity, page_size, page_bytes,
                  xcache_ptr, xidx_ptr, stride_xi_s, xcapacity, xpage_size, xpage_bytes,
                  NUM_HEAD_BLOCKS: gl.constexpr, HAS_EXTRA: gl.constexpr, HAS_TOPK_LEN: gl.constexpr,
                  HAS_XTOPK_LEN: gl.constexpr):
        """Gather and dequantize every KV tile of the CTA's items into the ring. A tile's loads
        are issued before waiting for its slot, so their latency overlaps the MMA groups' work."""
        l3: gl.constexpr = gl.BlockedLayout([1, 8, 16], [8, 1, 4], [4, 1, 1], [2, 1, 0])
        offs_n = gl.arange(0, CHUNK, layout=gl.SliceLayout(1, gl.SliceLayout(2, l3)))
        g = 0
        for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
            tok, head0, n_keys, n_xkeys, n_main_tiles, n_tiles = _work_item(
                item, topk, xtopk, topk_len_ptr, xtopk_len_ptr, NUM_HEAD_BLOCKS, HAS_EXTRA, HAS_TOPK_LEN, HAS_XTOPK_LEN)
            tok64 = tok.to(gl.int64)
            idx_row = idx_ptr + tok64 * stride_i_s
            xidx_row = xidx_ptr + tok64 * stride_xi_s
            for j in range(n_tiles):
                buf = g % NUM_BUF
                base, idx_tile, left, cap, psize, pbytes = _scope_of_tile(
                    j, n_main_tiles, cache_ptr, idx_row, n_keys, capacity, page_size, page_bytes,
                    xcache_ptr, xidx_row, n_xkeys, xcapacity, xpage_size, xpage_bytes)
                ids0 = gl.load(idx_tile + offs_n, mask=offs_n < left, other=-1)
                ids1 = gl.load(idx_tile + CHUNK + offs_n, mask=CHUNK + offs_n < left, other=-1)
                a = _load_chunk(ids0, offs_n, left, cap, base, psize, pbytes, l3)
                b = _load_chunk(ids1, CHUNK + offs_n, left, cap, base, psize, pbytes, l3)
                # Both MMA groups must be done with the tile that used this slot before.
                mbarrier.wait(k_free.index(buf), ((g // NUM_BUF) & 1) ^ 1, pred=g >= NUM_BUF)
                kb = k_smem.index(buf)
                vb = valid_smem.index(buf)
                _store_chunk(kb, vb, 0, a[0], a[1], a[2], a[3], l3)
                _store_chunk(kb, vb, 1, b[0], b[1], b[2], b[3], l3)
                # The tile must be visible to the MMAs' async proxy before it is published.
                fence_async_shared()
                gl.thread_barrier()
                mbarrier.arrive(k_ready.index(buf))
                g += 1

    @gluon.jit
    def load_sink(sink_ptr, offs_h, mask_h, HAS_SINK: gl.constexpr):
        """The sink logits of rows ``offs_h`` (what ``finish_rows`` takes; unused without a sink)."""
        if HAS_SINK:
            sink = gl.load(sink_ptr + offs_h, mask=mask_h, other=float("-inf"))
        else:
            sink = gl.full(offs_h.shape, float("-inf"), gl.float32, layout=offs_h.type.layout)
        return sink

    @gluon.jit
    def finish_rows(m_i, l_i, sink, HAS_SINK: gl.constexpr):
        """Epilogue of the online softmax (``m_i`` log2 units, ``l_i`` the row sums): (output
        scale, max_logits, lse), natural units, as the Triton kernels' ``store_attn_outputs``. A
        row with no valid key gets scale 0, max_logits -inf, lse +inf; a NaN score made ``l_i``
        NaN, and the row gets NaN in all three."""
        LN2: gl.constexpr = 0.6931471805599453
        # l_i is 0 exactly when no valid key was seen; a NaN l_i is not 0 and flows through.
        has_any = l_i != 0.0
        l_safe = gl.where(has_any, l_i, 1.0)
        lse = gl.where(has_any, (m_i + gl.log2(l_safe)) * LN2, float("inf"))
        max_logits = gl.where(has_any, m_i * LN2, float("-inf"))
        # max skips NaN on the GPU, so m_i can be finite in a NaN row: take the NaN from l_i.
        max_logits = gl.where(l_i == l_i, max_logits, l_i)
        scale = 1.0 / l_safe
        if HAS_SINK:
            # exp(lse) / (exp(lse) + exp(sink)) without overflow; sink -inf -> 1, +inf -> 0.
            scale = scale / (1.0 + gl.exp(sink - lse))
        # A row with no valid key writes 0 (its lse is +inf, so a +inf sink made scale NaN).
        return gl.where(has_any, scale, 0.0), max_logits, lse

    @gluon.jit
    def store_half(out_ptr, o, tok64, head0, h_q, stride_o_s, stride_o_h, D0: gl.constexpr,
                    o_l: gl.constexpr):
        """Write value dims ``D0 .. D0 + 255`` of the item's heads (bf16). The accumulator layout
        gives a thread 2 adjacent values per 8 columns (4-byte stores, half a sector each); each
        warp's 16 rows are first regrouped within the warp to 8 columns per thread (16-byte stores,
        full 32-byte sectors)."""
        st_l: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [4, 1], [1, 0])
        o = gl.convert_layout(o.to(gl.bfloat16), st_l)
        offs_h = head0 + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, st_l))
        offs_v = D0 + gl.arange(0, 256, layout=gl.SliceLayout(0, st_l))
        ptrs = out_ptr + tok64 * stride_o_s + offs_h[:, None].to(gl.int64) * stride_o_h + offs_v[None, :]
        gl.store(ptrs, o, mask=(offs_h < h_q)[:, None])

    @gluon.jit
    def _score_group(q_smem, k_smem, valid_smem, p_smem, alpha_smem, oscale_smem,
                     k_ready, k_free, p_ready, p_free, o_ready, o_free, qk_scale_log2,
                     q_ptr, stride_q_s, stride_q_h, out_ptr, stride_o_s, stride_o_h,
                     max_ptr, lse_ptr, sink_ptr, h_q,
                     topk, xtopk, topk_len_ptr, xtopk_len_ptr, stride_ml_s, n_items,
                     NUM_HEAD_BLOCKS: gl.constexpr, HAS_EXTRA: gl.constexpr, HAS_TOPK_LEN: gl.constexpr,
                     HAS_XTOPK_LEN: gl.constexpr, HAS_SINK: gl.constexpr):
        """``Q K^T``, the online softmax (base 2, as the Triton kernel), ``P V`` for value dims
        0..255, and the epilogue: max_logits, lse, and the output scale the value group reads."""
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_N, 16])
        o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16])
        rows_s: gl.constexpr = gl.SliceLayout(1, s_l)
        q_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        offs_qh = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, q_l))
        offs_qd = gl.arange(0, 512, layout=gl.SliceLayout(0, q_l))
        s0 = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=s_l)
        g = 0
        it = 0
        for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
            tok, head0, n_keys, n_xkeys, n_main_tiles, n_tiles = _work_item(
                item, topk, xtopk, topk_len_ptr, xtopk_len_ptr, NUM_HEAD_BLOCKS, HAS_EXTRA, HAS_TOPK_LEN, HAS_XTOPK_LEN)
            tok64 = tok.to(gl.int64)
            heads = head0 + offs_qh
            q_rows = q_ptr + tok64 * stride_q_s + heads[:, None].to(gl.int64) * stride_q_h
            # The previous item's last QK has completed (waited on), so Q can be replaced.
            async_copy.async_copy_global_to_shared(q_smem, q_rows + offs_qd[None, :], mask=(heads < h_q)[:, None])
            async_copy.commit_group()
            async_copy.wait_group(0)
            fence_async_shared()
            gl.thread_barrier()
            m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=rows_s)
            l_i = gl.zeros([BLOCK_H], gl.float32, layout=rows_s)
            acc = gl.zeros([BLOCK_H, 256], gl.float32, layout=o_l)
            for j in range(n_tiles):
                buf = g % NUM_BUF
                kb = k_smem.index(buf)
                mbarrier.wait(k_ready.index(buf), (g // NUM_BUF) & 1)
                s = warpgroup_mma(q_smem, kb.permute((1, 0)), s0, use_acc=False, is_async=True)
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
                # The value group must have read the previous P and alpha before they are replaced.
                mbarrier.wait(p_free, (g & 1) ^ 1, pred=g > 0)
                p_smem.store(p.to(gl.bfloat16))
                alpha_smem.store(alpha)
                fence_async_shared()
                gl.thread_barrier()
                mbarrier.arrive(p_ready)
                acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None]
                acc = warpgroup_mma(p_smem, kb.slice(0, 256, dim=1), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                gl.thread_barrier()
                mbarrier.arrive(k_free.index(buf))
                g += 1

            offs_h = head0 + gl.arange(0, BLOCK_H, layout=rows_s)
            mask_h = offs_h < h_q
            scale, max_logits, lse = finish_rows(m_i, l_i, load_sink(sink_ptr, offs_h, mask_h, HAS_SINK), HAS_SINK)
            # The value group must have read the last item's scale.
            mbarrier.wait(o_free, (it & 1) ^ 1, pred=it > 0)
            oscale_smem.store(scale)
            gl.thread_barrier()
            mbarrier.arrive(o_ready)
            gl.store(max_ptr + tok64 * stride_ml_s + offs_h, max_logits, mask=mask_h)
            gl.store(lse_ptr + tok64 * stride_ml_s + offs_h, lse, mask=mask_h)
            o_scale = gl.convert_layout(scale, gl.SliceLayout(1, o_l))
            store_half(out_ptr, acc * o_scale[:, None], tok64, head0, h_q, stride_o_s, stride_o_h, 0, o_l)
            it += 1

    @gluon.jit
    def _value_group(k_smem, p_smem, alpha_smem, oscale_smem, k_free, p_ready, p_free, o_ready, o_free,
                     out_ptr, h_q, topk, xtopk, topk_len_ptr, xtopk_len_ptr, stride_o_s, stride_o_h, n_items,
                     NUM_HEAD_BLOCKS: gl.constexpr, HAS_EXTRA: gl.constexpr,
                     HAS_TOPK_LEN: gl.constexpr, HAS_XTOPK_LEN: gl.constexpr):
        """``P V`` for value dims 256..511 and their share of the output."""
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
                acc = warpgroup_mma(p_smem, k_smem.index(buf).slice(256, 256, dim=1), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                gl.thread_barrier()
                mbarrier.arrive(p_free)
                mbarrier.arrive(k_free.index(buf))
                g += 1
            mbarrier.wait(o_ready, it & 1)
            scale = oscale_smem.load(gl.SliceLayout(1, o_l))
            gl.thread_barrier()
            mbarrier.arrive(o_free)
            store_half(out_ptr, acc * scale[:, None], tok.to(gl.int64), head0, h_q, stride_o_s, stride_o_h, 256, o_l)
            it += 1

    # Triton 3.6 fails to lower this kernel when a scalar argument is specialized to the constant
    # 1 (e.g. h_q 1, topk 1, an index row stride 1): keep those arguments runtime values.
    @gluon.jit(do_not_specialize=["h_q", "topk", "xtopk", "capacity", "xcapacity", "page_size", "xpage_size",
                                  "n_items", "stride_i_s", "stride_xi_s", "stride_ml_s"])
    def _paged_fp8_attn_ws_kernel(
        q_ptr, cache_ptr, idx_ptr, xcache_ptr, xidx_ptr,
        out_ptr, max_ptr, lse_ptr, sink_ptr, topk_len_ptr, xtopk_len_ptr,
        h_q, topk, xtopk, capacity, xcapacity, page_size, page_bytes, xpage_size, xpage_bytes,
        qk_scale_log2,
        stride_q_s, stride_q_h, stride_i_s, stride_xi_s, stride_o_s, stride_o_h, stride_ml_s, n_items,
        NUM_HEAD_BLOCKS: gl.constexpr, HAS_EXTRA: gl.constexpr, HAS_SINK: gl.constexpr,
        HAS_TOPK_LEN: gl.constexpr, HAS_XTOPK_LEN: gl.constexpr,
        VALUE_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    ):
        nvmma: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        q_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, 512], nvmma)
        k_smem = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUF, BLOCK_N, 512], nvmma)
        p_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, BLOCK_N], nvmma)
        valid_smem = gl.allocate_shared_memory(gl.int32, [NUM_BUF, BLOCK_N], flat)
        alpha_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_H], flat)
        oscale_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_H], flat)
        k_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        k_free = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        bars = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
        p_ready, p_free = bars.index(0), bars.index(1)
        o_ready, o_free = bars.index(2), bars.index(3)
        # A slot is freed by both MMA groups; every other barrier has one arrival.
        for i in gl.static_range(NUM_BUF):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(k_free.index(i), count=2)
        mbarrier.init(p_ready, count=1)
        mbarrier.init(p_free, count=1)
        mbarrier.init(o_ready, count=1)
        mbarrier.init(o_free, count=1)

        gl.warp_specialize([
            (_score_group, (q_smem, k_smem, valid_smem, p_smem, alpha_smem, oscale_smem,
                            k_ready, k_free, p_ready, p_free, o_ready, o_free, qk_scale_log2,
                            q_ptr, stride_q_s, stride_q_h, out_ptr, stride_o_s, stride_o_h,
                            max_ptr, lse_ptr, sink_ptr, h_q,
                            topk, xtopk, topk_len_ptr, xtopk_len_ptr, stride_ml_s, n_items,
                            NUM_HEAD_BLOCKS, HAS_EXTRA, HAS_TOPK_LEN, HAS_XTOPK_LEN, HAS_SINK)),
            (_value_group, (k_smem, p_smem, alpha_smem, oscale_smem, k_free, p_ready, p_free, o_ready, o_free,
                            out_ptr, h_q, topk, xtopk, topk_len_ptr, xtopk_len_ptr, stride_o_s, stride_o_h, n_items,
                            NUM_HEAD_BLOCKS, HAS_EXTRA, HAS_TOPK_LEN, HAS_XTOPK_LEN)),
            (_producer, (k_smem, valid_smem, k_ready, k_free, topk, xtopk, topk_len_ptr, xtopk_len_ptr, n_items,
                         cache_ptr, idx_ptr, stride_i_s, capacity, page_size, page_bytes,
                         xcache_ptr, xidx_ptr, stride_xi_s, xcapacity, xpage_size, xpage_bytes,
                         NUM_HEAD_BLOCKS, HAS_EXTRA, HAS_TOPK_LEN, HAS_XTOPK_LEN)),
        ], [4, 4], [VALUE_REGS, PRODUCER_REGS])


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
    """Launch on validated V4 inputs (see ``paged_fp8_sparse_attn_fwd``; ``unsupported_reason``
    must be None), ``s_q >= 1``. ``tuning`` overrides ``DEFAULT_TUNING`` (benchmarks compare
    register splits with it). Returns Triton's handle of the compiled kernel."""
    unknown = set(tuning) - set(DEFAULT_TUNING)
    if unknown:
        raise ValueError(f"unknown tuning keys {sorted(unknown)}; known: {sorted(DEFAULT_TUNING)}")
    s_q, h_q, _ = q.shape
    num_head_blocks = cdiv(h_q, BLOCK_H.value)
    n_items = s_q * num_head_blocks
    # Persistent: one CTA per SM (its shared memory admits no second one).
    grid = (min(n_items, torch.cuda.get_device_properties(q.device).multi_processor_count),)
    return _paged_fp8_attn_ws_kernel[grid](
        *launch_args(q, cache, indices, page_size, extra_cache, extra_indices, extra_page_size, topk_length,
                     extra_topk_length, sm_scale, attn_sink, out, max_logits, lse),
        n_items,
        NUM_HEAD_BLOCKS=num_head_blocks, HAS_EXTRA=extra_indices is not None, HAS_SINK=attn_sink is not None,
        HAS_TOPK_LEN=topk_length is not None, HAS_XTOPK_LEN=extra_topk_length is not None,
        num_warps=4, **{**DEFAULT_TUNING, **tuning},
    )
