"""sparse_attn_fwd: reference vs an independent dense float64 computation, kernel vs reference
(CPU: Triton interpreter on small shapes; GPU: real sizes), argument validation.

Every attention test checks results with ``tests/tolerance.py`` (FlashMLA's criteria, issue
"sparse_attn_fwd"); the FP8 op's tests also reuse this file's input builders.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace

import pytest
import torch

from sparse_prefill import value_checks
from sparse_prefill.ops.fp8_sparse_attn.gluon_kernel import validated_triton
from sparse_prefill.ops.sparse_attn import gluon_kernel, sparse_attn_fwd
from sparse_prefill.ops.sparse_attn import naive as naive_module
from sparse_prefill.ops.sparse_attn.naive import sparse_attn_fwd_naive
from tests.tolerance import INF, STAT_TOL, assert_attn_close, assert_close

INT_MIN, INT_MAX = -(2**31), 2**31 - 1
D_V = 512


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


# FlashMLA's test distribution, which its tolerances (used here) are calibrated for: values
# randn / 10 plus a random offset per tensor, sm_scale 0.5.
SM_SCALE = 0.5


def random_values(shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    offset = (torch.rand(()).item() - 0.5) / 10
    return (torch.randn(shape, device=device) / 10 + offset).bfloat16()


@dataclass
class Case:
    q: torch.Tensor
    kv: torch.Tensor
    indices: torch.Tensor
    sm_scale: float
    attn_sink: torch.Tensor | None
    topk_length: torch.Tensor | None

    def args(self) -> tuple:
        return (self.q, self.kv, self.indices, self.sm_scale, D_V, self.attn_sink, self.topk_length)


def bad_ids(n: int, s_kv: int, device: torch.device) -> torch.Tensor:
    """``n`` invalid ids of every kind: negative, INT_MIN, exactly s_kv, beyond it, INT_MAX."""
    kinds = torch.tensor([-1, -123456, INT_MIN, s_kv, s_kv + 1, 2147480000, INT_MAX], device=device)
    return kinds[torch.randint(0, len(kinds), (n,), device=device)].int()


def make_indices(
    s_q: int, s_kv: int, topk: int, device: torch.device, *, nan_rows: int, lengths: bool,
    invalid: float, unique: bool = False, empty_row: int = 1, zero_length_row: int = 2,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Index rows [s_q, topk] int32 into ``s_kv`` rows whose last ``nan_rows`` hold NaN, and
    their ``topk_length`` [s_q] (or None).

    Ids repeat (unless ``unique``); about ``invalid`` of them are invalid ids of every kind; row
    ``empty_row`` has no valid id at all; the NaN rows are only listed past a row's length (row
    0 has the full length, row ``zero_length_row`` length 0).
    """
    s_real = s_kv - nan_rows
    if unique:
        idx = torch.argsort(torch.rand(s_q, s_real, device=device), dim=1)[:, :topk].int()
    else:
        idx = torch.randint(0, s_real, (s_q, topk), device=device, dtype=torch.int32)
    hit = torch.rand(s_q, topk, device=device) < invalid
    idx[hit] = bad_ids(int(hit.sum()), s_kv, device)
    idx[empty_row : empty_row + 1] = bad_ids(topk, s_kv, device)
    if not lengths:
        return idx, None
    topk_length = torch.randint(0, topk + 1, (s_q,), device=device, dtype=torch.int32)
    topk_length[:1] = topk
    topk_length[zero_length_row : zero_length_row + 1] = 0
    past = torch.arange(topk, device=device)[None, :] >= topk_length[:, None]
    idx[past] = torch.randint(s_real, s_kv, (int(past.sum()),), device=device, dtype=torch.int32)
    return idx, topk_length


def make_sink(h_q: int, device: torch.device) -> torch.Tensor:
    """[h_q] float32 sink with finite entries and, for h_q >= 3, -inf at head 1, +inf at head 2."""
    attn_sink = torch.randn(h_q, device=device)
    if h_q >= 3:
        attn_sink[1], attn_sink[2] = -INF, INF
    return attn_sink


