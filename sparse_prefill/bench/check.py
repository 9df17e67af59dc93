"""``sparse-prefill check``: a randomized correctness sweep of every op against its reference.

Each round draws fresh shapes and inputs for one op (seeded: round ``i`` uses ``seed + i``, so
a failing round is replayed with ``--only OP --seed S --seconds 0.001``), runs the Triton kernel
on NaN/junk-poisoned outputs and compares it with the op's PyTorch reference: the cache and
index ops bit for bit, attention under FlashMLA's tolerances (``accuracy.py``) against the
float32 references. Inputs cover the contracts' corners: invalid indices of every kind, padding
ids, empty inputs, odd sizes, lengths that cut rows, infinite sinks, NaN rows listed past a row's
length. On CUDA the shapes are real-sized (and one cache round in 8 puts its tokens past 2**31
bytes); on CPU the kernels run under Triton's interpreter, so shapes stay small.
"""

from __future__ import annotations

import itertools
import math
import random
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sparse_prefill.backend import ModelConfig, SparsePrefillBackend, make_synthetic_batch, naive_layer_forward
from sparse_prefill.bench.accuracy import OUT_TOL, STAT_TOL, compare
from sparse_prefill.bench.common import Progress
from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops.cache import dequantize_k_cache_paged, quantize_k_cache, store_k_cache
from sparse_prefill.ops.fp8_sparse_attn import paged_fp8_sparse_attn_fwd
from sparse_prefill.ops.fp8_sparse_attn.naive import paged_fp8_sparse_attn_fwd_naive
from sparse_prefill.ops.indices import (
    build_swa_token_ids,
    build_workspace_plan,
    combine_topk_swa_indices,
    combined_width,
)
from sparse_prefill.ops.sparse_attn import sparse_attn_fwd
from sparse_prefill.ops.sparse_attn.naive import sparse_attn_fwd_naive

INT_MIN, INT_MAX = -(2**31), 2**31 - 1
SM_SCALE = 0.5  # FlashMLA's test scale, which its tolerances are calibrated for (with randn / 10 data)


