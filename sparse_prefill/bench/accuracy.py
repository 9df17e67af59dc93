"""The pass/fail criterion of ``sparse-prefill demo`` and ``check``: FlashMLA's test tolerances.

Attention outputs are bf16 and the kernels round probabilities to bf16 before ``P @ V`` (as
FlashMLA does), so a kernel is compared with the float32 reference as FlashMLA's tests compare
theirs: +inf, -inf and NaN at the same places; every other element within ``abs_tol`` or within
``rel_tol * |ref|``; and, over the whole tensor, a cosine difference below ``cos_tol``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OUT_TOL = dict(abs_tol=8e-4, rel_tol=3 / 128, cos_tol=7e-6)  # out (bf16)
STAT_TOL = dict(abs_tol=1e-6, rel_tol=2 / 65536, cos_tol=None)  # max_logits, lse (float32)
EXACT = dict(abs_tol=0.0, rel_tol=0.0, cos_tol=None)  # bit-exact ops (any difference fails)

TOLERANCE_TEXT = "|err| <= 8e-4 or <= 3/128 relative per element, cosine difference < 7e-6"


@dataclass(frozen=True)
class Comparison:
    """max_abs: the largest ``|ans - ref|`` where ``ref`` is finite (0.0 for empty tensors).
    ok: the criterion holds. why: what broke it (empty when ok)."""

    max_abs: float
    ok: bool
    why: str = ""


def compare(
    ans: torch.Tensor, ref: torch.Tensor, *, abs_tol: float, rel_tol: float, cos_tol: float | None
) -> Comparison:
    """``ans`` against ``ref`` (same shape, any float dtypes) under the module's criterion; with
    zero tolerances, any difference fails (for ops that must match bit for bit)."""
    if ans.shape != ref.shape:
        return Comparison(float("inf"), False, f"shape {tuple(ans.shape)} != {tuple(ref.shape)}")
    a, r = ans.detach().reshape(-1).float(), ref.detach().reshape(-1).float()
    if a.numel() == 0:
        return Comparison(0.0, True)
    for what, where in (("+inf", lambda t: t == float("inf")), ("-inf", lambda t: t == float("-inf")),
                        ("NaN", torch.isnan)):
        if not torch.equal(where(a), where(r)):
            return Comparison(float("inf"), False, f"{what} at different places")
    finite = torch.isfinite(r)
    a, r = a[finite], r[finite]
    err = (a - r).abs()
    max_abs = float(err.max()) if err.numel() else 0.0
    bad = (err > abs_tol) & (err > rel_tol * r.abs())
    if bad.any():
        i = int(torch.argmax(torch.where(bad, err, -1.0)))
        return Comparison(max_abs, False, f"{int(bad.sum())} elements out of tolerance, e.g. {a[i]:.6g} vs {r[i]:.6g}")
    if cos_tol is not None:
        ref_sq, ans_sq, dot = (x.sum(dtype=torch.float64).item() for x in (r * r, a * a, a * r))
        cos_diff = 0.0 if ref_sq < 1e-12 else 1.0 - 2.0 * dot / (ref_sq + ans_sq)
        if cos_diff >= cos_tol:
            return Comparison(max_abs, False, f"cosine difference {cos_diff:.3g} >= {cos_tol:g}")
    return Comparison(max_abs, True)