def make_case(
    s_q: int, s_kv: int, h_q: int, d_qk: int, topk: int, device: torch.device | str, *,
    sink: bool = True, lengths: bool = True, invalid: float = 0.2, unique: bool = False,
) -> Case:
    """Random inputs that exercise the whole contract at once (see ``make_indices``; with
    ``lengths`` the last 3 kv rows are NaN, listed only past a row's length)."""
    device = torch.device(device)
    nan_rows = 3 if lengths else 0
    q = random_values((s_q, h_q, d_qk), device)
    kv = random_values((s_kv, 1, d_qk), device)
    kv[s_kv - nan_rows :] = float("nan")
    idx, topk_length = make_indices(
        s_q, s_kv, topk, device, nan_rows=nan_rows, lengths=lengths, invalid=invalid, unique=unique
    )
    attn_sink = make_sink(h_q, device) if sink else None
    return Case(q, kv, idx[:, None, :].contiguous(), SM_SCALE, attn_sink, topk_length)


def strided_copy(t: torch.Tensor | None, unit_last: bool = True, aligned: bool = False) -> torch.Tensor | None:
    """The same values in a non-contiguous view inside a NaN/-1 filled buffer: every dim strided
    by 2 (the last by 1 when ``unit_last``), at an odd storage offset, or with ``aligned`` (and a
    last dim a multiple of 16) at a 16-element offset with strides multiples of 16 (what the
    Gluon kernels' 16-byte copies need)."""
    if t is None:
        return None
    pad = float("nan") if t.is_floating_point() else -1
    if unit_last:
        start = 16 if aligned else 3
        big = torch.full([2 * n for n in t.shape[:-1]] + [t.shape[-1] + 2 * start], pad, dtype=t.dtype, device=t.device)
        view = big[tuple(slice(None, None, 2) for _ in t.shape[:-1]) + (slice(start, start + t.shape[-1]),)]
    else:
        big = torch.full([2 * n + 1 for n in t.shape], pad, dtype=t.dtype, device=t.device)
        view = big[tuple(slice(1, None, 2) for _ in t.shape)]
    view.copy_(t)
    return view


def strided_case(case: Case, aligned: bool = False) -> Case:
    return Case(
        strided_copy(case.q, aligned=aligned), strided_copy(case.kv, aligned=aligned), strided_copy(case.indices),
        case.sm_scale, strided_copy(case.attn_sink, unit_last=False), strided_copy(case.topk_length, unit_last=False),
    )


