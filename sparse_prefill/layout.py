"""Byte layouts of the paged FP8 KV caches (DeepSeek-V4 "MODEL1" and V3.2).

A cache is a ``[num_pages, page_bytes]`` uint8 tensor; token id ``t`` lives in page
``t // page_size`` at offset ``t % page_size``.

V4, per page of ``P`` tokens::

    [ token 0..P-1: 448 x float8_e4m3fn (nope) | 64 x bfloat16 (rope) ]   P * 576 bytes
    [ token 0..P-1: 7 x ue8m0 scale | 1 pad byte ]                        P * 8 bytes
    [ zero padding up to a multiple of 576 bytes ]

V3.2, per token (no page-level split, page = P * 656 bytes)::

    [ 512 x float8_e4m3fn | 4 x float32 scale | 64 x bfloat16 (rope) ]   656 bytes

Scale tile ``i`` covers nope dims ``tile*i .. tile*(i+1)-1``; a scale is a power of two
(ue8m0 stores the bare exponent byte, value ``2**(byte - 127)``).
"""

from __future__ import annotations

import enum

import torch

from sparse_prefill._utils import cdiv

ROPE_DIM = 64
FP8_MAX = 448.0
# Scales are clamped to at least 2**MIN_SCALE_EXP, the power of two just above 1e-4.
MIN_SCALE_EXP = -13
UE8M0_BIAS = 127


class KVCacheLayout(enum.Enum):
    """The two FP8 paged KV cache layouts; each member knows its dims and byte offsets."""

    V4 = "v4"
    V32 = "v32"

    @property
    def nope_dim(self) -> int:
        """FP8-quantized dims per token (448 for V4, 512 for V3.2)."""
        return 448 if self is KVCacheLayout.V4 else 512

    @property
    def rope_dim(self) -> int:
        """bf16 dims stored unchanged after the nope dims (64)."""
        return ROPE_DIM

    @property
    def dim(self) -> int:
        """Head dim ``d`` of a dequantized token (512 for V4, 576 for V3.2)."""
        return self.nope_dim + ROPE_DIM

    @property
    def tile_size(self) -> int:
        """Nope dims sharing one scale (64 for V4, 128 for V3.2)."""
        return 64 if self is KVCacheLayout.V4 else 128

    @property
    def num_tiles(self) -> int:
        """Scales per token (7 for V4, 4 for V3.2)."""
        return self.nope_dim // self.tile_size

    @property
    def data_bytes(self) -> int:
        """Contiguous bytes of one token's fp8 nope + bf16 rope (+ scales for V3.2)."""
        return 576 if self is KVCacheLayout.V4 else 656

    @property
    def rope_offset(self) -> int:
        """Byte offset of the rope dims inside a token's data bytes."""
        return 448 if self is KVCacheLayout.V4 else 528

    @property
    def scale_offset(self) -> int:
        """V4: bytes per token in the page's scale section (7 scales + 1 pad).
        V3.2: byte offset of the float32 scales inside a token's data bytes."""
        return 8 if self is KVCacheLayout.V4 else 512

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies before page padding (584 for V4, 656 for V3.2)."""
        return 584 if self is KVCacheLayout.V4 else 656

    def page_bytes(self, page_size: int) -> int:
        """Bytes of one page of ``page_size`` tokens (V4 pads to a multiple of 576)."""
        if self is KVCacheLayout.V4:
            return cdiv(page_size * self.bytes_per_token, 576) * 576
        return page_size * self.bytes_per_token

    def page_size_of(self, cache: torch.Tensor) -> list[int]:
        """The page sizes whose page bytes equal ``cache.shape[-1]`` (for error messages)."""
        nbytes = cache.shape[-1]
        return [p for p in range(1, nbytes // self.bytes_per_token + 1) if self.page_bytes(p) == nbytes]