@dataclass
class Round:
    """One round's outcome: ``case`` (the shapes drawn), worst ``errors`` per metric, and a line
    per mismatch in ``failures``."""

    case: str
    errors: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def compare(self, metric: str, ans: torch.Tensor, ref: torch.Tensor, tol: dict) -> None:
        result = compare(ans, ref, **tol)
        self.errors[metric] = max(self.errors.get(metric, 0.0), result.max_abs)
        if not result.ok:
            self.failures.append(f"{metric}: {result.why}")

    def count(self, metric: str, a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
        """A bit-exact comparison: the elements of ``a`` and ``b`` that differ (must be none)."""
        differ = a.numel() + b.numel() if a.shape != b.shape else int((a != b).sum())
        self.errors[metric] = max(self.errors.get(metric, 0.0), float(differ))
        if differ:
            self.failures.append(f"{what or metric}: {differ} elements differ")


@dataclass(frozen=True)
class Sizes:
    """Ranges of the random shapes: small under the interpreter, real-sized on a GPU."""

    tokens: int  # cache ops' tokens per round
    page: int  # largest page size
    s_q: int  # attention query rows
    heads: tuple[int, ...]
    s_kv: int
    topk: tuple[int, ...]
    requests: int
    prefix: int
    extend: int
    windows: tuple[int, ...]
    backend_heads: tuple[int, ...]
    backend_topk: tuple[int, ...]


CPU_SIZES = Sizes(tokens=48, page=8, s_q=4, heads=(1, 2, 3, 5, 8, 16), s_kv=300, topk=(1, 7, 33, 64, 100),
                  requests=3, prefix=600, extend=40, windows=(1, 3, 8, 16, 64), backend_heads=(1, 2, 3),
                  backend_topk=(4, 9, 16))
GPU_SIZES = Sizes(tokens=20000, page=256, s_q=300, heads=(1, 7, 16, 32, 64, 100, 128), s_kv=200000,
                  topk=(1, 100, 512, 1024, 2048, 1500), requests=16, prefix=40000, extend=3000,
                  windows=(1, 16, 128, 200), backend_heads=(8, 16, 64, 128), backend_topk=(512, 1024, 77))


def _values(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """FlashMLA's test distribution: randn / 10 plus a random offset, bf16."""
    return (torch.randn(shape, device=device) / 10 + (torch.rand(()).item() - 0.5) / 10).bfloat16()


def _ids(shape: tuple[int, ...], valid_below: int, bound: int, invalid: float, device: torch.device) -> torch.Tensor:
    """int32 ids in ``[0, valid_below)``, about ``invalid`` of them replaced by invalid ids of
    every kind (negative, INT_MIN, ``bound`` (the first invalid one) and beyond, INT_MAX)."""
    ids = torch.randint(0, max(valid_below, 1), shape, device=device, dtype=torch.int32)
    kinds = torch.tensor([-1, -77, INT_MIN, bound, bound + 5, INT_MAX], device=device, dtype=torch.int32)
    bad = torch.rand(shape, device=device) < invalid
    return torch.where(bad, kinds[torch.randint(0, len(kinds), shape, device=device)], ids)


def _sink(rng: random.Random, h_q: int, device: torch.device) -> torch.Tensor | None:
    if rng.random() < 0.25:
        return None
    sink = torch.randn(h_q, device=device)
    if h_q >= 3 and rng.random() < 0.5:
        sink[1], sink[2] = -math.inf, math.inf
    return sink


def _lengths(rng: random.Random, s_q: int, width: int, device: torch.device) -> torch.Tensor | None:
    if rng.random() < 0.4:
        return None
    return torch.randint(0, width + 1, (s_q,), device=device, dtype=torch.int32)


def _past_lengths(ids: torch.Tensor, lengths: torch.Tensor | None, target: int) -> torch.Tensor:
    """``ids`` with every entry past its row's length pointing at ``target`` (a NaN row)."""
    if lengths is None:
        return ids
    past = torch.arange(ids.shape[-1], device=ids.device) >= lengths[:, None].long()
    return ids.masked_fill(past.view(ids.shape[0], *[1] * (ids.dim() - 2), ids.shape[-1]), target)


def _attention_outputs(s_q: int, h_q: int, device: torch.device) -> torch.Tensor:
    return torch.full((s_q, h_q, 512), math.nan, dtype=torch.bfloat16, device=device)


def _compare_attention(rnd: Round, result: tuple, reference: tuple) -> None:
    for metric, ans, ref, tol in zip(("out", "max_logits", "lse"), result, reference, (OUT_TOL, STAT_TOL, STAT_TOL)):
        rnd.compare(metric, ans, ref, tol)


# ---------------------------------------------------------------------------------------------
# One round per op


def check_cache(rng: random.Random, device: torch.device, sz: Sizes) -> Round:
    """store_k_cache and dequantize_k_cache_paged, kernel vs reference, bit for bit."""
    layout = rng.choice([KVCacheLayout.V4, KVCacheLayout.V32])
    page = rng.randint(1, sz.page)
    n = rng.choice([0, rng.randint(1, sz.tokens)])
    page_bytes = layout.page_bytes(page)
    # GPU: one round in 8 puts the tokens on pages past 2**31 bytes (int64 offsets).
    first_page = 2**31 // page_bytes + 1 if device.type == "cuda" and rng.random() < 0.125 else 0
    num_pages = first_page + -(-n // page) + rng.randint(1, 3)
    rnd = Round(f"{layout.name}, page size {page}, {n} tokens, {num_pages} pages")
    if first_page:  # zeros: quantizing gigabytes of K with the reference would take long
        cache = torch.zeros(num_pages, page_bytes, dtype=torch.uint8, device=device)
    else:  # earlier tokens in every slot: a store must change only the bytes of its own slots
        cache = quantize_k_cache(_values((num_pages, page, 1, layout.dim), device), layout, impl="reference")
    k = torch.randn(n, layout.dim, device=device) * 10 ** (torch.rand(n, 1, device=device) * 7 - 4)
    k[: n // 8] = 0
    slots = first_page * page + torch.randperm((num_pages - first_page) * page, device=device)[:n]
    slots = torch.where(torch.rand(n, device=device) < 0.1, -1, slots)
    stored = cache.clone()
    store_k_cache(stored, k.bfloat16(), slots, page, layout, impl="triton")
    store_k_cache(cache, k.bfloat16(), slots, page, layout, impl="reference")
    rnd.count("store bytes", stored, cache)
    del stored

    capacity = num_pages * page
    ids = torch.cat([slots, torch.randint(-2, capacity, (rng.randint(0, sz.tokens),), device=device)])
    ids = ids[torch.randperm(ids.numel(), device=device)].to(rng.choice([torch.int32, torch.int64]))
    out = torch.full((ids.numel(), 1, layout.dim), math.nan, dtype=torch.bfloat16, device=device)
    dequantize_k_cache_paged(cache, ids, page, layout, out=out, impl="triton")
    ref = dequantize_k_cache_paged(cache, ids, page, layout, impl="reference")
    rnd.count("dequantize elements", out.view(torch.int16), ref.view(torch.int16))
    return rnd


def check_indices(rng: random.Random, device: torch.device, sz: Sizes) -> Round:
    """build_swa_token_ids, build_workspace_plan and combine_topk_swa_indices, kernel vs
    reference, bit for bit (outputs poisoned)."""
    num_reqs = rng.randint(1, sz.requests)
    window = rng.choice(sz.windows)
    ratio = rng.choice([0, 1, 2, 4, 128, rng.randint(3, 9)])
    prefix = [rng.choice([0, rng.randint(0, sz.prefix)]) for _ in range(num_reqs)]
    extend = [rng.choice([0, 1, rng.randint(0, sz.extend)]) for _ in range(num_reqs)]
    seq = [p + e for p, e in zip(prefix, extend)]
    i32 = dict(dtype=torch.int32, device=device)
    seq_lens, extend_lens = torch.tensor(seq, **i32), torch.tensor(extend, **i32)
    table = torch.randint(INT_MIN, INT_MAX, (num_reqs, max(seq) + rng.randint(0, 3)), **i32)
    entries = max(s // ratio for s in seq) if ratio > 0 else 0
    comp_table = torch.randint(INT_MIN, INT_MAX, (num_reqs, entries + rng.randint(0, 2)), **i32) if ratio > 0 else None
    if ratio == 0:
        topk, picks = 0, None
    elif ratio == 128 and rng.random() < 0.5:
        topk, picks = entries, None  # every complete entry, as ratio-128 layers take them
    else:
        topk = rng.choice(sz.topk)
        picks = _ids((sum(extend), topk), entries + 3, entries + 3, 0.1, device)
    rnd = Round(f"{num_reqs} requests, prefixes {prefix[:4]}.., new tokens {extend[:4]}.., W {window}, "
                f"ratio {ratio}, topk {topk}{' (all entries)' if picks is None and ratio > 0 else ''}")

    qsl = torch.tensor([0, *itertools.accumulate(extend)], **i32)
    pos = torch.cat([torch.arange(p, s, **i32) for p, s in zip(prefix, seq)])
    results = {}
    for impl in ("triton", "reference"):
        swa = build_swa_token_ids(seq_lens, extend_lens, table, window, impl=impl)
        plan = build_workspace_plan(seq_lens, swa, ratio, comp_table, impl=impl)
        # Poisoned: an element the kernel does not write differs from the reference.
        out = (torch.full((pos.numel(), combined_width(topk, window)), 0x5EED, **i32),
               torch.full((pos.numel(),), -9, **i32))
        combined = combine_topk_swa_indices(
            picks, qsl, pos, seq_lens, swa.gather_lens, plan.compressed_base, plan.swa_base, window, ratio, topk,
            *out, impl=impl,
        )
        results[impl] = [*swa, plan.compressed_token_ids, plan.compressed_base, plan.swa_base, *combined]
    names = ("swa token_ids", "swa first_pos", "swa gather_lens", "swa offsets", "plan compressed ids",
             "plan compressed_base", "plan swa_base", "combined indices", "combined lens")
    for name, a, b in zip(names, results["triton"], results["reference"]):
        rnd.count("differing elements", a, b, name)
    return rnd


def check_sparse_attn(rng: random.Random, device: torch.device, sz: Sizes) -> Round:
    """sparse_attn_fwd (Triton) vs its float32 reference."""
    s_q = rng.choice([0, 1, rng.randint(1, sz.s_q)])
    h_q, d_qk = rng.choice(sz.heads), rng.choice([512, 576])
    s_kv, topk = rng.randint(2, sz.s_kv), rng.choice(sz.topk)
    q, kv = _values((s_q, h_q, d_qk), device), _values((s_kv, 1, d_qk), device)
    kv[-1] = math.nan  # listed only past a row's length: must not leak
    lengths = _lengths(rng, s_q, topk, device)
    ids = _ids((s_q, 1, topk), s_kv - 1, s_kv, rng.choice([0.0, 0.2, 1.0]), device)
    indices = _past_lengths(ids, lengths, s_kv - 1)
    sink = _sink(rng, h_q, device)
    rnd = Round(f"s_q {s_q}, h_q {h_q}, d_qk {d_qk}, s_kv {s_kv}, topk {topk}, "
                f"sink {sink is not None}, topk_length {lengths is not None}")
    out = _attention_outputs(s_q, h_q, device)
    result = sparse_attn_fwd(q, kv, indices, SM_SCALE, 512, sink, lengths, out=out, impl="triton")
    _compare_attention(rnd, result, sparse_attn_fwd_naive(q, kv, indices, SM_SCALE, 512, sink, lengths))
    return rnd


def check_fp8_sparse_attn(rng: random.Random, device: torch.device, sz: Sizes) -> Round:
    """paged_fp8_sparse_attn_fwd (Triton) vs its float32 reference, one or two scopes."""
    layout = rng.choice([KVCacheLayout.V4, KVCacheLayout.V32])
    s_q, h_q = rng.choice([0, 1, rng.randint(1, sz.s_q)]), rng.choice(sz.heads)
    q = _values((s_q, h_q, layout.dim), device)
    scopes = []
    for _ in range(rng.choice([1, 2])):
        page = rng.randint(1, sz.page)
        pages = rng.randint(1, max(1, sz.s_kv // page))
        cache = quantize_k_cache(_values((pages, page, 1, layout.dim), device), layout, impl="reference")
        topk = rng.choice(sz.topk)
        lengths = _lengths(rng, s_q, topk, device)
        scopes.append((cache, _ids((s_q, topk), pages * page, pages * page, 0.2, device), page, lengths))
    sink = _sink(rng, h_q, device)
    rnd = Round(f"{layout.name}, s_q {s_q}, h_q {h_q}, scopes (pages x page size, topk) "
                + ", ".join(f"({c.shape[0]} x {p}, {i.shape[1]})" for c, i, p, _ in scopes))
    (cache, ids, page, lengths), extra = scopes[0], scopes[1:]
    kwargs = dict(topk_length=lengths, attn_sink=sink, layout=layout)
    if extra:
        e_cache, e_ids, e_page, e_lengths = extra[0]
        kwargs.update(extra_cache=e_cache, extra_indices=e_ids, extra_page_size=e_page, extra_topk_length=e_lengths)
    out = _attention_outputs(s_q, h_q, device)
    result = paged_fp8_sparse_attn_fwd(q, cache, ids, page, SM_SCALE, out=out, impl="triton", **kwargs)
    _compare_attention(rnd, result, paged_fp8_sparse_attn_fwd_naive(q, cache, ids, page, SM_SCALE, **kwargs))
    return rnd


def check_backend(rng: random.Random, device: torch.device, sz: Sizes) -> Round:
    """SparsePrefillBackend.forward (Triton, one path) of one random layer vs naive_layer_forward."""
    ratio, path = rng.choice([0, 1, 2, 4, 128]), rng.choice(["sparse", "regular"])
    cfg = ModelConfig(
        num_heads=rng.choice(sz.backend_heads), compress_ratios=(ratio,), topk=rng.choice(sz.backend_topk),
        window_size=rng.choice(sz.windows[2:]), swa_page_size=rng.randint(1, sz.page),
        compressed_page_size=rng.randint(1, sz.page),
        ratio_kinds={1: "topk"},  # a one-layer stack of ratio 1 has no ratio 0 to tell it apart
    )
    num_reqs = rng.randint(1, sz.requests)
    prefix = [rng.choice([0, rng.randint(0, sz.prefix)]) for _ in range(num_reqs)]
    extend = [rng.randint(1, max(1, sz.extend // 8)) for _ in range(num_reqs)]
    rnd = Round(f"{path} path, ratio {ratio}, h_q {cfg.num_heads}, topk {cfg.topk}, W {cfg.window_size}, "
                f"pages {cfg.swa_page_size}/{cfg.page_size_of(ratio) if ratio > 0 else '-'}, "
                f"prefixes {prefix}, new tokens {extend}")
    # Logits spread about 1 on FlashMLA's test data.
    batch = make_synthetic_batch(cfg, prefix, extend, device=device, seed=rng.randrange(2**31),
                                 q_std=10.0, k_std=0.1, k_mean=0.05)
    out = _attention_outputs(batch.metadata.num_tokens, cfg.num_heads, device)
    SparsePrefillBackend(cfg, path, impl="triton").forward(*batch.layer_inputs(0), metadata=batch.metadata, out=out)
    rnd.compare("out", out, naive_layer_forward(cfg, batch.metadata, *batch.layer_inputs(0)), OUT_TOL)
    return rnd


# name -> (what is checked, the round)
OPS: dict[str, tuple[str, Callable[[random.Random, torch.device, Sizes], Round]]] = {
    "cache": ("store_k_cache / dequantize_k_cache_paged", check_cache),
    "indices": ("build_swa_token_ids / build_workspace_plan / combine_topk_swa_indices", check_indices),
    "sparse_attn": ("sparse_attn_fwd", check_sparse_attn),
    "fp8_sparse_attn": ("paged_fp8_sparse_attn_fwd", check_fp8_sparse_attn),
    "backend": ("SparsePrefillBackend.forward", check_backend),
}


@dataclass
class _Tally:
    rounds: int = 0
    failed: int = 0
    worst: dict[str, float] = field(default_factory=dict)


def run_check(
    seconds: float, *, seed: int = 0, ops: list[str] | None = None, say: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> bool:
    """Sweep ``ops`` (default all of ``OPS``) in turn until ``seconds`` have passed, every op at
    least once; print a line per failing round and a summary line per op through ``say``.
    Returns True when every round matched."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    names = list(ops or OPS)
    progress = Progress() if progress is None else progress
    progress.section("check", 1)
    where = "CUDA (real sizes)" if device.type == "cuda" else "CPU (Triton interpreter, small shapes)"
    say(f"sparse-prefill check: {', '.join(names)} on {where}, {seconds:g} s, seeds from {seed}")
    tallies = {name: _Tally() for name in names}
    # Under the interpreter, numpy warns about inf arithmetic in lanes the kernels then discard.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    start, i = time.monotonic(), 0
    while True:
        for name in names:
            elapsed = time.monotonic() - start
            if elapsed >= seconds and tallies[name].rounds:
                continue
            round_seed = seed + i
            i += 1
            progress.update(elapsed / seconds, f"round {i}: {name} ({elapsed:.0f}/{seconds:g} s)")
            torch.manual_seed(round_seed)
            try:
                rnd = OPS[name][1](random.Random(round_seed), device, sizes)
            except Exception as e:  # a kernel or a check that raises is a failure of this round
                rnd = Round("(raised)", failures=[f"{type(e).__name__}: {e}"])
                rnd.failures += [line.rstrip() for line in traceback.format_exc(limit=-3).splitlines()[-6:-1]]
            tally = tallies[name]
            tally.rounds += 1
            for metric, err in rnd.errors.items():
                tally.worst[metric] = max(tally.worst.get(metric, 0.0), err)
            if rnd.failures:
                tally.failed += 1
                progress.clear()
                say(f"FAIL {name} round seed {round_seed}: {rnd.case}")
                for failure in rnd.failures:
                    say(f"    {failure}")
        if time.monotonic() - start >= seconds and all(t.rounds for t in tallies.values()):
            break
    progress.clear()
    width = max(len(n) for n in names)
    for name in names:
        t = tallies[name]
        worst = ", ".join(f"{m} {v:.3g}" for m, v in t.worst.items()) or "-"
        verdict = "ok" if not t.failed else f"FAILED {t.failed}"
        say(f"{name:<{width}}  {t.rounds:4d} rounds  {verdict:<9}  worst: {worst}   ({OPS[name][0]})")
    failed = sum(t.failed for t in tallies.values())
    rounds = sum(t.rounds for t in tallies.values())
    say(f"{'FAIL' if failed else 'PASS'}: {rounds - failed} of {rounds} rounds match in "
        f"{time.monotonic() - start:.1f} s")
    return not failed