def dense_reference(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Independent float64 computation: dense scores of every query against every KV row,
    weighted by how many times the row is validly listed (no gather, no per-entry softmax)."""
    q, kv, indices = case.q.double(), case.kv[:, 0].double(), case.indices[:, 0].long()
    s_kv, topk = kv.shape[0], indices.shape[1]
    valid = (indices >= 0) & (indices < s_kv)
    if case.topk_length is not None:
        valid &= torch.arange(topk, device=q.device)[None, :] < case.topk_length[:, None].long()
    counts = torch.zeros(q.shape[0], s_kv, dtype=torch.float64, device=q.device)
    counts.scatter_add_(1, torch.where(valid, indices, 0), valid.double())
    kv = torch.nan_to_num(kv, nan=0.0)  # NaN rows are never listed validly (weight 0)
    scores = torch.einsum("qhd,kd->qhk", q, kv) * case.sm_scale
    listed = (counts > 0)[:, None, :]
    max_logits = scores.masked_fill(~listed, -INF).amax(-1)
    shift = torch.where(max_logits == -INF, 0.0, max_logits)
    weights = torch.where(listed, counts[:, None, :] * torch.exp(scores - shift[..., None]), 0.0)
    total = weights.sum(-1)
    some = total > 0
    lse = torch.where(some, torch.log(total) + shift, INF)
    out = (weights @ kv[:, :D_V]) / torch.where(some, total, 1.0)[..., None]
    if case.attn_sink is not None:
        factor = 1.0 / (1.0 + torch.exp(case.attn_sink.double() - lse))
        out = out * torch.where(some, factor, 0.0)[..., None]
    return out, max_logits, lse


def poisoned_outputs(s_q: int, h_q: int, device: torch.device) -> tuple:
    """NaN-filled out / max_logits / lse, so an element the kernel does not write fails."""
    nan = float("nan")
    return (
        torch.full((s_q, h_q, D_V), nan, dtype=torch.bfloat16, device=device),
        torch.full((s_q, h_q), nan, device=device),
        torch.full((s_q, h_q), nan, device=device),
    )


KERNELS = ["triton", "gluon"]


def skip_unless_runs(kernel: str, device) -> None:
    """Skip a "gluon" case where that kernel cannot run (CPU, not Hopper)."""
    if kernel == "gluon":
        reason = gluon_kernel.unsupported_reason(torch.device(device))
        if reason is not None:
            pytest.skip(f"Gluon kernel: {reason}")


def run_launcher(case: Case, kernel: str = "triton", **tuning: int) -> tuple:
    """A kernel's launcher itself ("triton" or "gluon") on poisoned output buffers (contract:
    2-D kv and indices)."""
    from sparse_prefill.ops.sparse_attn.kernel import sparse_attn_fwd_triton

    skip_unless_runs(kernel, case.q.device)
    launch = gluon_kernel.sparse_attn_fwd_gluon if kernel == "gluon" else sparse_attn_fwd_triton
    s_q, h_q, _ = case.q.shape
    outputs = poisoned_outputs(s_q, h_q, case.q.device)
    launch(case.q, case.kv[:, 0], case.indices[:, 0], case.sm_scale, case.attn_sink, case.topk_length,
           *outputs, **tuning)
    return outputs


# ---------------------------------------------------------------------------------------------
# Reference (CPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("topk", [1, 7, 64, 100, 130])
@pytest.mark.parametrize("d_qk", [512, 576])
@pytest.mark.parametrize("h_q", [1, 3, 8, 16, 64, 128])
def test_reference_matches_dense_float64(h_q, d_qk, topk):
    case = make_case(5, 160, h_q, d_qk, topk, "cpu")
    assert_attn_close(sparse_attn_fwd_naive(*case.args()), dense_reference(case))


def test_reference_without_sink_or_lengths_and_unique_ids():
    case = make_case(6, 300, 16, 512, 130, "cpu", sink=False, lengths=False, invalid=0.0, unique=True)
    assert_attn_close(sparse_attn_fwd_naive(*case.args()), dense_reference(case))


def test_reference_chunks_rows(monkeypatch):
    """A chunk of a few rows gives the same answer as one chunk of all rows."""
    case = make_case(11, 100, 8, 576, 33, "cpu")
    whole = sparse_attn_fwd_naive(*case.args())
    monkeypatch.setattr(naive_module, "_CHUNK_ELEMS", 3 * 33 * 576)
    for a, b in zip(sparse_attn_fwd_naive(*case.args()), whole):
        assert torch.equal(a, b)


def test_public_cpu_paths_are_the_reference():
    case = make_case(4, 90, 3, 512, 20, "cpu")
    ref_out, ref_max, ref_lse = sparse_attn_fwd_naive(*case.args())
    for impl in ("auto", "reference"):
        out, max_logits, lse = sparse_attn_fwd(*case.args(), impl=impl)
        assert out.dtype == torch.bfloat16 and out.shape == (4, 3, D_V)
        assert torch.equal(out, ref_out.bfloat16())
        assert torch.equal(max_logits, ref_max) and torch.equal(lse, ref_lse)


# ---------------------------------------------------------------------------------------------
# Kernel vs reference (CPU: interpreter, small; GPU: the same cases, then real sizes)
# ---------------------------------------------------------------------------------------------

# (s_q, s_kv, h_q, d_qk, topk): heads below, at and across a head block, topk below, at and
# across a key block.
KERNEL_CASES = [
    (4, 40, 1, 512, 1),
    (4, 300, 3, 576, 7),
    (3, 300, 16, 512, 100),
    (3, 400, 8, 576, 130),
    (3, 200, 64, 512, 64),
    (3, 200, 128, 576, 33),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", KERNEL_CASES, ids=lambda s: "sq{}-skv{}-h{}-d{}-topk{}".format(*s))
def test_kernel_matches_reference(device, shape, kernel):
    case = make_case(*shape, device)
    assert_attn_close(run_launcher(case, kernel), sparse_attn_fwd_naive(*case.args()))


@pytest.mark.parametrize("split_qk", [0, 1])
@pytest.mark.parametrize("d_qk", [512, 576])
def test_kernel_both_score_layouts(device, split_qk, d_qk):
    """``SPLIT_QK`` only changes which warps compute the scores, never the result (both values,
    whatever the default for the shape is)."""
    case = make_case(3, 200, 64, d_qk, 130, device)
    assert_attn_close(run_launcher(case, SPLIT_QK=split_qk), sparse_attn_fwd_naive(*case.args()))


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_special_rows(device, impl):
    """Exact facts: rows with nothing valid, sinks of +-inf, a duplicated id."""
    skip_unless_runs(impl, device)
    s_kv, h_q, d_qk = 50, 3, 512
    q = random_values((5, h_q, d_qk), device)
    q[4] = q[3]
    kv = random_values((s_kv, 1, d_qk), device)
    kv[40:] = float("nan")
    idx = torch.tensor(
        [
            [-1, INT_MIN, INT_MAX, s_kv],  # nothing valid by value
            [3, 4, 5, 6],  # topk_length 0
            [7, 8, 41, 42],  # topk_length 2: the NaN rows behind it are ignored
            [9, 9, 10, -5],  # 9 twice
            [9, 10, -1, 45],  # 9 once (45 is NaN, past the length)
        ],
        dtype=torch.int32, device=device,
    )[:, None, :]
    lengths = torch.tensor([4, 0, 2, 4, 3], dtype=torch.int32, device=device)
    sink = torch.tensor([0.5, -INF, INF], device=device)
    sm_scale = SM_SCALE
    out, max_logits, lse = sparse_attn_fwd(q, kv, idx, sm_scale, D_V, sink, lengths, impl=impl)
    plain, _, plain_lse = sparse_attn_fwd(q, kv, idx, sm_scale, D_V, None, lengths, impl=impl)

    assert torch.all(out[:2] == 0) and torch.all(max_logits[:2] == -INF) and torch.all(lse[:2] == INF)
    assert torch.all(out[2:, 2] == 0), "sink +inf must zero the output"
    assert torch.equal(out[:, 1], plain[:, 1]), "sink -inf must leave the output unchanged"
    assert torch.equal(lse, plain_lse), "the sink must not change lse"
    assert not torch.isnan(out).any()
    # Listing row 9 twice doubles its weight: lse grows by exactly the mass of one more copy.
    s9 = (q[3].float() @ kv[9, 0].float()) * sm_scale
    s10 = (q[3].float() @ kv[10, 0].float()) * sm_scale
    expect = torch.logaddexp(torch.logaddexp(s9, s9), s10)
    assert_close("lse of a duplicated id", lse[3], expect, **STAT_TOL)
    assert_close("lse of a single id", lse[4], torch.logaddexp(s9, s10), **STAT_TOL)
    ref = sparse_attn_fwd_naive(q, kv, idx, sm_scale, D_V, sink, lengths)
    assert_attn_close((out, max_logits, lse), ref)


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_strided_inputs_and_out_buffer(device, impl):
    skip_unless_runs(impl, device)
    case = make_case(3, 120, 16, 576, 40, device)
    ref = sparse_attn_fwd_naive(*case.args())
    strided = strided_case(case)
    assert not any(t.is_contiguous() for t in (strided.q, strided.kv, strided.indices, strided.topk_length))
    if impl == "gluon":
        # Odd offsets and strides: the Gluon kernel refuses them by name, auto takes Triton's.
        with pytest.raises(ValueError, match="impl='gluon' cannot run here: q must start 16-byte aligned"):
            sparse_attn_fwd(*strided.args(), impl=impl)
        assert_attn_close(sparse_attn_fwd(*strided.args(), impl="auto"), ref)
        strided = strided_case(case, aligned=True)
    big = torch.full((3, 16, 2 * D_V), float("nan"), dtype=torch.bfloat16, device=device)
    out = big[:, :, D_V:]
    result = sparse_attn_fwd(*strided.args(), out=out, impl=impl)
    assert result[0] is out
    assert torch.isnan(big[:, :, :D_V]).all(), "wrote outside the out view"
    assert_attn_close(result, ref)


@pytest.mark.parametrize("impl", ["reference", *KERNELS])
def test_empty_queries(device, impl):
    skip_unless_runs(impl, device)
    case = make_case(0, 10, 4, 512, 8, device)
    out, max_logits, lse = sparse_attn_fwd(*case.args(), impl=impl)
    assert out.shape == (0, 4, D_V) and max_logits.shape == lse.shape == (0, 4)
    given = torch.empty(0, 4, D_V, dtype=torch.bfloat16, device=device)
    assert sparse_attn_fwd(*case.args(), out=given, impl=impl)[0] is given


@pytest.mark.parametrize("impl", KERNELS)
def test_public_kernel_matches_launcher_and_unchecked_lengths(device, impl):
    """The wrapper passes its inputs through unchanged; with value checks off a length past
    topk behaves as topk and a negative one as 0 (the definition of the mask)."""
    skip_unless_runs(impl, device)
    case = make_case(4, 64, 8, 512, 9, device, lengths=False)
    lengths = torch.tensor([9, 100, -3, 0], dtype=torch.int32, device=device)
    case = replace(case, topk_length=lengths)
    with value_checks(False):
        result = sparse_attn_fwd(*case.args(), impl=impl)
    for a, b in zip(result, run_launcher(case, impl)):
        assert torch.equal(a, b)
    assert_attn_close(result, sparse_attn_fwd_naive(*case.args()))
    in_range = torch.tensor([9, 9, 0, 0], dtype=torch.int32, device=device)
    for a, b in zip(result, sparse_attn_fwd(*replace(case, topk_length=in_range).args(), impl=impl)):
        assert torch.equal(a, b)


def test_gluon_kernel_says_where_it_cannot_run():
    assert "CUDA tensors" in gluon_kernel.unsupported_reason(torch.device("cpu"))
    assert not gluon_kernel.auto_picks_gluon(torch.device("cpu"), 64)
    case = make_case(2, 10, 64, 512, 4, "cpu")
    with pytest.raises(ValueError, match="impl='gluon' cannot run here: it needs CUDA tensors"):
        sparse_attn_fwd(*case.args(), impl="gluon")
    # Both kernels behind the launcher check their own tuning keys before any launch.
    for h_q in (8, 64):
        with pytest.raises(ValueError, match="unknown tuning keys"):
            gluon_kernel.sparse_attn_fwd_gluon(torch.empty(1, h_q, 512), *[None] * 8, BLOCK_N=32)
    with pytest.raises(ValueError, match="PRODUCER_WARPS must be 1, 2, 4 or 8, got 3"):
        gluon_kernel.sparse_attn_fwd_gluon(torch.empty(1, 8, 512), *[None] * 8, PRODUCER_WARPS=3)
    with pytest.raises(ValueError, match=r"Q_LATE must be 0, 1 or 2 \(blocks copied before the token's Q\), got 3"):
        gluon_kernel.sparse_attn_fwd_gluon(torch.empty(1, 8, 512), *[None] * 8, Q_LATE=3)


@pytest.mark.parametrize("width,offset,ok", [(512, 0, True), (576, 0, True), (520, 0, False), (512, 4, False)])
def test_gluon_input_alignment_rule(width, offset, ok):
    """The Gluon kernel's 16-byte copies need rows starting 16-byte aligned: row strides that
    are multiples of 16 elements and an aligned start (``offset`` elements = 2 bytes each)."""
    kv = torch.zeros(10 * width + offset, dtype=torch.bfloat16)[offset:].view(10, 1, width)[..., :512]
    q = torch.zeros(4, 8, 512, dtype=torch.bfloat16)
    assert (gluon_kernel.inputs_reason(q, kv) is None) == ok


def record_gluon_launch(monkeypatch, module, kernel_name: str, launch) -> tuple:
    """Run ``launch()`` with ``module.kernel_name`` replaced by a recorder and 7 SMs; check the
    host side of a Gluon launcher: one runtime argument per runtime kernel parameter (ints or
    floats for the scalars) and every constexpr named. Returns (grid, runtime args by name,
    keyword arguments)."""
    calls = []

    class RecordingKernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    params = getattr(module, kernel_name).params
    monkeypatch.setattr(module, kernel_name, RecordingKernel())
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=7))
    launch()
    (grid, args, kwargs), = calls
    runtime = [p.name for p in params if not p.is_constexpr]
    assert len(args) == len(runtime)
    named = dict(zip(runtime, args))
    assert all(type(named[n]) in (int, float) for n in runtime if not n.endswith("_ptr"))
    assert set(kwargs) == {p.name for p in params if p.is_constexpr} | {"num_warps"}
    return grid, named, kwargs


@pytest.mark.skipif(not gluon_kernel.GLUON_IMPORTED, reason="this Triton has no Gluon Hopper API")
def test_gluon_launcher_arguments(monkeypatch):
    """The Gluon launcher's host side, without a GPU (``record_gluon_launch``), the persistent grid."""
    case = make_case(5, 40, 100, 576, 9, "cpu")
    grid, named, kwargs = record_gluon_launch(
        monkeypatch, gluon_kernel, "_sparse_attn_ws_kernel",
        lambda: gluon_kernel.sparse_attn_fwd_gluon(case.q, case.kv[:, 0], case.indices[:, 0], SM_SCALE,
                                                   case.attn_sink, case.topk_length, *poisoned_outputs(5, 100, "cpu")))
    assert named["n_items"] == 10 and grid == (7,)  # 5 tokens x 2 head blocks, one CTA per SM
    assert named["h_q"] == 100 and named["topk"] == 9 and named["s_kv"] == 40
    assert kwargs["NUM_HEAD_BLOCKS"] == 2 and kwargs["D_TAIL"] == 64


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


