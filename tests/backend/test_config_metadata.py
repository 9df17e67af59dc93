"""ModelConfig and BatchMetadata: normalisation, derived fields, validation, copy_."""

from __future__ import annotations

import math

import re

import pytest
import torch

from sparse_prefill import value_checks
from sparse_prefill.backend import BatchMetadata, ForwardMode, ModelConfig
from sparse_prefill.backend.layer_kinds import DEFAULT_RATIO_KINDS, LayerKind

# ---------------------------------------------------------------------------------------------
# ModelConfig


def test_config_defaults_and_normalisation():
    cfg = ModelConfig(num_heads=8, compress_ratios=[0, 4, 128, 4], topk=512)
    assert cfg.compress_ratios == (0, 4, 128, 4)
    assert cfg.num_layers == 4
    assert cfg.window_size == 128 and cfg.head_dim == 512
    # SGLang's pages: 256 tokens per SWA page, 256 / r entries per compressed page.
    assert cfg.swa_page_size == 256 and cfg.compressed_page_size == {4: 64, 128: 2}
    assert cfg.compressed_ratios == (4, 128)
    assert cfg.sm_scale == 1 / math.sqrt(512)
    assert cfg.ratio_of(2) == 128 and cfg.page_size_of(4) == 64
    assert cfg.ratio_kinds == {0: LayerKind.SWA, 4: LayerKind.TOPK, 128: LayerKind.DENSE}
    assert cfg.topk_ratios == (4,)
    assert hash(cfg) == hash(ModelConfig(num_heads=8, compress_ratios=(0, 4, 128, 4), topk=512))


def test_config_v41_kinds_and_default_pages():
    cfg = ModelConfig(num_heads=16, compress_ratios=(0, 1, 2, 4, 128, 1), topk=1024)
    assert cfg.compressed_page_size == {1: 256, 2: 128, 4: 64, 128: 2}
    assert cfg.topk_ratios == (1, 2, 4) and cfg.compressed_ratios == (1, 2, 4, 128)
    assert cfg.kind_of(0) is LayerKind.SWA and cfg.kind_of(1) is LayerKind.TOPK and cfg.kind_of(128) is LayerKind.DENSE
    with pytest.raises(ValueError, match="no layer uses compress ratio 8"):
        cfg.kind_of(8)
    assert dict(DEFAULT_RATIO_KINDS) == {0: "swa", 1: "topk", 2: "topk", 4: "topk", 128: "dense"}


def test_config_ratio_kinds_override():
    # A model with other ratios states their kinds; defaults may be replaced too.
    cfg = ModelConfig(num_heads=8, compress_ratios=(0, 8, 4, 16), topk=64, ratio_kinds={8: "topk", 16: "dense", 4: "dense"})
    assert cfg.ratio_kinds == {0: LayerKind.SWA, 4: LayerKind.DENSE, 8: LayerKind.TOPK, 16: LayerKind.DENSE}
    assert cfg.topk_ratios == (8,) and cfg.compressed_page_size == {4: 64, 8: 32, 16: 16}
    with pytest.raises(ValueError, match=r"compress_ratios\[1\] = 8: no layer kind for ratio 8"):
        ModelConfig(num_heads=8, compress_ratios=(0, 8), topk=64)
    with pytest.raises(ValueError, match=r"compress_ratios\[1\] = 3: no default compressed page size"):
        ModelConfig(num_heads=8, compress_ratios=(0, 3), topk=64, ratio_kinds={3: "topk"})
    assert ModelConfig(num_heads=8, compress_ratios=(0, 3), topk=64, ratio_kinds={3: "topk"},
                       compressed_page_size=5).page_size_of(3) == 5
    with pytest.raises(ValueError, match=r"ratio_kinds\[0\]: ratio 0 is the SWA-only layer"):
        ModelConfig(num_heads=8, compress_ratios=(0, 4), topk=64, ratio_kinds={0: "dense"})
    with pytest.raises(ValueError, match=r"ratio_kinds\[4\]: ratio 0 is the SWA-only layer and only it"):
        ModelConfig(num_heads=8, compress_ratios=(0, 4), topk=64, ratio_kinds={4: "swa"})
    with pytest.raises(ValueError, match=r"ratio_kinds\[4\] must be one of"):
        ModelConfig(num_heads=8, compress_ratios=(0, 4), topk=64, ratio_kinds={4: "sparse"})
    with pytest.raises(TypeError, match="ratio_kinds must be a mapping"):
        ModelConfig(num_heads=8, compress_ratios=(0, 4), topk=64, ratio_kinds=[4])


