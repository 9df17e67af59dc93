"""SparsePrefillBackend: both paths against the plain reference (naive.py) per layer, stale
state after replaced/refilled metadata, query splitting, decode, validation; GPU: long chunks.

Tolerances: the shared FlashMLA criteria (``assert_close`` with ``OUT_TOL``). The PyTorch
reference implementations of the ops compute in float32 like naive.py, so on that path each
output is also required to be within one bf16 step of the reference: a single key too many or
too few moves outputs by far more than that.
"""

from __future__ import annotations

import logging

import pytest
import torch

from sparse_prefill import value_checks
from sparse_prefill.backend import (
    BatchMetadata,
    ForwardMode,
    LayerCaches,
    ModelConfig,
    SparsePrefillBackend,
    make_synthetic_batch,
    naive_layer_forward,
)
from tests.tolerance import OUT_TOL, assert_close

STACK = (0, 4, 128, 4, 0)
# DeepSeek-V4.1's layer kinds: later layers of a ratio read their source's cache and top-k.
V41_STACK = (0, 1, 2, 4, 128, 1, 2, 4, 128, 0)
V41_SOURCES = dict(kv_source_layers=(1, 2, 3, 4), index_source_layers=(1, 2, 3))


def small_config(**kw):
    base = dict(
        num_heads=4, compress_ratios=STACK, topk=16, window_size=8, swa_page_size=4,
        compressed_page_size={4: 3, 128: 2},
    )
    return ModelConfig(**{**base, **kw})


def v41_config(**kw):
    """V4.1's kinds at small shapes with SGLang's default pages (256-token SWA pages, 256 / r
    entries per compressed page: 256, 128, 64 and 2)."""
    return ModelConfig(**{**dict(num_heads=2, compress_ratios=V41_STACK, topk=16, window_size=8), **kw})


def assert_within_one_step(name, ans, ref):
    """Two bf16 roundings of float32 results that differ only in summation order are at most
    one bf16 step apart (``2**-7`` relative, bf16 has 8 significant bits)."""
    a, r = ans.float(), ref.float()
    bad = (a - r).abs() > r.abs() * 2**-7 + 1e-5
    assert not bad.any(), f"{name}: {int(bad.sum())} elements more than one bf16 step from the reference"


def run_layers(backend, batch, layers=None):
    backend.begin_forward(batch.metadata)
    layers = range(batch.config.num_layers) if layers is None else layers
    return {layer: backend.forward(*batch.layer_inputs(layer)) for layer in layers}


def check_against_naive(batch, outs, *, tight):
    for layer, out in outs.items():
        ref = naive_layer_forward(batch.config, batch.metadata, *batch.layer_inputs(layer))
        name = f"layer {layer} (ratio {batch.config.compress_ratios[layer]})"
        assert_close(name, out, ref, **OUT_TOL)
        if tight:
            assert_within_one_step(name, out, ref)


# ---------------------------------------------------------------------------------------------
# End-to-end equivalence (reference implementations of the ops)

BATCHES = {
    # mixed: no prefix, prefix crossing a ratio-128 boundary, short prefix + long extend
    "mixed": (small_config(), [0, 300, 17], [40, 30, 90], {}),
    # odd heads and page sizes, window 16, prefixes that are and are not multiples of 4
    "odd": (
        small_config(num_heads=3, topk=24, window_size=16, swa_page_size=5, compressed_page_size={4: 1, 128: 4}),
        [0, 3, 4, 255, 511], [1, 9, 60, 2, 40], {},
    ),
    # single head, one long request: queries see more compressed entries than topk
    "one": (small_config(num_heads=1, topk=8, window_size=5), [129], [140], {}),
    # every V4.1 kind with shared caches and top-k, SGLang's pages; requests crossing pages of
    # 256 tokens (SWA, ratio 1) and of 2 ratio-128 entries
    "v41": (v41_config(), [0, 300, 511, 1], [40, 30, 3, 90], V41_SOURCES),
    # the same stack, every layer its own cache and picks; page size 2 everywhere
    "v41 pages 2": (v41_config(num_heads=3, swa_page_size=2, compressed_page_size=2), [0, 257, 9], [20, 12, 40], {}),
}