# name: (arguments replaced: a value, or a function of the valid case), error, message
VALIDATION = {
    "q dtype": (dict(q=lambda c: c.q.float()), TypeError, "q must have dtype"),
    "q rank": (dict(q=lambda c: c.q[0]), ValueError, "q must have shape"),
    "q heads 0": (dict(q=lambda c: c.q[:, :0]), ValueError, "q must have 1..128 heads"),
    "q heads 129": (dict(q=lambda c: c.q[:, :1].expand(-1, 129, -1)), ValueError, "q must have 1..128 heads"),
    "q head dim": (dict(q=lambda c: c.q[..., :256], kv=lambda c: c.kv[..., :256]), ValueError, "head dim"),
    "q last stride": (dict(q=lambda c: c.q.transpose(1, 2).contiguous().transpose(1, 2)), ValueError, "q must have unit stride"),
    "kv dtype": (dict(kv=lambda c: c.kv.half()), TypeError, "kv must have dtype"),
    "kv h_kv 2": (dict(kv=lambda c: c.kv.expand(-1, 2, -1)), ValueError, r"kv must have shape \(\*, 1, 512\)"),
    "kv 2-D": (dict(kv=lambda c: c.kv[:, 0]), ValueError, "kv must have shape"),
    "kv d mismatch": (dict(kv=torch.zeros(8, 1, 576, dtype=torch.bfloat16)), ValueError, "kv must have shape"),
    "kv empty": (dict(kv=lambda c: c.kv[:0]), ValueError, "kv must have 1.."),
    "indices dtype": (dict(indices=lambda c: c.indices.long()), TypeError, "indices must have dtype"),
    "indices 2-D": (dict(indices=lambda c: c.indices[:, 0]), ValueError, "indices must have shape"),
    "indices rows": (dict(indices=lambda c: c.indices[:-1]), ValueError, "indices must have shape"),
    "indices topk 0": (dict(indices=lambda c: c.indices[..., :0]), ValueError, "at least one entry"),
    "indices stride": (dict(indices=torch.zeros(4, 1, 16, dtype=torch.int32)[..., ::2]), ValueError, "indices must have unit stride"),
    "sm_scale str": (dict(sm_scale="0.1"), TypeError, "sm_scale must be a float"),
    "sm_scale bool": (dict(sm_scale=True), TypeError, "sm_scale must be a float"),
    "sm_scale nan": (dict(sm_scale=float("nan")), ValueError, "sm_scale must be finite"),
    # Finite as Python floats, but inf / 0 in float32 (and so on the device).
    "sm_scale 1e39": (dict(sm_scale=1e39), ValueError, r"sm_scale must be finite as a float32: 0 or a magnitude in \[2\*\*-126"),
    "sm_scale -1e39": (dict(sm_scale=-1e39), ValueError, "sm_scale must be finite as a float32"),
    "sm_scale 1e-50": (dict(sm_scale=1e-50), ValueError, "sm_scale must be finite as a float32"),
    "sm_scale 2**128": (dict(sm_scale=2**128), ValueError, "sm_scale must be finite as a float32"),
    "out expanded": (dict(out=torch.empty(1, 3, D_V, dtype=torch.bfloat16).expand(4, 3, D_V)), ValueError,
                     "out is an output, so its elements must not share memory"),
    "d_v 256": (dict(d_v=256), ValueError, "d_v must be 512"),
    "d_v float": (dict(d_v=512.0), TypeError, "d_v must be an int"),
    "sink shape": (dict(attn_sink=torch.zeros(4)), ValueError, "attn_sink must have shape"),
    "sink dtype": (dict(attn_sink=torch.zeros(3, dtype=torch.bfloat16)), TypeError, "attn_sink must have dtype"),
    "lengths dtype": (dict(topk_length=lambda c: c.topk_length.long()), TypeError, "topk_length must have dtype"),
    "lengths shape": (dict(topk_length=lambda c: c.topk_length[:-1]), ValueError, "topk_length must have shape"),
    "lengths > topk": (dict(topk_length=lambda c: c.topk_length + 20), ValueError, r"topk_length values must be in \[0, 8\]"),
    "lengths < 0": (dict(topk_length=lambda c: c.topk_length - 20), ValueError, r"topk_length values must be in \[0, 8\]"),
    "out dtype": (dict(out=torch.empty(4, 3, D_V)), TypeError, "out must have dtype"),
    "out shape": (dict(out=torch.empty(4, 3, 576, dtype=torch.bfloat16)), ValueError, "out must have shape"),
    "out stride": (dict(out=torch.empty(4, D_V, 3, dtype=torch.bfloat16).transpose(1, 2)), ValueError, "out must have unit stride"),
    "impl": (dict(impl="cuda"), ValueError, "impl must be one of"),
}