@pytest.mark.parametrize("ratios", [(1, 4, 128), (1, 1), (4, 1)])
def test_config_rejects_the_old_ratio_1(ratios):
    """Ratio 1 used to mean SWA only; under SGLang's convention it is a top-k layer. A list with 1
    and no 0 is what an old config looks like: a clear error, never a silent reinterpretation."""
    with pytest.raises(ValueError, match=r"old convention, where 1 meant an SWA-only layer.*Write 0"):
        ModelConfig(num_heads=8, compress_ratios=ratios, topk=64)
    # Stated explicitly, a stack of top-k ratio-1 layers without SWA-only layers is fine.
    cfg = ModelConfig(num_heads=8, compress_ratios=ratios, topk=64, ratio_kinds={1: "topk"})
    assert cfg.kind_of(1) is LayerKind.TOPK and 1 in cfg.compressed_ratios


def test_config_page_size_per_ratio_and_scale():
    cfg = ModelConfig(
        num_heads=1, compress_ratios=(4, 128), topk=1, window_size=1, swa_page_size=1,
        compressed_page_size={128: 2, 4: 1}, sm_scale=0.25,
    )
    assert cfg.page_size_of(4) == 1 and cfg.page_size_of(128) == 2 and cfg.sm_scale == 0.25
    swa_only = ModelConfig(num_heads=128, compress_ratios=(0, 0), topk=1)
    assert swa_only.compressed_ratios == () and swa_only.compressed_page_size == {}
    with pytest.raises(ValueError, match="no layer uses compress ratio 4"):
        swa_only.page_size_of(4)
    with pytest.raises(ValueError, match="layer must be in"):
        swa_only.ratio_of(2)


BASE = dict(num_heads=8, compress_ratios=(0, 4, 128), topk=64)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(num_heads=0), ValueError, "num_heads"),
        (dict(num_heads=129), ValueError, "num_heads"),
        (dict(num_heads=8.0), TypeError, "num_heads"),
        (dict(num_heads=True), TypeError, "num_heads"),
        (dict(head_dim=576), ValueError, "head_dim must be 512"),
        (dict(compress_ratios=()), ValueError, "compress_ratios"),
        (dict(compress_ratios=(0, 5)), ValueError, r"compress_ratios\[1\] = 5: no layer kind"),
        (dict(compress_ratios=(0, -4)), ValueError, r"compress_ratios\[1\] must be in"),
        (dict(compress_ratios=(0, 4.0)), TypeError, r"compress_ratios\[1\]"),
        (dict(compress_ratios="14"), TypeError, "compress_ratios"),
        (dict(compress_ratios=4), TypeError, "compress_ratios"),
        (dict(compress_ratios={1: 0, 4: 0, 128: 0}), TypeError, "compress_ratios must be a sequence of ints, got dict"),
        (dict(compress_ratios={1, 4, 128}), TypeError, "compress_ratios must be a sequence of ints, got set"),
        (dict(topk=2**40), ValueError, r"topk must be in \[1, 16777216\]"),
        (dict(window_size=2**40), ValueError, r"window_size must be in \[1, 16777216\]"),
        (dict(swa_page_size=2**31), ValueError, "swa_page_size must be in"),
        (dict(compressed_page_size=2**31), ValueError, "compressed_page_size must be in"),
        (dict(compressed_page_size={4: 64, 128: 2**40}), ValueError, r"compressed_page_size\[128\] must be in"),
        (dict(sm_scale=1e39), ValueError, "sm_scale must be finite as a float32"),
        (dict(sm_scale=1e-50), ValueError, "sm_scale must be finite as a float32"),
        (dict(topk=0), ValueError, "topk"),
        (dict(window_size=0), ValueError, "window_size"),
        (dict(swa_page_size=0), ValueError, "swa_page_size"),
        (dict(compressed_page_size=0), ValueError, "compressed_page_size"),
        (dict(compressed_page_size={4: 64}), ValueError, "ratio 128"),
        (dict(compressed_page_size={4: 64, 128: 64, 16: 1}), ValueError, "names ratio 16"),
        (dict(compressed_page_size={4: 0, 128: 1}), ValueError, r"compressed_page_size\[4\]"),
        (dict(sm_scale=float("nan")), ValueError, "sm_scale"),
        (dict(sm_scale=-0.1), ValueError, "sm_scale"),
        (dict(sm_scale=0.0), ValueError, "sm_scale"),
        (dict(sm_scale="0.1"), TypeError, "sm_scale"),
        (dict(sm_scale=True), TypeError, "sm_scale"),
    ],
)
def test_config_validation(change, exc, match):
    with pytest.raises(exc, match=match):
        ModelConfig(**{**BASE, **change})


# ---------------------------------------------------------------------------------------------
# BatchMetadata

