"""``sparse_prefill.flash_mla``: FlashMLA's interface on our kernels. CPU tests against our ops
on FlashMLA's cache views; a GPU test against FlashMLA itself (skipped when it is missing)."""

import pytest
import torch

import sparse_prefill.flash_mla as ours
from sparse_prefill import paged_fp8_sparse_attn_fwd, quantize_k_cache, sparse_attn_fwd
from sparse_prefill.layout import KVCacheLayout
from tests.tolerance import assert_close

INF = float("inf")


def random_k(blocks, page_size, layout, device="cpu"):
    k = torch.randn(blocks, page_size, 1, layout.dim, device=device) / 10 + 0.05
    return k.to(torch.bfloat16)


def flash_mla_view(cache, page_size, layout, stored_page_size=None):
    """FlashMLA's float8 view ``[blocks, P, 1, bytes]`` of our uint8 cache whose pages hold
    ``stored_page_size`` (>= P) tokens' room (V3.2 padding by whole tokens, as FlashMLA's tests)."""
    stored = stored_page_size or page_size
    per_token = layout.bytes_per_token
    fp8 = cache.view(torch.float8_e4m3fn)
    if layout is KVCacheLayout.V4:
        return fp8[:, : page_size * per_token].view(cache.shape[0], page_size, 1, per_token)
    return fp8.view(cache.shape[0], stored, per_token)[:, :page_size].unsqueeze(2)


def random_ids(b, s_q, width, capacity, device="cpu"):
    ids = torch.randint(0, capacity, (b, s_q, width), dtype=torch.int32, device=device)
    return ids.masked_fill(torch.rand(ids.shape, device=device) < 0.2, -1)


def test_get_mla_metadata_ignores_arguments():
    meta, none = ours.get_mla_metadata(torch.zeros(3), 64, num_heads_q=128)
    assert isinstance(meta, ours.FlashMLASchedMeta) and meta.config is None and none is None


@pytest.mark.parametrize("layout", list(KVCacheLayout))
@pytest.mark.parametrize("b, s_q", [(3, 1), (2, 3)])
def test_with_kvcache_is_the_paged_op_on_flash_mla_views(layout, b, s_q):
    """Both scopes, per-request lengths, a sink with +-inf: the same as the paged op on the
    flattened rows, with each request's lengths applied as -1 past them."""
    h_q, page, x_page, topk, x_topk = 4, 3, 2, 10, 6
    main = quantize_k_cache(random_k(5, page, layout), layout)
    extra = quantize_k_cache(random_k(4, x_page, layout), layout)
    q = torch.randn(b, s_q, h_q, layout.dim).to(torch.bfloat16)
    ids, x_ids = random_ids(b, s_q, topk, 5 * page), random_ids(b, s_q, x_topk, 4 * x_page)
    lens, x_lens = torch.randint(0, topk + 1, (b,), dtype=torch.int32), torch.randint(0, x_topk + 1, (b,), dtype=torch.int32)
    sink = torch.randn(h_q)
    sink[0], sink[1] = INF, -INF
    meta, _ = ours.get_mla_metadata()
    out, lse = ours.flash_mla_with_kvcache(
        q, flash_mla_view(main, page, layout), None, None, 512, meta, softmax_scale=0.3, is_fp8_kvcache=True,
        indices=ids, attn_sink=sink, extra_k_cache=flash_mla_view(extra, x_page, layout),
        extra_indices_in_kvcache=x_ids, topk_length=lens, extra_topk_length=x_lens,
    )
    assert out.shape == (b, s_q, h_q, 512) and lse.shape == (b, h_q, s_q) and lse.is_contiguous()

    def cut(t, lengths):  # -1 past each request's length
        return t.masked_fill(torch.arange(t.shape[2]) >= lengths[:, None, None], -1).reshape(b * s_q, -1)

    ref_out, _, ref_lse = paged_fp8_sparse_attn_fwd(
        q.reshape(b * s_q, h_q, -1), main, cut(ids, lens), page, 0.3, extra_cache=extra,
        extra_indices=cut(x_ids, x_lens), extra_page_size=x_page, attn_sink=sink, layout=layout,
    )
    assert torch.equal(out.reshape(b * s_q, h_q, -1), ref_out)
    assert torch.equal(lse.transpose(1, 2).reshape(b * s_q, h_q), ref_lse)
    assert (out[..., 0, :] == 0).all()  # sink +inf
    # The same object with the same shapes again, then other shapes.
    ours.flash_mla_with_kvcache(q, flash_mla_view(main, page, layout), None, None, 512, meta,
                                is_fp8_kvcache=True, indices=ids, extra_k_cache=flash_mla_view(extra, x_page, layout),
                                extra_indices_in_kvcache=x_ids)
    with pytest.raises(ValueError, match="fresh get_mla_metadata"):
        ours.flash_mla_with_kvcache(q, flash_mla_view(main, page, layout), None, None, 512, meta,
                                    is_fp8_kvcache=True, indices=ids)


