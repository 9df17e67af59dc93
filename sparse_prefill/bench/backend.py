"""The backend end to end on the GPU: both paths, the routing choice, the original pipeline.

One prefill chunk of 8192 and of 32768 new tokens over 4 requests (equal extends), with cached
prefixes of 0 and of 16384 tokens per request, for the DeepSeek-V4 shapes h_q 64 / topk 512 and
h_q 128 / topk 1024, over the 10-layer stack ``STACK`` (ratios 0, 4, 128, 4, 4, 128, 4, 0, 4, 128:
5 indexer layers, 3 dense ratio-128 layers, 2 SWA-only layers; W = 128, page size 64 in every
pool). Synthetic batch: ``sparse_prefill.backend.make_synthetic_batch`` (shuffled pages).

Per case it measures (median of ``triton.testing.do_bench``, value checks off):

* per layer, for each compress ratio: the regular path, the sparse path (dequantize + combine +
  attention, chunk cache already built) and its parts, and the path ``auto`` routes to (timed
  over two layers of the ratio in turn, so that no layer reuses the previous one's workspace);
* the whole 10-layer stack of each path including per-forward work (chunk cache, index rows);
* peak GPU memory of each path's stack forward above the inputs;
* the "original pipeline" of SGLang's change: every request's ``max_seq_len // ratio``
  compressed slots dequantized into ``R * c_max`` workspace rows, combine, sparse kernel;
* when ``import flash_mla`` works: the original pipeline and our sparse path with
  ``flash_mla_sparse_fwd`` in place of ``sparse_attn_fwd``, and the regular path through
  FlashMLA's FP8 decode kernel (``flash_mla_with_kvcache``);
* the regular-path rows of ANCHORS.md (s_q 4096, one query per row, topk + 128 window tokens):
  our FP8 kernel next to ``sparse_attn_fwd`` on a bf16 workspace of the same tokens;
* the constants of ``routing.PathCosts`` fitted to these measurements (paste into routing.py);
* a DeepSeek-V4.1-shaped stack ``V41_STACK`` (ratios 0, 1, 2, 4, 128, with shared "kv source"
  caches and "index source" top-k, SGLang's 256-token pages): the whole stack per path;
* the ratio-1 sweep: one request's short extend over a long history through a ratio-1 (V4.1
  top-k) layer, both paths, auto's pick and SGLang's hard-coded rule's ("<= 1024 new tokens over
  >= max(32768, 192 x new) history -> paged kernel"): where the crossover really is.

Prints markdown; ``--out DIR`` also writes DIR/backend.md and DIR/backend.json. Exits 2 without
CUDA (``--smoke`` runs tiny shapes on any device, to check the script itself).

    python -m sparse_prefill.bench.backend [--out DIR] [--chunks 8192,32768] [--smoke]

(``sparse-prefill bench --only backend`` runs it with the defaults; ``--quick`` there: one shape,
one chunk size.)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from collections.abc import Sequence

import torch

from sparse_prefill import value_checks
from sparse_prefill.backend import BatchMetadata, ModelConfig, SparsePrefillBackend, make_synthetic_batch
from sparse_prefill.backend import routing
from sparse_prefill.backend.backend import dense_token_ids, picked_token_ids, window_token_ids
from sparse_prefill.backend.layer_kinds import LayerKind
from sparse_prefill.bench.common import (
    SILENT,
    BenchResult,
    Progress,
    bench_main,
    fmt,
    import_flash_mla,
    median_us,
    own_attn_impl,
    require_cuda,
)
from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops.cache import dequantize_k_cache_paged, quantize_k_cache
from sparse_prefill.ops.flashmla_impl import FLASHMLA_DECODE_MAX_ROWS, cache_view
from sparse_prefill.ops.fp8_sparse_attn import paged_fp8_sparse_attn_fwd
from sparse_prefill.ops.indices import build_swa_token_ids, combine_topk_swa_indices, combined_width
from sparse_prefill.ops.sparse_attn import sparse_attn_fwd

STACK = (0, 4, 128, 4, 4, 128, 4, 0, 4, 128)
# DeepSeek-V4.1-shaped: every kind, later layers of a ratio read their source layer's cache/top-k.
V41_STACK = (0, 1, 2, 4, 128, 1, 2, 4, 128, 0, 1, 4)
V41_KV_SOURCES = (1, 2, 3, 4, 10)
V41_INDEX_SOURCES = (1, 2, 3, 7, 10)
RATIO1_EXTENDS = (64, 256, 1024, 4096)
RATIO1_HISTORIES = (0, 8192, 32768, 131072)
SHAPES = ((64, 512), (128, 1024))  # (h_q, topk)
CHUNKS = (8192, 32768)
PREFIXES = (0, 16384)
NUM_REQS = 4
WINDOW = 128
PAGE = 64
ANCHOR_ROWS = 4096
ANCHOR_TOKENS = (8192, 16384)
LATENCY_EXTEND = 32  # tokens per request of the small batch that measures fixed costs

flash_mla = import_flash_mla()  # FlashMLA is optional: its columns are left out when None


# ---------------------------------------------------------------------------------------------
# Timing


def peak_bytes(fn) -> int | None:
    """Peak GPU bytes allocated while ``fn`` runs, above what was allocated before."""
    if not torch.cuda.is_available():
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def attn_tflops(kv_entries: int, num_heads: int, us: float) -> float:
    """TFLOP/s counted as FlashMLA does: 2 * (d_qk + d_v) per head per attended entry."""
    return 2 * kv_entries * num_heads * 1024 / (us * 1e-6) / 1e12


# ---------------------------------------------------------------------------------------------
# Workspace pipelines other than the backend's own paths


def ours_kernel(q, kv, indices, lens, sink, scale, out):
    # Our kernel, by name: "auto" would run FlashMLA's where it is installed and faster.
    sparse_attn_fwd(q, kv, indices[:, None, :], scale, 512, sink, lens, out=out,
                    impl=own_attn_impl(q.device, q.shape[1], q.shape[2]))


def flashmla_kernel(q, kv, indices, lens, sink, scale, out):
    # FlashMLA allocates its own output (part of its cost, as in an engine).
    flash_mla.flash_mla_sparse_fwd(q, kv, indices[:, None, :], scale, 512, sink, lens)


class OriginalPipeline:
    """SGLang's change: per ratio, ``c_max = max_seq_len // ratio`` workspace slots for every
    request (``R * c_max`` rows, dequantized whole), the SWA gathers after them; SWA-only and
    dense rows combined once per chunk, top-k rows per layer; then the sparse kernel."""

    def __init__(self, batch, kernel):
        self.batch, self.kernel = batch, kernel
        self.cfg = batch.config

    def begin(self):
        md, cfg = self.batch.metadata, self.cfg
        r = md.num_requests
        self.swa = build_swa_token_ids(md.seq_lens, md.extend_lens, md.swa_token_table, cfg.window_size)
        self.plan, self.rows = {}, {}
        for ratio in sorted(set(cfg.compress_ratios)):
            c_max = md.max_seq_len // ratio if ratio > 0 else 0
            ids = md.compressed_token_tables[ratio][:, :c_max].reshape(-1) if ratio > 0 else None
            cbase = torch.arange(r, dtype=torch.int32, device=md.device) * c_max
            sbase = (r * c_max + self.swa.offsets[:-1]).to(torch.int32)
            self.plan[ratio] = (ids, r * c_max, cbase, sbase)
            if cfg.kind_of(ratio) is not LayerKind.TOPK:
                self.rows[ratio] = self._combine(ratio, None, c_max)
        rows = max(n + self.swa.token_ids.shape[0] for _, n, _, _ in self.plan.values())
        self.ws = torch.empty(rows, 1, 512, dtype=torch.bfloat16, device=md.device)

    def _combine(self, ratio, topk_indices, topk):
        md = self.batch.metadata
        _, _, cbase, sbase = self.plan[ratio]
        return combine_topk_swa_indices(
            topk_indices, md.query_start_loc, md.query_pos, md.seq_lens, self.swa.gather_lens, cbase, sbase,
            self.cfg.window_size, ratio, topk,
        )

    def layer(self, layer, out):
        _, q, caches, topk_indices, sink = self.batch.layer_inputs(layer)
        ratio, cfg = self.cfg.compress_ratios[layer], self.cfg
        ids, n_comp, _, _ = self.plan[ratio]
        if ratio > 0:
            dequantize_k_cache_paged(caches.compressed, ids, cfg.page_size_of(ratio), out=self.ws[:n_comp])
        n_swa = self.swa.token_ids.shape[0]
        swa_rows = self.ws[n_comp : n_comp + n_swa]
        dequantize_k_cache_paged(caches.swa, self.swa.token_ids, cfg.swa_page_size, out=swa_rows)
        topk = cfg.kind_of(ratio) is LayerKind.TOPK
        indices, lens = self._combine(ratio, topk_indices, cfg.topk) if topk else self.rows[ratio]
        self.kernel(q, self.ws[: n_comp + n_swa], indices, lens, sink, cfg.sm_scale, out)


class ChunkCachePipeline:
    """Our sparse path (chunk cache, per-layer plan) with another kernel in place of ours."""

    def __init__(self, batch, kernel):
        self.batch, self.kernel = batch, kernel
        self.backend = SparsePrefillBackend(batch.config, "sparse")

    def begin(self):
        md = self.batch.metadata
        self.backend.begin_forward(md)
        self.chunk = self.backend.chunk_cache()
        self.ws = torch.empty(max(self.chunk.max_workspace_rows, 1), 1, 512, dtype=torch.bfloat16, device=md.device)

    def dequantize(self, layer, plan):
        _, _, caches, _, _ = self.batch.layer_inputs(layer)
        cfg, ratio = self.batch.config, plan.compress_ratio
        if ratio > 0:
            dequantize_k_cache_paged(caches.compressed, plan.compressed_token_ids, cfg.page_size_of(ratio),
                                     out=self.ws[plan.compressed_rows])
        dequantize_k_cache_paged(caches.swa, plan.swa_token_ids, cfg.swa_page_size, out=self.ws[plan.swa_rows])

    def layer(self, layer, out):
        _, q, _, topk_indices, sink = self.batch.layer_inputs(layer)
        ratio = self.batch.config.compress_ratios[layer]
        plan, indices, lens = self.chunk.layer(ratio, self.batch.metadata.generation, topk_indices)
        self.dequantize(layer, plan)
        self.kernel(q, self.ws[: max(plan.num_rows, 1)], indices, lens, sink, self.batch.config.sm_scale, out)


class FlashMLARegularPipeline:
    """The regular path through FlashMLA's sparse FP8 decode kernel (one query per batch row):
    main scope the compressed cache, extra scope the SWA window; SWA-only layers use the SWA
    cache alone. Scheduler metadata is made once per ratio per forward."""

    def __init__(self, batch):
        self.batch = batch

    @staticmethod
    def _cache(cache, page_size):
        return cache_view(cache, page_size, KVCacheLayout.V4)

    @staticmethod
    def _pad64(ids):
        # FlashMLA's decode kernel reads index blocks of 64.
        return torch.nn.functional.pad(ids, (0, -ids.shape[1] % 64), value=-1)

    def begin(self):
        md, cfg = self.batch.metadata, self.batch.config
        self.swa_ids, self.swa_lens = window_token_ids(md, cfg.window_size)
        self.dense = {r: dense_token_ids(md, r) for r, k in cfg.ratio_kinds.items() if k is LayerKind.DENSE}
        self.sched = {r: flash_mla.get_mla_metadata()[0] for r in set(cfg.compress_ratios)}

    def layer(self, layer, out):
        _, q, caches, topk_indices, sink = self.batch.layer_inputs(layer)
        cfg, md = self.batch.config, self.batch.metadata
        ratio, n = cfg.compress_ratios[layer], md.num_tokens
        qb = q.view(n, 1, *q.shape[1:])
        swa_cache = self._cache(caches.swa, cfg.swa_page_size)
        if ratio == 0:
            flash_mla.flash_mla_with_kvcache(
                qb, swa_cache, None, None, 512, self.sched[ratio], softmax_scale=cfg.sm_scale, is_fp8_kvcache=True,
                indices=self.swa_ids.view(n, 1, -1), attn_sink=sink, topk_length=self.swa_lens,
            )
            return
        if cfg.kind_of(ratio) is LayerKind.TOPK:
            ids, lens = picked_token_ids(md, topk_indices, ratio), None
        else:
            ids, lens = self.dense[ratio]
        flash_mla.flash_mla_with_kvcache(
            qb, self._cache(caches.compressed, cfg.page_size_of(ratio)), None, None, 512, self.sched[ratio],
            softmax_scale=cfg.sm_scale, is_fp8_kvcache=True, indices=self._pad64(ids).view(n, 1, -1),
            attn_sink=sink, extra_k_cache=swa_cache, extra_indices_in_kvcache=self.swa_ids.view(n, 1, -1),
            topk_length=lens, extra_topk_length=self.swa_lens,
        )


class BackendPipeline:
    def __init__(self, batch, path):
        self.batch = batch
        impl = own_attn_impl(batch.metadata.device, batch.config.num_heads)  # ours, not FlashMLA's
        self.backend = SparsePrefillBackend(batch.config, path, impl=impl)

    def begin(self):
        self.backend.begin_forward(self.batch.metadata)

    def layer(self, layer, out):
        self.backend.forward(*self.batch.layer_inputs(layer), out=out)


def pipeline_factories(num_tokens: int) -> dict:
    """name -> pipeline class and arguments after the batch (made one at a time: memory), for a
    chunk of ``num_tokens`` query rows."""
    found = {
        "regular": (BackendPipeline, "regular"),
        "sparse": (BackendPipeline, "sparse"),
        "auto": (BackendPipeline, "auto"),
        "original (ours)": (OriginalPipeline, ours_kernel),
    }
    if flash_mla is not None:
        found["original (FlashMLA)"] = (OriginalPipeline, flashmla_kernel)
        found["sparse (FlashMLA kernel)"] = (ChunkCachePipeline, flashmla_kernel)
        # FlashMLA's decode kernel aborts the process past FLASHMLA_DECODE_MAX_ROWS rows (the
        # failure the original change routed around): its column is measured only up to there.
        if num_tokens <= FLASHMLA_DECODE_MAX_ROWS:
            found["regular (FlashMLA decode)"] = (FlashMLARegularPipeline,)
    return found


# ---------------------------------------------------------------------------------------------
# Cases


def layer_pairs() -> dict[int, tuple[int, int]]:
    """ratio -> the first two layers of STACK with that ratio (layers of one ratio cost the same;
    timing them in turn keeps a layer from reusing the previous one's workspace)."""
    return {r: tuple(i for i, x in enumerate(STACK) if x == r)[:2] for r in sorted(set(STACK))}


def in_turn(fn, args: Sequence):
    """A function calling ``fn(a)`` for the items of ``args`` in turn, one per call."""
    state = {"i": 0}

    def call():
        state["i"] += 1
        return fn(args[state["i"] % len(args)])
    return call


def case_batch(h_q, topk, chunk, prefix, device, layers=None):
    """The synthetic batch of one case over ``STACK``: ``NUM_REQS`` requests of ``chunk //
    NUM_REQS`` new tokens after ``prefix`` cached ones each (``layers``: as ``make_synthetic_batch``)."""
    cfg = ModelConfig(num_heads=h_q, compress_ratios=STACK, topk=topk, window_size=WINDOW,
                      swa_page_size=PAGE, compressed_page_size=PAGE)
    extend = chunk // NUM_REQS
    return make_synthetic_batch(cfg, [prefix] * NUM_REQS, [extend] * NUM_REQS, device=device, seed=0,
                                share_q=True, k_std=0.1, k_mean=0.05, layers=layers)


def run_case(h_q, topk, chunk, prefix, device, measure_memory=True) -> dict:
    batch = case_batch(h_q, topk, chunk, prefix, device)
    cfg, md = batch.config, batch.metadata
    out = torch.empty_like(batch.q[0])
    case = dict(h_q=h_q, topk=topk, chunk=chunk, prefix=prefix, layers={}, stack_us={}, peak_mb={}, errors={})
    auto = SparsePrefillBackend(cfg, "auto")
    case["route"] = {r: auto.path_for(r, md) for r in set(STACK)}

    for name, (cls, *extra) in pipeline_factories(chunk).items():
        pipe = cls(batch, *extra)

        def stack(pipe=pipe):
            pipe.begin()
            for layer in range(len(STACK)):
                pipe.layer(layer, out)
        try:
            case["peak_mb"][name] = None if not measure_memory else _mb(peak_bytes(stack))
            case["stack_us"][name] = median_us(stack)
            pipe.begin()
            for ratio, pair in layer_pairs().items():
                pipe.layer(pair[0], out)  # per-forward state built, as for every later layer
                case["layers"].setdefault(ratio, {})[name] = median_us(in_turn(lambda i: pipe.layer(i, out), pair))
        except Exception as e:  # a failing variant (e.g. FlashMLA's limits) is reported, not fatal
            case["errors"][name] = f"{type(e).__name__}: {e}"[:300]
        del pipe

    # Parts of the sparse path per ratio, for the cost model.
    parts = ChunkCachePipeline(batch, ours_kernel)
    case["chunk_cache_us"] = median_us(parts.begin)
    parts.begin()
    case["parts"], case["work"] = {}, {}
    for ratio, pair in layer_pairs().items():
        layer = pair[0]
        _, q, _, topk_indices, sink = batch.layer_inputs(layer)
        plan, indices, lens = parts.chunk.layer(ratio, md.generation, topk_indices)
        kv = parts.ws[: plan.num_rows]
        p = {"dequantize": median_us(lambda: parts.dequantize(layer, plan)),
             "attention": median_us(lambda: ours_kernel(q, kv, indices, lens, sink, cfg.sm_scale, out))}
        if ratio == 4:
            # Two layers' picks in turn: the same tensor again would reuse the rows.
            picks = [batch.topk_indices[i] for i in pair]
            p["combine"] = median_us(in_turn(lambda t: parts.chunk.combine_topk(ratio, t, md.generation), picks))
        case["parts"][ratio] = p
        case["work"][ratio] = dataclasses.asdict(routing.layer_work(cfg, md, ratio))
    return case


def anchor_rows(h_q, topk, tokens, n, device) -> dict:
    """ANCHORS.md's regular-path rows (``n`` queries): our FP8 kernel vs sparse_attn_fwd on a
    bf16 workspace of the same tokens."""
    s = n + WINDOW - 1
    scale = 512**-0.5
    gen = torch.Generator(device=device).manual_seed(1)

    def cache(num):
        k = torch.randn(num // PAGE + 1, PAGE, 1, 512, generator=gen, device=device) / 10
        return quantize_k_cache(k.bfloat16())

    comp, swa = cache(tokens), cache(s)
    q = (torch.randn(n, h_q, 512, generator=gen, device=device) / 10).bfloat16()
    sink = torch.randn(h_q, generator=gen, device=device)
    ids = torch.rand(n, tokens, generator=gen, device=device).topk(topk, dim=1).indices.int()
    win = (torch.arange(n, device=device)[:, None] + torch.arange(WINDOW, device=device)).int()
    ws = torch.cat([dequantize_k_cache_paged(comp, torch.arange(tokens, device=device), PAGE),
                    dequantize_k_cache_paged(swa, torch.arange(s, device=device), PAGE)])
    rows = torch.full((n, combined_width(topk, WINDOW)), -1, dtype=torch.int32, device=device)
    rows[:, :topk], rows[:, topk : topk + WINDOW] = ids, win + tokens
    out = torch.empty_like(q)
    row = dict(h_q=h_q, topk=topk, tokens=tokens)
    row["regular_us"] = median_us(lambda: paged_fp8_sparse_attn_fwd(
        q, comp, ids, PAGE, scale, extra_cache=swa, extra_indices=win, extra_page_size=PAGE, attn_sink=sink, out=out))
    row["sparse_us"] = median_us(lambda: ours_kernel(q, ws, rows, None, sink, scale, out))
    if flash_mla is not None:
        row["flashmla_sparse_us"] = median_us(lambda: flashmla_kernel(q, ws, rows, None, sink, scale, out))
    for key in [k for k in row if k.endswith("_us")]:
        row[key.replace("_us", "_tflops")] = attn_tflops(n * (topk + WINDOW), h_q, row[key])
    return row


def dequant_slopes(sweep: list[dict]) -> list[float]:
    """ns per workspace row, one per shape of the ratio-1 sweep: at its largest extend, the sparse
    path's extra time from the second-shortest history to the longest over the extra workspace
    rows. Past ``topk`` cached tokens the picks are capped, so only the workspace grows: this is
    the dequantize's marginal cost, free of the host time that a per-call ratio carries."""
    slopes = []
    for h_q, topk in sorted({(r["h_q"], r["topk"]) for r in sweep}):
        mine = [r for r in sweep if (r["h_q"], r["topk"]) == (h_q, topk)]
        extend = max(r["extend"] for r in mine)
        rows = sorted((r for r in mine if r["extend"] == extend), key=lambda r: r["history"])
        if len(rows) >= 3 and rows[-1]["workspace_rows"] > rows[1]["workspace_rows"]:
            slopes.append((rows[-1]["sparse_us"] - rows[1]["sparse_us"]) * 1e3
                          / (rows[-1]["workspace_rows"] - rows[1]["workspace_rows"]))
    return slopes


def fit_costs(cases: list[dict], latency: dict, sweep: list[dict]) -> dict:
    """``routing.PathCosts`` fields from the measurements: throughputs and the combine's cost per
    entry as medians over cases, the dequantize's per-row cost from the ratio-1 sweep
    (:func:`dequant_slopes`; the per-case median where the sweep has too few histories), the
    fixed per-layer costs from the small batch."""
    fit = {}
    for h in (64, 128):
        mine = [c for c in cases if c["h_q"] == h and 4 in c["layers"] and "regular" in c["layers"][4]]
        if mine:
            fit[f"regular_tflops_h{h}"] = statistics.median(
                attn_tflops(c["work"][4]["regular_kv"], h, c["layers"][4]["regular"]) for c in mine)
            fit[f"sparse_tflops_h{h}"] = statistics.median(
                attn_tflops(c["work"][4]["sparse_kv"], h, c["parts"][4]["attention"]) for c in mine)
    slopes = dequant_slopes(sweep)
    fit["dequant_ns_per_row"] = statistics.median(slopes) if slopes else statistics.median(
        c["parts"][r]["dequantize"] * 1e3 / c["work"][r]["workspace_rows"] for c in cases for r in c["parts"])
    fit["combine_ns_per_entry"] = statistics.median(
        c["parts"][4]["combine"] * 1e3 / c["work"][4]["combined_entries"] for c in cases)
    fit["regular_fixed_us"] = min(latency["layers"][r].get("regular", float("inf")) for r in latency["layers"])
    fit["sparse_fixed_us"] = min(latency["layers"][r].get("sparse", float("inf")) for r in latency["layers"])
    return fit


CROSSOVER_RATIOS = (0, 1, 2, 4, 128)


def v41_case(h_q, topk, chunk, prefix, device) -> dict:
    """The whole V4.1-shaped stack per path (shared caches and top-k, SGLang's page sizes)."""
    cfg = ModelConfig(num_heads=h_q, compress_ratios=V41_STACK, topk=topk, window_size=WINDOW)
    extend = chunk // NUM_REQS
    batch = make_synthetic_batch(cfg, [prefix] * NUM_REQS, [extend] * NUM_REQS, device=device, seed=0,
                                 share_q=True, k_std=0.1, k_mean=0.05, kv_source_layers=V41_KV_SOURCES,
                                 index_source_layers=V41_INDEX_SOURCES)
    out = torch.empty_like(batch.q[0])
    case = dict(h_q=h_q, topk=topk, chunk=chunk, prefix=prefix, stack_us={}, peak_mb={})
    case["route"] = {r: SparsePrefillBackend(cfg, "auto").path_for(r, batch.metadata) for r in cfg.ratio_kinds}
    for path in ("regular", "sparse", "auto"):
        pipe = BackendPipeline(batch, path)

        def stack(pipe=pipe):
            pipe.begin()
            for layer in range(len(V41_STACK)):
                pipe.layer(layer, out)
        case["peak_mb"][path] = _mb(peak_bytes(stack))
        case["stack_us"][path] = median_us(stack)
    return case


def sglang_ratio1_rule(extend: int, history: int) -> str:
    """SGLang 0.5.23's hard-coded choice for a ratio-1/2 layer of one request."""
    return routing.REGULAR if extend <= 1024 and history >= max(32768, 192 * extend) else routing.SPARSE


def ratio1_sweep(h_q, topk, device, extends=RATIO1_EXTENDS, histories=RATIO1_HISTORIES) -> list[dict]:
    """One request's ``extend`` new tokens over ``history`` cached ones through a ratio-1 (V4.1
    top-k) layer: per-layer us of both paths (two layers with their own caches in turn), auto's
    pick and SGLang's rule's."""
    cfg = ModelConfig(num_heads=h_q, compress_ratios=(0, 1, 1), topk=topk, window_size=WINDOW)
    rows = []
    for history in histories:
        for extend in extends:
            batch = make_synthetic_batch(cfg, [history], [extend], device=device, seed=0, share_q=True,
                                         k_std=0.1, k_mean=0.05, layers=(1, 2))
            out = torch.empty_like(batch.q[1])
            row = dict(h_q=h_q, topk=topk, extend=extend, history=history,
                       workspace_rows=routing.workspace_rows(cfg, batch.metadata, 1),
                       auto=SparsePrefillBackend(cfg, "auto").path_for(1, batch.metadata),
                       sglang=sglang_ratio1_rule(extend, history))
            for path in (routing.REGULAR, routing.SPARSE):
                pipe = BackendPipeline(batch, path)
                pipe.begin()
                pipe.layer(1, out)
                row[f"{path}_us"] = median_us(in_turn(lambda i: pipe.layer(i, out), (1, 2)))
            row["faster"] = min((routing.REGULAR, routing.SPARSE), key=lambda p: row[f"{p}_us"])
            rows.append(row)
            del batch
    return rows


def crossovers(costs: routing.PathCosts) -> list[dict]:
    """Per shape, prefix and ratio: the smallest one-request chunk (powers of 2) auto sends to
    the sparse path under ``costs`` (host arithmetic; trivial token tables)."""
    rows = []
    for h, topk in SHAPES:
        cfg = ModelConfig(num_heads=h, compress_ratios=CROSSOVER_RATIOS, topk=topk, window_size=WINDOW)
        for prefix in PREFIXES:
            for ratio in CROSSOVER_RATIOS:
                found = None
                for n in (2**i for i in range(17)):
                    seq = prefix + n
                    tables = {c: torch.zeros(1, seq // c + 1, dtype=torch.int32) for c in cfg.compressed_ratios}
                    md = BatchMetadata(cfg, [prefix], [n], torch.zeros(1, seq, dtype=torch.int32), tables)
                    if routing.choose_path("auto", cfg, md, ratio, costs) == routing.SPARSE:
                        found = n
                        break
                rows.append(dict(h_q=h, topk=topk, prefix=prefix, ratio=ratio, sparse_from=found))
    return rows


# ---------------------------------------------------------------------------------------------
# Report


def _mb(nbytes):
    return None if nbytes is None else round(nbytes / 2**20, 1)


def markdown(result: dict) -> str:
    cases = result["cases"]
    names = list(dict.fromkeys(n for c in cases for n in (*c["stack_us"], *c["errors"])))
    lines = [f"Stack {STACK}, {NUM_REQS} requests, W {WINDOW}, page size {PAGE}; median us of do_bench.", ""]
    lines += ["### Per layer (us), chunk cache / index rows already built", "",
              "| h_q/topk | chunk | prefix | ratio | " + " | ".join(names)
              + " | sparse: dequant / combine / attn | routed to |",
              "|" + " --- |" * (len(names) + 6)]
    for c in cases:
        for ratio, t in sorted(c["layers"].items()):
            p = c["parts"][ratio]
            parts = f"{fmt(p['dequantize'])} / {fmt(p.get('combine'))} / {fmt(p['attention'])}"
            lines.append(f"| {c['h_q']}/{c['topk']} | {c['chunk']} | {c['prefix']} | {ratio} | "
                         + " | ".join(fmt(t.get(n)) for n in names) + f" | {parts} | {c['route'][ratio]} |")
    lines += ["", "### 10-layer stack (us, per-forward work included) and peak memory above inputs (MiB)", "",
              "| h_q/topk | chunk | prefix | chunk cache | " + " | ".join(names) + " | "
              + " | ".join(f"peak {n}" for n in names) + " |",
              "|" + " --- |" * (2 * len(names) + 4)]
    for c in cases:
        lines.append(f"| {c['h_q']}/{c['topk']} | {c['chunk']} | {c['prefix']} | {fmt(c['chunk_cache_us'])} | "
                     + " | ".join(fmt(c["stack_us"].get(n)) for n in names) + " | "
                     + " | ".join(fmt(c["peak_mb"].get(n), ".1f") for n in names) + " |")
    lines += ["", f"`regular (FlashMLA decode)` is measured up to {FLASHMLA_DECODE_MAX_ROWS} query rows: at 32768 "
              "FlashMLA's FP8 decode kernel aborts the process (`get_decoding_sched_meta.cu:111: invalid argument`)."]
    errors = [(c, n, e) for c in cases for n, e in c["errors"].items()]
    if errors:
        lines += ["", "Failed variants:", ""]
        lines += [f"- {c['h_q']}/{c['topk']} chunk {c['chunk']} prefix {c['prefix']}, {n}: {e}" for c, n, e in errors]
    lines += ["", "### ANCHORS regular-path rows (s_q 4096, topk + 128; kernels only)", "",
              "| h_q | topk + W | compressed tokens | regular (ours) | sparse_attn_fwd (ours) | flash_mla_sparse_fwd |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in result["anchors"]:
        cells = [f"{fmt(r[k + '_us'])} us ({fmt(r[k + '_tflops'])} TF/s)" if k + "_us" in r else "-"
                 for k in ("regular", "sparse", "flashmla_sparse")]
        lines.append(f"| {r['h_q']} | {r['topk']} + {WINDOW} | {r['tokens']} | " + " | ".join(cells) + " |")
    fit = result["fitted_costs"]
    lines += ["", "### Fitted routing constants (paste into routing.PathCosts)", "", "```python",
              "PathCosts(" + ", ".join(f"{k}={v:.4g}" for k, v in fit.items()) + ")", "```", "",
              "Crossovers under them: one request's chunk goes sparse from this many new tokens.", "",
              "| h_q/topk | prefix | " + " | ".join(f"ratio {r}" for r in CROSSOVER_RATIOS) + " |",
              "|" + " --- |" * (len(CROSSOVER_RATIOS) + 2)]
    by_key = {(c["h_q"], c["prefix"], c["ratio"]): c["sparse_from"] for c in result["crossovers"]}
    for h, topk in SHAPES:
        for prefix in PREFIXES:
            cells = [str(by_key.get((h, prefix, r)) or "never") for r in CROSSOVER_RATIOS]
            lines.append(f"| {h}/{topk} | {prefix} | " + " | ".join(cells) + " |")
    lines += ["", f"### DeepSeek-V4.1-shaped stack {V41_STACK} (kv sources {V41_KV_SOURCES}, index sources "
              f"{V41_INDEX_SOURCES}; SGLang's pages): whole stack (us) and peak memory (MiB)", "",
              "| h_q/topk | chunk | prefix | regular | sparse | auto | peak regular | peak sparse | peak auto | routed |",
              "|" + " --- |" * 10]
    for c in result["v41"]:
        route = ", ".join(f"{r}: {p}" for r, p in sorted(c["route"].items()))
        lines.append(f"| {c['h_q']}/{c['topk']} | {c['chunk']} | {c['prefix']} | "
                     + " | ".join(fmt(c["stack_us"].get(p)) for p in ("regular", "sparse", "auto")) + " | "
                     + " | ".join(fmt(c["peak_mb"].get(p), ".1f") for p in ("regular", "sparse", "auto"))
                     + f" | {route} |")
    lines += ["", "### Ratio-1 (V4.1 top-k) layer, one request: short extends over long histories (us per layer)", "",
              "| h_q/topk | history | new tokens | regular | sparse | faster | auto picks | SGLang's rule |",
              "|" + " --- |" * 8]
    for r in result["ratio1"]:
        lines.append(f"| {r['h_q']}/{r['topk']} | {r['history']} | {r['extend']} | {fmt(r['regular_us'])} | "
                     f"{fmt(r['sparse_us'])} | {r['faster']} | {r['auto']} | {r['sglang']} |")
    lines.append("")
    return "\n".join(lines)


def each_case(shapes, chunks, prefixes, progress: Progress, measure) -> list:
    """``measure(h_q, topk, chunk, prefix)`` of every case in turn, one progress step each."""
    rows = []
    for h, k in shapes:
        for c in chunks:
            for p in prefixes:
                progress.step(f"h_q {h} topk {k}, chunk {c}, prefix {p}")
                rows.append(measure(h, k, c, p))
    return rows


def run(
    *, quick: bool = False, smoke: bool = False, shapes: Sequence[tuple[int, int]] = SHAPES,
    chunks: Sequence[int] = CHUNKS, prefixes: Sequence[int] = PREFIXES, progress: Progress = SILENT,
) -> BenchResult:
    """Measure on CUDA (``smoke``: tiny shapes on whatever device there is). ``quick``: the first
    shape and the first chunk size only."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes, chunks, prefixes = list(shapes), list(chunks), list(prefixes)
    anchors = [(h, k, t, ANCHOR_ROWS) for h, k in SHAPES for t in ANCHOR_TOKENS]
    if quick:
        shapes, chunks, anchors = shapes[:1], chunks[:1], anchors[:1]
    ratio1 = dict(extends=RATIO1_EXTENDS, histories=RATIO1_HISTORIES)
    if smoke:
        shapes, chunks, prefixes, anchors = [(4, 16)], [64], [0, 300], [(4, 16, 256, 16)]
        ratio1 = dict(extends=(8,), histories=(0, 600))

    cases_n = len(shapes) * len(chunks) * len(prefixes)
    progress.section("backend", 2 * cases_n + 1 + len(anchors) + len(shapes))
    with value_checks(False):
        cases = each_case(shapes, chunks, prefixes, progress, lambda h, k, c, p: run_case(h, k, c, p, device))
        progress.step("fixed costs (small batch)")
        latency = run_case(shapes[0][0], shapes[0][1], NUM_REQS * LATENCY_EXTEND, 0, device, measure_memory=False)
        anchor = []
        for a in anchors:
            progress.step(f"ANCHORS regular-path row h_q {a[0]} topk {a[1]} tokens {a[2]}")
            anchor.append(anchor_rows(*a, device))
        v41, sweep = [], []
        for h, k in shapes:
            for c in chunks:
                for p in prefixes:
                    progress.step(f"V4.1 stack h_q {h} topk {k}, chunk {c}, prefix {p}")
                    v41.append(v41_case(h, k, c, p, device))
            progress.step(f"ratio-1 sweep h_q {h} topk {k}")
            sweep += ratio1_sweep(h, k, device, **ratio1)
    result = dict(
        stack=STACK, cases=cases, latency=latency, anchors=anchor, v41=v41, ratio1=sweep,
        fitted_costs=fit_costs(cases, latency, sweep),
        current_costs=dataclasses.asdict(routing.DEFAULT_COSTS),
    )
    fitted = dataclasses.replace(routing.DEFAULT_COSTS, **result["fitted_costs"])
    with value_checks(False):
        result["crossovers"] = crossovers(fitted)
    extra = {k: v for k, v in result.items() if k != "cases"}
    return BenchResult("backend", "The backend end to end: both paths, routing, the original pipeline",
                       markdown(result), cases, extra)


def case_main(argv: Sequence[str] | None, doc: str, name: str, run) -> int:
    """The ``main`` of a benchmark of these cases (``--shapes`` x ``--chunks`` x ``--prefixes``,
    ``--smoke``, ``--out``): ``run(smoke=, shapes=, chunks=, prefixes=, progress=)`` measures."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", metavar="DIR", help=f"directory for {name}.md and {name}.json")
    ap.add_argument("--chunks", default=",".join(map(str, CHUNKS)))
    ap.add_argument("--prefixes", default=",".join(map(str, PREFIXES)))
    ap.add_argument("--shapes", default=",".join(f"{h}:{k}" for h, k in SHAPES), help="h_q:topk,...")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any device (checks the script)")
    args = ap.parse_args(argv)
    shapes = [tuple(map(int, s.split(":"))) for s in args.shapes.split(",")]
    chunks, prefixes = ([int(x) for x in text.split(",")] for text in (args.chunks, args.prefixes))
    return bench_main(
        args.out,
        lambda progress: run(smoke=args.smoke, shapes=shapes, chunks=chunks, prefixes=prefixes, progress=progress),
        None if args.smoke else require_cuda(f"the {name} benchmark"),
    )


def main(argv: Sequence[str] | None = None) -> int:
    return case_main(argv, __doc__, "backend", run)

if __name__ == "__main__":
    sys.exit(main())
