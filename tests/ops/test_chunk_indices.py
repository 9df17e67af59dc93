"""build_chunk_indices (the chunk cache's fused build): Triton kernel against the composed
references on random inputs, poisoned outputs, the registered op (opcheck, compile), and what one
``SparsePrefillChunkCache.build`` dispatches and launches."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparse_prefill._utils import value_checks
from sparse_prefill.backend.chunk_cache import SparsePrefillChunkCache
from sparse_prefill.ops.indices import chunk_indices, kernels, library
from sparse_prefill.ops.indices.plan import swa_gather_len
from tests.ops.test_indices import POISON, make_lens, token_table


def chunk_args(seq, ext, ratios, dense, window, device, strided=False):
    """``chunk_indices``' arguments for host lengths ``seq`` / ``ext``: rows for the ratios in
    ``dense`` (0 included), top-k (no rows) for the others."""
    num_reqs = len(seq)
    if strided:  # every other element of a longer vector
        lens = torch.tensor([v for pair in zip(seq, ext) for v in pair], dtype=torch.int32, device=device)
        seq_t, ext_t = lens[0::2], lens[1::2]
    else:
        seq_t, ext_t = (torch.tensor(v, dtype=torch.int32, device=device) for v in (seq, ext))
    longest = max(seq, default=0)
    tables = {c: token_table(num_reqs, longest // c + 2, device, transposed=strided) for c in ratios if c > 0}
    row_topks = [
        (max((s // c for s, e in zip(seq, ext) if e), default=0) if c else 0) if c in dense else -1 for c in ratios
    ]
    num_swa = sum(swa_gather_len(s, e, window) for s, e in zip(seq, ext))
    num_compressed = [sum(s // c for s in seq) if c else 0 for c in ratios]
    return (seq_t, ext_t, token_table(num_reqs, longest + 3, device, transposed=strided), tables, list(ratios),
            row_topks, window, sum(ext), num_swa, num_compressed)


def flat(ci):
    return library.flatten_chunk_indices(ci)


def assert_chunk_equal(a, b):
    fa, fb = flat(a), flat(b)
    assert len(fa) == len(fb)
    for i, (x, y) in enumerate(zip(fa, fb)):
        assert x.dtype == y.dtype and x.shape == y.shape, i
        assert torch.equal(x.cpu(), y.cpu()), i
    assert all(p.swa_token_ids is a.swa.token_ids for p in a.plans.values())


@pytest.fixture
def poisoned(monkeypatch):
    """The Triton path's outputs start as POISON, so an element the kernel misses fails."""
    empty = library.empty_chunk_indices

    def poisoned_empty(*args):
        out = empty(*args)
        for t in flat(out):
            t.fill_(POISON)
        return out

    monkeypatch.setattr(library, "empty_chunk_indices", poisoned_empty)