def test_v32_blocks_padded_by_whole_tokens():
    """FlashMLA's V3.2 test caches leave one token of room per block: ids ``block * P + offset``
    address pages of P + 1 tokens."""
    layout, page, b = KVCacheLayout.V32, 4, 2
    stored = quantize_k_cache(random_k(6, page + 1, layout), layout)
    q = torch.randn(b, 1, 8, 576).to(torch.bfloat16)
    ids = random_ids(b, 1, 12, 6 * page)
    ids[0, 0, :3] = torch.tensor([6 * page, 2**31 - 1, -(2**31)])  # past the cache: ignored
    out, lse = ours.flash_mla_with_kvcache(q, flash_mla_view(stored, page, layout, page + 1), None, None, 512,
                                           ours.get_mla_metadata()[0], is_fp8_kvcache=True, indices=ids)
    flat = ids.reshape(b, -1).long()
    moved = torch.where((flat >= 0) & (flat < 6 * page), flat // page * (page + 1) + flat % page, -1)
    ref_out, _, ref_lse = paged_fp8_sparse_attn_fwd(q[:, 0], stored, moved.int(), page + 1, 576**-0.5, layout=layout)
    assert torch.equal(out[:, 0], ref_out) and torch.equal(lse[:, :, 0], ref_lse)


def test_sparse_fwd_is_sparse_attn_fwd():
    q = torch.randn(5, 3, 512).to(torch.bfloat16)
    kv = torch.randn(20, 1, 512).to(torch.bfloat16)
    idx = torch.randint(-1, 25, (5, 1, 7), dtype=torch.int32)
    lens = torch.randint(0, 8, (5,), dtype=torch.int32)
    sink = torch.randn(3)
    got = ours.flash_mla_sparse_fwd(q, kv, idx, 0.1, 512, sink, lens)
    for a, r in zip(got, sparse_attn_fwd(q, kv, idx, 0.1, 512, sink, lens)):
        assert torch.equal(a, r)


def test_with_kvcache_errors():
    layout, page = KVCacheLayout.V4, 2
    cache = quantize_k_cache(random_k(3, page, layout), layout)
    view = flash_mla_view(cache, page, layout)
    q = torch.randn(1, 1, 4, 512).to(torch.bfloat16)
    ids = torch.zeros(1, 1, 4, dtype=torch.int32)
    meta = ours.get_mla_metadata()[0]
    with pytest.raises(NotImplementedError, match="dense mode"):
        ours.flash_mla_with_kvcache(q, view, torch.zeros(1, 3, dtype=torch.int32), torch.tensor([5]), 512, meta)
    cases = [
        (dict(causal=True), ValueError, "causal"),
        (dict(is_fp8_kvcache=False), ValueError, "is_fp8_kvcache"),
        (dict(num_splits=4), ValueError, "num_splits"),
        (dict(tile_scheduler_metadata=object()), TypeError, "FlashMLASchedMeta"),
        (dict(k_cache=cache.view(torch.float8_e4m3fn).view(3, 1, 1, -1)), ValueError, "bytes per token"),
        (dict(k_cache=torch.zeros(3, page, 1, 584, dtype=torch.float8_e4m3fn)), ValueError, "bytes apart"),
        (dict(q=q[..., :448].contiguous()), ValueError, "head dim 512"),
        (dict(indices=ids[0]), ValueError, "indices"),
        (dict(topk_length=torch.zeros(1, 1, dtype=torch.int32)), ValueError, "topk_length"),
        (dict(extra_k_cache=view), ValueError, "go together"),
        (dict(extra_topk_length=torch.zeros(1, dtype=torch.int32)), ValueError, "extra scope"),
        (dict(extra_k_cache=flash_mla_view(quantize_k_cache(random_k(1, 2, KVCacheLayout.V32), KVCacheLayout.V32),
                                           2, KVCacheLayout.V32),
              extra_indices_in_kvcache=ids), ValueError, "layout"),
    ]
    base = dict(q=q, k_cache=view, block_table=None, cache_seqlens=None, head_dim_v=512,
                tile_scheduler_metadata=meta, is_fp8_kvcache=True, indices=ids)
    for change, exc, match in cases:
        with pytest.raises(exc, match=match):
            ours.flash_mla_with_kvcache(**{**base, **change})


# ---------------------------------------------------------------------------------------------
# Against FlashMLA itself (on the device: PYTHONPATH with the flash_mla package)

DECODE_OUT_TOL = dict(abs_tol=1e-3, rel_tol=2.01 / 128, cos_tol=5e-6)
DECODE_LSE_TOL = dict(abs_tol=1e-6, rel_tol=8.01 / 65536)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [2, 64, 256])
@pytest.mark.parametrize("h_q", [64, 128])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_gpu_with_kvcache_matches_flash_mla(page, h_q, with_lengths):
    flash_mla = pytest.importorskip("flash_mla")
    layout, b, s_q, topk, x_topk, x_page = KVCacheLayout.V4, 4, 2, 512, 128, 64
    blocks = max(2, 4096 // page)
    main = quantize_k_cache(random_k(blocks, page, layout, "cuda"), layout)
    extra = quantize_k_cache(random_k(64, x_page, layout, "cuda"), layout)
    q = torch.randn(b, s_q, h_q, 512, device="cuda").to(torch.bfloat16)
    ids = random_ids(b, s_q, topk, blocks * page, "cuda")
    x_ids = random_ids(b, s_q, x_topk, 64 * x_page, "cuda")
    ids[0, 0] = -1  # a query with no main-scope token
    x_ids[0, 0] = -1  # ... and none at all
    sink = torch.randn(h_q, device="cuda")
    sink[:2] = torch.tensor([INF, -INF])
    lengths = {}
    if with_lengths:
        lengths = dict(topk_length=torch.randint(0, topk + 1, (b,), dtype=torch.int32, device="cuda"),
                       extra_topk_length=torch.randint(0, x_topk + 1, (b,), dtype=torch.int32, device="cuda"))
        lengths["topk_length"][1] = 0
    results = []
    for lib in (ours, flash_mla):
        meta, _ = lib.get_mla_metadata()
        results.append(lib.flash_mla_with_kvcache(
            q, flash_mla_view(main, page, layout), None, None, 512, meta, softmax_scale=512**-0.5,
            is_fp8_kvcache=True, indices=ids, attn_sink=sink, extra_k_cache=flash_mla_view(extra, x_page, layout),
            extra_indices_in_kvcache=x_ids, **lengths,
        ))
    (out, lse), (ref_out, ref_lse) = results
    assert_close("out", out.float(), ref_out.float(), **DECODE_OUT_TOL)
    assert_close("lse", lse, ref_lse, **DECODE_LSE_TOL)
