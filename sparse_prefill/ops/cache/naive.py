"""PyTorch references of the FP8 paged KV cache ops: the definition of truth.

Quantization of one token (``x``: its ``d`` bf16 values), per scale tile of ``layout.tile_size``
nope dims (V4: 7 tiles of 64, V3.2: 4 tiles of 128):

- ``amax = max |x|`` over the tile (exact in float32).
- ``k`` = the smallest integer with ``amax <= 448 * 2**k``, at least -13; the scale is ``2**k``.
  This is DESIGN.md's ``2**ceil(log2(max(amax / 448, 1e-4)))`` computed without rounding
  error, from the float32 bits of ``amax`` (see ``scale_exponents``).
- ``fp8 = float8_e4m3fn(x * 2**-k)``, round to nearest even. The scaling is exact and
  ``|x * 2**-k| <= 448`` by construction, so saturation never happens for finite inputs.
  NaN and +-inf inputs are unsupported: what they store is unspecified.
- V4 stores ``k + 127`` as a ue8m0 byte (plus one zero pad byte per token); V3.2 stores the
  float32 ``2**k``. RoPE dims are stored as their bf16 bytes, unchanged.

Dequantization: ``bf16(float32(fp8) * 2**k)``, exact (a 4-bit significand times a power of two),
except that fp8 448 times the largest scales exceeds float32: bf16 inputs above about 3.3e38
can come back as inf. RoPE dims come back bit for bit.
"""

from __future__ import annotations

import torch

from sparse_prefill.layout import FP8_MAX, MIN_SCALE_EXP, UE8M0_BIAS, KVCacheLayout

# float32 fields: the exponent of FP8_MAX = 1.75 * 2**8 and its mantissa bits (1.75 -> 0x600000).
FP8_MAX_EXP = 8
FP8_MAX_MANTISSA = 0x600000
assert FP8_MAX == (1 + FP8_MAX_MANTISSA / 2**23) * 2**FP8_MAX_EXP


def scale_bytes_per_token(layout: KVCacheLayout) -> int:
    """Bytes one token has in its page's scale section: 8 for V4 (7 ue8m0 + 1 pad), 0 for V3.2
    (whose scales sit inside the token's data bytes)."""
    return layout.bytes_per_token - layout.data_bytes


def pow2(k: torch.Tensor) -> torch.Tensor:
    """float32 ``2**k`` for int32 ``k`` in [-126, 127], built from its bits (exact)."""
    return ((k + 127) << 23).view(torch.float32)


def scale_exponents(amax: torch.Tensor) -> torch.Tensor:
    """int32 ``k``: the smallest integer with ``amax <= 448 * 2**k``, clamped to ``k >= -13``.

    With ``amax = m * 2**E`` (``m`` in [1, 2)), ``448 = 1.75 * 2**8`` gives ``k = E - 8`` when
    ``m <= 1.75`` and ``E - 7`` otherwise; both are read off the float32 bits. Zero and
    subnormal ``amax`` are far below ``448 * 2**-13`` and take the clamp.

    Args:
        amax: float32, any shape, finite and ``>= 0``.
    """
    bits = amax.view(torch.int32)
    biased_exp = (bits >> 23) & 0xFF
    k = biased_exp - 127 - FP8_MAX_EXP + ((bits & 0x7FFFFF) > FP8_MAX_MANTISSA).to(torch.int32)
    k = torch.where(biased_exp == 0, MIN_SCALE_EXP, k)
    return k.clamp(min=MIN_SCALE_EXP)