CASES = [
    # (seq_lens, extend_lens): prefix 0, a zero extend, an empty request, odd sizes
    ([40, 9, 300], [5, 9, 3]),
    ([5, 0, 37, 130], [0, 0, 20, 129]),
    ([1], [1]),
    ([0, 0], [0, 0]),
    ([], []),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize(
    ("ratios", "dense"),
    [((0, 4, 128), (0, 128)), ((0, 1, 2, 4, 128), (0, 128)), ((4,), ()), ((2, 3, 128), (3,))],
)
@pytest.mark.parametrize("window", [1, 16])
def test_kernel_matches_reference(device, poisoned, case, ratios, dense, window):
    seq, ext = CASES[case]
    args = chunk_args(seq, ext, ratios, dense, window, device)
    assert_chunk_equal(chunk_indices(*args, "triton"), chunk_indices(*args, "reference"))


@pytest.mark.parametrize("num_reqs", [3, 17, 40])  # one, two and three scans of 16 requests
def test_kernel_matches_reference_random(device, poisoned, num_reqs):
    seq, ext = (t.tolist() for t in make_lens(num_reqs, 400, 40, min_extend=0))
    args = chunk_args(seq, ext, (0, 4, 128), (0, 128), 128, device, strided=True)
    assert_chunk_equal(chunk_indices(*args, "triton"), chunk_indices(*args, "reference"))


def test_opcheck():
    seq, ext = make_lens(3, 300, 40, min_extend=0)
    args = list(chunk_args(seq.tolist(), ext.tolist(), (0, 4, 128), (0, 128), 16, "cpu"))
    args[3] = list(args[3].values())
    torch.library.opcheck(library.build_chunk_indices_op, (*args, "reference"))


def test_compile_fullgraph_matches_eager():
    args = chunk_args([40, 9, 300], [5, 9, 3], (0, 4, 128), (0, 128), 16, "cpu")

    def build(seq_lens, extend_lens, swa_table, tables):
        return flat(chunk_indices(seq_lens, extend_lens, swa_table, tables, *args[4:], "reference"))

    compiled = torch.compile(build, fullgraph=True)(*args[:4])
    for x, y in zip(compiled, build(*args[:4])):
        assert x.dtype == y.dtype and torch.equal(x, y)


class _OpCounter(TorchDispatchMode):
    """The ops a call dispatches at the top level (those inside a custom op are its own)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_build_is_one_op_and_one_launch(device, monkeypatch):
    """With value checks off the build dispatches the fused op and the top-k buffers'
    allocations only, and the op launches one kernel for its three ratios."""
    launches = []
    run = kernels._chunk_kernel.run
    monkeypatch.setattr(kernels._chunk_kernel, "run", lambda *a, **k: launches.append(1) or run(*a, **k))
    seq, ext = [40, 9, 300, 77], [5, 9, 3, 0]
    args = chunk_args(seq, ext, (0, 4, 128), (0, 128), 16, device)
    with value_checks(False), _OpCounter() as counter:
        SparsePrefillChunkCache.build(
            key=1, seq_lens=args[0], extend_lens=args[1], swa_token_table=args[2], window_size=16,
            ratios=(0, 4, 128), compressed_token_tables=args[3], topk=8, impl="triton",
            host_lens=(seq, ext),
        )
    assert counter.ops == {"sparse_prefill.build_chunk_indices": 1, "aten.empty": 2}
    assert len(launches) == 1


def test_direct_call_only_for_plain_cuda_eager():
    """The build skips the dispatcher only where nothing expects to see the op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sparse_prefill.ops.registry import direct_call_ok

    assert not direct_call_ok(torch.zeros(1))
    with FakeTensorMode() as mode:
        assert not direct_call_ok(mode.from_tensor(torch.zeros(1)))
    if torch.cuda.is_available():
        t = torch.zeros(1, device="cuda")
        assert direct_call_ok(t)
        with _OpCounter():
            assert not direct_call_ok(t)
        with torch.device("cuda"):
            assert not direct_call_ok(t)


@pytest.mark.gpu
def test_gpu_build_calls_the_impl_directly(monkeypatch):
    """On plain CUDA tensors the build runs the op's implementation without the dispatcher, on
    one pooled buffer, and gives what the registered op gives."""
    import sparse_prefill.ops.indices as indices

    calls = []
    impl = library.build_chunk_indices
    monkeypatch.setattr(indices, "build_chunk_indices", lambda *a, **k: calls.append(k) or impl(*a, **k))
    args = chunk_args([40, 9, 300, 77], [5, 9, 3, 0], (0, 4, 128), (0, 128), 16, "cuda")
    direct = chunk_indices(*args, "triton")
    assert calls == [{"pooled": True}]
    tables = [args[3][c] for c in args[4] if c > 0]
    via_op = library.build_chunk_indices_op(*args[:3], tables, *args[4:], "triton")
    assert_chunk_equal(direct, library.unflatten_chunk_indices(via_op, args[4], args[5]))


def _op_args(args):
    """``chunk_args`` as the op takes them: the tables a list, in ratio order."""
    return (*args[:3], [args[3][c] for c in args[4] if c > 0], *args[4:])


@pytest.mark.parametrize("case", [0, 1, 3, 4])
def test_pooled_build_matches_reference(device, poisoned, case):
    seq, ext = CASES[case]
    args = chunk_args(seq, ext, (0, 1, 4, 128), (0, 128), 16, device)
    pooled = library.build_chunk_indices(*_op_args(args), "triton", pooled=True)
    assert_chunk_equal(pooled, chunk_indices(*args, "reference"))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_pooled_views_are_aligned_and_disjoint(case):
    """One buffer; every view 16-byte aligned (as separate allocations are, so Triton compiles
    the same variant), shaped and typed as unpooled, and no two overlap."""
    seq, ext = CASES[case]
    args = chunk_args(seq, ext, (0, 3, 4, 128), (0, 3), 5, "cpu")
    sizes = (args[0], args[4], args[5], args[6], args[7], args[8], args[9])
    pooled, separate = (flat(library.empty_chunk_indices(*sizes, pooled=p)) for p in (True, False))
    assert [(t.dtype, t.shape) for t in pooled] == [(t.dtype, t.shape) for t in separate]
    assert len({t.untyped_storage().data_ptr() for t in pooled}) == 1
    assert all(t.data_ptr() % 16 == 0 and t.is_contiguous() for t in pooled)
    for i, t in enumerate(pooled):
        t.fill_(i)
    assert all(bool((t == i).all()) for i, t in enumerate(pooled))


def test_bench_smoke():
    from sparse_prefill.bench import chunk_cache_build

    result = chunk_cache_build.run(smoke=True)
    assert [(r["round"], r["chunk"], r["prefix"]) for r in result.rows] == [
        (round_, 64, prefix) for round_ in range(chunk_cache_build.ROUNDS) for prefix in (0, 300)
    ]
    assert all(r[k] > 0 for r in result.rows for k in ("build_us", "build_us_checked", "host_us", "host_us_checked"))
    assert "| round | h_q/topk | chunk | prefix | build us | host us | launches |" in result.markdown
    assert all("host_profile" not in r for r in result.rows[:-1])  # the last round's last case only
    assert "chunk_cache.py" in result.rows[-1]["host_profile"]  # the build's own functions are in it
    assert result.rows[-1]["host_profile"] in result.markdown
