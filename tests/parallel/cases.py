"""Batches shared by the parallel tests and what one process computes for them (the truth).

A case is plain data (picklable for spawn): the config, the batch lengths, a seed, the path and
the forward mode. ``build`` turns it into tensors, the same in every process (seeded CPU
generators); ``single_process`` runs the single-GPU backend over the whole batch.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import torch

from sparse_prefill.backend import ForwardMode, LayerCaches, ModelConfig, SparsePrefillBackend, make_synthetic_batch
from sparse_prefill.backend.routing import PathCosts
from sparse_prefill.ops.cache import store_k_cache

D = 512


@dataclass(frozen=True)
class Case:
    prefix: tuple[int, ...]
    extend: tuple[int, ...]
    path: str = "auto"
    num_heads: int = 8
    ratios: tuple[int, ...] = (0, 4, 128)
    mode: ForwardMode = ForwardMode.EXTEND
    seed: int = 0
    costs: PathCosts = field(default_factory=PathCosts)
    # CPU defaults: a small window and top-k, so that clipped windows and complete 128-entries
    # occur within a few hundred positions; distinct page sizes per cache.
    window: int = 8
    topk: int = 16
    page_size: int = 16
    device: str = "cpu"

    @property
    def config(self) -> ModelConfig:
        pages = {r: max(1, self.page_size // (4 if r == 4 else 8)) for r in self.ratios if r > 0}
        return ModelConfig(
            num_heads=self.num_heads, compress_ratios=self.ratios, topk=self.topk, window_size=self.window,
            swa_page_size=self.page_size, compressed_page_size=pages,
        )

    def backend(self) -> SparsePrefillBackend:
        return SparsePrefillBackend(self.config, self.path, costs=self.costs)


# Mixed batches: a request of 0 prefix, requests whose window reaches into the prefix, the
# longest request last (309 tokens: 2 complete 128-entries) and short ones without any.
MIXED = ((0, 130, 5, 300), (37, 20, 41, 9))


@contextlib.contextmanager
def one_thread():
    """Spawned ranks run with one intra-op thread; so does the truth (BLAS sums may depend on it)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def new_entry_slots(metadata, ratio: int) -> list[tuple[int, int]]:
    """(row, compressed-cache slot) of each entry the chunk completes, in row order: the row at
    position ``p`` completes entry ``(p + 1) // ratio - 1`` when ``(p + 1) % ratio == 0``."""
    table = metadata.compressed_token_tables[ratio].cpu()
    out = []
    for row, (req, pos) in enumerate(zip(metadata.query_req.tolist(), metadata.query_pos.tolist())):
        if (pos + 1) % ratio == 0:
            out.append((row, int(table[req, (pos + 1) // ratio - 1])))
    return out


def build(case: Case):
    """``(batch, new_k)``: the synthetic batch, and per layer the chunk's new K to store:
    ``(k [num_tokens, 512], compressed_k [new entries, 512] or None)`` bf16."""
    cfg = case.config
    dev = case.device
    batch = make_synthetic_batch(cfg, case.prefix, case.extend, seed=case.seed, forward_mode=case.mode, device=dev)
    gen = torch.Generator(device=dev).manual_seed(case.seed + 1)
    new_k = []
    for ratio in cfg.compress_ratios:
        k = torch.randn(batch.metadata.num_tokens, D, generator=gen, device=dev).to(torch.bfloat16)
        ck = None
        if ratio > 0:
            n = len(new_entry_slots(batch.metadata, ratio))
            ck = torch.randn(n, D, generator=gen, device=dev).to(torch.bfloat16)
        new_k.append((k, ck))
    return batch, new_k


def store_single(batch, layer: int, new_k) -> LayerCaches:
    """One process's store of the chunk's new K into (copies of) the layer's caches."""
    md, cfg = batch.metadata, batch.config
    swa, comp = (None if c is None else c.clone() for c in batch.caches[layer])
    k, ck = new_k[layer]
    slots = md.swa_token_table[md.query_req, md.query_pos.long()]
    store_k_cache(swa, k, slots, cfg.swa_page_size)
    if ck is not None:
        ratio = cfg.compress_ratios[layer]
        cslots = torch.tensor([s for _, s in new_entry_slots(md, ratio)], dtype=torch.int64, device=md.device)
        store_k_cache(comp, ck, cslots, cfg.page_size_of(ratio))
    return LayerCaches(swa, comp)


@functools.lru_cache(maxsize=16)
def single_process(case: Case, store: bool = True) -> dict:
    """The truth for ``case``: per layer, the caches after storing the chunk (when ``store``)
    and the backend's output over the whole batch. Cached: tests of several world sizes share
    it (callers must not modify it)."""
    with one_thread():
        batch, new_k = build(case)
        backend = case.backend()
        caches, outs = [], []
        for layer in range(case.config.num_layers):
            c = store_single(batch, layer, new_k) if store else batch.caches[layer]
            _, q, _, topk, sink = batch.layer_inputs(layer)
            caches.append(c)
            outs.append(backend.forward(layer, q, c, topk, sink, metadata=batch.metadata))
    return {"caches": caches, "out": outs}


def assert_bitwise(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Same shape, dtype and bytes (bf16 compared as int16: -0.0 vs 0.0 or NaN payloads count)."""
    assert (got.shape, got.dtype) == (want.shape, want.dtype), f"{name}: {got.shape} {got.dtype} vs {want.shape}"
    bits = torch.int16 if got.dtype == torch.bfloat16 else got.dtype
    same = got.contiguous().view(bits) == want.to(got.device).contiguous().view(bits)
    assert bool(same.all()), f"{name}: {int((~same).sum())} of {same.numel()} elements differ"
