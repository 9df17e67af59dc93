"""ModelConfig.from_hf_config: a DeepSeek-V4 config.json read as SGLang reads it."""

from __future__ import annotations

import json

import pytest

from sparse_prefill.backend import ModelConfig
from sparse_prefill.backend.layer_kinds import LayerKind

# The attention fields of a DeepSeek-V4-Flash-style config.json (43 layers plus one MTP layer,
# whose trailing compress_ratios entry SGLang ignores), with the neighbours a real file has.
V4_FLASH = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "hidden_size": 4096,
    "num_hidden_layers": 43,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 64,
    "num_key_value_heads": 1,
    "head_dim": 512,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 1024,
    "o_lora_rank": 1024,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 512,
    "window_size": 128,
    "compress_rope_theta": 160000,
    "compress_ratios": [0, 0, 4] + [128, 4] * 20 + [0],
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536},
    "max_position_embeddings": 1048576,
}


def test_v4_flash_config():
    cfg = ModelConfig.from_hf_config(json.loads(json.dumps(V4_FLASH)), tp_size=8)
    assert cfg.num_heads == 8 and cfg.topk == 512 and cfg.window_size == 128
    assert cfg.num_layers == 43 and cfg.compress_ratios == tuple(V4_FLASH["compress_ratios"][:43])
    assert cfg.ratio_kinds == {0: LayerKind.SWA, 4: LayerKind.TOPK, 128: LayerKind.DENSE}
    assert cfg.swa_page_size == 256 and cfg.compressed_page_size == {4: 64, 128: 2}
    assert cfg.sm_scale == 512**-0.5
    # SGLang's MTP (NextN) layer is SWA-only whatever the trailing entry says.
    mtp = ModelConfig.from_hf_config(V4_FLASH, tp_size=8, mtp=True)
    assert mtp.compress_ratios == (0,) and mtp.num_heads == 8
    # Further fields pass through.
    assert ModelConfig.from_hf_config(V4_FLASH, swa_page_size=64).swa_page_size == 64


def test_v41_config_keeps_the_ratios_verbatim():
    ratios = [0, 0, 2, 2, 1, 4, 128, 1, 2, 4, 128, 1]
    cfg = ModelConfig.from_hf_config(
        {**V4_FLASH, "num_hidden_layers": 12, "num_nextn_predict_layers": 0, "compress_ratios": ratios,
         "index_topk": 1024, "kv_source_layer_ids": [2, 4, 5, 6], "index_source_layer_ids": [2, 4, 5]},
        tp_size=4,
    )
    assert cfg.compress_ratios == tuple(ratios) and cfg.topk == 1024 and cfg.num_heads == 16
    assert cfg.topk_ratios == (1, 2, 4) and cfg.compressed_page_size == {1: 256, 2: 128, 4: 64, 128: 2}
    # No ratio 0 at all: still SGLang's convention (1 is top-k), so no old-convention error.
    only_topk = ModelConfig.from_hf_config({**V4_FLASH, "num_hidden_layers": 2, "compress_ratios": [1, 4]})
    assert only_topk.kind_of(1) is LayerKind.TOPK


def test_window_size_defaults_to_128():
    cfg = ModelConfig.from_hf_config({k: v for k, v in V4_FLASH.items() if k != "window_size"})
    assert cfg.window_size == 128
    assert ModelConfig.from_hf_config({**V4_FLASH, "window_size": 64}).window_size == 64


@pytest.mark.parametrize(
    "change, tp, exc, match",
    [
        (dict(num_attention_heads=None), 1, ValueError, "no field 'num_attention_heads'"),
        (dict(index_topk=None), 1, ValueError, "no field 'index_topk'"),
        (dict(compress_ratios=None), 1, ValueError, "no field 'compress_ratios'"),
        (dict(num_hidden_layers=None), 1, ValueError, "no field 'num_hidden_layers'"),
        (dict(num_attention_heads=64.0), 1, TypeError, "num_attention_heads"),
        (dict(compress_ratios="0,4"), 1, TypeError, "compress_ratios must be a list"),
        (dict(compress_ratios=[0, 4]), 1, ValueError, r"has 2 entries; expected num_hidden_layers \(43\)"),
        (dict(compress_ratios=[0] * 42 + [8, 0]), 1, ValueError, r"compress_ratios\[42\] = 8: no layer kind"),
        (dict(compress_ratios=[0] * 42 + [-1, 0]), 1, ValueError, r"compress_ratios\[42\] must be in"),
        (dict(head_dim=576), 1, ValueError, "head_dim must be 512"),
        (dict(num_key_value_heads=2), 1, ValueError, "num_key_value_heads must be 1"),
        (dict(qk_rope_head_dim=128), 1, ValueError, "qk_rope_head_dim must be 64"),
        (dict(index_topk=0), 1, ValueError, "index_topk"),
        (dict(window_size=0), 1, ValueError, "window_size"),
        (dict(num_attention_heads=256), 1, ValueError, "num_heads"),  # 256 heads on one GPU
        ({}, 3, ValueError, "tp_size 3 must divide config.json's num_attention_heads"),
        ({}, 0, ValueError, "tp_size"),
    ],
)
def test_bad_configs(change, tp, exc, match):
    cfg = {**V4_FLASH, **change}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(exc, match=match):
        ModelConfig.from_hf_config(cfg, tp_size=tp)


def test_bad_arguments():
    with pytest.raises(TypeError, match="cfg must be the config.json dict"):
        ModelConfig.from_hf_config("config.json")
    with pytest.raises(ValueError, match="mtp=True needs"):
        ModelConfig.from_hf_config({**V4_FLASH, "num_nextn_predict_layers": 0, "compress_ratios": [0] * 43}, mtp=True)
