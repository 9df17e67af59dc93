"""The tolerance check shared by every attention test: FlashMLA's comparison with the
tolerances of issue "sparse_attn_fwd" (out abs 8e-4 / rel 3/128 / cosine 7e-6; max_logits and
lse abs 1e-6 / rel 2/65536)."""

from __future__ import annotations

import pytest
import torch

INF = float("inf")

OUT_TOL = dict(abs_tol=8e-4, rel_tol=3 / 128, cos_tol=7e-6)
STAT_TOL = dict(abs_tol=1e-6, rel_tol=2 / 65536)


# Elements compared at a time, so real-size GPU outputs (70000 x 64 x 512) fit in memory.
_COMPARE_CHUNK = 1 << 24


def _position(flat_index: int, shape: torch.Size) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), shape))


def assert_close(
    name: str, ans: torch.Tensor, ref: torch.Tensor, *, abs_tol: float, rel_tol: float,
    cos_tol: float | None = None,
) -> None:
    """FlashMLA's comparison: +inf, -inf and NaN sit at exactly the same places; every other
    element is within ``abs_tol`` or within ``rel_tol * |ref|``; and the cosine difference of the
    whole tensors (float64) is under ``cos_tol``."""
    assert ans.shape == ref.shape, f"{name}: shape {tuple(ans.shape)} != {tuple(ref.shape)}"
    flat_a, flat_r = ans.reshape(-1), ref.reshape(-1)
    n_bad, worst = 0, (-1.0, 0)
    sums = torch.zeros(3, dtype=torch.float64, device=ans.device)  # ref^2, ans^2, ans * ref
    for start in range(0, flat_a.numel(), _COMPARE_CHUNK):
        a, r = flat_a[start : start + _COMPARE_CHUNK].double(), flat_r[start : start + _COMPARE_CHUNK].double()
        for what, where in (("+inf", lambda t: t == INF), ("-inf", lambda t: t == -INF), ("NaN", torch.isnan)):
            in_a, in_r = where(a), where(r)
            if not torch.equal(in_a, in_r):
                first = start + int(torch.nonzero(in_a != in_r)[0])
                pytest.fail(f"{name}: {what} mismatch at {_position(first, ans.shape)}: result "
                            f"{flat_a[first].item()!r}, reference {flat_r[first].item()!r}")
        finite = torch.isfinite(r)
        a, r = torch.where(finite, a, 0.0), torch.where(finite, r, 0.0)
        err = (a - r).abs()
        bad = (err >= abs_tol) & (err / (r.abs() + 1e-6) >= rel_tol)
        n_bad += int(bad.sum())
        if n_bad:
            i = int(torch.argmax(torch.where(bad, err, -1.0)))
            worst = max(worst, (err[i].item(), start + i))
        sums += torch.stack([(r * r).sum(), (a * a).sum(), (a * r).sum()])
    if n_bad:
        at = worst[1]
        pytest.fail(
            f"{name}: {n_bad} of {flat_a.numel()} elements outside abs {abs_tol:g} / rel {rel_tol:g}; "
            f"worst at {_position(at, ans.shape)}: {flat_a[at].item()!r} vs {flat_r[at].item()!r}"
        )
    if cos_tol is not None:
        ref_sq, ans_sq, dot = sums.tolist()
        cos_diff = 0.0 if ref_sq < 1e-12 else 1.0 - 2.0 * dot / (ref_sq + ans_sq)
        assert cos_diff < cos_tol, f"{name}: cosine difference {cos_diff:.3g} >= {cos_tol:g}"


def assert_attn_close(result: tuple, reference: tuple) -> None:
    """``result`` = (out, max_logits, lse) of an attention op (out bf16; float32 for a reference
    under test) against a float32 or float64 ``reference`` triple, with the tolerances of issue
    "sparse_attn_fwd"."""
    out, max_logits, lse = result
    ref_out, ref_max, ref_lse = reference
    assert out.dtype in (torch.bfloat16, torch.float32)
    assert max_logits.dtype == lse.dtype == torch.float32
    assert_close("out", out, ref_out, **OUT_TOL)
    assert_close("max_logits", max_logits, ref_max, **STAT_TOL)
    assert_close("lse", lse, ref_lse, **STAT_TOL)
