"""SparsePrefillChunkCache: brute-force set test against DESIGN.md's table, staleness, validation.

The brute-force test follows every combined index of a query row through its layer's workspace
plan to the cache token it dequantizes from, and compares that set with the tokens DESIGN.md
says the query attends to, computed independently here with Python sets and loops.
"""

from __future__ import annotations

import gc

import pytest
import torch

from sparse_prefill.backend.chunk_cache import SparsePrefillChunkCache, StaleChunkCacheError

W = 128
RATIOS = (0, 1, 2, 4, 128)  # every DeepSeek-V4.1 layer kind
TOPK_RATIOS = (1, 2, 4)


class Metadata:
    """Stands in for an engine's batch-metadata object (the cache's key)."""


def random_batch(num_reqs, max_prefix, max_extend, *, extremes=False):
    prefix = torch.randint(0, max_prefix + 1, (num_reqs,))
    ext = torch.randint(1, max_extend + 1, (num_reqs,))
    if extremes:  # the bounds of the issue: no prefix / prefix 5000, extend 1 / 3000
        prefix[:3] = torch.tensor([5000, 0, 5000])[:num_reqs]
        ext[:3] = torch.tensor([3000, 1, 1])[:num_reqs]
    return (prefix + ext).int().tolist(), ext.int().tolist()