@pytest.mark.parametrize("name", list(VALIDATION))
def test_validation_errors(name):
    changes, exc, match = VALIDATION[name]
    case = make_case(4, 20, 3, 512, 8, "cpu")
    kwargs = dict(q=case.q, kv=case.kv, indices=case.indices, sm_scale=case.sm_scale, d_v=D_V,
                  attn_sink=case.attn_sink, topk_length=case.topk_length, out=None, impl="reference")
    kwargs.update({key: value(case) if callable(value) else value for key, value in changes.items()})
    with pytest.raises(exc, match=match):
        sparse_attn_fwd(**kwargs)


def test_value_checks_off_skips_only_value_checks():
    case = make_case(4, 20, 3, 512, 8, "cpu")
    too_long = case.topk_length + 20
    with value_checks(False):
        sparse_attn_fwd(*case.args()[:-1], too_long)
        with pytest.raises(TypeError, match="topk_length must have dtype"):
            sparse_attn_fwd(*case.args()[:-1], too_long.long())


# ---------------------------------------------------------------------------------------------
# GPU: every small shape combination, then real sizes, long s_q and int64 offsets
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("topk", [1, 7, 64, 100, 130])
@pytest.mark.parametrize("d_qk", [512, 576])
@pytest.mark.parametrize("h_q", [1, 3, 8, 16, 64, 100, 128])
def test_gpu_all_small_shapes(h_q, d_qk, topk, kernel):
    case = make_case(33, 500, h_q, d_qk, topk, "cuda")
    assert_attn_close(run_launcher(case, kernel), sparse_attn_fwd_naive(*case.args()))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