@pytest.mark.parametrize("name", sorted(BATCHES))
def test_paths_match_reference(name):
    cfg, prefix, extend, kw = BATCHES[name]
    batch = make_synthetic_batch(cfg, prefix, extend, seed=len(name), **kw)
    outs = {}
    for path in ("sparse", "regular"):
        backend = SparsePrefillBackend(cfg, path, impl="reference")
        outs[path] = run_layers(backend, batch)
        assert all(backend.path_for(r) == path for r in set(cfg.compress_ratios))
        check_against_naive(batch, outs[path], tight=True)
    for layer in outs["sparse"]:
        assert_within_one_step(f"sparse vs regular, layer {layer}", outs["sparse"][layer], outs["regular"][layer])


def test_kernels_under_interpreter_or_gpu(device):
    """The same through the Triton kernels (interpreter on CPU: a few tokens, enough keys per
    query for bf16 probabilities to meet the tolerance)."""
    # Every kind, SGLang's default pages (256-token SWA pages; 256, 128, 64, 2 entries per
    # compressed page), one shared cache and top-k (layer 5 reads layer 1's).
    cfg = v41_config(compress_ratios=(0, 1, 2, 4, 128, 1), topk=8, window_size=64)
    # FlashMLA's test data (randn / 10 plus an offset) with logits spread about 1.
    batch = make_synthetic_batch(cfg, [70, 300], [4, 2], device=device, seed=3, q_std=10, k_std=0.1, k_mean=0.05,
                                 kv_source_layers=(1, 2, 3, 4), index_source_layers=(1, 2, 3))
    for path in ("sparse", "regular"):
        outs = run_layers(SparsePrefillBackend(cfg, path, impl="triton"), batch)
        check_against_naive(batch, outs, tight=False)


def test_auto_path_and_debug_log(caplog):
    cfg, prefix, extend, _ = BATCHES["mixed"]
    batch = make_synthetic_batch(cfg, prefix, extend, seed=5, layers=(1,))
    backend = SparsePrefillBackend(cfg)  # auto
    with caplog.at_level(logging.DEBUG, logger="sparse_prefill.backend.routing"):
        outs = run_layers(backend, batch, layers=(1,))
    assert f"take the {backend.path_for(4)} path" in caplog.text
    check_against_naive(batch, outs, tight=True)


# ---------------------------------------------------------------------------------------------
# Shared caches and top-k (DeepSeek-V4.1): dequantized / combined once per forward


def _count_calls(monkeypatch, module, name):
    """Wrap ``module.name``; return the list of the first positional argument of every call."""
    calls, real = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return calls


def _times_passed(calls, t):
    return sum(c is t for c in calls)


def _v41_sparse(monkeypatch, seed, module, name):
    """The "v41" batch (shared caches and top-k), a sparse-path backend, and the first argument
    of every call of ``module.name``."""
    cfg, prefix, extend, kw = BATCHES["v41"]
    batch = make_synthetic_batch(cfg, prefix, extend, seed=seed, **kw)
    calls = _count_calls(monkeypatch, module, name)
    return cfg, batch, calls, SparsePrefillBackend(cfg, "sparse", impl="reference")


def test_shared_compressed_cache_dequantized_once_per_forward(monkeypatch):
    from sparse_prefill.backend import backend as backend_module

    _, batch, calls, backend = _v41_sparse(monkeypatch, 21, backend_module, "dequantize_k_cache_paged")
    outs = run_layers(backend, batch)
    check_against_naive(batch, outs, tight=True)
    for source, reader in ((1, 5), (2, 6), (3, 7), (4, 8)):
        shared = batch.caches[source].compressed
        assert batch.caches[reader].compressed is shared
        assert _times_passed(calls, shared) == 1, f"layers {source} and {reader}'s shared cache"
    # Every layer's own SWA cache is dequantized once, each by its layer.
    assert all(_times_passed(calls, c.swa) == 1 for c in batch.caches)

    # A second forward over the same metadata dequantizes again (the state is per forward).
    calls.clear()
    run_layers(backend, batch, layers=(1, 5))
    assert _times_passed(calls, batch.caches[1].compressed) == 1


