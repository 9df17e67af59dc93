"""Random synthetic batches with their FP8 caches, for tests, the demo and benchmarks.

``make_synthetic_batch`` builds what an engine would hand the backend for one forward: batch
metadata whose token tables come from a shuffled page allocation (an SWA pool and one
compressed pool per ratio, each with its own page size), one SWA cache and one compressed cache
per layer filled with quantized random K, per-layer queries, indexer picks and sinks.
DeepSeek-V4.1's sharing (only "kv source" layers own a compressed cache, only "index source"
layers own an indexer) is built with ``kv_source_layers`` / ``index_source_layers``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from sparse_prefill.backend.config import ModelConfig
from sparse_prefill.backend.layer_kinds import LayerKind
from sparse_prefill.backend.metadata import BatchMetadata, ForwardMode, LayerCaches
from sparse_prefill.ops.cache import quantize_k_cache

# Rows of indexer picks drawn at once (bounds the [rows, entries] random keys).
_PICK_ROWS = 4096


@dataclass
class SyntheticBatch:
    """One forward's inputs; ``layer_inputs(i)`` gives ``forward``'s arguments for layer ``i``.

    q:            per layer ``[num_tokens, h_q, 512]`` bf16 (one shared tensor with ``share_q``).
    caches:       per layer :class:`LayerCaches` (V4 FP8 paged uint8); layers that share
                  (``kv_source_layers``) hold the very same compressed tensor.
    topk_indices: per layer ``[num_tokens, topk]`` int32 picks (top-k layers), else None;
                  shared likewise (``index_source_layers``).
    attn_sink:    per layer ``[h_q]`` float32.
    """

    config: ModelConfig
    metadata: BatchMetadata
    q: list[torch.Tensor]
    caches: list[LayerCaches]
    topk_indices: list[torch.Tensor | None]
    attn_sink: list[torch.Tensor]

    def layer_inputs(self, layer: int) -> tuple:
        """``(layer, q, caches, topk_indices, attn_sink)`` for ``SparsePrefillBackend.forward``."""
        return layer, self.q[layer], self.caches[layer], self.topk_indices[layer], self.attn_sink[layer]


def _allocate(lengths: Sequence[int], page_size: int, spare_pages: int, extra_cols: int, device, gen):
    """Token tables ``[R, max(lengths) + extra_cols]`` int32 over a shuffled pool of pages
    (``-1`` past each length) and the pool's page count."""
    pages_per_req = [-(-n // page_size) for n in lengths]
    num_pages = sum(pages_per_req) + spare_pages
    perm = torch.randperm(num_pages, generator=gen, device=device)
    width = max(lengths) + extra_cols
    cols = torch.arange(width, device=device)
    table = torch.full((len(lengths), width), -1, dtype=torch.int64, device=device)
    start = 0
    for r, (n, p) in enumerate(zip(lengths, pages_per_req)):
        pages = perm[start : start + p]
        start += p
        c = cols[:n]
        table[r, :n] = pages[c // page_size] * page_size + c % page_size
    return table.to(torch.int32), max(num_pages, 1)


def _random_cache(num_pages, page_size, config: ModelConfig, std, mean, device, gen) -> torch.Tensor:
    k = torch.randn(num_pages, page_size, 1, config.head_dim, generator=gen, device=device) * std + mean
    return quantize_k_cache(k.to(torch.bfloat16), config.layout)


def _random_picks(metadata: BatchMetadata, topk: int, ratio: int, invalid_frac: float, gen) -> torch.Tensor:
    """Duplicate-free picks among each query's complete entries; a fraction ``invalid_frac`` of
    the slots then holds -1 or a not-yet-complete (future) entry, which the backend must drop."""
    device = metadata.device
    n = metadata.num_tokens
    out = torch.full((n, topk), -1, dtype=torch.int32, device=device)
    entries = max(1, max(s // ratio for s in metadata.seq_lens_host))
    k = min(topk, entries)
    for a in range(0, n, _PICK_ROWS):
        b = min(n, a + _PICK_ROWS)
        visible = ((metadata.query_pos[a:b].long() + 1) // ratio)[:, None]
        keys = torch.rand(b - a, entries, generator=gen, device=device)
        keys = keys.masked_fill(torch.arange(entries, device=device) >= visible, -1.0)
        val, idx = keys.topk(k, dim=1)
        picks = torch.where(val >= 0, idx, -1)
        # topk sorts by key, which leaves the -1s last: shuffle each row's slots.
        order = torch.rand(b - a, topk, generator=gen, device=device).argsort(dim=1)
        row = torch.full((b - a, topk), -1, dtype=torch.int64, device=device)
        row[:, :k] = picks
        row = row.gather(1, order)
        bad = torch.rand(b - a, topk, generator=gen, device=device) < invalid_frac
        future = visible + torch.randint(0, 64, (b - a, topk), generator=gen, device=device)
        junk = torch.where(torch.rand(b - a, topk, generator=gen, device=device) < 0.5, -1, future)
        out[a:b] = torch.where(bad, junk, row).to(torch.int32)
    return out


def make_synthetic_batch(
    config: ModelConfig,
    prefix_lens: Sequence[int],
    extend_lens: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    forward_mode: ForwardMode = ForwardMode.EXTEND,
    layers: Sequence[int] | None = None,
    share_q: bool = False,
    q_std: float = 1.0,
    k_std: float = 1.0,
    k_mean: float = 0.0,
    invalid_pick_frac: float = 0.1,
    spare_pages: int = 3,
    evict_outside_window: bool = True,
    kv_source_layers: Sequence[int] | None = None,
    index_source_layers: Sequence[int] | None = None,
) -> SyntheticBatch:
    """A random batch of ``len(prefix_lens)`` requests and the caches of every layer.

    Args:
        config: the model.
        prefix_lens, extend_lens: per request cached prefix and new tokens (``extend >= 1``).
        device: where everything is built.
        seed: seeds a generator on ``device`` (the same seed gives the same batch there).
        forward_mode: EXTEND or DECODE (DECODE needs every ``extend_len == 1``).
        layers: the layers to build inputs for (default all); the lists of the result keep one
            slot per model layer, None for layers not built.
        share_q: one query tensor for every layer (saves memory in benchmarks).
        q_std, k_std, k_mean: queries ~ N(0, q_std^2), K ~ N(k_mean, k_std^2) before
            quantization. The logits' spread is about ``q_std * k_std * sm_scale * sqrt(512)``
            (1 by default). Kernels round probabilities to bf16 for ``P @ V`` as FlashMLA does;
            its accuracy criteria hold for its test data, ``randn / 10`` plus an offset, i.e.
            a small ``k_std`` and a nonzero ``k_mean``.
        invalid_pick_frac: fraction of top-k pick slots replaced by -1 or a future entry.
        spare_pages: unused pages in each pool, so ids do not fill the cache exactly.
        evict_outside_window: set SWA-table positions no query window reaches to -1 (as a
            ring SWA pool would), proving the backend never reads them.
        kv_source_layers: None (every compressed layer owns its cache) or the layers that own
            one (V4.1's ``kv_source_layer_ids``): any other layer of ratio > 0 gets the very
            tensor of the latest earlier source layer of its ratio.
        index_source_layers: likewise for top-k layers' ``topk_indices`` (V4.1's
            ``index_source_layer_ids``).

    Every request's tables have a few extra columns of -1 past its length. The caches hold
    every position's K (the chunk's K is already stored, as an engine does before attention);
    sinks ~ N(0, 1).
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    seq = [p + e for p, e in zip(prefix_lens, extend_lens)]
    swa_table, swa_pages = _allocate(seq, config.swa_page_size, spare_pages, 3, device, gen)
    if evict_outside_window:
        first = torch.tensor(
            [max(0, p - config.window_size + 1) for p in prefix_lens], device=device
        )[:, None]
        swa_table = swa_table.masked_fill(torch.arange(swa_table.shape[1], device=device) < first, -1)
    tables, pool_pages = {}, {}
    for ratio in config.compressed_ratios:
        entries = [s // ratio for s in seq]
        tables[ratio], pool_pages[ratio] = _allocate(entries, config.page_size_of(ratio), spare_pages, 2, device, gen)
    metadata = BatchMetadata(config, prefix_lens, extend_lens, swa_table, tables, forward_mode)

    n, h = metadata.num_tokens, config.num_heads
    q_list, caches, picks, sinks = [], [], [], []
    shared = None
    owns_cache = _owners("kv_source_layers", kv_source_layers, config, lambda r: r > 0)
    owns_picks = _owners("index_source_layers", index_source_layers, config,
                         lambda r: config.kind_of(r) is LayerKind.TOPK)
    last_cache, last_picks = {}, {}  # ratio -> the latest source layer's tensor
    for layer, ratio in enumerate(config.compress_ratios):
        if layers is not None and layer not in layers:
            q_list.append(None), caches.append(None), picks.append(None), sinks.append(None)
            continue
        if shared is None or not share_q:
            shared = (torch.randn(n, h, config.head_dim, generator=gen, device=device) * q_std).to(torch.bfloat16)
        q_list.append(shared)
        swa = _random_cache(swa_pages, config.swa_page_size, config, k_std, k_mean, device, gen)
        comp = pick = None
        if ratio > 0:
            if owns_cache(layer):
                last_cache[ratio] = _random_cache(
                    pool_pages[ratio], config.page_size_of(ratio), config, k_std, k_mean, device, gen
                )
            comp = _source(last_cache, ratio, layer, "kv_source_layers")
        if config.kind_of(ratio) is LayerKind.TOPK:
            if owns_picks(layer):
                last_picks[ratio] = _random_picks(metadata, config.topk, ratio, invalid_pick_frac, gen)
            pick = _source(last_picks, ratio, layer, "index_source_layers")
        caches.append(LayerCaches(swa, comp))
        picks.append(pick)
        sinks.append(torch.randn(h, generator=gen, device=device))
    return SyntheticBatch(config, metadata, q_list, caches, picks, sinks)


def _owners(name: str, sources: Sequence[int] | None, config: ModelConfig, applies):
    """``layer -> bool``: whether ``layer`` makes its own tensor (all layers when ``sources`` is None)."""
    if sources is None:
        return lambda layer: True
    chosen = set()
    for i, layer in enumerate(sources):
        ratio = config.ratio_of(layer)  # ValueError naming the layer when out of range
        if not applies(ratio):
            raise ValueError(f"{name}[{i}] = {layer} has ratio {ratio}, which has no such tensor")
        chosen.add(layer)
    return chosen.__contains__


def _source(latest: Mapping[int, torch.Tensor], ratio: int, layer: int, name: str) -> torch.Tensor:
    if ratio not in latest:
        raise ValueError(f"layer {layer} (ratio {ratio}) has no earlier layer of its ratio in {name}")
    return latest[ratio]
