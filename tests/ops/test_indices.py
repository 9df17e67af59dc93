"""Index ops: Triton kernels against the PyTorch references, a hand-worked example, validation."""

from __future__ import annotations

import pytest
import torch

from sparse_prefill._utils import value_checks
from sparse_prefill.ops.indices import (
    SwaTokenIds,
    build_swa_token_ids,
    build_workspace_plan,
    combine_topk_swa_indices,
    combined_width,
)

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
POISON = 0x7F7F7F7F


def make_lens(num_reqs: int, max_prefix: int, max_extend: int, min_extend: int = 1):
    prefix = torch.randint(0, max_prefix + 1, (num_reqs,))
    ext = torch.randint(min_extend, max_extend + 1, (num_reqs,))
    return (prefix + ext).int(), ext.int()


def token_table(num_reqs: int, width: int, device, transposed: bool = False) -> torch.Tensor:
    """Random positive ids (0 never appears, so an unwritten zero cannot pass)."""
    if transposed:  # a non-contiguous view
        return torch.randint(1, INT32_MAX, (width, num_reqs), dtype=torch.int32, device=device).t()
    return torch.randint(1, INT32_MAX, (num_reqs, width), dtype=torch.int32, device=device)


def queries(seq: torch.Tensor, ext: torch.Tensor):
    qsl = torch.nn.functional.pad(ext.cumsum(0), (1, 0)).int()
    pos = [torch.arange(s - e, s) for s, e in zip(seq.tolist(), ext.tolist())]
    return qsl, torch.cat([torch.zeros(0, dtype=torch.int64)] + pos).int()


def assert_same(a, b):
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x.cpu(), y.cpu())
        else:
            assert x == y


def cpu(*ts):
    return [None if t is None else t.cpu() for t in ts]


# ---------------------------------------------------------------------------------------------
# build_swa_token_ids / build_workspace_plan


@pytest.mark.parametrize("num_reqs", [1, 2, 5, 8])
@pytest.mark.parametrize("window", [1, 7, 128])
def test_swa_token_ids_kernel_matches_reference(device, num_reqs, window):
    seq, ext = make_lens(num_reqs, 300, 200, min_extend=0)
    seq[0] = ext[0] = 0  # an empty request
    table = token_table(num_reqs, int(seq.max()) + 3, device, transposed=num_reqs % 2 == 0)
    got = build_swa_token_ids(seq.to(device), ext.to(device), table, window, impl="triton")
    want = build_swa_token_ids(seq, ext, table.cpu(), window, impl="reference")
    assert_same(got, want)
    gather = torch.where(ext > 0, torch.minimum(seq, ext + window - 1), 0)
    assert torch.equal(want.gather_lens, gather.int())
    assert torch.equal(want.first_pos, (seq - gather).int())
    assert want.offsets.dtype == torch.int64 and int(want.offsets[-1]) == want.token_ids.numel()


def test_swa_token_ids_known_total_and_no_queries(device):
    seq = torch.tensor([0, 5], dtype=torch.int32, device=device)
    ext = torch.tensor([0, 0], dtype=torch.int32, device=device)
    table = token_table(2, 5, device)
    for impl in ("triton", "reference"):
        out = build_swa_token_ids(seq, ext, table, 4, total=0, impl=impl)
        assert out.token_ids.shape == (0,) and out.gather_lens.tolist() == [0, 0]
        assert out.first_pos.tolist() == [0, 5] and out.offsets.tolist() == [0, 0, 0]


