"""Routing: the override settings, the cost model's decisions, the debug log."""

from __future__ import annotations

import logging

import pytest
import torch

from sparse_prefill import value_checks
from sparse_prefill.backend import BatchMetadata, ForwardMode, ModelConfig, PathCosts, SparsePrefillBackend
from sparse_prefill.backend import routing

CFG = ModelConfig(num_heads=64, compress_ratios=(0, 1, 2, 4, 128), topk=512)


def metadata(prefix, extend, cfg=CFG, mode=ForwardMode.EXTEND):
    """A batch with trivial tables (routing reads lengths only); value checks off for speed."""
    seq = [p + e for p, e in zip(prefix, extend)]
    r, width = len(seq), max(seq)
    tables = {c: torch.zeros(r, width // c + 1, dtype=torch.int32) for c in cfg.compressed_ratios}
    with value_checks(False):
        return BatchMetadata(cfg, prefix, extend, torch.zeros(r, width, dtype=torch.int32), tables, mode)


def test_path_setting(monkeypatch):
    monkeypatch.delenv(routing.ENV_VAR, raising=False)
    assert routing.path_setting() == "auto"
    monkeypatch.setenv(routing.ENV_VAR, " Regular ")
    assert routing.path_setting("auto") == "regular"
    assert routing.path_setting("sparse") == "sparse"  # an explicit argument wins
    monkeypatch.setenv(routing.ENV_VAR, "")
    assert routing.path_setting() == "auto"
    monkeypatch.setenv(routing.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="SPARSE_PREFILL_PATH"):
        routing.path_setting()
    with pytest.raises(ValueError, match="SPARSE_PREFILL_PATH"):
        SparsePrefillBackend(CFG)
    with pytest.raises(ValueError, match="path must be one of"):
        routing.path_setting("flashmla")


def test_layer_work_counts():
    cfg = ModelConfig(num_heads=8, compress_ratios=(0, 1, 4, 128), topk=2, window_size=4)
    md = metadata([0, 130], [3, 2], cfg)  # positions 0, 1, 2 and 130, 131
    win = 1 + 2 + 3 + 4 + 4
    w0 = routing.layer_work(cfg, md, 0)
    assert (w0.regular_kv, w0.sparse_kv, w0.combined_entries) == (win, win, 0)
    assert w0.workspace_rows == 3 + 5  # min(seq, extend + W - 1) per request
    w1 = routing.layer_work(cfg, md, 1)
    # Ratio 1 (top-k): visible entries p + 1 = 1, 2, 3, 131, 132, capped at topk 2 when sparse;
    # the workspace holds the whole history (3 + 132 entries).
    assert w1.regular_kv == win + 2 * 5 and w1.sparse_kv == win + 1 + 2 + 2 + 2 + 2
    assert w1.workspace_rows == 8 + 3 + 132 and w1.combined_entries == 5 * 128
    w4 = routing.layer_work(cfg, md, 4)
    # Visible entries (p + 1) // 4: 0, 0, 0, 32, 33, capped at topk 2 for the sparse rows.
    assert w4.regular_kv == win + 2 * 5 and w4.sparse_kv == win + 4
    assert w4.workspace_rows == 8 + 0 + 33 and w4.combined_entries == 5 * 128
    w128 = routing.layer_work(cfg, md, 128)
    assert w128.regular_kv == w128.sparse_kv == win + 2 and w128.workspace_rows == 8 + 1


# Ratio 4 without prefixes: fewer complete compressed entries than topk, so the regular kernel
# scans masked picks the sparse path compacts away; with long prefixes every pick is valid.
SHORT = ([0] * 4, [1024] * 4)
LONG = ([16384] * 4, [4096] * 4)


def test_auto_rule_picks_by_estimate(caplog):
    short, long = metadata(*SHORT), metadata(*LONG)
    tiny = metadata([200000], [1])  # one token after a long prefix: dequantizing costs more
    with caplog.at_level(logging.DEBUG, logger="sparse_prefill.backend.routing"):
        assert routing.choose_path("auto", CFG, short, 4) == routing.SPARSE
    assert "ratio-4 layers" in caplog.text and "sparse path" in caplog.text and "estimated" in caplog.text
    # With the H200 constants (the Gluon sparse kernel) the long batch goes sparse too.
    assert routing.choose_path("auto", CFG, long, 4) == routing.SPARSE
    # Where the workspace holds the long prefix's compressed entries (ratios 1-4: 50000+ rows).
    # At ratios 0 and 128 it holds a few hundred to a thousand rows and the fixed per-layer
    # costs decide (on the H200 both paths are host-bound there, about equally).
    for ratio in (1, 2, 4):
        work = routing.layer_work(CFG, tiny, ratio)
        assert routing.estimate_us("sparse", work) > routing.estimate_us("regular", work)
        assert routing.choose_path("auto", CFG, tiny, ratio) == routing.REGULAR
    # The rule follows the constants: a slow sparse kernel sends both batches to regular, a
    # slow regular kernel keeps them sparse.
    slow_sparse = PathCosts(sparse_tflops_h64=100.0, sparse_tflops_h128=100.0)
    assert routing.choose_path("auto", CFG, short, 4, slow_sparse) == routing.REGULAR
    assert routing.choose_path("auto", CFG, long, 4, slow_sparse) == routing.REGULAR
    slow_regular = PathCosts(regular_tflops_h64=100.0, regular_tflops_h128=100.0)
    assert routing.choose_path("auto", CFG, long, 4, slow_regular) == routing.SPARSE


def test_sparse_state_limit(monkeypatch, caplog):
    cfg = ModelConfig(num_heads=8, compress_ratios=(0, 4, 128), topk=2, window_size=4)
    md = metadata([0, 130], [3, 2], cfg)
    # Rows of widths 128 (ratio 0), 128 (ratio 4: 2 + 4), 128 (ratio 128: 1 + 4), each plus a
    # length, for 5 tokens; one workspace per ratio: 8 + 41 + 9 rows of 1 KiB.
    assert routing.sparse_state_bytes(cfg, md) == 3 * 4 * 5 * 129 + (8 + 41 + 9) * 1024
    big = metadata([0, 16384, 0, 16384], [4096] * 4)
    monkeypatch.setattr(routing, "SPARSE_STATE_BYTES_LIMIT", routing.sparse_state_bytes(CFG, big) - 1)
    with caplog.at_level(logging.DEBUG, logger="sparse_prefill.backend.routing"):
        assert routing.choose_path("auto", CFG, big, 4) == routing.REGULAR
    assert "sparse state" in caplog.text
    assert routing.choose_path("sparse", CFG, big, 4) == routing.SPARSE  # forced still goes


@pytest.mark.parametrize("ratio", [1, 2])
@pytest.mark.parametrize("extend", [1, 64, 256, 1024])
def test_short_extend_over_long_history_goes_regular(ratio, extend):
    """V4.1's ratio-1/2 top-k layers see the whole history: SGLang hard-codes "<= 1024 new tokens
    over >= max(32768, 192 x new) history -> paged kernel". Here the costs decide, and they agree
    on that region: the sparse path's workspace grows with the history."""
    for history in (max(32768, 192 * extend), 131072):
        md = metadata([history], [extend])
        work = routing.layer_work(CFG, md, ratio)
        assert work.workspace_rows >= (history + extend) // ratio
        assert routing.choose_path("auto", CFG, md, ratio) == routing.REGULAR, history
    # It is the costs, not a hard-coded rule: a free dequantize sends the same batch sparse.
    free = PathCosts(dequant_ns_per_row=0.0, sparse_fixed_us=0.0, sparse_tflops_h64=1e4)
    assert routing.choose_path("auto", CFG, metadata([131072], [extend]), ratio, free) == routing.SPARSE


def test_forced_and_decode():
    big = metadata([0, 16384], [4096] * 2)
    assert routing.choose_path("regular", CFG, big, 4) == routing.REGULAR
    assert routing.choose_path("sparse", CFG, metadata([200000], [1]), 4) == routing.SPARSE
    decode = metadata([0, 5, 900], [1, 1, 1], mode=ForwardMode.DECODE)
    for setting in ("auto", "sparse", "regular"):
        assert routing.choose_path(setting, CFG, decode, 4) == routing.REGULAR


def test_backend_takes_env_and_argument(monkeypatch):
    short = metadata(*SHORT)
    monkeypatch.setenv(routing.ENV_VAR, "regular")
    assert SparsePrefillBackend(CFG).path_for(4, short) == "regular"
    assert SparsePrefillBackend(CFG, "sparse").path_for(4, short) == "sparse"
    monkeypatch.setenv(routing.ENV_VAR, "auto")
    assert SparsePrefillBackend(CFG).path_for(4, short) == "sparse"
    assert SparsePrefillBackend(CFG, "regular").path_for(4, short) == "regular"


def test_tflops_interpolation():
    c = PathCosts()
    assert c.tflops("regular", 8) == c.regular_tflops_h64
    assert c.tflops("sparse", 128) == c.sparse_tflops_h128
    assert c.tflops("sparse", 96) == pytest.approx((c.sparse_tflops_h64 + c.sparse_tflops_h128) / 2)