def test_write_between_layers_forces_a_fresh_dequantize(monkeypatch):
    from sparse_prefill.backend import backend as backend_module
    from sparse_prefill.ops.cache import store_k_cache

    cfg, batch, calls, backend = _v41_sparse(monkeypatch, 22, backend_module, "dequantize_k_cache_paged")
    before = run_layers(backend, batch, layers=(1, 5))[5]
    shared = batch.caches[1].compressed
    assert _times_passed(calls, shared) == 1
    # Overwrite the entries request 0's queries may pick (ratio 1: entry j is position j).
    slots = batch.metadata.compressed_token_tables[1][0, :40]
    store_k_cache(shared, torch.randn(40, 512).bfloat16() * 3, slots, cfg.page_size_of(1))
    out = backend.forward(*batch.layer_inputs(5))
    assert _times_passed(calls, shared) == 2
    assert not torch.equal(out[:40], before[:40])
    check_against_naive(batch, {5: out}, tight=True)  # the reference reads the written cache


def test_shared_topk_rows_reused_and_rewritten_picks_recombined(monkeypatch):
    from sparse_prefill.backend import chunk_cache as chunk_module

    _, batch, combines, backend = _v41_sparse(monkeypatch, 23, chunk_module, "combine")
    outs = run_layers(backend, batch)
    check_against_naive(batch, outs, tight=True)
    topk_combines = [t for t in combines if t is not None]  # SWA-only / dense rows pass None
    for source, reader in ((1, 5), (2, 6), (3, 7)):
        assert batch.topk_indices[reader] is batch.topk_indices[source]
        assert _times_passed(topk_combines, batch.topk_indices[source]) == 1
    assert len(topk_combines) == 3

    # New picks written into the same tensor (an engine's reused indexer buffer): recombined.
    picks = batch.topk_indices[3]
    picks.copy_(torch.where(picks >= 0, torch.flip(picks, dims=(1,)), -1))
    outs = {7: backend.forward(*batch.layer_inputs(7))}
    assert _times_passed([t for t in combines if t is not None], picks) == 2
    check_against_naive(batch, outs, tight=True)


def test_regular_path_reuses_mapped_picks(monkeypatch):
    from sparse_prefill.backend import backend as backend_module

    cfg, prefix, extend, kw = BATCHES["v41"]
    batch = make_synthetic_batch(cfg, prefix, extend, seed=25, **kw)
    calls = _count_calls(monkeypatch, backend_module, "picked_token_ids")
    backend = SparsePrefillBackend(cfg, "regular", impl="reference")
    outs = run_layers(backend, batch)
    check_against_naive(batch, outs, tight=True)
    assert len(calls) == 3  # one per index source layer, the readers reuse its ids
    batch.topk_indices[3].add_(0)  # written: mapped again
    backend.forward(*batch.layer_inputs(7))
    assert len(calls) == 4
    # Blocks of rows (a long batch) map per block and layer instead.
    monkeypatch.setattr(backend_module, "REGULAR_INDEX_ROWS", 50)
    calls.clear()
    blocks = run_layers(SparsePrefillBackend(cfg, "regular", impl="reference"), batch, layers=(3, 7))
    assert len(calls) == 2 * 4  # 163 rows in blocks of 50, both layers
    assert torch.equal(blocks[7], outs[7])


def test_inference_tensors_are_never_reused(monkeypatch):
    """Tensors made under inference_mode have no version counter: every layer dequantizes."""
    from sparse_prefill.backend import backend as backend_module

    cfg, prefix, extend, kw = BATCHES["v41"]
    with torch.inference_mode():
        batch = make_synthetic_batch(cfg, prefix, extend, seed=24, **kw)
        calls = _count_calls(monkeypatch, backend_module, "dequantize_k_cache_paged")
        outs = run_layers(SparsePrefillBackend(cfg, "sparse", impl="reference"), batch, layers=(1, 5))
    assert _times_passed(calls, batch.caches[1].compressed) == 2
    check_against_naive(batch, outs, tight=True)


