"""The shared argument checks of ``sparse_prefill._utils``: output overlap, float32 scales, the
value-check switch and its environment variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import sparse_prefill as sp
from sparse_prefill import value_checks, value_checks_enabled
from sparse_prefill._utils import check_disjoint, check_float32_scale, check_no_overlap, parse_value_checks_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _buffer(*shape):
    return torch.empty(*shape, dtype=torch.bfloat16)


ACCEPTED = {
    "dense": _buffer(4, 3, 8),
    "row slice": _buffer(10, 3, 8)[2:6],
    "rows of a wider buffer": _buffer(4, 3, 16)[:, :, 8:],
    "every other row": _buffer(8, 3, 8)[::2],
    "permuted": _buffer(8, 3, 4).permute(2, 1, 0),
    "size-1 dims with stride 0": _buffer(1, 3, 8).expand(1, 3, 8),
    "interleaved but disjoint": _buffer(20).as_strided((3, 2), (2, 7)),
    "empty, any strides": _buffer(0, 3, 8).expand(0, 3, 8),
    "one element": _buffer(1),
}

REJECTED = {
    "expanded rows": _buffer(1, 3, 8).expand(4, 3, 8),
    "expanded heads": _buffer(4, 1, 8).expand(4, 3, 8),
    "broadcast scalar": _buffer(1).expand(5),
    "overlapping rows": _buffer(40).as_strided((4, 8), (4, 1)),
    "two dims with one stride": _buffer(16).as_strided((2, 2), (1, 1)),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_no_overlap_accepts(name):
    check_no_overlap("out", ACCEPTED[name])


@pytest.mark.parametrize("name", list(REJECTED))
def test_no_overlap_rejects(name):
    t = REJECTED[name]
    with pytest.raises(ValueError, match=r"out is an output, so its elements must not share memory; got shape"):
        check_no_overlap("out", t)


def test_no_overlap_agrees_with_touched_addresses():
    """On random small strided views: every view where two elements share an address is
    rejected, and every view the check accepts touches distinct addresses."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(500):
        dims = int(torch.randint(1, 4, (), generator=gen))
        shape = torch.randint(1, 4, (dims,), generator=gen).tolist()
        strides = torch.randint(0, 9, (dims,), generator=gen).tolist()
        base = torch.arange(200, dtype=torch.float32)
        view = base.as_strided(shape, strides)
        addresses = view.reshape(-1).tolist()
        overlapping = len(set(addresses)) < len(addresses)
        try:
            check_no_overlap("out", view)
            rejected = False
        except ValueError:
            rejected = True
        if overlapping:
            assert rejected, (shape, strides)


@pytest.mark.parametrize("value", [0, 0.0, 1, 0.5, -0.5, 2.0**-126, 2.0**127, -(2.0**127), 512**-0.5])
def test_float32_scale_accepts(value):
    assert check_float32_scale("sm_scale", value) == float(value)
    assert torch.isfinite(torch.tensor(float(value)) * 1.4426950408889634)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e39, -1e39, 2.0**128,
                                   1e-50, 2.0**-127, -1e-45, 10**400])
def test_float32_scale_rejects(value):
    with pytest.raises(ValueError, match=r"sm_scale must be finite as a float32: 0 or a magnitude in \[2\*\*-126, 2\*\*127\]"):
        check_float32_scale("sm_scale", value)


@pytest.mark.parametrize("value", ["0.5", True, None, 1j, torch.tensor(0.5)])
def test_float32_scale_type(value):
    with pytest.raises(TypeError, match="sm_scale must be a float"):
        check_float32_scale("sm_scale", value)


@pytest.mark.parametrize("text, expected", [
    (None, "on"), ("", "on"), ("  ", "on"), ("1", "on"), ("on", "on"), ("TRUE", "on"), (" yes ", "on"),
    ("0", "off"), ("off", "off"), ("False", "off"), ("no", "off"), ("strict", "strict"), (" Strict", "strict"),
])
def test_value_checks_env_values(text, expected):
    assert parse_value_checks_env(text) == expected


@pytest.mark.parametrize("text", ["2", "maybe", "falsy", "-1", "0.0"])
def test_value_checks_env_rejects_unknown_values(text):
    with pytest.raises(ValueError, match=f"environment variable SPARSE_PREFILL_VALUE_CHECKS must be one of .*got {text!r}"):
        parse_value_checks_env(text)


def test_value_checks_env_is_read_at_import():
    def run(value):
        env = dict(os.environ, SPARSE_PREFILL_VALUE_CHECKS=value)
        code = "import sparse_prefill; print(sparse_prefill.value_checks_enabled())"
        return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)

    assert run("off").stdout.strip() == "False"
    assert run("1").stdout.strip() == "True"
    bad = run("nope")
    assert bad.returncode != 0 and "SPARSE_PREFILL_VALUE_CHECKS must be one of" in bad.stderr


@pytest.mark.parametrize("value", ["false", 0, 1, None, "0"])
def test_value_checks_takes_a_bool_only(value):
    before = value_checks_enabled()
    with pytest.raises(TypeError, match="value_checks takes a bool"):
        with value_checks(value):
            pass
    assert value_checks_enabled() is before


def test_value_checks_switches_and_restores():
    before = value_checks_enabled()
    with value_checks(not before):
        assert value_checks_enabled() is (not before)
    assert value_checks_enabled() is before


def test_check_disjoint_names_both_arguments():
    buf = torch.zeros(4, 8)
    check_disjoint("out", buf[:2], q=buf[2:])  # halves of one buffer: fine
    check_disjoint("out", buf, q=torch.zeros(4, 8), none=None)
    with pytest.raises(ValueError, match="out must not share memory with q"):
        check_disjoint("out", buf[:3], q=buf[2:])
    with pytest.raises(ValueError, match="out must not share memory with kv"):
        check_disjoint("out", buf[:, :4], kv=buf.view(-1)[4:8])  # inside out's span
    check_disjoint("out", buf[:0], q=buf)  # nothing written


def test_ops_reject_an_out_that_aliases_an_input():
    q = torch.randn(3, 4, 512).bfloat16()
    kv = torch.randn(10, 1, 512).bfloat16()
    idx = torch.zeros(3, 1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="out must not share memory with q"):
        sp.sparse_attn_fwd(q, kv, idx, 0.5, out=q)
    cache = sp.quantize_k_cache(torch.randn(2, 4, 1, 512).bfloat16(), sp.KVCacheLayout.V4)
    out = torch.empty(2, 1, 512, dtype=torch.bfloat16)
    sp.dequantize_k_cache_paged(cache, torch.tensor([0, 5], dtype=torch.int32), 4, sp.KVCacheLayout.V4, out=out)
    alias = cache.view(-1)[: 2 * 512 * 2].view(torch.bfloat16).view(2, 1, 512)
    with pytest.raises(ValueError, match="out must not share memory with cache"):
        sp.dequantize_k_cache_paged(cache, torch.tensor([0, 5], dtype=torch.int32), 4, sp.KVCacheLayout.V4, out=alias)
