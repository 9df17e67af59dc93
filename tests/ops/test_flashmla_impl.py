"""impl="flashmla" (ops/flashmla_impl.py): on CPU, the argument mapping onto FlashMLA's Python
interface, with our FlashMLA drop-in (``sparse_prefill.flash_mla``, the references on CPU)
standing in for ``flash_mla``; on the GPU (``flash_mla`` importable, an sm_90 GPU), FlashMLA's
kernels through both ops against the references, invalid ids of every kind and lengths included.

FlashMLA is not held to the contract that rows listed past ``topk_length`` are ignored even
when they hold NaN (its docstring warns of NaN there): the GPU cases replace those rows by
finite values."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import sparse_prefill.flash_mla as drop_in
from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops import flashmla_impl, kernel_choice
from sparse_prefill.ops.cache import quantize_k_cache
from sparse_prefill.ops.fp8_sparse_attn import paged_fp8_sparse_attn_fwd
from sparse_prefill.ops.sparse_attn import sparse_attn_fwd
from sparse_prefill.ops.sparse_attn.naive import sparse_attn_fwd_naive
from tests.ops.test_fp8_sparse_attn import Fp8Case, make_fp8_case
from tests.ops.conftest import forget_flash_mla
from tests.ops.test_sparse_attn import SM_SCALE, make_case, poisoned_outputs, random_values
from tests.test_flash_mla import DECODE_LSE_TOL, DECODE_OUT_TOL
from tests.tolerance import OUT_TOL, assert_attn_close, assert_close

V4, V32 = KVCacheLayout.V4, KVCacheLayout.V32


@pytest.fixture
def drop_in_as_flash_mla(flash_mla_as):
    flash_mla_as(drop_in)


def fp8_launch(case: Fp8Case) -> tuple:
    """``paged_fp8_sparse_attn_flashmla`` on ``case``, into poisoned outputs."""
    kw = case.kwargs()
    s_q, h_q, _ = case.q.shape
    outputs = poisoned_outputs(s_q, h_q, case.q.device)
    flashmla_impl.paged_fp8_sparse_attn_flashmla(
        case.q, case.main.cache, case.main.indices, case.main.page_size, kw["extra_cache"], kw["extra_indices"],
        kw["extra_page_size"], kw["topk_length"], kw["extra_topk_length"], SM_SCALE, case.attn_sink, case.layout,
        *outputs)
    return outputs


def test_sparse_launcher_maps_onto_flash_mla_sparse_fwd(drop_in_as_flash_mla):
    case = make_case(5, 40, 64, 576, 128, "cpu")
    outputs = poisoned_outputs(5, 64, "cpu")
    flashmla_impl.sparse_attn_fwd_flashmla(case.q, case.kv, case.indices, case.sm_scale, case.attn_sink,
                                           case.topk_length, *outputs)
    assert_attn_close(outputs, sparse_attn_fwd_naive(*case.args()))


@pytest.mark.parametrize("layout", [V4, V32])
@pytest.mark.parametrize("extra", [False, True])
def test_fp8_launcher_maps_onto_flash_mla_with_kvcache(drop_in_as_flash_mla, layout, extra):
    """One query per batch row over FlashMLA's float8 view of our caches; every invalid id
    passed as -1, rows padded to 64; out and lse as the reference's, max_logits NaN."""
    case = make_fp8_case(6, 64, layout, (4, 3, 20), (2, 5, 7) if extra else None, "cpu")
    out, max_logits, lse = fp8_launch(case)
    ref_out, _, ref_lse = case.reference()
    assert_close("out", out.float(), ref_out, **OUT_TOL)
    assert_close("lse", lse, ref_lse, **DECODE_LSE_TOL)
    assert torch.isnan(max_logits).all()


@pytest.mark.parametrize("layout", [V4, V32])
@pytest.mark.parametrize("page_size", [1, 3, 64])
def test_cache_view_is_flash_mla_s_view_of_the_same_bytes(layout, page_size):
    cache = torch.randint(0, 256, (3, layout.page_bytes(page_size)), dtype=torch.uint8)
    view = flashmla_impl.cache_view(cache, page_size, layout)
    assert view.dtype == torch.float8_e4m3fn and view.shape == (3, page_size, 1, layout.bytes_per_token)
    back, back_layout, back_page, addressed = drop_in._paged_cache("k_cache", view)
    assert (back_layout, back_page, addressed) == (layout, page_size, page_size)
    assert back.data_ptr() == cache.data_ptr() and torch.equal(back, cache)


def test_decode_ids_mark_every_invalid_id_and_pad_to_64():
    ids = torch.tensor([[0, 9, 10, -1, -(2**31), 2**31 - 1, 5]], dtype=torch.int32)
    rows = flashmla_impl._decode_ids(ids, 10)
    assert rows.shape == (1, 1, 64) and rows.dtype == torch.int32
    assert rows[0, 0, :7].tolist() == [0, 9, -1, -1, -1, -1, 5] and (rows[0, 0, 7:] == -1).all()


# ---------------------------------------------------------------------------------------------
# Against the references on the GPU


def require_flashmla() -> None:
    pytest.importorskip("flash_mla")
    forget_flash_mla()
    reason = flashmla_impl.device_reason(torch.device("cuda"))
    if reason is not None:
        pytest.skip(f"FlashMLA: {reason}")


def finite_fp8(case: Fp8Case) -> Fp8Case:
    """``case`` with fresh caches of finite tokens (its NaN tokens are listed past lengths)."""
    def fresh(scope):
        if scope is None:
            return None
        k = random_values((scope.cache.shape[0], scope.page_size, 1, case.layout.dim), case.q.device)
        return replace(scope, cache=quantize_k_cache(k, case.layout, impl="reference"))

    return replace(case, main=fresh(case.main), extra=fresh(case.extra))