def test_reuse_stamp():
    from sparse_prefill.backend.reuse import stamp, unchanged

    t = torch.zeros(4, 3)
    s = stamp(t)
    assert unchanged(s, t) and unchanged(s, t[:])  # a view of the same elements
    assert not unchanged(s, t[1:]) and not unchanged(s, t.clone()) and not unchanged(None, t)
    t[0, 0] = 1
    assert not unchanged(s, t)
    assert unchanged(stamp(t), t)
    with torch.inference_mode():
        assert stamp(torch.zeros(2)) is None


# ---------------------------------------------------------------------------------------------
# Stale state: replaced or refilled metadata


def test_replaced_metadata_rebuilds_state():
    cfg = small_config()
    first = make_synthetic_batch(cfg, [0, 40], [30, 20], seed=1)
    second = make_synthetic_batch(cfg, [150, 3, 9], [5, 30, 2], seed=2)
    backend = SparsePrefillBackend(cfg, "sparse", impl="reference")
    run_layers(backend, first, layers=(0, 1))
    chunk = backend._state.chunk_cache
    # A different metadata object mid-"forward" (no begin_forward): state must follow it.
    outs = {layer: backend.forward(*second.layer_inputs(layer), metadata=second.metadata) for layer in (1, 2, 0)}
    assert backend._state.metadata is second.metadata and backend._state.chunk_cache is not chunk
    check_against_naive(second, outs, tight=True)


@pytest.mark.parametrize("path", ["sparse", "regular"])
def test_refilled_metadata_never_uses_stale_state(path):
    """CUDA-graph replay refills the captured metadata in place (``copy_``): same object, same
    tensor shapes, new lengths and tables. The next layer must not use the old state."""
    cfg = small_config()
    first = make_synthetic_batch(cfg, [10, 200], [30, 20], seed=1)
    second = make_synthetic_batch(cfg, [150, 3], [20, 30], seed=2)
    md, new = first.metadata, second.metadata

    def pad(t, like):
        return torch.nn.functional.pad(t, (0, like.shape[1] - t.shape[1]), value=-1)

    refill = BatchMetadata(
        cfg, new.prefix_lens_host, new.extend_lens_host, pad(new.swa_token_table, md.swa_token_table),
        {c: pad(t, md.compressed_token_tables[c]) for c, t in new.compressed_token_tables.items()},
    )
    backend = SparsePrefillBackend(cfg, path, impl="reference")
    run_layers(backend, first, layers=(0, 1, 2))
    ptr = md.swa_token_table.data_ptr()
    md.copy_(refill)
    assert md.swa_token_table.data_ptr() == ptr  # refilled in place, as a graph needs
    second.metadata = md
    outs = {layer: backend.forward(*second.layer_inputs(layer)) for layer in (1, 2, 0, 3, 4)}
    check_against_naive(second, outs, tight=True)


# ---------------------------------------------------------------------------------------------
# Splitting, decode, output buffer


@pytest.mark.parametrize("path", ["sparse", "regular"])
def test_query_split_is_invisible(path):
    cfg, prefix, extend, _ = BATCHES["mixed"]
    batch = make_synthetic_batch(cfg, prefix, extend, seed=7, layers=(0, 1, 2))
    whole = run_layers(SparsePrefillBackend(cfg, path, impl="reference"), batch, layers=(0, 1, 2))
    split = run_layers(SparsePrefillBackend(cfg, path, impl="reference", max_query_rows=23), batch, layers=(0, 1, 2))
    for layer in whole:
        assert torch.equal(whole[layer], split[layer]), f"layer {layer}"


def test_regular_rows_per_block_are_invisible(monkeypatch):
    """Large ratio-128 rows are rebuilt per block of rows instead of once per forward."""
    from sparse_prefill.backend import backend as backend_module

    cfg, prefix, extend, _ = BATCHES["mixed"]
    batch = make_synthetic_batch(cfg, prefix, extend, seed=9, layers=(1, 2))
    whole = run_layers(SparsePrefillBackend(cfg, "regular", impl="reference"), batch, layers=(1, 2))
    monkeypatch.setattr(backend_module, "REGULAR_SHARED_ROWS_BYTES", 0)
    monkeypatch.setattr(backend_module, "REGULAR_INDEX_ROWS", 17)
    backend = SparsePrefillBackend(cfg, "regular", impl="reference")
    blocks = run_layers(backend, batch, layers=(1, 2))
    assert 128 not in backend._state.regular_rows
    for layer in whole:
        assert torch.equal(whole[layer], blocks[layer]), f"layer {layer}"