def test_gpu_strided_inputs(kernel):
    """Strided inputs through the public op: the Gluon kernel where strides keep its 16-byte
    copies aligned, the Triton kernel where not (``auto``)."""
    case = make_case(33, 500, 64, 576, 130, "cuda")
    strided = strided_case(case)
    impl = kernel if gluon_kernel.inputs_reason(strided.q, strided.kv) is None else "auto"
    skip_unless_runs(kernel, "cuda")
    assert_attn_close(sparse_attn_fwd(*strided.args(), impl=impl), sparse_attn_fwd_naive(*case.args()))


@pytest.mark.gpu
def test_gpu_gluon_refuses_misaligned_inputs():
    skip_unless_runs("gluon", "cuda")
    case = make_case(4, 100, 64, 512, 16, "cuda")
    kv = torch.empty(100, 1, 520, dtype=torch.bfloat16, device="cuda")[..., :512]
    kv.copy_(case.kv)
    assert "kv must start 16-byte aligned" in gluon_kernel.inputs_reason(case.q, kv)
    with pytest.raises(ValueError, match="impl='gluon' cannot run here: kv must start"):
        sparse_attn_fwd(case.q, kv, case.indices, SM_SCALE, impl="gluon")
    args = (case.q, kv, case.indices, SM_SCALE, D_V, case.attn_sink, case.topk_length)
    assert_attn_close(sparse_attn_fwd(*args, impl="auto"), sparse_attn_fwd_naive(*args))  # the Triton kernel