def quantize_tokens(k: torch.Tensor, layout: KVCacheLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of ``n`` quantized tokens.

    Args:
        k: [n, layout.dim], bfloat16.

    Returns:
        (data [n, layout.data_bytes] uint8, the token's contiguous bytes (V3.2: scales included);
        scales [n, scale_bytes_per_token(layout)] uint8, its bytes in the page's scale section).
    """
    n = k.shape[0]
    nope = k[:, : layout.nope_dim].float().reshape(n, layout.num_tiles, layout.tile_size)
    exps = scale_exponents(nope.abs().amax(dim=-1))
    fp8 = (nope * pow2(-exps)[..., None]).to(torch.float8_e4m3fn)
    fp8_bytes = fp8.view(torch.uint8).reshape(n, layout.nope_dim)
    rope_bytes = k[:, layout.nope_dim :].contiguous().view(torch.uint8)
    if layout is KVCacheLayout.V4:
        ue8m0 = (exps + UE8M0_BIAS).to(torch.uint8)
        pad = torch.zeros(n, 1, dtype=torch.uint8, device=k.device)
        return torch.cat([fp8_bytes, rope_bytes], dim=1), torch.cat([ue8m0, pad], dim=1)
    scale_bytes = pow2(exps).view(torch.uint8)
    empty = torch.empty(n, 0, dtype=torch.uint8, device=k.device)
    return torch.cat([fp8_bytes, scale_bytes, rope_bytes], dim=1), empty


def dequantize_tokens(data: torch.Tensor, scales: torch.Tensor, layout: KVCacheLayout) -> torch.Tensor:
    """Inverse of ``quantize_tokens``: [n, layout.dim] bfloat16.

    A V4 ue8m0 byte ``b`` is read as the float32 with bits ``b << 23`` (``2**(b - 127)`` for the
    bytes 1..254 that quantization writes).
    """
    n = data.shape[0]
    fp8 = data[:, : layout.nope_dim].contiguous().view(torch.float8_e4m3fn).float()
    if layout is KVCacheLayout.V4:
        scale = (scales[:, : layout.num_tiles].to(torch.int32) << 23).view(torch.float32)
    else:
        lo = layout.scale_offset
        scale = data[:, lo : lo + 4 * layout.num_tiles].contiguous().view(torch.float32)
    nope = fp8.reshape(n, layout.num_tiles, layout.tile_size) * scale[..., None]
    rope_lo = layout.rope_offset
    rope = data[:, rope_lo : rope_lo + 2 * layout.rope_dim].contiguous().view(torch.bfloat16)
    return torch.cat([nope.reshape(n, layout.nope_dim).to(torch.bfloat16), rope], dim=1)


def token_byte_offsets(
    token_ids: torch.Tensor, page_size: int, layout: KVCacheLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 byte offsets, in the flattened cache, of each token's data bytes and scale bytes."""
    ids = token_ids.long()
    page, slot = ids // page_size, ids % page_size
    page_start = page * layout.page_bytes(page_size)
    data_off = page_start + slot * layout.data_bytes
    if layout is KVCacheLayout.V4:
        scale_off = page_start + page_size * layout.data_bytes + slot * scale_bytes_per_token(layout)
    else:
        scale_off = data_off + layout.scale_offset
    return data_off, scale_off


def _byte_index(offsets: torch.Tensor, width: int) -> torch.Tensor:
    return offsets[:, None] + torch.arange(width, device=offsets.device)


def store_k_cache_ref(
    cache: torch.Tensor, k: torch.Tensor, slot_ids: torch.Tensor, page_size: int, layout: KVCacheLayout
) -> None:
    """Quantize ``k`` [n, d] and write token ``i`` at slot ``slot_ids[i]`` of ``cache`` in place;
    negative slots are skipped. Inputs are validated by the caller."""
    keep = slot_ids >= 0
    data, scales = quantize_tokens(k[keep], layout)
    data_off, scale_off = token_byte_offsets(slot_ids[keep], page_size, layout)
    flat = cache.view(-1)
    flat[_byte_index(data_off, data.shape[1])] = data
    flat[_byte_index(scale_off, scales.shape[1])] = scales


def dequantize_k_cache_paged_ref(
    cache: torch.Tensor, token_ids: torch.Tensor, page_size: int, layout: KVCacheLayout
) -> torch.Tensor:
    """[n, layout.dim] bfloat16: token ``token_ids[i]`` dequantized, zeros for a negative id.
    Inputs are validated by the caller."""
    out = torch.zeros(token_ids.shape[0], layout.dim, dtype=torch.bfloat16, device=cache.device)
    keep = token_ids >= 0
    data_off, scale_off = token_byte_offsets(token_ids[keep], page_size, layout)
    flat = cache.view(-1)
    data = flat[_byte_index(data_off, layout.data_bytes)]
    scales = flat[_byte_index(scale_off, scale_bytes_per_token(layout))]
    out[keep] = dequantize_tokens(data, scales, layout)
    return out