def test_decode_batch_takes_regular_path():
    cfg = small_config()
    batch = make_synthetic_batch(cfg, [0, 5, 130, 700], [1, 1, 1, 1], seed=4, forward_mode=ForwardMode.DECODE)
    backend = SparsePrefillBackend(cfg, "sparse", impl="reference")
    outs = run_layers(backend, batch)
    assert all(backend.path_for(r) == "regular" for r in (0, 4, 128))
    assert backend._state.chunk_cache is None  # nothing of the sparse path was built
    check_against_naive(batch, outs, tight=True)


def test_no_complete_compressed_entry_yet():
    """Every sequence shorter than 4 tokens: zero-width compressed tables, empty compressed
    regions; only windows remain."""
    cfg = small_config()
    batch = make_synthetic_batch(cfg, [0, 1, 2], [2, 2, 1], seed=8)
    md = batch.metadata
    batch.metadata = BatchMetadata(
        cfg, md.prefix_lens_host, md.extend_lens_host, md.swa_token_table,
        {c: t[:, :0] for c, t in md.compressed_token_tables.items()},
    )
    for path in ("sparse", "regular"):
        check_against_naive(batch, run_layers(SparsePrefillBackend(cfg, path, impl="reference"), batch), tight=True)


def test_out_buffer_and_call():
    cfg = small_config()
    batch = make_synthetic_batch(cfg, [3], [12], seed=6, layers=(3,))
    backend = SparsePrefillBackend(cfg, impl="reference")
    backend.begin_forward(batch.metadata)
    out = torch.full_like(batch.q[3], float("nan"))
    assert backend(*batch.layer_inputs(3), out=out) is out
    check_against_naive(batch, {3: out}, tight=True)


# ---------------------------------------------------------------------------------------------
# Validation

CFG = small_config()


@pytest.fixture(scope="module")
def tiny():
    return make_synthetic_batch(CFG, [20, 0], [5, 3], seed=0)


def _args(batch, layer_index, change):
    _, q, caches, topk, sink = batch.layer_inputs(layer_index)
    args = dict(layer=layer_index, q=q, caches=caches, topk_indices=topk, attn_sink=sink)
    return {k: (v(args) if callable(v) else v) for k, v in {**args, **change}.items()}