@pytest.mark.gpu
def test_gpu_auto_runs_the_kernel_it_names():
    """``impl="auto"`` on CUDA is bitwise the kernel ``auto_picks_gluon`` names for the head
    count; on Hopper with a validated Triton that is the Gluon kernel from MIN_AUTO_HEADS on."""
    device = torch.device("cuda")
    if gluon_kernel.unsupported_reason(device) is None and validated_triton():
        assert gluon_kernel.auto_picks_gluon(device, 64) and gluon_kernel.auto_picks_gluon(device, 128)
    for h_q in (8, 32, 64, 128):
        case = make_case(33, 500, h_q, 512, 200, "cuda")
        kernel = "gluon" if gluon_kernel.auto_picks_gluon(device, h_q) else "triton"
        for a, b in zip(sparse_attn_fwd(*case.args(), impl="auto"), run_launcher(case, kernel)):
            assert torch.equal(a, b), (h_q, kernel)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("d_qk", [512, 576])
@pytest.mark.parametrize("h_q,topk", [(64, 512), (64, 1024), (64, 2048), (128, 512), (128, 1024), (128, 2048)])
def test_gpu_real_sizes(h_q, topk, d_qk, kernel):
    case = make_case(4096, 65536, h_q, d_qk, topk, "cuda", invalid=0.05)
    assert_attn_close(run_launcher(case, kernel), sparse_attn_fwd_naive(*case.args()))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("h_q", [1, 3, 8, 16, 32, 48])
