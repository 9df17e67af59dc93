"""paged_fp8_sparse_attn_fwd: reference vs an independent dense float64 computation over the
dequantized caches (and vs sparse_attn_fwd's reference on the equivalent bf16 workspace), kernel
vs reference (CPU: Triton interpreter on small shapes; GPU: real sizes), argument validation.
Tolerances: the shared check of tests/tolerance.py (FlashMLA's criteria)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
import triton

from sparse_prefill import value_checks
from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops.cache import dequantize_k_cache_paged, quantize_k_cache
from sparse_prefill.ops.cache.naive import token_byte_offsets
from sparse_prefill.ops.fp8_sparse_attn import gluon_kernel, paged_fp8_sparse_attn_fwd
from sparse_prefill.ops.fp8_sparse_attn.naive import paged_fp8_sparse_attn_fwd_naive
from sparse_prefill.ops.sparse_attn.naive import sparse_attn_fwd_naive
from tests.tolerance import INF, assert_attn_close
from tests.ops.test_sparse_attn import (
    D_V,
    INT_MAX,
    INT_MIN,
    SM_SCALE,
    Case,
    dense_reference,
    make_indices,
    make_sink,
    record_gluon_launch,
    poisoned_outputs,
    random_values,
    strided_copy,
)

V4, V32 = KVCacheLayout.V4, KVCacheLayout.V32
NAN_TOKENS = 2  # the last tokens of each cache dequantize to NaN; listed only past a length

@dataclass
class Scope:
    cache: torch.Tensor
    indices: torch.Tensor
    page_size: int
    lengths: torch.Tensor | None

    @property
    def capacity(self) -> int:
        return self.cache.shape[0] * self.page_size


@dataclass
class Fp8Case:
    q: torch.Tensor
    main: Scope
    extra: Scope | None
    attn_sink: torch.Tensor | None
    layout: KVCacheLayout

    def args(self) -> tuple:
        return (self.q, self.main.cache, self.main.indices, self.main.page_size, SM_SCALE)

    def kwargs(self) -> dict:
        x = self.extra
        return dict(
            extra_cache=x and x.cache, extra_indices=x and x.indices, extra_page_size=x and x.page_size,
            topk_length=self.main.lengths, extra_topk_length=x and x.lengths,
            attn_sink=self.attn_sink, layout=self.layout,
        )

    def reference(self) -> tuple:
        return paged_fp8_sparse_attn_fwd_naive(*self.args(), **self.kwargs())


def poison_tokens(cache: torch.Tensor, ids: torch.Tensor, page_size: int, layout: KVCacheLayout) -> None:
    """Make tokens ``ids`` dequantize to NaN: their fp8 bytes become 0x7F (e4m3fn NaN)."""
    data_off, _ = token_byte_offsets(ids, page_size, layout)
    cache.view(-1)[data_off[:, None] + torch.arange(layout.nope_dim, device=cache.device)] = 0x7F


def make_scope(
    s_q: int, page_size: int, num_pages: int, width: int, layout: KVCacheLayout,
    device: torch.device, *, lengths: bool = True, invalid: float = 0.2, zero_length_row: int = 2,
) -> Scope:
    """A quantized cache of random tokens (the last NAN_TOKENS poisoned when ``lengths``) and
    index rows into it with every kind of invalid entry (see ``make_indices``)."""
    k = random_values((num_pages, page_size, 1, layout.dim), device)
    cache = quantize_k_cache(k, layout, impl="reference")
    capacity = num_pages * page_size
    nan_tokens = NAN_TOKENS if lengths else 0
    poison_tokens(cache, torch.arange(capacity - nan_tokens, capacity, device=device), page_size, layout)
    idx, topk_length = make_indices(
        s_q, capacity, width, device, nan_rows=nan_tokens, lengths=lengths, invalid=invalid,
        zero_length_row=zero_length_row,
    )
    return Scope(cache, idx, page_size, topk_length)


def make_fp8_case(
    s_q: int, h_q: int, layout: KVCacheLayout, main: tuple[int, int, int],
    extra: tuple[int, int, int] | None, device: torch.device | str, *, sink: bool = True,
    lengths: bool = True, invalid: float = 0.2,
) -> Fp8Case:
    """``main`` / ``extra`` = (page_size, num_pages, width). Row 1 has nothing valid in either
    scope; row 2 has main length 0 and row 3 extra length 0, so each scope alone decides a row."""
    device = torch.device(device)
    q = random_values((s_q, h_q, layout.dim), device)
    main_scope = make_scope(s_q, *main, layout, device, lengths=lengths, invalid=invalid)
    extra_scope = None
    if extra is not None:
        extra_scope = make_scope(s_q, *extra, layout, device, lengths=lengths, invalid=invalid, zero_length_row=3)
    return Fp8Case(q, main_scope, extra_scope, make_sink(h_q, device) if sink else None, layout)


def workspace_case(case: Fp8Case) -> Case:
    """The same attention as a ``sparse_attn_fwd`` input: every token of both caches dequantized
    into one bf16 kv (the extra cache after the main one), each row's valid entries as ids into
    it (the extra scope's shifted), everything invalid as -1."""
    kvs, rows, base = [], [], 0
    for scope in (case.main, case.extra):
        if scope is None:
            continue
        all_ids = torch.arange(scope.capacity, device=case.q.device)
        kvs.append(dequantize_k_cache_paged(scope.cache, all_ids, scope.page_size, case.layout, impl="reference"))
        ids = scope.indices.long()
        valid = (ids >= 0) & (ids < scope.capacity)
        if scope.lengths is not None:
            valid &= torch.arange(ids.shape[1], device=ids.device)[None, :] < scope.lengths[:, None]
        rows.append(torch.where(valid, ids + base, -1))
        base += scope.capacity
    indices = torch.cat(rows, dim=1).int()[:, None, :]
    return Case(case.q, torch.cat(kvs), indices, SM_SCALE, case.attn_sink, None)


KERNELS = ["triton", "gluon"]


def skip_unless_runs(kernel: str, device, layout: KVCacheLayout) -> None:
    """Skip a "gluon" case where that kernel cannot run (CPU, not Hopper, V3.2 layout)."""
    if kernel == "gluon":
        reason = gluon_kernel.unsupported_reason(torch.device(device), layout)
        if reason is not None:
            pytest.skip(f"Gluon kernel: {reason}")


def run_launcher(case: Fp8Case, kernel: str = "triton") -> tuple:
    """A kernel's launcher itself ("triton" or "gluon") on poisoned output buffers."""
    from sparse_prefill.ops.fp8_sparse_attn.kernel import paged_fp8_sparse_attn_triton

    skip_unless_runs(kernel, case.q.device, case.layout)
    s_q, h_q, _ = case.q.shape
    outputs = poisoned_outputs(s_q, h_q, case.q.device)
    kw = case.kwargs()
    scopes = (case.q, case.main.cache, case.main.indices, case.main.page_size, kw["extra_cache"],
              kw["extra_indices"], kw["extra_page_size"], kw["topk_length"], kw["extra_topk_length"],
              SM_SCALE, case.attn_sink)
    if kernel == "gluon":
        gluon_kernel.paged_fp8_sparse_attn_gluon(*scopes, *outputs)
    else:
        paged_fp8_sparse_attn_triton(*scopes, case.layout, D_V, *outputs)
    return outputs


# (page_size, num_pages, width) of the main and the extra scope: page sizes 1, odd and 64,
# widths below, at and across a key block; the last: SGLang's pages (a ratio-128 cache of 2
# entries per page as the main scope, the 256-token SWA pages as the extra one).
SCOPES = [
    ((64, 3, 7), None),
    ((5, 20, 33), (16, 4, 9)),
    ((1, 150, 64), (2, 50, 1)),
    ((7, 10, 130), (64, 2, 128)),
    ((2, 90, 70), (256, 2, 128)),
]


def _scope_id(scopes) -> str:
    main, extra = scopes
    return "p{}x{}-k{}".format(*main) + ("" if extra is None else "+p{}x{}-k{}".format(*extra))


# ---------------------------------------------------------------------------------------------
# Reference (CPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scopes", SCOPES, ids=_scope_id)
@pytest.mark.parametrize("h_q", [1, 3, 16, 128])
@pytest.mark.parametrize("layout", [V4, V32], ids=lambda x: x.name)
def test_reference_matches_dense_float64(layout, h_q, scopes):
    case = make_fp8_case(5, h_q, layout, *scopes, "cpu")
    assert_attn_close(case.reference(), dense_reference(workspace_case(case)))


@pytest.mark.parametrize("scopes", SCOPES[1:], ids=_scope_id)
def test_reference_is_sparse_attn_on_the_workspace(scopes):
    """Attending from the caches equals sparse_attn_fwd over a workspace of the same tokens."""
    case = make_fp8_case(6, 8, V4, *scopes, "cpu")
    for a, b in zip(case.reference(), sparse_attn_fwd_naive(*workspace_case(case).args())):
        assert torch.equal(a, b)


def test_public_cpu_paths_are_the_reference():
    case = make_fp8_case(4, 3, V4, *SCOPES[1], "cpu")
    ref_out, ref_max, ref_lse = case.reference()
    for impl in ("auto", "reference"):
        out, max_logits, lse = paged_fp8_sparse_attn_fwd(*case.args(), **case.kwargs(), impl=impl)
        assert out.dtype == torch.bfloat16 and out.shape == (4, 3, D_V)
        assert torch.equal(out, ref_out.bfloat16())
        assert torch.equal(max_logits, ref_max) and torch.equal(lse, ref_lse)


# ---------------------------------------------------------------------------------------------
# Kernel vs reference (CPU: interpreter, small; GPU: the same cases, then real sizes)
# ---------------------------------------------------------------------------------------------

# (s_q, h_q, layout, scopes)
KERNEL_CASES = [
    (4, 1, V4, SCOPES[0]),
    (4, 3, V4, SCOPES[1]),
    (4, 16, V4, SCOPES[2]),
    (4, 128, V4, SCOPES[3]),
    (4, 8, V32, SCOPES[1]),
    (4, 8, V4, SCOPES[4]),
]


@pytest.mark.parametrize(
    "s_q,h_q,layout,scopes", KERNEL_CASES,
    ids=[f"h{c[1]}-{c[2].name}-{_scope_id(c[3])}" for c in KERNEL_CASES],
)
def test_kernel_matches_reference(device, s_q, h_q, layout, scopes):
    case = make_fp8_case(s_q, h_q, layout, *scopes, device)
    assert_attn_close(run_launcher(case), case.reference())


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_special_rows(device, impl):
    """Exact facts: a row with nothing valid in either scope is (0, -inf, +inf); a row whose
    main scope is empty equals attending to its extra scope alone; sinks of +-inf."""
    skip_unless_runs(impl, device, V4)
    case = make_fp8_case(4, 3, V4, *SCOPES[1], device)
    out, max_logits, lse = paged_fp8_sparse_attn_fwd(*case.args(), **case.kwargs(), impl=impl)
    assert torch.all(out[1] == 0) and torch.all(max_logits[1] == -INF) and torch.all(lse[1] == INF)
    assert torch.all(out[[0, 2, 3], 2] == 0), "sink +inf must zero the output"
    assert not torch.isnan(out).any()
    # Row 2 has main length 0: the extra scope alone, passed as the main scope, gives the same.
    x = case.extra
    alone = Fp8Case(case.q[2:3], Scope(x.cache, x.indices[2:3], x.page_size, x.lengths[2:3]), None, case.attn_sink, V4)
    result = paged_fp8_sparse_attn_fwd(*alone.args(), **alone.kwargs(), impl=impl)
    assert_attn_close(result, (out[2:3].float(), max_logits[2:3], lse[2:3]))
    assert_attn_close((out, max_logits, lse), case.reference())


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_strided_inputs_and_out_buffer(device, impl):
    skip_unless_runs(impl, device, V4)
    case = make_fp8_case(3, 16, V4, *SCOPES[3], device)

    def strided_scope(scope: Scope) -> Scope:
        lengths = strided_copy(scope.lengths, unit_last=False)
        return replace(scope, indices=strided_copy(scope.indices), lengths=lengths)

    def strided(aligned: bool) -> Fp8Case:
        return Fp8Case(strided_copy(case.q, aligned=aligned), strided_scope(case.main), strided_scope(case.extra),
                       strided_copy(case.attn_sink, unit_last=False), V4)

    inputs = strided(aligned=False)
    if impl == "gluon":
        # An odd q offset or stride: the Gluon kernel refuses it by name, auto takes Triton's.
        with pytest.raises(ValueError, match="impl='gluon' cannot run here: q must start 16-byte aligned"):
            paged_fp8_sparse_attn_fwd(*inputs.args(), **inputs.kwargs(), impl=impl)
        assert_attn_close(paged_fp8_sparse_attn_fwd(*inputs.args(), **inputs.kwargs(), impl="auto"), case.reference())
        inputs = strided(aligned=True)
    big = torch.full((3, 16, 2 * D_V), float("nan"), dtype=torch.bfloat16, device=device)
    out = big[:, :, D_V:]
    result = paged_fp8_sparse_attn_fwd(*inputs.args(), **inputs.kwargs(), out=out, impl=impl)
    assert result[0] is out
    assert torch.isnan(big[:, :, :D_V]).all(), "wrote outside the out view"
    assert_attn_close(result, case.reference())


@pytest.mark.parametrize("impl", ["reference", *KERNELS])
def test_empty_queries(device, impl):
    skip_unless_runs(impl, device, V4)
    case = make_fp8_case(0, 4, V4, *SCOPES[1], device)
    out, max_logits, lse = paged_fp8_sparse_attn_fwd(*case.args(), **case.kwargs(), impl=impl)
    assert out.shape == (0, 4, D_V) and max_logits.shape == lse.shape == (0, 4)


@pytest.mark.parametrize("impl", KERNELS)
def test_public_kernel_matches_launcher_and_unchecked_lengths(device, impl):
    """The wrapper passes its inputs through unchanged; with value checks off a length past the
    width behaves as the width and a negative one as 0."""
    skip_unless_runs(impl, device, V4)
    case = make_fp8_case(4, 8, V4, (16, 4, 9), (8, 4, 5), device, lengths=False)
    case.main.lengths = torch.tensor([9, 100, -3, 0], dtype=torch.int32, device=device)
    case.extra.lengths = torch.tensor([-1, 5, 77, 2], dtype=torch.int32, device=device)
    with value_checks(False):
        result = paged_fp8_sparse_attn_fwd(*case.args(), **case.kwargs(), impl=impl)
    for a, b in zip(result, run_launcher(case, impl)):
        assert torch.equal(a, b)
    case.main.lengths = torch.tensor([9, 9, 0, 0], dtype=torch.int32, device=device)
    case.extra.lengths = torch.tensor([0, 5, 5, 2], dtype=torch.int32, device=device)
    for a, b in zip(result, paged_fp8_sparse_attn_fwd(*case.args(), **case.kwargs(), impl=impl)):
        assert torch.equal(a, b)
    assert_attn_close(result, case.reference())


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

_PB = V4.page_bytes(16)
# name: (arguments replaced: a value, or a function of the valid case), error, message
VALIDATION = {
    "layout": (dict(layout="v4"), TypeError, "layout must be a KVCacheLayout"),
    "q dtype": (dict(q=lambda c: c.q.float()), TypeError, "q must have dtype"),
    "q dim vs layout": (dict(layout=V32), ValueError, r"q must have head dim \(dim 2\) in \(576,\)"),
    "q heads": (dict(q=lambda c: c.q[:, :1].expand(-1, 129, -1)), ValueError, "q must have 1..128 heads"),
    "cache dtype": (dict(cache=lambda c: c.main.cache.view(torch.int8)), TypeError, "cache must have dtype"),
    "cache page bytes": (dict(page_size=8), ValueError, rf"cache has {_PB} bytes per page, but layout V4 with page_size=8 needs {V4.page_bytes(8)}"),
    "cache no pages": (dict(cache=lambda c: c.main.cache[:0]), ValueError, "cache must have at least one page"),
    "cache strided": (dict(cache=lambda c: torch.zeros(8, 2 * _PB, dtype=torch.uint8)[::2, :_PB]), ValueError, "cache must be contiguous"),
    "page_size 0": (dict(page_size=0), ValueError, "page_size must be in"),
    "page_size float": (dict(page_size=16.0), TypeError, "page_size must be an int"),
    "indices 3-D": (dict(indices=lambda c: c.main.indices[:, None]), ValueError, "indices must have shape"),
    "indices dtype": (dict(indices=lambda c: c.main.indices.long()), TypeError, "indices must have dtype"),
    "indices stride": (dict(indices=lambda c: torch.zeros(4, 18, dtype=torch.int32)[:, ::2]), ValueError, "indices must have unit stride"),
    "extra partial": (dict(extra_page_size=None), ValueError, "go together; got only"),
    "extra lengths alone": (dict(extra_cache=None, extra_indices=None, extra_page_size=None), ValueError, "extra_topk_length needs the extra scope"),
    "extra cache bytes": (dict(extra_page_size=16), ValueError, rf"extra_cache has \d+ bytes per page, but layout V4 with extra_page_size=16 needs {_PB}"),
    "extra page size": (dict(extra_page_size=-1), ValueError, "extra_page_size must be in"),
    "extra indices rows": (dict(extra_indices=lambda c: c.extra.indices[:-1]), ValueError, "extra_indices must have shape"),
    "extra lengths > width": (dict(extra_topk_length=lambda c: c.extra.lengths + 6), ValueError, r"extra_topk_length values must be in \[0, 5\]"),
    "lengths > width": (dict(topk_length=lambda c: c.main.lengths + 10), ValueError, r"topk_length values must be in \[0, 9\]"),
    "lengths dtype": (dict(topk_length=lambda c: c.main.lengths.long()), TypeError, "topk_length must have dtype"),
    "sink shape": (dict(attn_sink=lambda c: torch.zeros(2)), ValueError, "attn_sink must have shape"),
    "sm_scale": (dict(sm_scale=float("inf")), ValueError, "sm_scale must be finite"),
    "d_v": (dict(d_v=448), ValueError, "d_v must be 512"),
    "out shape": (dict(out=lambda c: torch.empty(4, 3, 576, dtype=torch.bfloat16)), ValueError, "out must have shape"),
    "impl": (dict(impl="gpu"), ValueError, "impl must be one of"),
    "impl gluon on cpu": (dict(impl="gluon"), ValueError, "impl='gluon' cannot run here: it needs CUDA tensors"),
}


def test_gluon_kernel_says_where_it_cannot_run():
    assert "V4 layout only" in gluon_kernel.unsupported_reason(torch.device("cuda"), V32)
    assert "CUDA tensors" in gluon_kernel.unsupported_reason(torch.device("cpu"), V4)
    assert not gluon_kernel.auto_picks_gluon(torch.device("cpu"), V4)
    with pytest.raises(ValueError, match="unknown tuning keys"):
        gluon_kernel.paged_fp8_sparse_attn_gluon(*[None] * 14, BLOCK_N=32)


@pytest.mark.skipif(not gluon_kernel.GLUON_IMPORTED, reason="this Triton has no Gluon Hopper API")
def test_gluon_launcher_arguments(monkeypatch):
    """The Gluon launcher's host side, without a GPU (``record_gluon_launch``), the persistent grid."""
    case = make_fp8_case(5, 100, V4, *SCOPES[1], "cpu")
    kw = case.kwargs()
    grid, named, kwargs = record_gluon_launch(
        monkeypatch, gluon_kernel, "_paged_fp8_attn_ws_kernel",
        lambda: gluon_kernel.paged_fp8_sparse_attn_gluon(
            case.q, case.main.cache, case.main.indices, case.main.page_size, kw["extra_cache"], kw["extra_indices"],
            kw["extra_page_size"], kw["topk_length"], kw["extra_topk_length"], SM_SCALE, case.attn_sink,
            *poisoned_outputs(5, 100, "cpu")))
    assert named["n_items"] == 10 and grid == (7,)  # 5 tokens x 2 head blocks, one CTA per SM
    assert named["h_q"] == 100 and named["page_size"] == case.main.page_size
    assert kwargs["NUM_HEAD_BLOCKS"] == 2 and type(kwargs["NUM_HEAD_BLOCKS"]) is int


@pytest.mark.parametrize("name", list(VALIDATION))
def test_validation_errors(name):
    changes, exc, match = VALIDATION[name]
    case = make_fp8_case(4, 3, V4, (16, 4, 9), (8, 4, 5), "cpu")
    kwargs = dict(q=case.q, cache=case.main.cache, indices=case.main.indices, page_size=16,
                  sm_scale=SM_SCALE, out=None, impl="reference", d_v=D_V, **case.kwargs())
    kwargs.update({key: value(case) if callable(value) else value for key, value in changes.items()})
    with pytest.raises(exc, match=match):
        paged_fp8_sparse_attn_fwd(**kwargs)


# ---------------------------------------------------------------------------------------------
# GPU: every small combination, then real sizes, long s_q and caches past 2**31 bytes
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("scopes", SCOPES, ids=_scope_id)
@pytest.mark.parametrize("h_q", [1, 3, 8, 16, 64, 100, 128])
@pytest.mark.parametrize("layout", [V4, V32], ids=lambda x: x.name)
def test_gpu_all_small_shapes(layout, h_q, scopes, kernel):
    case = make_fp8_case(33, h_q, layout, *scopes, "cuda")
    assert_attn_close(run_launcher(case, kernel), case.reference())


@pytest.mark.gpu
def test_gpu_auto_runs_the_kernel_it_names():
    """``impl="auto"`` on CUDA is bitwise the kernel ``auto_picks_gluon`` names (V4), and the
    Triton kernel for V3.2; on Hopper with a validated Triton that is the Gluon kernel."""
    validated = triton.__version__.rsplit(".", 1)[0] in gluon_kernel.VALIDATED_TRITON
    if torch.cuda.get_device_capability() == (9, 0) and validated:
        assert gluon_kernel.auto_picks_gluon(torch.device("cuda"), V4)
    for layout in (V4, V32):
        case = make_fp8_case(33, 64, layout, *SCOPES[3], "cuda")
        kernel = "gluon" if gluon_kernel.auto_picks_gluon(torch.device("cuda"), layout) else "triton"
        result = paged_fp8_sparse_attn_fwd(*case.args(), **case.kwargs(), impl="auto")
        for a, b in zip(result, run_launcher(case, kernel)):
            assert torch.equal(a, b), (layout, kernel)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("h_q,topk", [(64, 512), (128, 1024), (16, 512), (32, 1024)])
@pytest.mark.parametrize("compressed_tokens", [8192, 16384])
def test_gpu_real_sizes(h_q, topk, compressed_tokens, kernel):
    """The regular-path rows of ANCHORS.md: s_q 4096, top-k ids into a compressed cache plus
    128 window ids into an SWA cache, V4, page size 64."""
    case = make_fp8_case(4096, h_q, V4, (64, compressed_tokens // 64, topk), (64, 66, 128), "cuda", invalid=0.05)
    assert_attn_close(run_launcher(case, kernel), case.reference())


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("main_page", [1, 2, 64, 128, 256])
def test_gpu_sglang_page_sizes(main_page, kernel):
    """SGLang's pools: compressed caches of 256 / r entries per page (r = 256, 128, 4, 2, 1) as
    the main scope, the 256-token SWA pages as the extra one; s_q 1024, h_q 64, topk 512."""
    case = make_fp8_case(1024, 64, V4, (main_page, 16384 // main_page, 512), (256, 5, 128), "cuda", invalid=0.05)
    assert_attn_close(run_launcher(case, kernel), case.reference())


@pytest.mark.gpu
@pytest.mark.alone
@pytest.mark.parametrize("kernel", KERNELS)
def test_gpu_long_sq(kernel):
    """s_q = 70000 > 65535 (grid dims 1/2); q/out element offsets past 2**31 (70000 * 64 * 512)."""
    case = make_fp8_case(70000, 64, V4, (64, 64, 64), (64, 4, 16), "cuda")
    assert_attn_close(run_launcher(case, kernel), case.reference())


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("layout", [V4, V32], ids=lambda x: x.name)
def test_gpu_cache_past_2_pow_31_bytes(layout, kernel):
    """A 2.2 GB main cache with the tokens used in its last pages: byte offsets past 2**31
    (int64 addressing); ids just past the capacity and INT_MAX are invalid."""
    page_size = 64
    num_pages = 2**31 // layout.page_bytes(page_size) + 1000
    cache = torch.zeros(num_pages, layout.page_bytes(page_size), dtype=torch.uint8, device="cuda")
    k = random_values((16, page_size, 1, layout.dim), "cuda")
    cache[-16:] = quantize_k_cache(k, layout, impl="reference")
    capacity = num_pages * page_size
    s_q, h_q, topk = 128, 64, 256
    idx = torch.randint(capacity - 16 * page_size, capacity, (s_q, topk), device="cuda", dtype=torch.int32)
    idx[:, :4] = torch.tensor([capacity - 1, capacity, INT_MAX, INT_MIN], dtype=torch.int32)
    main = Scope(cache, idx, page_size, None)
    extra = make_scope(s_q, 16, 8, 32, layout, torch.device("cuda"))
    case = Fp8Case(random_values((s_q, h_q, layout.dim), "cuda"), main, extra, make_sink(h_q, "cuda"), layout)
    assert_attn_close(run_launcher(case, kernel), case.reference())


@pytest.mark.gpu
def test_gpu_device_mismatch():
    case = make_fp8_case(4, 3, V4, (16, 4, 9), (8, 4, 5), "cuda")
    kwargs = case.kwargs()
    with pytest.raises(ValueError, match="cache must be on cuda"):
        paged_fp8_sparse_attn_fwd(case.q, case.main.cache.cpu(), case.main.indices, 16, SM_SCALE, **kwargs)
    kwargs["extra_indices"] = kwargs["extra_indices"].cpu()
    with pytest.raises(ValueError, match="extra_indices must be on cuda"):
        paged_fp8_sparse_attn_fwd(*case.args(), **kwargs)