BAD_FORWARD = {
    "layer -1": (1, dict(layer=-1), ValueError, "layer must be in"),
    "layer 5": (1, dict(layer=5), ValueError, "layer must be in"),
    "q dtype": (1, dict(q=lambda a: a["q"].float()), TypeError, "q must have dtype"),
    "q heads": (1, dict(q=lambda a: a["q"][:, :2]), ValueError, "q must have shape"),
    "q rows": (1, dict(q=lambda a: a["q"][:-1]), ValueError, "q must have shape"),
    "topk missing": (1, dict(topk_indices=None), TypeError, "topk_indices must be a torch.Tensor"),
    "topk int64": (1, dict(topk_indices=lambda a: a["topk_indices"].long()), TypeError, "topk_indices"),
    "topk width": (1, dict(topk_indices=lambda a: a["topk_indices"][:, :4]), ValueError,
                   "topk_indices must have shape"),
    "topk on ratio 0": (0, dict(topk_indices=torch.zeros(8, 16, dtype=torch.int32)), ValueError,
                        r"top-k layers only; layer 0 has ratio 0 \(swa\)"),
    "topk on ratio 128": (2, dict(topk_indices=torch.zeros(8, 16, dtype=torch.int32)), ValueError,
                          r"layer 2 has ratio 128 \(dense\)"),
    "caches type": (1, dict(caches=lambda a: a["caches"].swa), TypeError, "caches must be a LayerCaches"),
    "no compressed": (1, dict(caches=lambda a: LayerCaches(a["caches"].swa)), TypeError, "caches.compressed"),
    "compressed on ratio 0": (0, dict(caches=lambda a: LayerCaches(a["caches"].swa, a["caches"].swa)), ValueError,
                              r"must be None for an SWA-only \(ratio-0\) layer"),
    "swa page bytes": (0, dict(caches=lambda a: LayerCaches(a["caches"].swa[:, :-576])), ValueError,
                       "caches.swa must have"),
    "swa too small": (0, dict(caches=lambda a: LayerCaches(a["caches"].swa[:1])), ValueError, "capacity"),
    "compressed dtype": (2, dict(
        caches=lambda a: LayerCaches(a["caches"].swa, a["caches"].compressed.view(torch.int8))),
                         TypeError, "caches.compressed"),
    "sink dtype": (1, dict(attn_sink=lambda a: a["attn_sink"].double()), TypeError, "attn_sink"),
    "sink shape": (1, dict(attn_sink=torch.zeros(3)), ValueError, "attn_sink"),
    "out shape": (1, dict(out=torch.empty(8, 4, 511, dtype=torch.bfloat16)), ValueError, "out must have shape"),
    "out expanded": (1, dict(out=lambda a: a["q"][:1].expand(a["q"].shape)), ValueError,
                     "out is an output, so its elements must not share memory"),
    # Named as the caller passed them, not as the inner op's cache / extra_cache.
    "swa strided": (0, dict(caches=lambda a: LayerCaches(
        torch.empty(a["caches"].swa.shape[0], 2 * a["caches"].swa.shape[1], dtype=torch.uint8)[:, ::2])),
                    ValueError, r"caches.swa must be contiguous"),
    "compressed strided": (1, dict(caches=lambda a: LayerCaches(a["caches"].swa, torch.empty(
        2 * a["caches"].compressed.shape[0], a["caches"].compressed.shape[1], dtype=torch.uint8)[::2])),
                           ValueError, r"caches.compressed must be contiguous"),
    "compressed no pages": (2, dict(caches=lambda a: LayerCaches(a["caches"].swa, a["caches"].compressed[:0])),
                            ValueError, "caches.compressed must have at least one page"),
}


@pytest.mark.parametrize("case", sorted(BAD_FORWARD))
def test_forward_validation(tiny, case):
    layer, change, exc, match = BAD_FORWARD[case]
    backend = SparsePrefillBackend(CFG, impl="reference")
    backend.begin_forward(tiny.metadata)
    with pytest.raises(exc, match=match):
        backend.forward(**_args(tiny, layer, change))


@pytest.mark.parametrize("name", ["q", "out"])
def test_strides_checked_before_any_launch(tiny, name, monkeypatch):
    """A last dim with non-unit stride fails in forward itself, not in an op after the sparse
    path has dequantized the layer's caches."""
    backend = SparsePrefillBackend(CFG, "sparse", impl="reference")
    backend.begin_forward(tiny.metadata)

    def no_launch(*args, **kwargs):
        raise AssertionError("dequantized before the stride check")

    monkeypatch.setattr("sparse_prefill.backend.backend.dequantize_k_cache_paged", no_launch)
    args = _args(tiny, 1, {})
    strided = args["q"].transpose(1, 2).contiguous().transpose(1, 2)
    kw = dict(q=strided) if name == "q" else dict(out=torch.empty_like(strided))
    with pytest.raises(ValueError, match=f"{name} must have unit stride"):
        backend.forward(**{**args, **kw})


def test_backend_validation(tiny):
    with pytest.raises(TypeError, match="config"):
        SparsePrefillBackend(None)
    with pytest.raises(ValueError, match="path"):
        SparsePrefillBackend(CFG, "fastest")
    with pytest.raises(ValueError, match="impl"):
        SparsePrefillBackend(CFG, impl="cuda")
    with pytest.raises(ValueError, match="max_query_rows"):
        SparsePrefillBackend(CFG, max_query_rows=0)
    with pytest.raises(TypeError, match="costs"):
        SparsePrefillBackend(CFG, costs={})
    backend = SparsePrefillBackend(CFG, impl="reference")
    with pytest.raises(ValueError, match="begin_forward"):
        backend.forward(*tiny.layer_inputs(0))
    with pytest.raises(TypeError, match="metadata must be a BatchMetadata"):
        backend.begin_forward(object())
    with pytest.raises(ValueError, match="different ModelConfig"):
        SparsePrefillBackend(small_config(window_size=9)).begin_forward(tiny.metadata)