@pytest.mark.parametrize("ratio", [0, 1, 2, 3, 4, 128])
def test_workspace_plan_kernel_matches_reference(device, ratio):
    seq, ext = make_lens(6, 2000, 300)
    seq[1] = 0
    ext[1] = 0
    table = token_table(6, int(seq.max()) + 1, device)
    swa = build_swa_token_ids(seq.to(device), ext.to(device), table, 128)
    ctable = None if ratio == 0 else token_table(6, int(seq.max()) // ratio + 2, device, transposed=True)
    got = build_workspace_plan(seq.to(device), swa, ratio, ctable, impl="triton")
    want = build_workspace_plan(seq, SwaTokenIds(*cpu(*swa)), ratio, *cpu(ctable), impl="reference")
    assert_same(got, want)
    entries = (seq // ratio).tolist() if ratio > 0 else [0] * 6
    assert got.num_compressed_rows == sum(entries)
    assert got.num_rows == sum(entries) + swa.token_ids.numel()
    assert want.compressed_base.tolist() == [sum(entries[:r]) for r in range(6)]
    assert want.swa_base.tolist() == [sum(entries) + int(o) for o in swa.offsets[:-1]]
    if ratio > 0:
        r = 2
        rows = want.compressed_token_ids[want.compressed_base[r] : want.compressed_base[r] + entries[r]]
        assert torch.equal(rows, ctable[r, : entries[r]].cpu())


# ---------------------------------------------------------------------------------------------
# combine_topk_swa_indices


def random_topk(seq, ext, ratio, topk, device, allow_duplicates=False):
    """Per-row picks: mostly visible entries, some future / beyond the request / -1 / extremes."""
    rows = []
    for s, e in zip(seq.tolist(), ext.tolist()):
        hi = s // ratio + 8
        for _ in range(e):
            if allow_duplicates:
                rows.append(torch.randint(-2, hi, (topk,)))
            else:
                rows.append(torch.randperm(max(hi, topk))[:topk] - (torch.rand(topk) < 0.1).long() * 10**6)
    t = torch.stack(rows) if rows else torch.zeros(0, topk, dtype=torch.int64)
    t = t.clamp(min=-1).int()
    if t.numel():
        t.view(-1)[torch.randint(0, t.numel(), (3,))] = torch.tensor([INT32_MIN, INT32_MAX, -5], dtype=torch.int32)
    return t.to(device)


def combine_both(device, topk_indices, seq, ext, window, ratio, topk, gather_extra=0):
    """Run kernel (poisoned out buffers) and reference on the same batch; return both."""
    qsl, pos = queries(seq, ext)
    gather = torch.where(ext > 0, torch.minimum(seq, ext + window - 1 + gather_extra), 0).int()
    # Arbitrary but fixed per batch size, so two calls on one batch agree.
    bases = torch.randint(0, 1000, (2, seq.shape[0]), generator=torch.Generator().manual_seed(seq.shape[0]))
    cbase, sbase = bases.int()
    args = [qsl, pos, seq, gather, cbase, sbase]
    n = pos.shape[0]
    out = torch.full((n, combined_width(topk, window)), POISON, dtype=torch.int32, device=device)
    out_lens = torch.full((n,), POISON, dtype=torch.int32, device=device)
    got = combine_topk_swa_indices(
        topk_indices, *(a.to(device) for a in args), window, ratio, topk, out, out_lens, impl="triton"
    )
    assert got[0] is out and got[1] is out_lens
    want = combine_topk_swa_indices(*cpu(topk_indices), *args, window, ratio, topk, impl="reference")
    return got, want


@pytest.mark.parametrize(
    "num_reqs,window,ratio,topk",
    [(1, 128, 4, 512), (3, 128, 128, 64), (2, 128, 0, 0), (3, 16, 1, 24), (3, 16, 2, 40), (8, 5, 4, 24),
     (4, 1, 3, 40), (5, 200, 4, 130)],
)
def test_combine_kernel_matches_reference(device, num_reqs, window, ratio, topk):
    seq, ext = make_lens(num_reqs, 600, 60 if device.type == "cuda" else 6)
    if num_reqs > 2:
        seq[1] -= ext[1]
        ext[1] = 0  # a request without queries between others
    if ratio == 128:
        seq[0] = ext[0] + 1000  # a long prefix: several complete entries
    picks = None if ratio in (0, 128) else random_topk(seq, ext, ratio, topk, device)
    if ratio == 128:
        topk = int(seq.max()) // ratio
    got, want = combine_both(device, picks, seq, ext, window, ratio, topk)
    assert_same(got, want)


def test_combine_duplicates_are_kept_and_topk_none_matches_arange(device):
    seq, ext = make_lens(3, 400, 5)
    picks = random_topk(seq, ext, 4, 32, device, allow_duplicates=True)
    got, want = combine_both(device, picks, seq, ext, 16, 4, 32)
    assert_same(got, want)
    row = picks[-1].cpu()
    p, s = int(seq[-1]) - 1, int(seq[-1])
    valid = [j for j in row.tolist() if 0 <= j < min((p + 1) // 4, s // 4)]
    assert int(want[1][-1]) == len(valid) + min(p + 1, 16)  # every occurrence counted

    # topk_indices=None is entries 0..topk-1 of every row.
    topk = int(seq.max()) // 4
    arange = torch.arange(topk, dtype=torch.int32).expand(picks.shape[0], topk).contiguous().to(device)
    assert_same(combine_both(device, None, seq, ext, 16, 4, topk)[1], combine_both(device, arange, seq, ext, 16, 4, topk)[1])


@pytest.mark.parametrize("num_tokens", [0, 1])
def test_combine_tiny(device, num_tokens):
    seq = torch.tensor([7 + num_tokens, 9], dtype=torch.int32)
    ext = torch.tensor([num_tokens, 0], dtype=torch.int32)
    picks = torch.tensor([[1, -1, 0, 2]] * num_tokens, dtype=torch.int32).view(num_tokens, 4).to(device)
    got, want = combine_both(device, picks, seq, ext, 3, 4, 4)
    assert_same(got, want)
    assert got[0].shape == (num_tokens, 128) and got[1].shape == (num_tokens,)


def test_combine_wider_gather_and_strided_topk(device):
    """gather_lens beyond what the windows need shift the SWA rows; a strided topk view works."""
    seq, ext = make_lens(3, 50, 4)
    picks = random_topk(seq, ext, 4, 40, device)
    wide = torch.cat([picks, picks], dim=1)[:, ::2]  # stride (80, 2)
    got, want = combine_both(device, wide, seq, ext, 8, 4, 40, gather_extra=3)
    assert_same(got, want)


def test_many_requests_and_topk_beyond_one_block(device):
    """1100 requests (request search spans several blocks) and topk 1500 (several top-k blocks)."""
    num_reqs = 1100
    seq, ext = make_lens(num_reqs, 7000, 1, min_extend=0)
    ext[torch.randperm(num_reqs)[:1090]] = 0  # ten requests with one query each, anywhere
    ext[-1] = 1
    table = token_table(num_reqs, int(seq.max()), device)
    swa = build_swa_token_ids(seq.to(device), ext.to(device), table, 9, impl="triton")
    assert_same(swa, build_swa_token_ids(seq, ext, table.cpu(), 9, impl="reference"))
    picks = random_topk(seq, ext, 4, 1500, device)
    got, want = combine_both(device, picks, seq, ext, 9, 4, 1500)
    assert_same(got, want)
    assert int(want[1].max()) > 1024 + 9  # rows compacted across top-k blocks


def test_combine_hand_worked_example():
    """Two requests, W = 3, ratio 4; rows written out by hand from DESIGN.md's table."""
    seq = torch.tensor([9, 4], dtype=torch.int32)  # request 0: prefix 7, queries 7, 8; request 1: 0..3
    ext = torch.tensor([2, 4], dtype=torch.int32)
    qsl, pos = queries(seq, ext)
    gather = torch.tensor([4, 4], dtype=torch.int32)  # request 0 gathers positions 5..8
    cbase = torch.tensor([0, 2], dtype=torch.int32)  # request 0: entries 0, 1; request 1: entry 0
    sbase = torch.tensor([3, 7], dtype=torch.int32)
    picks = torch.tensor(
        [
            [1, 0, 2],  # p=7: (7+1)//4 = 2 visible -> 1, 0; entry 2 is beyond
            [-1, 1, 1],  # p=8: duplicate 1 kept
            [0, -1, 5],  # request 1, p=0: nothing visible
            [0, 1, 2],
            [2, 1, 0],
            [0, 3, 1],  # p=3: (3+1)//4 = 1 -> entry 0
        ],
        dtype=torch.int32,
    )
    ind, lens = combine_topk_swa_indices(picks, qsl, pos, seq, gather, cbase, sbase, 3, 4, 3)
    # SWA rows: request 0 position x -> 3 + x - 5; request 1 position x -> 7 + x.
    want = [
        [0 + 1, 0 + 0, 3 + 0, 3 + 1, 3 + 2],
        [0 + 1, 0 + 1, 3 + 1, 3 + 2, 3 + 3],
        [7],
        [7, 8],
        [7, 8, 9],
        [2 + 0, 8, 9, 10],
    ]
    assert lens.tolist() == [len(w) for w in want]
    assert ind.tolist() == [w + [-1] * (128 - len(w)) for w in want]


def test_combine_reuses_buffers_across_layers(device):
    seq, ext = make_lens(2, 100, 5)
    qsl, pos = queries(seq, ext)
    gather = torch.minimum(seq, ext + 15).int()
    base = torch.zeros(2, dtype=torch.int32)
    args = [t.to(device) for t in (qsl, pos, seq, gather, base, base + 500)]
    out = torch.full((pos.shape[0], 128), POISON, dtype=torch.int32, device=device)
    lens = torch.empty(pos.shape[0], dtype=torch.int32, device=device)
    for _ in range(2):  # the second layer's rows must not keep anything of the first's
        picks = random_topk(seq, ext, 4, 16, device)
        combine_topk_swa_indices(picks, *args, 16, 4, 16, out, lens, impl="triton")
        want = combine_topk_swa_indices(*cpu(picks, *args), 16, 4, 16, impl="reference")
        assert_same((out, lens), want)


def test_value_checks_off_gives_same_result(device):
    seq, ext = make_lens(3, 200, 4)
    picks = random_topk(seq, ext, 4, 16, device)
    with value_checks(False):
        got, want = combine_both(device, picks, seq, ext, 16, 4, 16)
        table = token_table(3, int(seq.max()), device)
        swa = build_swa_token_ids(seq.to(device), ext.to(device), table, 16, impl="triton")
    assert_same(got, want)
    assert swa.token_ids.numel() == int(torch.minimum(seq, ext + 15).sum())


# ---------------------------------------------------------------------------------------------
# validation


def _swa_args():
    seq = torch.tensor([10, 6], dtype=torch.int32)
    ext = torch.tensor([4, 6], dtype=torch.int32)
    return dict(seq_lens=seq, extend_lens=ext, req_token_table=token_table(2, 10, "cpu"), swa_window=4)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(swa_window=0), ValueError, "swa_window"),
        (dict(swa_window=2.0), TypeError, "swa_window"),
        (dict(seq_lens=torch.tensor([10, 6])), TypeError, "seq_lens"),
        (dict(extend_lens=torch.tensor([4], dtype=torch.int32)), ValueError, "extend_lens"),
        (dict(extend_lens=torch.tensor([11, 6], dtype=torch.int32)), ValueError, r"extend_lens\[0\]"),
        (dict(extend_lens=torch.tensor([-1, 6], dtype=torch.int32)), ValueError, r"extend_lens\[0\]"),
        (dict(seq_lens=torch.tensor([-1, 6], dtype=torch.int32)), ValueError, r"seq_lens\[0\]"),
        (dict(req_token_table=token_table(2, 9, "cpu")), ValueError, "req_token_table has 9 columns"),
        (dict(req_token_table=token_table(3, 10, "cpu")), ValueError, "req_token_table"),
        (dict(req_token_table=token_table(2, 10, "cpu").long()), TypeError, "req_token_table"),
        (dict(total=5), ValueError, "total must be"),
        (dict(impl="cuda"), ValueError, "impl"),
    ],
)
def test_swa_token_ids_validation(change, exc, match):
    with pytest.raises(exc, match=match):
        build_swa_token_ids(**{**_swa_args(), **change})


def test_workspace_plan_validation():
    a = _swa_args()
    swa = build_swa_token_ids(**a)
    seq = a["seq_lens"]
    with pytest.raises(ValueError, match="compressed_token_table has 1 columns"):
        build_workspace_plan(seq, swa, 4, token_table(2, 1, "cpu"))
    with pytest.raises(ValueError, match=r"must be None for compress_ratio 0 \(SWA only\)"):
        build_workspace_plan(seq, swa, 0, token_table(2, 1, "cpu"))
    # Ratio 1 is a compressed cache now (V4.1), not the SWA-only layer: the old call is refused.
    with pytest.raises(ValueError, match="required for compress_ratio 1; the SWA-only layer is compress_ratio 0"):
        build_workspace_plan(seq, swa, 1, None)
    with pytest.raises(ValueError, match="compressed_token_table is required for compress_ratio 4"):
        build_workspace_plan(seq, swa, 4, None)
    with pytest.raises(TypeError, match="compressed_token_table"):
        build_workspace_plan(seq, swa, 4, token_table(2, 3, "cpu").long())
    with pytest.raises(ValueError, match="compress_ratio"):
        build_workspace_plan(seq, swa, -1, None)
    with pytest.raises(ValueError, match="num_compressed must be"):
        build_workspace_plan(seq, swa, 4, token_table(2, 3, "cpu"), num_compressed=5)
    with pytest.raises(TypeError, match="SwaTokenIds"):
        build_workspace_plan(seq, tuple(swa), 4, token_table(2, 3, "cpu"))
    with pytest.raises(TypeError, match="swa.offsets"):
        build_workspace_plan(seq, swa._replace(offsets=swa.offsets.int()), 4, token_table(2, 3, "cpu"))
    with pytest.raises(ValueError, match=r"seq_lens\[1\] must be >= 0"):
        build_workspace_plan(torch.tensor([8, -4], dtype=torch.int32), swa, 4, token_table(2, 3, "cpu"))


def test_workspace_plan_checks_swa_against_seq_lens():
    """An ``swa`` that is not what build_swa_token_ids returns for these seq_lens is named."""
    a = _swa_args()
    swa = build_swa_token_ids(**a)
    seq, table = a["seq_lens"], token_table(2, 3, "cpu")
    bad = {
        r"swa.offsets\[0\] must be sum\(swa.gather_lens\[:0\]\) = 0, got 1": swa._replace(offsets=swa.offsets + 1),
        r"swa.gather_lens\[0\] must be in \[0, seq_lens\[0\]\]": swa._replace(gather_lens=swa.gather_lens + 100),
        r"swa.first_pos\[1\] must be seq_lens\[1\] - swa.gather_lens\[1\]": swa._replace(
            first_pos=swa.first_pos + torch.tensor([0, 1], dtype=torch.int32)),
        r"len\(swa.token_ids\) must both be sum\(swa.gather_lens\)": swa._replace(token_ids=swa.token_ids[:-1]),
    }
    for match, wrong in bad.items():
        with pytest.raises(ValueError, match=match):
            build_workspace_plan(seq, wrong, 4, table)
        with value_checks(False):  # value checks off: not read (no host sync)
            build_workspace_plan(seq, wrong, 4, table, num_compressed=int((seq // 4).sum()))
    # Lengths that disagree with the swa: a request longer than its gather says.
    with pytest.raises(ValueError, match=r"swa.first_pos\[0\] must be"):
        build_workspace_plan(seq + 1, swa, 4, token_table(2, 4, "cpu"))


def test_workspace_rows_must_fit_int32():
    """A workspace beyond 2**31 - 1 rows raises before anything is built (no big tensors)."""
    seq = torch.tensor([INT32_MAX, INT32_MAX], dtype=torch.int32)
    ones = torch.ones(2, dtype=torch.int32)
    # Stride-0 views: 2 * (2**30 - 1) compressed rows + 2 SWA rows = 2**31 rows.
    first = torch.full((2,), INT32_MAX - 1, dtype=torch.int32)
    swa = SwaTokenIds(torch.zeros(1, dtype=torch.int32).expand(2), first, ones, torch.arange(3))
    table = torch.zeros(2, 1, dtype=torch.int32).expand(2, INT32_MAX // 2)
    with pytest.raises(ValueError, match="exceeds the int32 row indices"):
        build_workspace_plan(seq, swa, 2, table)


def _combine_args():
    seq = torch.tensor([10, 6], dtype=torch.int32)
    ext = torch.tensor([2, 3], dtype=torch.int32)
    qsl, pos = queries(seq, ext)
    return dict(
        topk_indices=torch.zeros(5, 8, dtype=torch.int32),
        query_start_loc=qsl,
        query_pos=pos,
        seq_lens=seq,
        gather_lens=torch.minimum(seq, ext + 3).int(),
        compressed_base=torch.tensor([0, 2], dtype=torch.int32),
        swa_base=torch.tensor([4, 9], dtype=torch.int32),
        window_size=4,
        compress_ratio=4,
        topk=8,
    )


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(topk=9), ValueError, "topk_indices must have shape"),
        (dict(topk_indices=torch.zeros(5, 8, dtype=torch.int64)), TypeError, "topk_indices"),
        (dict(topk_indices=torch.zeros(4, 8, dtype=torch.int32)), ValueError, "topk_indices"),
        (dict(compress_ratio=0, topk=0, topk_indices=None), None, None),
        (dict(compress_ratio=0), ValueError, r"compress_ratio 0 \(SWA only\) needs topk == 0"),
        (dict(compress_ratio=1), None, None),  # ratio 1 is a top-k layer (V4.1)
        (dict(window_size=0), ValueError, "window_size"),
        (dict(topk=-1), ValueError, "topk"),
        (dict(query_pos=torch.tensor([8, 9, 3, 4, 6], dtype=torch.int32)), ValueError, r"query_pos\[4\] must be"),
        (dict(query_pos=torch.zeros(5, dtype=torch.int64)), TypeError, "query_pos"),
        (dict(query_start_loc=torch.tensor([0, 2], dtype=torch.int32)), ValueError, "query_start_loc"),
        (dict(query_start_loc=torch.tensor([1, 2, 5], dtype=torch.int32)), ValueError, "run from 0"),
        # A decreasing step is named as such, whatever the gather lengths of earlier requests.
        (dict(query_start_loc=torch.tensor([0, 6, 5], dtype=torch.int32)), ValueError,
         r"query_start_loc must be non-decreasing .* query_start_loc\[2\] = 5 < query_start_loc\[1\] = 6"),
        (dict(seq_lens=torch.tensor([10, 2], dtype=torch.int32)), ValueError, "extend_len"),
        (dict(gather_lens=torch.tensor([4, 6], dtype=torch.int32)), ValueError, r"gather_lens\[0\] must be in \[5"),
        (dict(gather_lens=torch.tensor([5, 7], dtype=torch.int32)), ValueError, r"gather_lens\[1\]"),
        (dict(swa_base=torch.tensor([-1, 9], dtype=torch.int32)), ValueError, r"swa_base\[0\]"),
        (dict(swa_base=torch.tensor([4, INT32_MAX - 2], dtype=torch.int32)), ValueError, r"swa_base\[1\]"),
        (dict(compressed_base=torch.tensor([INT32_MAX - 1, 0], dtype=torch.int32)), ValueError, "compressed_base"),
        (dict(compressed_base=torch.tensor([0], dtype=torch.int32)), ValueError, "compressed_base"),
        (dict(topk_indices=None, topk=1), ValueError, "topk_indices=None takes entries"),
        (dict(out_indices=torch.zeros(5, 127, dtype=torch.int32)), ValueError, "out_indices"),
        (dict(out_indices=torch.zeros(128, 5, dtype=torch.int32).t()), ValueError, "out_indices must have unit stride in its last dim"),
        (dict(out_lens=torch.zeros(5, dtype=torch.int64)), TypeError, "out_lens"),
        (dict(out_lens=torch.zeros(10, dtype=torch.int32)[::2]), ValueError, "out_lens must have unit stride"),
        (dict(out_lens=torch.zeros(1, dtype=torch.int32).expand(5)), ValueError, "out_lens must have unit stride"),
        (dict(out_indices=torch.zeros(1, 128, dtype=torch.int32).expand(5, 128)), ValueError,
         "out_indices is an output, so its elements must not share memory"),
        (dict(out_indices=torch.zeros(6, 64, dtype=torch.int32).as_strided((5, 128), (64, 1))), ValueError,
         "out_indices is an output"),
        # Bounded before anything is allocated (2**31 - 1 would ask for 5 rows of 8 GiB).
        (dict(topk=2**31 - 1, topk_indices=None), ValueError, r"topk must be in \[0, 16777216\]"),
        (dict(window_size=2**31 - 1), ValueError, r"window_size must be in \[1, 16777216\]"),
    ],
)
def test_combine_validation(change, exc, match):
    kwargs = {**_combine_args(), **change}
    if exc is None:
        combine_topk_swa_indices(**kwargs)
        return
    with pytest.raises(exc, match=match):
        combine_topk_swa_indices(**kwargs)


def test_mixed_devices_rejected():
    kwargs = _combine_args()
    kwargs["seq_lens"] = kwargs["seq_lens"].to("meta")
    with pytest.raises(ValueError, match="seq_lens must be on cpu"):
        combine_topk_swa_indices(**kwargs)


# ---------------------------------------------------------------------------------------------
# GPU: large shapes, int64 addressing


@pytest.mark.gpu
@pytest.mark.parametrize("topk", [512, 1024])
def test_gpu_combine_large_chunk(topk):
    """131072 query tokens (grid beyond 65535 rows), 8 requests with long prefixes."""
    dev = torch.device("cuda")
    ext = torch.full((8,), 131072 // 8, dtype=torch.int32)
    seq = ext + torch.randint(0, 50000, (8,), dtype=torch.int32)
    qsl, pos = queries(seq, ext)
    picks = torch.randint(-1, int(seq.max()) // 4, (pos.shape[0], topk), dtype=torch.int32)
    gather = torch.minimum(seq, ext + 127).int()
    cbase = torch.nn.functional.pad((seq // 4).cumsum(0), (1, 0))[:-1].int()
    sbase = (int((seq // 4).sum()) + torch.nn.functional.pad(gather.cumsum(0), (1, 0))[:-1]).int()
    args = [picks, qsl, pos, seq, gather, cbase, sbase]
    got = combine_topk_swa_indices(*(a.to(dev) for a in args), 128, 4, topk, impl="triton")
    want = combine_topk_swa_indices(*(a.to(dev) for a in args), 128, 4, topk, impl="reference")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
def test_gpu_combine_output_beyond_int32_elements():
    """An SWA-only chunk whose [num_tokens, 128] output has more than 2**31 elements."""
    dev = torch.device("cuda")
    n = 2**31 // 128 + 1000
    seq = torch.tensor([n], dtype=torch.int32, device=dev)
    qsl = torch.tensor([0, n], dtype=torch.int32, device=dev)
    pos = torch.arange(n, dtype=torch.int32, device=dev)
    zero = torch.zeros(1, dtype=torch.int32, device=dev)
    with value_checks(False):
        ind, lens = combine_topk_swa_indices(None, qsl, pos, seq, seq, zero, zero, 128, 0, 0)
    tail = torch.arange(n - 3000, n, device=dev)
    want = (tail[:, None] - 127 + torch.arange(128, device=dev)).int()
    assert torch.equal(ind[-3000:], want)
    assert bool((lens[-3000:] == 128).all())
    assert ind[5].tolist()[:7] == [0, 1, 2, 3, 4, 5, -1] and int(lens[5]) == 6


@pytest.mark.gpu
def test_gpu_swa_gather_from_table_beyond_int32_elements():
    """A token table of more than 2**31 elements: row offsets must be int64."""
    dev = torch.device("cuda")
    width = 2**30 + 7
    table = torch.empty((3, width), dtype=torch.int32, device=dev)
    table[:, -600:] = torch.randint(1, INT32_MAX, (3, 600), dtype=torch.int32, device=dev)
    seq = torch.full((3,), width, dtype=torch.int32, device=dev)
    ext = torch.tensor([100, 300, 400], dtype=torch.int32, device=dev)
    got = build_swa_token_ids(seq, ext, table, 128, impl="triton")
    want = torch.cat([table[r, width - g :] for r, g in enumerate(got.gather_lens.tolist())])
    assert torch.equal(got.token_ids, want)
