"""Triton device helpers that read the FP8 paged KV cache layouts (``sparse_prefill.layout``).

Shared by the dequantize-gather kernel (``kernels.py``) and the fused FP8 attention kernel, so
the layout is spelled out once on the device side. ``cache_ptr`` is always the uint8 base
pointer of a ``[num_pages, page_bytes]`` cache; all byte offsets are int64, so caches larger
than 2**31 bytes work.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops.cache.naive import scale_bytes_per_token

_V4, _V32 = KVCacheLayout.V4, KVCacheLayout.V32
V4_DATA_BYTES = tl.constexpr(_V4.data_bytes)
V4_SCALE_BYTES = tl.constexpr(scale_bytes_per_token(_V4))
V4_NOPE = tl.constexpr(_V4.nope_dim)
V4_TILE = tl.constexpr(_V4.tile_size)
V4_ROPE_OFFSET = tl.constexpr(_V4.rope_offset)
V32_DATA_BYTES = tl.constexpr(_V32.data_bytes)
V32_NOPE = tl.constexpr(_V32.nope_dim)
V32_TILE = tl.constexpr(_V32.tile_size)
V32_ROPE_OFFSET = tl.constexpr(_V32.rope_offset)
V32_SCALE_OFFSET = tl.constexpr(_V32.scale_offset)


@triton.jit
def bf16_to_f32(x):
    """bf16 -> float32 through the bits: exact, where Triton's interpreter mangles subnormals."""
    return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def f32_to_bf16_exact(x):
    """float32 -> bf16 by dropping the low 16 bits: exact for values representable in bf16 (all
    that ``load_kv_dims`` returns from a cache ``store_k_cache`` wrote, whose scales are
    ``>= 2**-13``), where the interpreter's cast mangles bf16 subnormals."""
    return (x.to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def token_offsets(token_ids, PAGE_SIZE, PAGE_BYTES, IS_V4: tl.constexpr):
    """int64 byte offsets ``(data_off, scale_off)`` of each token's data bytes and scale bytes.

    ``token_ids``: [N] block of non-negative ids (masked-off lanes may hold anything; their
    offsets are meaningless), int32 or int64: the page division runs in that dtype (int32
    division is several times cheaper than int64's), the byte offsets in int64.
    ``PAGE_SIZE`` / ``PAGE_BYTES``: runtime ints or constexprs.
    V4: ``page * PAGE_BYTES + slot * 576`` and ``page * PAGE_BYTES + PAGE_SIZE * 576 + slot * 8``;
    V3.2: ``page * PAGE_BYTES + slot * 656`` and that ``+ 512``.
    """
    page = token_ids // PAGE_SIZE
    slot = (token_ids - page * PAGE_SIZE).to(tl.int64)
    page = page.to(tl.int64)
    if IS_V4:
        data_off = page * PAGE_BYTES + slot * V4_DATA_BYTES
        # (PAGE_SIZE - slot) is int64, so the scale section start cannot overflow int32.
        scale_off = data_off + (PAGE_SIZE - slot) * V4_DATA_BYTES + slot * V4_SCALE_BYTES
    else:
        data_off = page * PAGE_BYTES + slot * V32_DATA_BYTES
        scale_off = data_off + V32_SCALE_OFFSET
    return data_off, scale_off


@triton.jit
def load_kv_dims(cache_ptr, data_off, scale_off, mask, D0: tl.constexpr, D: tl.constexpr,
                 IS_V4: tl.constexpr):
    """[N, D] float32: dims ``D0 .. D0+D-1`` of N tokens, dequantized exactly
    (``float32(fp8) * 2**k`` for nope dims, the bf16 value for rope dims); 0 where ``mask`` [N]
    is False.

    ``data_off`` / ``scale_off``: [N] int64 from ``token_offsets``. ``D0`` / ``D``: constexprs,
    ``D`` a power of two and ``D0`` a multiple of ``min(D, tile)`` (e.g. 0/512 or 512/64).
    """
    if IS_V4:
        NOPE: tl.constexpr = V4_NOPE
        TILE: tl.constexpr = V4_TILE
        NUM_TILES: tl.constexpr = V4_NOPE // V4_TILE
        ROPE_OFFSET: tl.constexpr = V4_ROPE_OFFSET
    else:
        NOPE: tl.constexpr = V32_NOPE
        TILE: tl.constexpr = V32_TILE
        NUM_TILES: tl.constexpr = V32_NOPE // V32_TILE
        ROPE_OFFSET: tl.constexpr = V32_ROPE_OFFSET
    N: tl.constexpr = data_off.shape[0]
    # One scale per (token, tile), broadcast over the tile's dims: per-dim scale loads would
    # cost one load instruction per element.
    NT: tl.constexpr = D // TILE if D >= TILE else 1
    dims = D0 + tl.arange(0, D)
    tiles = D0 // TILE + tl.arange(0, NT)
    mask_scale = mask[:, None] & (tiles < NUM_TILES)[None, :]
    if IS_V4:
        # ue8m0 byte b is the float32 exponent field of 2**(b - 127).
        ue8m0 = tl.load(cache_ptr + scale_off[:, None] + tiles[None, :], mask=mask_scale, other=0)
        scale = (ue8m0.to(tl.int32) << 23).to(tl.float32, bitcast=True)
    else:
        # Loaded as int32 bits: with a float `other` ptxas keeps one load per element instead of
        # one per (token, tile).
        scale_ptr = (cache_ptr + scale_off[:, None]).to(tl.pointer_type(tl.int32))
        scale = tl.load(scale_ptr + tiles[None, :], mask=mask_scale, other=0).to(tl.float32, bitcast=True)
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (N, NT, D // NT)), (N, D))

    is_nope = dims < NOPE
    fp8 = tl.load(cache_ptr + data_off[:, None] + dims[None, :], mask=mask[:, None] & is_nope[None, :], other=0)
    fp8 = fp8.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    rope_ptr = (cache_ptr + data_off[:, None] + ROPE_OFFSET).to(tl.pointer_type(tl.bfloat16))
    rope = tl.load(rope_ptr + (dims - NOPE)[None, :], mask=mask[:, None] & (dims >= NOPE)[None, :], other=0.0)
    return tl.where(is_nope[None, :], fp8 * scale, bf16_to_f32(rope))