# ---------------------------------------------------------------------------------------------
# GPU: long chunks, DeepSeek-V4 shapes, caches beyond 2**31 bytes

V4_STACK = (0, 4, 128)


def v4_config(num_heads, topk):
    return ModelConfig(num_heads=num_heads, compress_ratios=V4_STACK, topk=topk, window_size=128,
                       swa_page_size=64, compressed_page_size=64)


def check_gpu_batch(cfg, prefix, extend, layers=(0, 1, 2), **kw):
    """Both paths (Triton kernels) against naive.py, layer by layer (one reference each)."""
    batch = make_synthetic_batch(cfg, prefix, extend, device="cuda", seed=11, share_q=True, q_std=1.0,
                                 k_std=0.1, k_mean=0.05, layers=layers, **kw)
    with value_checks(False):
        backends = [SparsePrefillBackend(cfg, path) for path in ("sparse", "regular")]
        for backend in backends:
            backend.begin_forward(batch.metadata)
        for layer in layers:
            ref = naive_layer_forward(cfg, batch.metadata, *batch.layer_inputs(layer))
            for backend in backends:
                out = backend.forward(*batch.layer_inputs(layer))
                assert_close(f"{backend.path_setting} layer {layer}", out, ref, **OUT_TOL)
                del out
    return batch


@pytest.mark.gpu
@pytest.mark.parametrize("num_heads, topk", [(64, 512), (128, 1024)])
def test_gpu_chunk_32768(num_heads, topk):
    check_gpu_batch(v4_config(num_heads, topk), [0, 16384, 0, 16384], [8192] * 4)


@pytest.mark.gpu
@pytest.mark.parametrize("num_heads, topk", [(64, 512), (128, 1024)])
def test_gpu_flashmla_impl(num_heads, topk):
    """``impl="flashmla"``: FlashMLA's kernels on both paths (index and cache ops: ours). The
    sparse path against naive.py, the regular one (9300 rows: two launches of at most 8192,
    FlashMLA's decode limit) against the default backend with the tolerances tests/test_flash_mla.py
    compares FlashMLA's decode kernel with ours."""
    from sparse_prefill.ops import flashmla_impl
    from tests.ops.test_flashmla_impl import require_flashmla
    from tests.test_flash_mla import DECODE_OUT_TOL

    require_flashmla()
    cfg = v4_config(num_heads, topk)
    layers = (0, 1, 2)
    batch = make_synthetic_batch(cfg, [0, 16384], [9000, 300], device="cuda", seed=11, share_q=True, q_std=1.0,
                                 k_std=0.1, k_mean=0.05, layers=layers)
    assert batch.metadata.num_tokens > flashmla_impl.FLASHMLA_DECODE_MAX_ROWS
    with value_checks(False):
        for path in ("sparse", "regular"):
            flashmla, default = SparsePrefillBackend(cfg, path, impl="flashmla"), SparsePrefillBackend(cfg, path)
            assert flashmla.ops_impl == "auto"
            flashmla.begin_forward(batch.metadata)
            default.begin_forward(batch.metadata)
            for layer in layers:
                out = flashmla.forward(*batch.layer_inputs(layer))
                name = f"{path} layer {layer}"
                if path == "sparse":
                    ref = naive_layer_forward(cfg, batch.metadata, *batch.layer_inputs(layer))
                    assert_close(name, out, ref, **OUT_TOL)
                else:
                    assert_close(name, out.float(), default.forward(*batch.layer_inputs(layer)).float(), **DECODE_OUT_TOL)


@pytest.mark.gpu
def test_gpu_chunk_65536():
    check_gpu_batch(v4_config(64, 512), [0, 16384], [32768] * 2)


