"""Model-level configuration of the DeepSeek-V4 attention backend."""

from __future__ import annotations

import math
from collections.abc import Mapping, Set
from dataclasses import dataclass, field

from sparse_prefill._utils import check_float32_scale, check_int
from sparse_prefill.backend.hf_config import hf_config_fields
from sparse_prefill.backend.layer_kinds import LayerKind, resolve_ratio_kinds
from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops.indices.plan import INT32_MAX, MAX_ROW_ENTRIES
from sparse_prefill.ops.sparse_attn import MAX_HEADS  # both paths' attention ops take 1..128 heads

HEAD_DIM = KVCacheLayout.V4.dim  # 512: 448 fp8 nope + 64 bf16 rope, K and V share it
# SGLang pages every pool by 256 tokens: SWA pages of 256 tokens, ratio-r pages of 256 / r entries.
POOL_PAGE_TOKENS = 256


def default_compressed_page_sizes(ratios: tuple[int, ...]) -> dict[int, int]:
    """``{ratio: 256 // ratio}`` for the compressed ratios of ``ratios`` (SGLang's pages); raises
    ValueError naming the layer for a ratio that does not divide 256."""
    pages = {}
    for i, r in enumerate(ratios):
        if r == 0 or r in pages:
            continue
        if POOL_PAGE_TOKENS % r:
            raise ValueError(
                f"compress_ratios[{i}] = {r}: no default compressed page size (256 / {r} is not an "
                "integer); pass compressed_page_size"
            )
        pages[r] = POOL_PAGE_TOKENS // r
    return pages


@dataclass(frozen=True)
class ModelConfig:
    """What the backend needs to know about a DeepSeek-V4 model (per GPU, after tensor parallelism).

    Args:
        num_heads: ``h_q``, query heads on this GPU, 1..128 (tensor parallelism leaves 8..128).
        compress_ratios: one compress ratio per attention layer, SGLang's ``compress_ratios``
            verbatim (a sequence: a mapping or a set is a TypeError): 0 (SWA only), 1, 2, 4
            (window + the indexer's top-k compressed entries; 1 and 2 are DeepSeek-V4.1's) or 128
            (window + every complete compressed entry); see ``layer_kinds.py``. A list with 1 and
            no 0 (this library's old convention, where 1 meant SWA only) is rejected unless
            ``ratio_kinds`` names ratio 1.
        topk: the indexer's top-k of every top-k layer (``index_topk``: 512 or 1024 in
            DeepSeek-V4; any value in ``1 .. 2**24`` works).
        window_size: ``W``, sliding window of raw tokens every layer attends to (128 in V4),
            ``1 .. 2**24``.
        swa_page_size: tokens per page of the SWA caches (SGLang: 256), ``1 .. 2**31 - 1``.
        compressed_page_size: entries per page of the compressed caches: None for SGLang's
            ``256 / ratio`` (64 for ratio 4, 2 for 128, 128 for 2, 256 for 1), one int for every
            ratio, or a mapping ``{ratio: page size}`` naming each ratio > 0 that
            ``compress_ratios`` uses.
        sm_scale: softmax scale applied to ``q @ k``, in ``[2**-126, 2**127]`` (a normal float32).
            ``None`` means ``1 / sqrt(512)``; a model whose attention scale differs (e.g. a YaRN
            mscale) must pass its own value.
        head_dim: ``d_qk = d_v``; only 512 (the V4 cache layout) is supported.
        ratio_kinds: ``{ratio: "topk" | "dense"}`` adding to or replacing
            ``layer_kinds.DEFAULT_RATIO_KINDS``; normalised to ``{ratio: LayerKind}`` of the
            ratios in use.

    Raises ValueError/TypeError naming the field when a value is out of range.
    """

    num_heads: int
    compress_ratios: tuple[int, ...]
    topk: int
    window_size: int = 128
    swa_page_size: int = POOL_PAGE_TOKENS
    # Normalised to a dict {ratio: page size} in __post_init__, hence left out of the hash.
    compressed_page_size: int | Mapping[int, int] | None = field(default=None, hash=False)
    sm_scale: float | None = None
    head_dim: int = HEAD_DIM
    # Normalised to a dict {ratio: LayerKind} in __post_init__, hence left out of the hash.
    ratio_kinds: Mapping[int, object] | None = field(default=None, hash=False)
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
            check_int(f"compress_ratios[{i}]", r, lo=0)
        object.__setattr__(self, "compress_ratios", ratios)
        object.__setattr__(self, "ratio_kinds", resolve_ratio_kinds(ratios, self.ratio_kinds))

        used = sorted({r for r in ratios if r > 0})
        cps = self.compressed_page_size
        if cps is None:
            pages = default_compressed_page_sizes(ratios)
        elif isinstance(cps, Mapping):
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
        """The ratios > 0 that some layer uses, ascending (the compressed caches a batch needs)."""
        return tuple(sorted(self.compressed_page_size))

    def kind_of(self, ratio: int) -> LayerKind:
        """The :class:`LayerKind` of the ratio-``ratio`` layers (ValueError when no layer uses it)."""
        if ratio not in self.ratio_kinds:
            raise ValueError(f"no layer uses compress ratio {ratio}; ratios in use: {tuple(self.ratio_kinds)}")
        return self.ratio_kinds[ratio]

    @property
    def topk_ratios(self) -> tuple[int, ...]:
        """The ratios in use whose layers take the indexer's ``topk_indices``, ascending."""
        return tuple(r for r, k in self.ratio_kinds.items() if k is LayerKind.TOPK)

    def ratio_of(self, layer: int) -> int:
        """Compress ratio of ``layer`` (ValueError when out of range)."""
        check_int("layer", layer, lo=0, hi=self.num_layers - 1)
        return self.compress_ratios[layer]

    def page_size_of(self, ratio: int) -> int:
        """Page size of the compressed cache of ``ratio`` (> 0)."""
        if ratio not in self.compressed_page_size:
            raise ValueError(f"no layer uses compress ratio {ratio}; ratios in use: {self.compressed_ratios}")
        return self.compressed_page_size[ratio]

    @classmethod
    def from_hf_config(
        cls, cfg: Mapping[str, object], tp_size: int = 1, *, mtp: bool = False, **overrides: object
    ) -> ModelConfig:
        """The config of a DeepSeek-V4 / V4.1 model from its ``config.json`` dict, read as SGLang
        reads it (``hf_config.py``: ``num_attention_heads // tp_size`` heads, ``index_topk``,
        the main layers' ``compress_ratios`` verbatim, ``window_size`` or 128; ``mtp=True``: the
        SWA-only MTP layers). ``overrides`` are further ``ModelConfig`` fields (page sizes,
        ``sm_scale``, ``ratio_kinds``, ...). Raises ValueError/TypeError naming a missing or
        unservable field."""
        fields = hf_config_fields(cfg, tp_size, mtp)
        if "ratio_kinds" in fields and overrides.get("ratio_kinds") is not None:
            overrides["ratio_kinds"] = {**fields["ratio_kinds"], **overrides["ratio_kinds"]}
        return cls(**{**fields, **overrides})