def test_gpu_tensor_parallel_heads(h_q, kernel):
    case = make_case(4096, 32768, h_q, 512, 1024, "cuda", unique=True, lengths=False, invalid=0.0)
    assert_attn_close(run_launcher(case, kernel), sparse_attn_fwd_naive(*case.args()))


@pytest.mark.gpu
@pytest.mark.parametrize("d_qk", [512, 576])
@pytest.mark.parametrize("h_q", [3, 9, 16])
@pytest.mark.parametrize("tuning", [{"PRODUCER_WARPS": 2}, {"PRODUCER_WARPS": 8}, {"Q_LATE": 0}, {"Q_LATE": 1},
                                    {"Q_LATE": 2}],
                         ids=["2 producer warps", "8 producer warps", "Q first", "Q after one block", "Q after two blocks"])
def test_gpu_few_head_kernel_variants(tuning, h_q, d_qk):
    """The few-head kernel's tuning variants that bench.few_heads times: the producer's copy
    layout and its barriers' arrival counts follow its warp count; Q copied before, between or
    after a token's first two blocks (s_q 300: several tokens per CTA; random lengths down to 0:
    tokens with no block; topk 300: an odd block count, so the last pair's second block is all
    invalid)."""
    case = make_case(300, 5000, h_q, d_qk, 300, "cuda")
    assert_attn_close(run_launcher(case, "gluon", **tuning), sparse_attn_fwd_naive(*case.args()))


@pytest.mark.gpu
@pytest.mark.alone
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("h_q,d_qk,topk", [(64, 576, 64), (16, 512, 100), (128, 512, 130)])
def test_gpu_long_sq(h_q, d_qk, topk, kernel):
    """s_q = 70000 > 65535 (grid dims 1/2; the Gluon kernel's persistent CTAs walk 70000+ items),
    and q/out element offsets past 2**31 for h_q 64, d_qk 576 (70000 * 64 * 576 = 2.6e9)."""
    case = make_case(70000, 4096, h_q, d_qk, topk, "cuda")
    assert_attn_close(run_launcher(case, kernel), sparse_attn_fwd_naive(*case.args()))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
def test_gpu_large_index_values(kernel):
    """s_kv = 2**31 - 1 cannot be allocated; a 4.4 GB kv of 4.3M rows puts row offsets of the
    ids used here past 2**31 elements (int64 addressing), next to invalid ids just past s_kv."""
    s_kv, d_qk, h_q, topk, s_q = 4_300_000, 512, 64, 256, 64
    kv = random_values((s_kv, 1, d_qk), "cuda")
    q = random_values((s_q, h_q, d_qk), "cuda")
    idx = torch.randint(s_kv - 50_000, s_kv, (s_q, 1, topk), device="cuda", dtype=torch.int32)
    idx[:, 0, :4] = torch.tensor([s_kv - 1, s_kv, s_kv + 1, INT_MAX], dtype=torch.int32)
    case = Case(q, kv, idx, SM_SCALE, torch.randn(h_q, device="cuda"), None)
    assert_attn_close(run_launcher(case, kernel), sparse_attn_fwd_naive(*case.args()))


@pytest.mark.gpu
def test_gpu_device_mismatch():
    case = make_case(4, 20, 3, 512, 8, "cuda")
    with pytest.raises(ValueError, match="kv must be on cuda"):
        sparse_attn_fwd(case.q, case.kv.cpu(), case.indices, SM_SCALE)
    with pytest.raises(ValueError, match="attn_sink must be on cuda"):
        sparse_attn_fwd(*case.args()[:5], case.attn_sink.cpu(), case.topk_length)