@pytest.mark.gpu
@pytest.mark.parametrize("num_heads", [8, 16, 32])
def test_gpu_tensor_parallel_heads(num_heads):
    check_gpu_batch(v4_config(num_heads, 512), [0, 3, 130, 5000, 20000], [1, 700, 2000, 129, 3000])


@pytest.mark.gpu
@pytest.mark.alone
def test_gpu_caches_beyond_int32_bytes():
    # ~4.2M-token pools (2.5 GB caches): pages of the batch land past 2**31 bytes.
    cfg = v4_config(64, 512)
    batch = check_gpu_batch(cfg, [0, 9000], [3000, 1000], layers=(0, 1), spare_pages=66000)
    md, page_bytes = batch.metadata, cfg.layout.page_bytes(64)
    assert md.max_swa_id // 64 * page_bytes >= 2**31
    assert md.max_compressed_id[4] // 64 * page_bytes >= 2**31


@pytest.mark.gpu
def test_gpu_decode():
    check_gpu_batch(v4_config(128, 1024), [0, 127, 128, 70000], [1] * 4, forward_mode=ForwardMode.DECODE)


@pytest.mark.gpu
@pytest.mark.parametrize("checks", [True, False], ids=["default_checks", "checks_off"])
@pytest.mark.parametrize("path", ["sparse", "regular"])
def test_gpu_forward_never_syncs(path, checks):
    """With the default settings (value checks on, run on the device) or value checks off, a
    forward, its per-forward state included, only queues GPU work: the host never waits on the
    device, so it runs ahead of the layers it launches. (The metadata is built before: with
    value checks on its construction reads the tables once, the forward's one sync.)"""
    cfg = v4_config(16, 512)
    batch = make_synthetic_batch(cfg, [0, 300, 5000], [700, 129, 1], device="cuda", seed=3, share_q=True,
                                 q_std=1.0, k_std=0.1, k_mean=0.05, layers=(0, 1, 2))
    with value_checks(checks):
        run_layers(SparsePrefillBackend(cfg, path), batch)  # compiles the kernels
        backend = SparsePrefillBackend(cfg, path)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            outs = run_layers(backend, batch)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    check_against_naive(batch, outs, tight=False)


@pytest.mark.gpu
@pytest.mark.parametrize("num_heads, topk", [(64, 512), (16, 1024)])
def test_gpu_v41_stack_sglang_pages(num_heads, topk):
    """Every V4.1 kind with shared caches and top-k, SGLang's pages (256-token SWA pages; 256,
    128, 64, 2 entries per compressed page), a chunk after a 16K prefix and one without."""
    cfg = ModelConfig(num_heads=num_heads, compress_ratios=V41_STACK, topk=topk)
    assert cfg.swa_page_size == 256 and cfg.compressed_page_size == {1: 256, 2: 128, 4: 64, 128: 2}
    check_gpu_batch(cfg, [0, 16384, 700], [4096, 2048, 300], layers=tuple(range(len(V41_STACK))), **V41_SOURCES)


@pytest.mark.gpu
def test_gpu_ratio1_short_extend_over_long_history():
    """A ratio-1 layer sees the whole history: auto takes the regular path (no 64K-row workspace)
    and both paths agree with the reference."""
    cfg = ModelConfig(num_heads=64, compress_ratios=(0, 1), topk=512)
    batch = check_gpu_batch(cfg, [65536], [256], layers=(0, 1))
    assert SparsePrefillBackend(cfg).path_for(1, batch.metadata) == "regular"


def test_synthetic_sources_validation():
    cfg = v41_config()
    with pytest.raises(ValueError, match=r"kv_source_layers\[0\] = 0 has ratio 0"):
        make_synthetic_batch(cfg, [0], [4], kv_source_layers=(0,))
    with pytest.raises(ValueError, match=r"index_source_layers\[0\] = 4 has ratio 128"):
        make_synthetic_batch(cfg, [0], [4], index_source_layers=(4,))
    with pytest.raises(ValueError, match=r"layer 1 \(ratio 1\) has no earlier layer of its ratio in kv_source_layers"):
        make_synthetic_batch(cfg, [0], [4], kv_source_layers=(5,))