SMALL = dict(num_heads=2, compress_ratios=(0, 4, 128), topk=8, swa_page_size=2, compressed_page_size=1)
CFG = ModelConfig(**SMALL, window_size=4)
PREFIX, EXTEND = [0, 5, 130], [3, 1, 2]
SEQ = [3, 6, 132]


def tables(width=134, c4=40, c128=2, fill=None):
    """Identity-like tables: position/entry ``j`` of request ``r`` -> ``1000 * r + j``."""
    def make(w):
        t = (torch.arange(3)[:, None] * 1000 + torch.arange(w)).int()
        return t if fill is None else t.fill_(fill)
    return make(width), {4: make(c4), 128: make(c128)}


def test_metadata_derived_fields():
    swa, comp = tables()
    md = BatchMetadata(CFG, PREFIX, EXTEND, swa, comp)
    assert md.forward_mode is ForwardMode.EXTEND and not md.is_decode
    assert md.num_requests == 3 and md.num_tokens == 6 and md.max_seq_len == 132
    assert md.seq_lens_host == tuple(SEQ)
    assert md.seq_lens.tolist() == SEQ and md.seq_lens.dtype == torch.int32
    assert md.prefix_lens.tolist() == PREFIX and md.extend_lens.tolist() == EXTEND
    assert md.query_start_loc.tolist() == [0, 3, 4, 6] and md.query_start_loc.dtype == torch.int32
    assert md.query_pos.tolist() == [0, 1, 2, 5, 130, 131] and md.query_pos.dtype == torch.int32
    assert md.query_req.tolist() == [0, 0, 0, 1, 2, 2]
    # Reached SWA positions: [0, 3), [2, 6), [127, 132); compressed: seq // ratio entries.
    assert md.max_swa_id == 2131
    assert md.max_compressed_id == {4: 2032, 128: 2000}
    # Lengths as tensors of any integer dtype give the same batch.
    md2 = BatchMetadata(CFG, torch.tensor(PREFIX), torch.tensor(EXTEND, dtype=torch.int16), swa, comp)
    assert md2.query_pos.tolist() == md.query_pos.tolist()
    assert md2.generation != md.generation
    assert "tokens=6" in repr(md)


def test_metadata_value_checks():
    swa, comp = tables()
    swa[1, 1] = -1  # position 1 of request 1: before its window union [2, 6)
    swa[2, :127] = -5  # evicted positions of request 2
    comp[4][0, 0] = -1  # entry 0 of request 0: seq 3 // 4 = 0 complete entries
    comp[128][0:2, 0] = -1  # requests 0 and 1 have no complete ratio-128 entry
    BatchMetadata(CFG, PREFIX, EXTEND, swa, comp)
    swa[1, 2] = -1
    with pytest.raises(ValueError, match="swa_token_table holds a negative token id"):
        BatchMetadata(CFG, PREFIX, EXTEND, swa, comp)
    with value_checks(False):
        md = BatchMetadata(CFG, PREFIX, EXTEND, swa, comp)
    assert md.max_swa_id is None and md.max_compressed_id is None
    swa[1, 2] = 7
    comp[4][1, 0] = -3
    with pytest.raises(ValueError, match=r"compressed_token_tables\[4\] holds a negative token id \(-3\)"):
        BatchMetadata(CFG, PREFIX, EXTEND, swa, comp)


def _bad_tables(**kw):
    swa, comp = tables()
    kw = {k: v(swa, comp) if callable(v) else v for k, v in kw.items()}
    return {"swa_token_table": swa, "compressed_token_tables": comp, **kw}


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (dict(prefix_lens=[0, 0]), ValueError, "same length"),
        (dict(prefix_lens=[], extend_lens=[]), ValueError, "at least one request"),
        (dict(prefix_lens=[0, -1, 0]), ValueError, r"prefix_lens\[1\] must be >= 0"),
        (dict(extend_lens=[3, 0, 2]), ValueError, r"extend_lens\[1\] must be >= 1"),
        (dict(prefix_lens=[0, 1.5, 0]), TypeError, r"prefix_lens\[1\]"),
        (dict(prefix_lens=torch.zeros(3)), TypeError, "prefix_lens"),
        (dict(extend_lens=torch.ones(3, 1, dtype=torch.int32)), TypeError, "extend_lens"),
        (dict(extend_lens="123"), TypeError, "extend_lens"),
        (dict(forward_mode=ForwardMode.DECODE), ValueError, r"extend_lens\[0\] must be 1 in DECODE"),
        (dict(forward_mode="extend"), TypeError, "forward_mode"),
        (dict(config=None), TypeError, "config"),
        (_bad_tables(swa_token_table=lambda s, c: s.long()), TypeError, "swa_token_table"),
        (_bad_tables(swa_token_table=lambda s, c: s[:2]), ValueError, "swa_token_table must have shape"),
        (_bad_tables(swa_token_table=lambda s, c: s[:, :131]), ValueError, "at least max.seq_lens. = 132 columns"),
        (_bad_tables(compressed_token_tables=lambda s, c: {4: c[4]}), ValueError, r"exactly the ratios \(4, 128\)"),
        (_bad_tables(compressed_token_tables=lambda s, c: [c[4], c[128]]), TypeError, "mapping"),
        (_bad_tables(compressed_token_tables=lambda s, c: {**c, 16: c[4]}), ValueError, "exactly the ratios"),
        (_bad_tables(compressed_token_tables=lambda s, c: {4: c[4][:, :32], 128: c[128]}), ValueError,
         r"compressed_token_tables\[4\] must have at least max\(seq_lens\) // 4 = 33 columns"),
        (_bad_tables(compressed_token_tables=lambda s, c: {4: c[4], 128: c[128].long()}), TypeError,
         r"compressed_token_tables\[128\]"),
    ],
)
def test_metadata_validation(args, exc, match):
    swa, comp = tables()
    full = dict(config=CFG, prefix_lens=PREFIX, extend_lens=EXTEND, swa_token_table=swa, compressed_token_tables=comp)
    full.update(args)
    with pytest.raises(exc, match=match):
        BatchMetadata(**full)


def test_metadata_decode_mode():
    swa, comp = tables()
    md = BatchMetadata(CFG, [0, 4, 131], [1, 1, 1], swa, comp, ForwardMode.DECODE)
    assert md.is_decode and md.query_pos.tolist() == [0, 4, 131]


def test_metadata_copy_refills_in_place():
    swa, comp = tables()
    md = BatchMetadata(CFG, PREFIX, EXTEND, swa, comp)
    swa2, comp2 = tables(fill=9)
    other = BatchMetadata(CFG, [100, 0, 7], [1, 4, 1], swa2, comp2)
    ptrs = {name: getattr(md, name).data_ptr() for name in ("swa_token_table", "query_pos", "seq_lens")}
    gen = md.generation
    md.copy_(other)
    assert md.generation > gen and md.generation != other.generation
    assert md.seq_lens_host == (101, 4, 8) and md.num_tokens == 6
    assert md.query_pos.tolist() == [100, 0, 1, 2, 3, 7]
    assert (md.swa_token_table == 9).all() and (md.compressed_token_tables[4] == 9).all()
    # Same shapes: the storage captured by a CUDA graph is kept.
    assert {name: getattr(md, name).data_ptr() for name in ptrs} == ptrs
    with pytest.raises(TypeError, match="other"):
        md.copy_(None)
    other_cfg = ModelConfig(**SMALL, window_size=8)
    with pytest.raises(ValueError, match="same config"):
        md.copy_(BatchMetadata(other_cfg, PREFIX, EXTEND, swa, comp))


def test_metadata_copy_in_place_needs_the_same_shapes():
    swa, comp = tables()
    md = BatchMetadata(CFG, PREFIX, EXTEND, swa, comp)
    swa2, comp2 = tables(fill=9)
    same = BatchMetadata(CFG, [100, 0, 7], [1, 4, 1], swa2, comp2)  # 6 tokens, as md
    md.copy_(same, in_place=True)
    assert md.query_pos.tolist() == [100, 0, 1, 2, 3, 7] and (md.swa_token_table == 9).all()
    cases = {
        "num_tokens": BatchMetadata(CFG, [100, 0, 7], [1, 4, 2], swa2, comp2),
        "num_requests": BatchMetadata(CFG, [100, 0], [1, 5], swa2[:2], {c: t[:2] for c, t in comp2.items()}),
        "swa_token_table shape": BatchMetadata(CFG, [100, 0, 7], [1, 4, 1], torch.cat([swa2, swa2], 1), comp2),
        "forward_mode": BatchMetadata(CFG, [100, 0, 7], [1, 1, 1], swa2, comp2, ForwardMode.DECODE),
    }
    for ratio, t in comp2.items():
        wider = {**comp2, ratio: torch.cat([t, t], 1)}
        cases[f"compressed_token_tables[{ratio}] shape"] = BatchMetadata(CFG, [100, 0, 7], [1, 4, 1], swa2, wider)
    gen = md.generation
    for name, other in cases.items():
        with pytest.raises(ValueError, match=f"needs the same {re.escape(name)}"):
            md.copy_(other, in_place=True)
        assert md.generation == gen and md.query_pos.tolist() == [100, 0, 1, 2, 3, 7]

