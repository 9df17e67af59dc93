"""Model-level configuration of the DeepSeek-V4 attention backend."""

from __future__ import annotations

import math
from collections.abc import Mapping, Set
from dataclasses import dataclass, field

from sparse_prefill._utils import check_float32_scale, check_int
from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops.indices.plan import INT32_MAX, MAX_ROW_ENTRIES
from sparse_prefill.ops.sparse_attn import MAX_HEADS  # both paths' attention ops take 1..128 heads

COMPRESS_RATIOS = (1, 4, 128)
HEAD_DIM = KVCacheLayout.V4.dim  # 512: 448 fp8 nope + 64 bf16 rope, K and V share it


@dataclass(frozen=True)
class ModelConfig:
    """What the backend needs to know about a DeepSeek-V4 model (per GPU, after tensor parallelism).

    Args:
        num_heads: ``h_q``, query heads on this GPU, 1..128 (tensor parallelism leaves 8..128).
        compress_ratios: one compress ratio per attention layer, in layer order (a sequence:
            a mapping or a set is a TypeError), each 1 (SWA only), 4 (indexer top-k over
            compressed entries) or 128 (every complete compressed entry).
        topk: the ratio-4 indexer's top-k (512 or 1024 in DeepSeek-V4; any value in
            ``1 .. 2**24`` works).
        window_size: ``W``, sliding window of raw tokens every layer attends to (128 in V4),
            ``1 .. 2**24``.
        swa_page_size: tokens per page of the SWA caches, ``1 .. 2**31 - 1``.
        compressed_page_size: tokens per page of the compressed caches: one int for every ratio,
            or a mapping ``{ratio: page size}`` naming each ratio > 1 that ``compress_ratios`` uses.
        sm_scale: softmax scale applied to ``q @ k``, in ``[2**-126, 2**127]`` (a normal float32).
            ``None`` means ``1 / sqrt(512)``; a model whose attention scale differs (e.g. a YaRN
            mscale) must pass its own value.
        head_dim: ``d_qk = d_v``; only 512 (the V4 cache layout) is supported.

    Raises ValueError/TypeError naming the field when a value is out of range.
    """

    num_heads: int
    compress_ratios: tuple[int, ...]
    topk: int
    window_size: int = 128
    swa_page_size: int = 64
    # Normalised to a dict {ratio: page size} in __post_init__, hence left out of the hash.
    compressed_page_size: int | Mapping[int, int] = field(default=64, hash=False)
    sm_scale: float | None = None
    head_dim: int = HEAD_DIM
    layout: KVCacheLayout = field(default=KVCacheLayout.V4, init=False)

    def __post_init__(self) -> None:
        check_int("num_heads", self.num_heads, lo=1, hi=MAX_HEADS)
        check_int("topk", self.topk, lo=1, hi=MAX_ROW_ENTRIES)
        check_int("window_size", self.window_size, lo=1, hi=MAX_ROW_ENTRIES)
        check_int("swa_page_size", self.swa_page_size, lo=1, hi=INT32_MAX)
        check_int("head_dim", self.head_dim)
        if self.head_dim != HEAD_DIM:
            raise ValueError(f"head_dim must be {HEAD_DIM} (the V4 cache layout), got {self.head_dim}")
        # A mapping or a set would iterate its keys (in no layer order): one ratio per layer, in order.
        if isinstance(self.compress_ratios, (str, bytes, Mapping, Set)) or not hasattr(self.compress_ratios, "__iter__"):
            raise TypeError(f"compress_ratios must be a sequence of ints, got {type(self.compress_ratios).__name__}")
        ratios = tuple(self.compress_ratios)
        if not ratios:
            raise ValueError("compress_ratios must name at least one layer")
        for i, r in enumerate(ratios):
            check_int(f"compress_ratios[{i}]", r)
            if r not in COMPRESS_RATIOS:
                raise ValueError(f"compress_ratios[{i}] must be one of {COMPRESS_RATIOS}, got {r}")
        object.__setattr__(self, "compress_ratios", ratios)

        used = sorted({r for r in ratios if r > 1})
        cps = self.compressed_page_size
        if isinstance(cps, Mapping):
            pages = {}
            for r in used:
                if r not in cps:
                    raise ValueError(f"compressed_page_size must give a page size for ratio {r}, got {dict(cps)}")
                pages[r] = check_int(f"compressed_page_size[{r}]", cps[r], lo=1, hi=INT32_MAX)
            for r in cps:
                if r not in used:
                    raise ValueError(
                        f"compressed_page_size names ratio {r!r}, which no layer uses (ratios {tuple(used)})"
                    )
        else:
            check_int("compressed_page_size", cps, lo=1, hi=INT32_MAX)
            pages = {r: cps for r in used}
        object.__setattr__(self, "compressed_page_size", pages)

        if self.sm_scale is None:
            object.__setattr__(self, "sm_scale", 1.0 / math.sqrt(self.head_dim))
        sm_scale = check_float32_scale("sm_scale", self.sm_scale)
        if not sm_scale > 0:
            raise ValueError(f"sm_scale must be > 0, got {self.sm_scale}")
        object.__setattr__(self, "sm_scale", sm_scale)

    @property
    def num_layers(self) -> int:
        """Attention layers in the stack (``len(compress_ratios)``)."""
        return len(self.compress_ratios)

    @property
    def compressed_ratios(self) -> tuple[int, ...]:
        """The ratios > 1 that some layer uses, ascending (the compressed caches a batch needs)."""
        return tuple(sorted(self.compressed_page_size))

    def ratio_of(self, layer: int) -> int:
        """Compress ratio of ``layer`` (ValueError when out of range)."""
        check_int("layer", layer, lo=0, hi=self.num_layers - 1)
        return self.compress_ratios[layer]

    def page_size_of(self, ratio: int) -> int:
        """Page size of the compressed cache of ``ratio`` (> 1)."""
        if ratio not in self.compressed_page_size:
            raise ValueError(f"no layer uses compress ratio {ratio}; ratios in use: {self.compressed_ratios}")
        return self.compressed_page_size[ratio]
