"""The NaN contract of both attention ops, on every path (reference, Triton; on a Hopper GPU also
both Gluon kernels): NaN propagates as in a float computation.

- A NaN in ``q[i, h]`` makes ``out[i, h]``, ``max_logits[i, h]`` and ``lse[i, h]`` NaN, when row
  ``i`` has at least one valid entry (a row with none stays empty: out 0, max -inf, lse +inf).
- A NaN in a KV row that row ``i`` lists *validly* makes every head of row ``i`` NaN.
- An entry that is invalid (out of range, or at a position ``>= topk_length[i]``) is ignored
  whatever its row holds, NaN included; other rows are unaffected.
"""

from __future__ import annotations

import pytest
import torch

from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops.cache import quantize_k_cache
from sparse_prefill.ops.cache.naive import token_byte_offsets
from sparse_prefill.ops.fp8_sparse_attn import paged_fp8_sparse_attn_fwd
from sparse_prefill.ops.sparse_attn import sparse_attn_fwd
from tests.ops.test_fp8_sparse_attn import poison_tokens, skip_unless_runs
from tests.ops.test_sparse_attn import D_V, SM_SCALE, make_sink, random_values
from tests.tolerance import INF, assert_attn_close

NAN = float("nan")
S_Q = 6
# Rows of the case: what each one exercises.
Q_NAN_ROW, KV_NAN_ROW, PAST_LENGTH_ROW, EMPTY_ROW, CLEAN_ROW, OUT_OF_RANGE_ROW = range(S_Q)