@pytest.mark.gpu
@pytest.mark.parametrize("d_qk", [512, 576])
@pytest.mark.parametrize("h_q,topk", [(64, 128), (64, 512), (128, 1024), (128, 2048)])
@pytest.mark.parametrize("lengths", [False, True])
def test_gpu_sparse_attn_flashmla(h_q, topk, d_qk, lengths):
    require_flashmla()
    case = make_case(257, 8192, h_q, d_qk, topk, "cuda", lengths=lengths)
    case.kv.nan_to_num_(nan=0.05)
    reference = sparse_attn_fwd_naive(*case.args())
    assert_attn_close(sparse_attn_fwd(*case.args(), impl="flashmla"), reference)
    # Into a slice of a larger buffer (FlashMLA allocates its own outputs: they are copied).
    out = torch.empty(257, h_q, 1024, dtype=torch.bfloat16, device="cuda")[..., 256:768]
    result = sparse_attn_fwd(*case.args(), out=out, impl="flashmla")
    assert result[0] is out
    assert_attn_close(result, reference)


@pytest.mark.gpu
@pytest.mark.parametrize("table", ["current", "h_q 64 entry"])
def test_gpu_sparse_attn_auto_takes_flashmla_where_the_table_says(monkeypatch, table):
    """Bitwise the result of the kernel ``pick`` names: FlashMLA's only where ``AUTO_PREFERS``
    has the shape (the current table has none; a patched-in h_q 64 / d_qk 512 entry) and
    FlashMLA takes the call (not at topk 200); ours at h_q 128 and 32."""
    require_flashmla()
    if table != "current":
        monkeypatch.setattr(kernel_choice, "AUTO_PREFERS", {(kernel_choice.SPARSE_ATTN, 64, 512): "flashmla"})
    for h_q, topk in [(64, 512), (128, 1024), (32, 512), (64, 200)]:
        expected = table != "current" and (h_q, topk) == (64, 512)
        case = make_case(33, 4096, h_q, 512, topk, "cuda", lengths=False)
        shape = kernel_choice.sparse_attn_shape(case.q, case.indices)
        picked = kernel_choice.pick(kernel_choice.SPARSE_ATTN, "auto", shape, case.q, case.kv)
        assert (picked == "flashmla") == expected, (table, h_q, topk, picked)
        auto = sparse_attn_fwd(*case.args(), impl="auto")
        for a, b in zip(auto, sparse_attn_fwd(*case.args(), impl=picked)):
            assert torch.equal(a, b), (h_q, topk, picked)
        assert_attn_close(auto, sparse_attn_fwd_naive(*case.args()))


@pytest.mark.gpu
def test_gpu_sparse_attn_flashmla_refuses_misaligned_rows():
    require_flashmla()
    case = make_case(4, 100, 64, 512, 128, "cuda")
    kv = torch.empty(100, 1, 516, dtype=torch.bfloat16, device="cuda")[..., :512]
    kv.copy_(case.kv)
    with pytest.raises(ValueError, match="impl='flashmla' cannot run here: kv must start 16-byte aligned"):
        sparse_attn_fwd(case.q, kv, case.indices, SM_SCALE, impl="flashmla")
    with pytest.raises(ValueError, match="impl='flashmla' cannot run here: FlashMLA's kernels take h_q 64 or 128"):
        sparse_attn_fwd(*make_case(4, 100, 32, 512, 128, "cuda").args(), impl="flashmla")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", [V4, V32])
@pytest.mark.parametrize("h_q", [64, 128])
@pytest.mark.parametrize("extra", [False, True])
@pytest.mark.parametrize("lengths", [False, True])
def test_gpu_paged_fp8_flashmla(layout, h_q, extra, lengths):
    """FlashMLA's sparse FP8 decode through our op, against the reference with the tolerances
    tests/test_flash_mla.py compares it with (max_logits: NaN, FlashMLA does not return it)."""
    require_flashmla()
    case = finite_fp8(make_fp8_case(65, h_q, layout, (64, 40, 200), (64, 6, 128) if extra else None, "cuda",
                                    lengths=lengths))
    if layout is V32 and (extra or lengths):
        # FlashMLA's kernel crashed the process on these (H200): refused before any launch.
        with pytest.raises(ValueError, match="impl='flashmla' cannot run here: .* crashed the process on the V3.2"):
            paged_fp8_sparse_attn_fwd(*case.args(), **case.kwargs(), impl="flashmla")
        return
    out, max_logits, lse = paged_fp8_sparse_attn_fwd(*case.args(), **case.kwargs(), impl="flashmla")
    ref_out, _, ref_lse = case.reference()
    assert_close("out", out.float(), ref_out, **DECODE_OUT_TOL)
    assert_close("lse", lse, ref_lse, **DECODE_LSE_TOL)
    assert torch.isnan(max_logits).all()
    # auto never takes FlashMLA's decode kernel (slower than ours): its max_logits are real.
    assert not torch.isnan(paged_fp8_sparse_attn_fwd(*case.args(), **case.kwargs(), impl="auto")[1]).all()


@pytest.mark.gpu
def test_gpu_paged_fp8_flashmla_refuses_the_batches_it_aborts_on():
    require_flashmla()
    case = make_fp8_case(8193, 64, V4, (64, 4, 64), None, "cuda", lengths=False)
    with pytest.raises(ValueError, match="impl='flashmla' cannot run here: FlashMLA's FP8 decode kernel aborted"):
        paged_fp8_sparse_attn_fwd(*case.args(), **case.kwargs(), impl="flashmla")
