"""Triton kernels of the FP8 paged KV cache ops: store (quantize + scatter) and dequantize-gather.

Both are memory bound: each program handles ``BLOCK_T`` tokens with 16-byte accesses along the
contiguous dims, all byte offsets are int64, and the 1-D grid (``cdiv(n, BLOCK_T)`` programs)
has no practical limit. The quantization is bit-exact with ``naive.py`` (its docstring defines
it); the dequantize kernel reads the cache only through ``tiles.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_prefill._utils import INTERPRET, cdiv
from sparse_prefill.layout import MIN_SCALE_EXP, UE8M0_BIAS, KVCacheLayout
from sparse_prefill.ops.cache.naive import FP8_MAX_EXP, FP8_MAX_MANTISSA
from sparse_prefill.ops.cache.tiles import (
    V4_SCALE_BYTES,
    bf16_to_f32,
    f32_to_bf16_exact,
    load_kv_dims,
    token_offsets,
)

_MIN_SCALE_EXP = tl.constexpr(MIN_SCALE_EXP)
_UE8M0_BIAS = tl.constexpr(UE8M0_BIAS)
_FP8_MAX_EXP = tl.constexpr(FP8_MAX_EXP)
_FP8_MAX_MANTISSA = tl.constexpr(FP8_MAX_MANTISSA)


@triton.jit
def _scale_exponents(amax):
    """int32 k, the smallest integer with amax <= 448 * 2**k, >= -13 (as naive.scale_exponents)."""
    bits = amax.to(tl.int32, bitcast=True)
    biased_exp = (bits >> 23) & 0xFF
    k = biased_exp - 127 - _FP8_MAX_EXP + ((bits & 0x7FFFFF) > _FP8_MAX_MANTISSA).to(tl.int32)
    k = tl.where(biased_exp == 0, _MIN_SCALE_EXP, k)
    return tl.maximum(k, _MIN_SCALE_EXP)


@triton.jit
def _round_to_fp8_grid(y):
    """Round float32 ``y`` (``|y| <= 448``) to the nearest e4m3 value, ties to even.

    Only used under the interpreter, whose float32 -> fp8 cast rounds half away from zero and
    drops the mantissa carry but converts exactly representable values right. On the GPU the
    cast itself rounds to nearest even (``cvt.rn.satfinite.e4m3x2.f32``).
    Adding ``c = 1.5 * 2**(q + 23)`` leaves ``2**q`` as the float32 ulp, so ``(|y| + c) - c`` is
    ``|y|`` rounded (nearest even) to a multiple of ``2**q``, the e4m3 spacing at ``|y|``
    (``q = max(exp(y), -6) - 3``; -6 is the smallest normal e4m3 exponent).
    """
    bits = y.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127
    q = tl.maximum(exp, -6) - 3
    c = (((q + 150) << 23) | (1 << 22)).to(tl.float32, bitcast=True)
    rounded = (tl.abs(y) + c) - c
    sign = (bits >> 31) << 31  # keeps -0.0 and tiny negatives negative
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _store_kernel(
    cache_ptr, k_ptr, slot_ptr, n, stride_k, PAGE_SIZE, PAGE_BYTES,
    IS_V4: tl.constexpr, NOPE: tl.constexpr, TILE: tl.constexpr, NUM_TILES: tl.constexpr,
    TILES_P2: tl.constexpr, ROPE: tl.constexpr, ROPE_OFFSET: tl.constexpr,
    BLOCK_T: tl.constexpr, SNAP_TO_GRID: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    slots = tl.load(slot_ptr + rows, mask=rows < n, other=-1).to(tl.int64)
    valid = slots >= 0
    data_off, scale_off = token_offsets(tl.where(valid, slots, 0), PAGE_SIZE, PAGE_BYTES, IS_V4)
    k_rows = k_ptr + rows * stride_k

    # Nope dims as [token, tile, dim-in-tile]; TILES_P2 pads the tile count to a power of two.
    tile = tl.arange(0, TILES_P2)
    tile_ok = tile < NUM_TILES
    dims = tile[None, :, None] * TILE + tl.arange(0, TILE)[None, None, :]
    mask = valid[:, None, None] & tile_ok[None, :, None]
    x = bf16_to_f32(tl.load(k_rows[:, None, None] + dims, mask=mask, other=0.0))
    exps = _scale_exponents(tl.max(tl.abs(x), axis=2))
    inv_scale = ((127 - exps) << 23).to(tl.float32, bitcast=True)  # 2**-k from float32 bits
    y = x * inv_scale[:, :, None]
    if SNAP_TO_GRID:
        y = _round_to_fp8_grid(y)
    fp8 = y.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
    tl.store(cache_ptr + data_off[:, None, None] + dims, fp8, mask=mask)

    if IS_V4:
        # One 8-byte store per token: 7 ue8m0 bytes and the zero pad byte.
        tl.static_assert(TILES_P2 == V4_SCALE_BYTES)
        ue8m0 = tl.where(tile_ok[None, :], exps + _UE8M0_BIAS, 0).to(tl.uint8)
        tl.store(cache_ptr + scale_off[:, None] + tile[None, :], ue8m0, mask=valid[:, None])
    else:
        scale = ((exps + 127) << 23).to(tl.float32, bitcast=True)
        scale_ptr = (cache_ptr + scale_off[:, None]).to(tl.pointer_type(tl.float32))
        tl.store(scale_ptr + tile[None, :], scale, mask=valid[:, None] & tile_ok[None, :])

    rope_dims = tl.arange(0, ROPE)
    rope = tl.load(k_rows[:, None] + NOPE + rope_dims[None, :], mask=valid[:, None])
    rope_ptr = (cache_ptr + data_off[:, None] + ROPE_OFFSET).to(tl.pointer_type(tl.bfloat16))
    tl.store(rope_ptr + rope_dims[None, :], rope, mask=valid[:, None])


@triton.jit
def _gather_dims(cache_ptr, data_off, scale_off, valid, out_rows, in_range, D0: tl.constexpr,
                 D: tl.constexpr, IS_V4: tl.constexpr):
    x = load_kv_dims(cache_ptr, data_off, scale_off, valid, D0, D, IS_V4)
    dims = D0 + tl.arange(0, D)
    tl.store(out_rows[:, None] + dims[None, :], f32_to_bf16_exact(x), mask=in_range[:, None])


@triton.jit
def _dequantize_gather_kernel(
    cache_ptr, ids_ptr, out_ptr, n, stride_out, PAGE_SIZE, PAGE_BYTES,
    IS_V4: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = rows < n
    ids = tl.load(ids_ptr + rows, mask=in_range, other=-1).to(tl.int64)
    valid = ids >= 0
    data_off, scale_off = token_offsets(tl.where(valid, ids, 0), PAGE_SIZE, PAGE_BYTES, IS_V4)
    out_rows = out_ptr + rows * stride_out
    # Dims in chunks of BLOCK_D (a power of two dividing D_MAIN), then the V3.2 tail.
    for d0 in tl.static_range(0, D_MAIN, BLOCK_D):
        _gather_dims(cache_ptr, data_off, scale_off, valid, out_rows, in_range, d0, BLOCK_D, IS_V4)
    if D_TAIL > 0:
        _gather_dims(cache_ptr, data_off, scale_off, valid, out_rows, in_range, D_MAIN, D_TAIL, IS_V4)


# Launch configurations for the GPU. Under the interpreter every program and every block op
# costs Python time, so there it runs few large blocks (tests pass these GPU values explicitly
# to cover the chunked code path too).
STORE_DEFAULTS = {"BLOCK_T": 16, "num_warps": 4}
# Measured on the H100 (benchmarks/data/cache_sweep.md): all 512 dims of a token in one block
# issue every load before any store, 90% of copy bandwidth against 74% with 64-dim chunks.
GATHER_DEFAULTS = {"BLOCK_T": 8, "BLOCK_D": 512, "num_warps": 4}
_INTERPRETER_CONFIG = {"BLOCK_T": 128, "BLOCK_D": 512}


def _pick_config(defaults: dict[str, int], tuning: dict[str, int]) -> dict[str, int]:
    """``defaults`` (interpreter-sized blocks under the interpreter), overridden by ``tuning``."""
    unknown = set(tuning) - set(defaults)
    if unknown:
        raise ValueError(f"unknown tuning keys {sorted(unknown)}; known: {sorted(defaults)}")
    cfg = dict(defaults)
    if INTERPRET:
        cfg.update({key: value for key, value in _INTERPRETER_CONFIG.items() if key in cfg})
    return cfg | tuning


def store_k_cache_triton(
    cache: torch.Tensor,
    k: torch.Tensor,
    slot_ids: torch.Tensor,
    page_size: int,
    layout: KVCacheLayout,
    **tuning: int,
) -> None:
    """Launch on validated inputs: cache [num_pages, page_bytes] uint8 contiguous, k [n, d] bf16
    with unit stride in d, slot_ids [n] int32/int64 contiguous. ``tuning`` overrides
    ``STORE_DEFAULTS`` (benchmarks compare variants with it)."""
    n = k.shape[0]
    if n == 0:
        return
    cfg = _pick_config(STORE_DEFAULTS, tuning)
    grid = (cdiv(n, cfg["BLOCK_T"]),)
    _store_kernel[grid](
        cache, k, slot_ids, n, k.stride(0), page_size, cache.shape[1],
        IS_V4=layout is KVCacheLayout.V4, NOPE=layout.nope_dim, TILE=layout.tile_size,
        NUM_TILES=layout.num_tiles, TILES_P2=triton.next_power_of_2(layout.num_tiles),
        ROPE=layout.rope_dim, ROPE_OFFSET=layout.rope_offset,
        BLOCK_T=cfg["BLOCK_T"], SNAP_TO_GRID=INTERPRET, num_warps=cfg["num_warps"],
    )


def dequantize_k_cache_paged_triton(
    cache: torch.Tensor,
    token_ids: torch.Tensor,
    page_size: int,
    layout: KVCacheLayout,
    out: torch.Tensor,
    **tuning: int,
) -> None:
    """Launch on validated inputs: token_ids [n] int32/int64 contiguous, out [n, d] bf16 with unit
    stride in d (any row stride). ``tuning`` overrides ``GATHER_DEFAULTS``."""
    n = token_ids.shape[0]
    if n == 0:
        return
    cfg = _pick_config(GATHER_DEFAULTS, tuning)
    grid = (cdiv(n, cfg["BLOCK_T"]),)
    d_main = triton.next_power_of_2(layout.dim + 1) // 2  # largest power of two <= dim
    _dequantize_gather_kernel[grid](
        cache, token_ids, out, n, out.stride(0), page_size, cache.shape[1],
        IS_V4=layout is KVCacheLayout.V4, D_MAIN=d_main, D_TAIL=layout.dim - d_main,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )

