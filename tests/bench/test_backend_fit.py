"""bench.backend's fit of the routing constants: the dequantize's per-row cost from the ratio-1
sweep's slope."""

from __future__ import annotations

import pytest

from sparse_prefill.bench.backend import dequant_slopes


def sweep_rows(h_q, ns_per_row, fixed_us, histories=(0, 8192, 131072), extends=(64, 4096)):
    """Rows whose sparse time is ``fixed_us`` plus ``ns_per_row`` per workspace row."""
    rows = []
    for extend in extends:
        for history in histories:
            ws = history + extend + 128
            rows.append(dict(h_q=h_q, topk=512, extend=extend, history=history, workspace_rows=ws,
                             sparse_us=fixed_us + ws * ns_per_row * 1e-3))
    return rows


def test_slope_per_shape_at_the_largest_extend_from_the_second_history():
    # The shortest history is skipped: below topk cached tokens the attention work still grows.
    rows = sweep_rows(64, 1.5, 300.0) + sweep_rows(128, 2.5, 900.0)
    rows[0]["sparse_us"] = rows[3]["sparse_us"] = 1e6  # the small extend; history 0 at 4096: ignored
    assert dequant_slopes(rows) == [pytest.approx(1.5), pytest.approx(2.5)]


def test_no_slope_without_three_histories():
    assert dequant_slopes(sweep_rows(64, 1.5, 300.0, histories=(0, 600))) == []
    assert dequant_slopes([]) == []