def nan_rows(s_kv: int, h_q: int, topk: int, device: torch.device):
    """Index rows [S_Q, topk] over ``s_kv`` rows whose last one (``bad``) is NaN, their lengths,
    and the [S_Q, h_q] bool mask of the (row, head) pairs the contract makes NaN."""
    bad = s_kv - 1
    idx = torch.randint(0, bad, (S_Q, topk), dtype=torch.int32, device=device)
    lengths = torch.full((S_Q,), topk, dtype=torch.int32, device=device)
    idx[KV_NAN_ROW, topk // 2] = bad  # listed validly
    idx[PAST_LENGTH_ROW, -1] = bad  # listed, but past the row's length
    lengths[PAST_LENGTH_ROW] = topk - 1
    idx[EMPTY_ROW] = -1  # nothing valid (its q row is NaN too)
    idx[OUT_OF_RANGE_ROW, 0] = s_kv  # one past the NaN row: invalid
    expect = torch.zeros(S_Q, h_q, dtype=torch.bool, device=device)
    expect[Q_NAN_ROW, 0] = True
    expect[KV_NAN_ROW] = True
    return idx, lengths, expect


def poison_queries(q: torch.Tensor) -> None:
    q[Q_NAN_ROW, 0, 3] = NAN  # one head of one row
    q[EMPTY_ROW, :, 0] = NAN  # a row with nothing valid stays empty


def assert_contract(result: tuple, expect: torch.Tensor) -> None:
    out, max_logits, lse = result
    assert torch.isnan(out).all(-1).eq(expect).all(), "out must be NaN exactly in the NaN (row, head) pairs"
    assert not torch.isnan(out[~expect]).any(), "NaN leaked into a row the contract keeps finite"
    assert torch.isnan(max_logits).eq(expect).all() and torch.isnan(lse).eq(expect).all()
    assert torch.all(out[EMPTY_ROW] == 0) and torch.all(max_logits[EMPTY_ROW] == -INF)
    assert torch.all(lse[EMPTY_ROW] == INF)


def bf16_case(h_q: int, d_qk: int, topk: int, s_kv: int, device: torch.device, nan_dim: int):
    q = random_values((S_Q, h_q, d_qk), device)
    kv = random_values((s_kv, 1, d_qk), device)
    idx, lengths, expect = nan_rows(s_kv, h_q, topk, device)
    clean = (q.clone(), kv.clone())
    poison_queries(q)
    kv[s_kv - 1, 0, nan_dim] = NAN
    return (q, kv, idx[:, None, :], lengths), clean, expect


def check_bf16(h_q: int, d_qk: int, topk: int, s_kv: int, device, impl: str, nan_dim: int) -> None:
    (q, kv, idx, lengths), (q_clean, kv_clean), expect = bf16_case(h_q, d_qk, topk, s_kv, device, nan_dim)
    sink = make_sink(h_q, device)
    result = sparse_attn_fwd(q, kv, idx, SM_SCALE, D_V, sink, lengths, impl=impl)
    assert_contract(result, expect)
    # Everywhere else the NaNs change nothing: the same as on clean inputs.
    clean = sparse_attn_fwd(q_clean, kv_clean, idx, SM_SCALE, D_V, sink, lengths, impl="reference")
    reference = sparse_attn_fwd(q, kv, idx, SM_SCALE, D_V, sink, lengths, impl="reference")
    keep = ~expect
    keep[EMPTY_ROW] = False  # its clean q is not NaN, but it is empty either way
    assert_attn_close(tuple(t[keep] for t in result), tuple(t[keep] for t in clean))
    assert_attn_close(result, reference)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("d_qk,nan_dim", [(512, 0), (512, 511), (576, 550)], ids=["nope", "rope", "tail"])
def test_sparse_attn_nan_contract(device, impl, d_qk, nan_dim):
    """``nan_dim``: a value dim, the last value dim, or (d_qk 576) a key-only dim."""
    check_bf16(3, d_qk, 20, 70, device, impl, nan_dim)


def poison_rope(cache: torch.Tensor, token: int, page_size: int, layout: KVCacheLayout) -> None:
    """Make the first rope dim of ``token`` a bf16 NaN (its bytes)."""
    data_off, _ = token_byte_offsets(torch.tensor([token], device=cache.device), page_size, layout)
    start = int(data_off) + layout.rope_offset
    nan_bytes = torch.tensor([NAN], dtype=torch.bfloat16).view(torch.uint8)
    cache.view(-1)[start : start + 2] = nan_bytes.to(cache.device)


def fp8_case(h_q: int, layout: KVCacheLayout, page_size: int, num_pages: int, topk: int, device, poison: str):
    """One main scope with the NaN token and a clean extra scope. ``poison``: "rope" makes a
    rope dim NaN, "fp8" the nope bytes (0x7F, e4m3fn NaN; Triton's interpreter decodes that
    byte as a finite number, so that case is GPU only)."""
    capacity = page_size * num_pages
    q = random_values((S_Q, h_q, layout.dim), device)
    cache = quantize_k_cache(random_values((num_pages, page_size, 1, layout.dim), device), layout, impl="reference")
    extra_cache = quantize_k_cache(random_values((2, page_size, 1, layout.dim), device), layout, impl="reference")
    idx, lengths, expect = nan_rows(capacity, h_q, topk, device)
    extra_idx = torch.randint(0, 2 * page_size, (S_Q, 5), dtype=torch.int32, device=device)
    extra_idx[EMPTY_ROW] = -1
    poison_queries(q)
    if poison == "fp8":
        poison_tokens(cache, torch.tensor([capacity - 1], device=device), page_size, layout)
    else:
        poison_rope(cache, capacity - 1, page_size, layout)
    kwargs = dict(extra_cache=extra_cache, extra_indices=extra_idx, extra_page_size=page_size,
                  topk_length=lengths, attn_sink=make_sink(h_q, device), layout=layout)
    return (q, cache, idx, page_size, SM_SCALE), kwargs, expect


def check_fp8(h_q: int, layout: KVCacheLayout, topk: int, device, impl: str, poison: str = "rope") -> None:
    args, kwargs, expect = fp8_case(h_q, layout, 16, 4, topk, device, poison)
    result = paged_fp8_sparse_attn_fwd(*args, **kwargs, impl=impl)
    assert_contract(result, expect)
    assert_attn_close(result, paged_fp8_sparse_attn_fwd(*args, **kwargs, impl="reference"))


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("layout", [KVCacheLayout.V4, KVCacheLayout.V32], ids=lambda x: x.name)
def test_paged_fp8_nan_contract(device, impl, layout):
    check_fp8(3, layout, 20, device, impl)


# ---------------------------------------------------------------------------------------------
# GPU: the compiled kernels at real head counts (tl.max skips NaN on the GPU, unlike the
# interpreter's numpy, so the GPU's answer is its own case)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("h_q,d_qk,nan_dim", [(64, 512, 0), (128, 512, 511), (16, 512, 7), (64, 576, 550)])
def test_gpu_sparse_attn_nan_contract(h_q, d_qk, nan_dim):
    """Both kernels (the Gluon one where it runs) and auto, topk across key blocks."""
    from sparse_prefill.ops.sparse_attn import gluon_kernel

    gluon = gluon_kernel.unsupported_reason(torch.device("cuda")) is None
    for impl in ("auto", "triton", *(("gluon",) if gluon else ())):
        check_bf16(h_q, d_qk, 300, 4096, torch.device("cuda"), impl, nan_dim)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["triton", "gluon"])
@pytest.mark.parametrize("h_q", [64, 128])
@pytest.mark.parametrize("poison", ["rope", "fp8"])
def test_gpu_paged_fp8_nan_contract(kernel, h_q, poison):
    skip_unless_runs(kernel, "cuda", KVCacheLayout.V4)
    check_fp8(h_q, KVCacheLayout.V4, 300, torch.device("cuda"), kernel, poison)