def unique_tables(seq, ratios):
    """Token tables with globally distinct ids, so a reached id names exactly one (cache, token)."""
    num_reqs, longest = len(seq), max(seq)
    ids = torch.randperm(num_reqs * longest * 4).int()  # SWA + ratio 1 + 2 + 4 + 128 < 2x
    swa = ids[: num_reqs * longest].view(num_reqs, longest)
    comp, used = {}, num_reqs * longest
    for c in ratios:
        if c > 0:
            n = max(longest // c, 1)
            comp[c] = ids[used : used + num_reqs * n].view(num_reqs, n)
            used += num_reqs * n
    return swa, comp


def random_picks(seq, ext, topk, ratio=4):
    """Duplicate-free indexer picks per query, mostly visible entries, some future ones, some -1."""
    rows = []
    for s, e in zip(seq, ext):
        prefix = s - e
        p = torch.arange(prefix, s)[:, None]
        span = max(s // ratio + 8, topk)
        score = torch.rand(e, span)
        score[torch.arange(span)[None, :] >= (p + 1) // ratio + 4] -= 1.0  # prefer visible entries
        picks = score.topk(topk, dim=1).indices
        picks[torch.rand(e, topk) < 0.05] = -1
        rows.append(picks)
    return torch.cat(rows).int()


def expected_tokens(seq, ext, swa_table, comp_tables, ratio, picks):
    """DESIGN.md's table, per query row: the set of ("swa" | "c", token id) it attends to."""
    swa_rows = swa_table.tolist()
    comp_rows = comp_tables[ratio].tolist() if ratio > 0 else None
    picks = picks.tolist() if picks is not None else None
    out, q = [], 0
    for r, (s, e) in enumerate(zip(seq, ext)):
        for p in range(s - e, s):
            want = {("swa", swa_rows[r][x]) for x in range(max(0, p - W + 1), p + 1)}
            if ratio in TOPK_RATIOS:
                want |= {("c", comp_rows[r][j]) for j in picks[q] if 0 <= j < (p + 1) // ratio}
            elif ratio > 0:  # dense
                want |= {("c", comp_rows[r][j]) for j in range((p + 1) // ratio)}
            out.append(want)
            q += 1
    return out


def reached_tokens(layer):
    """Follow each combined row through the workspace plan to cache tokens (a list per row)."""
    plan = layer.plan
    rows = [("c", t) for t in plan.compressed_token_ids.tolist()]
    rows += [("swa", t) for t in plan.swa_token_ids.tolist()]
    out = []
    for row, length in zip(layer.indices.tolist(), layer.lens.tolist()):
        valid, rest = row[:length], row[length:]
        assert rest.count(-1) == len(rest)
        assert not valid or 0 <= min(valid) and max(valid) < len(rows)
        out.append([rows[x] for x in valid])
    return out


def check_batch(seq, ext, device, impl, topk=512, c4_layers=2):
    swa_table, comp_tables = unique_tables(seq, RATIOS)
    key = Metadata()
    cache = SparsePrefillChunkCache.build(
        key=key,
        seq_lens=torch.tensor(seq, dtype=torch.int32, device=device),
        extend_lens=torch.tensor(ext, dtype=torch.int32, device=device),
        swa_token_table=swa_table.to(device),
        window_size=W,
        ratios=RATIOS,
        compressed_token_tables={c: t.to(device) for c, t in comp_tables.items()},
        topk=topk,
        impl=impl,
    )
    assert cache.num_tokens == sum(ext)
    for c in RATIOS:
        plan = cache.plan(c, key)
        # The workspace is exactly what the requests can see, not R x the longest.
        n_comp = sum(s // c for s in seq) if c > 0 else 0
        assert plan.num_compressed_rows == n_comp
        assert plan.num_rows == n_comp + sum(min(s, e + W - 1) for s, e in zip(seq, ext))
    for _ in range(c4_layers):  # the second top-k layer of a ratio reuses the first one's buffers
        layer_picks = {c: random_picks(seq, ext, topk, c) for c in TOPK_RATIOS}
        for c in RATIOS:
            picks = layer_picks.get(c)
            layer = cache.layer(c, key, None if picks is None else picks.to(device))
            want = expected_tokens(seq, ext, swa_table, comp_tables, c, picks)
            got = reached_tokens(layer)
            assert len(got) == len(want)
            for q, (g, w) in enumerate(zip(got, want)):
                assert len(g) == len(set(g)), f"ratio {c} row {q}: a token reached twice"
                assert set(g) == w, f"ratio {c} row {q}"
    return cache


def assert_caches_equal(a, b, key, picks_a, picks_b):
    """Two caches of one chunk (e.g. kernels and reference) give equal SWA gathers, plans and
    combined rows for every ratio; ``picks_*``: the top-k layers' picks on each cache's device."""
    assert a.max_workspace_rows == b.max_workspace_rows and a.ratios == b.ratios
    for x, y in zip(a.swa(key), b.swa(key)):
        assert torch.equal(x.cpu(), y.cpu())
    for c in RATIOS:
        topk = c in TOPK_RATIOS
        la, lb = a.layer(c, key, picks_a if topk else None), b.layer(c, key, picks_b if topk else None)
        for x, y in zip(la.plan, lb.plan):
            assert x == y if isinstance(x, int) else torch.equal(x.cpu(), y.cpu())
        assert torch.equal(la.indices.cpu(), lb.indices.cpu()) and torch.equal(la.lens.cpu(), lb.lens.cpu())


@pytest.mark.parametrize("seed", range(4))
def test_brute_force_reference(seed):
    torch.manual_seed(seed)
    num_reqs = int(torch.randint(1, 9, ()))
    seq, ext = random_batch(num_reqs, 1200, 60)
    check_batch(seq, ext, "cpu", "reference")


def test_brute_force_reference_extremes():
    """Prefixes 0 and 5000, extends 1 and 3000, 8 requests: the issue's bounds (reference path)."""
    seq, ext = random_batch(8, 5000, 40, extremes=True)
    check_batch(seq, ext, "cpu", "reference", c4_layers=1)


@pytest.mark.parametrize("num_reqs", [1, 3, 8])
def test_brute_force_kernels(device, num_reqs):
    """The same through the Triton kernels (interpreter on CPU: fewer query tokens)."""
    seq, ext = random_batch(num_reqs, 5000, 6 if device.type == "cpu" else 600)
    check_batch(seq, ext, device, "triton")


@pytest.mark.gpu
def test_gpu_brute_force_extremes():
    seq, ext = random_batch(8, 5000, 3000, extremes=True)
    check_batch(seq, ext, torch.device("cuda"), "triton", topk=1024, c4_layers=1)


@pytest.mark.gpu
@pytest.mark.alone
@pytest.mark.parametrize("topk", [512, 1024])
def test_gpu_large_chunk_kernels_equal_reference(topk):
    """A 131072-token chunk over 8 requests with long prefixes: kernel cache == reference cache."""
    dev = torch.device("cuda")
    ext = [131072 // 8] * 8
    seq = [e + int(p) for e, p in zip(ext, torch.randint(0, 60000, (8,)))]
    swa, comp = unique_tables(seq, RATIOS)
    kwargs = dict(
        key=1, seq_lens=torch.tensor(seq, dtype=torch.int32, device=dev),
        extend_lens=torch.tensor(ext, dtype=torch.int32, device=dev), swa_token_table=swa.to(dev),
        window_size=W, ratios=RATIOS, compressed_token_tables={c: t.to(dev) for c, t in comp.items()},
        topk=topk,
    )
    tri = SparsePrefillChunkCache.build(**kwargs, impl="triton")
    ref = SparsePrefillChunkCache.build(**kwargs, impl="reference")
    picks = torch.randint(-1, max(seq) + 10, (sum(ext), topk), dtype=torch.int32, device=dev)
    assert_caches_equal(tri, ref, 1, picks, picks)


def build_small(impl="reference", key=7, **change):
    seq = torch.tensor([40, 9, 300], dtype=torch.int32)
    ext = torch.tensor([5, 9, 3], dtype=torch.int32)
    swa, comp = unique_tables(seq.tolist(), RATIOS)
    kwargs = dict(
        key=key,
        seq_lens=seq,
        extend_lens=ext,
        swa_token_table=swa,
        window_size=16,
        ratios=RATIOS,
        compressed_token_tables=comp,
        topk=8,
        impl=impl,
    )
    kwargs.update(change)
    return SparsePrefillChunkCache.build(**kwargs), kwargs


def test_kernel_cache_equals_reference_cache(device):
    ref, kwargs = build_small()
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    moved["compressed_token_tables"] = {c: t.to(device) for c, t in kwargs["compressed_token_tables"].items()}
    moved["impl"] = "triton"
    tri = SparsePrefillChunkCache.build(**moved)
    picks = torch.randint(-1, 310, (ref.num_tokens, 8), dtype=torch.int32)
    assert_caches_equal(tri, ref, 7, picks.to(device), picks)


def test_builder_builds_what_build_builds():
    """One builder, several batches: each cache equals ``build``'s of the same batch."""
    _, kwargs = build_small()
    model = {k: kwargs.pop(k) for k in ("window_size", "ratios", "topk", "impl")}
    builder = SparsePrefillChunkCache.builder(**model, device="cpu")
    assert builder.ratios == sorted(RATIOS) and builder.impl == "reference" and builder.device_type == "cpu"
    picks = torch.randint(-1, 310, (17, 8), dtype=torch.int32)
    for key in (1, 2):
        assert_caches_equal(builder.build(**{**kwargs, "key": key}), SparsePrefillChunkCache.build(
            **kwargs | {"key": key}, **model), key, picks, picks)


def test_builder_validation():
    _, kwargs = build_small()
    model = {k: kwargs.pop(k) for k in ("window_size", "ratios", "topk", "impl")}
    with pytest.raises(ValueError, match="window_size"):
        SparsePrefillChunkCache.builder(**model | {"window_size": 0})
    with pytest.raises(ValueError, match="impl"):
        SparsePrefillChunkCache.builder(**model | {"impl": "fast"})
    builder = SparsePrefillChunkCache.builder(**model, device="meta")
    with pytest.raises(ValueError, match="seq_lens must be on a meta device"):
        builder.build(**kwargs)
    with pytest.raises(ValueError, match="key"):
        SparsePrefillChunkCache.builder(**model, device="cpu").build(**kwargs | {"key": None})


def test_topk_buffers_are_reused():
    cache, _ = build_small()
    a = cache.combine_topk(4, torch.zeros(cache.num_tokens, 8, dtype=torch.int32), 7)
    b = cache.combine_topk(4, torch.full((cache.num_tokens, 8), -1, dtype=torch.int32), 7)
    assert a[0] is b[0] and a[1] is b[1]
    # The second layer's picks are all -1: only windows remain.
    positions = [*range(35, 40), *range(0, 9), *range(297, 300)]  # seq [40, 9, 300], ext [5, 9, 3]
    assert b[1].tolist() == [min(p + 1, 16) for p in positions]
    # Each top-k ratio has its own buffers.
    c = cache.combine_topk(1, torch.zeros(cache.num_tokens, 8, dtype=torch.int32), 7)
    assert c[0] is not a[0]


def test_same_picks_tensor_reuses_rows_until_written():
    """V4.1's index sharing: a layer passing the previous combine's topk_indices tensor gets its
    rows back without a recombine; a write to the tensor (or another tensor) recombines."""
    cache, _ = build_small()
    picks = torch.randint(-1, 80, (cache.num_tokens, 8), dtype=torch.int32)
    indices, lens = cache.combine_topk(2, picks, 7)
    want = indices.clone(), lens.clone()
    indices.fill_(-7)  # poison: a reuse returns the buffers as they are
    assert cache.combine_topk(2, picks, 7)[0].eq(-7).all()
    assert cache.layer(2, 7, picks[:]).indices.eq(-7).all()  # a view of the same elements too
    picks.add_(0)  # a write, even one that changes nothing, bumps the version: recombined
    got = cache.combine_topk(2, picks, 7)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    got[0].fill_(-7)
    got = cache.combine_topk(2, picks.clone(), 7)  # another tensor: recombined
    assert torch.equal(got[0], want[0])


def test_stale_key_invalidate_and_in_place_change():
    md = Metadata()
    cache, kwargs = build_small(key=md)
    assert cache.is_valid_for(md)
    cache.layer(0, md)
    with pytest.raises(StaleChunkCacheError, match="key differs"):
        cache.layer(0, Metadata())
    assert not cache.is_valid_for(Metadata()) and not cache.is_valid_for(None)

    kwargs["seq_lens"].copy_(kwargs["seq_lens"])  # a CUDA-graph replay's metadata copy
    assert not cache.is_valid_for(md)
    with pytest.raises(StaleChunkCacheError, match="modified in place"):
        cache.plan(4, md)

    cache, kwargs = build_small(key=md)
    kwargs["compressed_token_tables"][128][0, 0] = 5
    with pytest.raises(StaleChunkCacheError, match="modified in place"):
        cache.combine_topk(4, torch.zeros(cache.num_tokens, 8, dtype=torch.int32), md)

    cache, _ = build_small(key=md)
    cache.invalidate()
    for use in (lambda: cache.layer(0, md), lambda: cache.swa(md), lambda: cache.plan(1, md)):
        with pytest.raises(StaleChunkCacheError, match="invalidated"):
            use()


def test_generation_token_keys_and_dead_metadata():
    cache, _ = build_small(key=10**12)
    assert cache.is_valid_for(10**12) and not cache.is_valid_for(10**12 + 1) and not cache.is_valid_for("1")
    md = Metadata()
    cache, _ = build_small(key=md)
    del md
    gc.collect()
    assert not cache.is_valid_for(Metadata())  # held weakly: a new object never matches


def test_inference_tensors_use_key_and_invalidate():
    with torch.inference_mode():
        cache, kwargs = build_small(key="gen-1")
        kwargs["seq_lens"].add_(0)  # not tracked for inference tensors
    assert cache.is_valid_for("gen-1") and not cache.is_valid_for("gen-2")
    cache.invalidate()
    assert not cache.is_valid_for("gen-1")


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(key=None), ValueError, "key"),
        (dict(window_size=0), ValueError, "window_size"),
        (dict(ratios=()), ValueError, "ratios"),
        (dict(ratios=(0, 4, 4, 128)), ValueError, "distinct"),
        (dict(ratios=(0, 4.0, 128)), TypeError, "ratios"),
        (dict(ratios=(0, 4)), ValueError, "compressed_token_tables must have one table per ratio"),
        (dict(ratios=(1, 4)), ValueError, "old convention, where 1 meant an SWA-only layer"),
        (dict(ratios=(0, 8)), ValueError, "no layer kind for ratio 8"),
        (dict(ratio_kinds={4: "swa"}), ValueError, "ratio 0 is the SWA-only layer"),
        (dict(topk=None), TypeError, "topk"),
        (dict(topk=0), ValueError, "topk"),
        (dict(ratios=(0, 128), compressed_token_tables=None, topk=None), ValueError, "compressed_token_tables"),
        (dict(extend_lens=torch.tensor([5, 10, 3], dtype=torch.int32)), ValueError, r"extend_lens\[1\]"),
        (dict(extend_lens=torch.tensor([5, 9], dtype=torch.int32)), ValueError, "extend_lens"),
        (dict(seq_lens=torch.tensor([40, 9, 300])), TypeError, "seq_lens"),
        (dict(swa_token_table=torch.zeros(3, 299, dtype=torch.int32)), ValueError, "swa_token_table has 299"),
        (dict(impl="fast"), ValueError, "impl"),
    ],
)
def test_build_validation(change, exc, match):
    with pytest.raises(exc, match=match):
        build_small(**change)


def test_build_validation_tables_and_layer_use():
    with pytest.raises(ValueError, match=r"compressed_token_tables\[4\] has 2 columns"):
        build_small(ratios=(0, 4, 128), compressed_token_tables={4: torch.zeros(3, 2, dtype=torch.int32),
                                                                 128: torch.zeros(3, 2, dtype=torch.int32)})
    with pytest.raises(ValueError, match="topk is for top-k layers"):
        build_small(ratios=(0, 128), compressed_token_tables={128: torch.zeros(3, 2, dtype=torch.int32)})
    # A stack of ratio-1 top-k layers only, stated explicitly.
    ratio1, _ = build_small(ratios=(1,), compressed_token_tables={1: torch.zeros(3, 300, dtype=torch.int32)},
                            ratio_kinds={1: "topk"})
    assert ratio1.ratios == (1,)
    cache, _ = build_small()
    with pytest.raises(ValueError, match="need their indexer"):
        cache.layer(4, 7)
    with pytest.raises(ValueError, match=r"only for top-k layers, not ratio 128 \(dense\)"):
        cache.layer(128, 7, torch.zeros(cache.num_tokens, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="topk_indices must have shape"):
        cache.combine_topk(4, torch.zeros(cache.num_tokens, 9, dtype=torch.int32), 7)
    with pytest.raises(ValueError, match="combine_topk needs a top-k ratio"):
        cache.combine_topk(128, torch.zeros(cache.num_tokens, 8, dtype=torch.int32), 7)
    with pytest.raises(ValueError, match="ratio must be one of"):
        cache.plan(3, 7)


def test_empty_chunk(device):
    """Requests without new tokens: zero query rows, nothing gathered."""
    seq = torch.tensor([5, 0], dtype=torch.int32, device=device)
    ext = torch.zeros(2, dtype=torch.int32, device=device)
    table = torch.zeros(2, 5, dtype=torch.int32, device=device)
    cache = SparsePrefillChunkCache.build(
        key=1, seq_lens=seq, extend_lens=ext, swa_token_table=table, window_size=W, ratios=(0, 4),
        compressed_token_tables={4: table}, topk=512, impl="triton",
    )
    assert cache.num_tokens == 0 and cache.max_workspace_rows == 1  # request 0's complete entry
    layer = cache.layer(4, 1, torch.zeros(0, 512, dtype=torch.int32, device=device))
    assert layer.indices.shape == (0, 640) and layer.lens.shape == (0,)


def test_host_lens_skip_the_sync_and_must_match():
    """Host copies of the lengths give the same cache; wrong ones are refused (value checks on)."""
    ref, kwargs = build_small()
    host = (kwargs["seq_lens"].tolist(), kwargs["extend_lens"].tolist())
    cache = SparsePrefillChunkCache.build(**kwargs, host_lens=host)
    picks = torch.randint(-1, 310, (ref.num_tokens, 8), dtype=torch.int32)
    assert_caches_equal(cache, ref, 7, picks, picks)
    with pytest.raises(ValueError, match="host_lens' extend_lens .* differ"):
        SparsePrefillChunkCache.build(**kwargs, host_lens=(host[0], [5, 9, 2]))
    with pytest.raises(ValueError, match="host_lens' seq_lens has 2 entries"):
        SparsePrefillChunkCache.build(**kwargs, host_lens=(host[0][:2], host[1]))
    with pytest.raises(TypeError, match="host_lens must be a"):
        SparsePrefillChunkCache.build(**kwargs, host_lens=host[0])
    with pytest.raises(TypeError, match="host_lens' seq_lens must be a sequence"):
        SparsePrefillChunkCache.build(**kwargs, host_lens=(kwargs["seq_lens"], host[1]))
    with pytest.raises(TypeError, match=r"host_lens' extend_lens\[1\]"):
        SparsePrefillChunkCache.build(**kwargs, host_lens=(host[0], [5, 9.0, 3]))
