"""``ModelConfig`` fields from a DeepSeek-V4 ``config.json``, read as SGLang reads them.

SGLang's DeepSeek-V4 model (``models/deepseek_v4.py``) builds layer ``i`` of the
``num_hidden_layers`` with ``compress_ratios[i]`` and shards ``num_attention_heads`` over the
attention tensor-parallel ranks; the indexer keeps ``index_topk`` entries; the window is
``window_size`` (128 when absent); the softmax scale is ``head_dim ** -0.5``. ``compress_ratios`` may carry one more entry per MTP (NextN)
layer after the main layers; SGLang ignores it: its NextN draft layer is built with
``compress_ratio_override = COMPRESS_RATIO_NEXTN_LAYER = 0`` (``models/deepseek_v4_nextn.py``),
an SWA-only layer whatever that entry says. ``mtp=True`` gives the config of those layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sparse_prefill._utils import check_int
from sparse_prefill.backend.layer_kinds import LayerKind

DEFAULT_WINDOW = 128
# Fields whose value this library's kernels fix; a config that says otherwise is not servable.
FIXED_FIELDS = {"head_dim": 512, "qk_rope_head_dim": 64, "num_key_value_heads": 1, "v_head_dim": 512}
MTP_RATIO = 0  # SGLang's COMPRESS_RATIO_NEXTN_LAYER


def _field(cfg: Mapping[str, Any], name: str, **limits) -> int:
    if name not in cfg:
        raise ValueError(f"config.json has no field {name!r}, which a DeepSeek-V4 config must have")
    return check_int(f"config.json's {name}", cfg[name], **limits)


def hf_config_fields(cfg: Mapping[str, Any], tp_size: int = 1, mtp: bool = False) -> dict[str, Any]:
    """Keyword arguments of ``ModelConfig`` from a ``config.json`` dict (see the module docstring).

    Args:
        cfg: the parsed ``config.json``. Required: ``num_attention_heads``, ``index_topk``,
            ``compress_ratios`` (a list of ints), ``num_hidden_layers``; optional:
            ``window_size`` (default 128), ``num_nextn_predict_layers`` (default 0), and
            ``head_dim`` / ``qk_rope_head_dim`` / ``num_key_value_heads`` / ``v_head_dim``,
            which must then be 512 / 64 / 1 / 512. Other fields are not read.
        tp_size: attention tensor-parallel ranks; must divide ``num_attention_heads``.
        mtp: the MTP (NextN) draft layers instead of the main ones: ``num_nextn_predict_layers``
            SWA-only (ratio 0) layers, as SGLang builds them.

    Raises ValueError/TypeError naming the field for a missing field or a value the library
    cannot serve.
    """
    if not isinstance(cfg, Mapping):
        raise TypeError(f"cfg must be the config.json dict, got {type(cfg).__name__}")
    check_int("tp_size", tp_size, lo=1)
    heads = _field(cfg, "num_attention_heads", lo=1)
    if heads % tp_size:
        raise ValueError(f"tp_size {tp_size} must divide config.json's num_attention_heads ({heads})")
    for name, want in FIXED_FIELDS.items():
        if name in cfg and cfg[name] != want:
            raise ValueError(f"config.json's {name} must be {want} (the DeepSeek-V4 layout), got {cfg[name]!r}")
    layers = _field(cfg, "num_hidden_layers", lo=1)
    num_mtp = _field(cfg, "num_nextn_predict_layers", lo=0) if "num_nextn_predict_layers" in cfg else 0
    if "compress_ratios" not in cfg:
        raise ValueError("config.json has no field 'compress_ratios', which a DeepSeek-V4 config must have")
    ratios = cfg["compress_ratios"]
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, (list, tuple)):
        raise TypeError(f"config.json's compress_ratios must be a list of ints, got {type(ratios).__name__}")
    if len(ratios) not in (layers, layers + num_mtp):
        raise ValueError(
            f"config.json's compress_ratios has {len(ratios)} entries; expected num_hidden_layers "
            f"({layers}), or that plus num_nextn_predict_layers ({num_mtp}) for the MTP layers"
        )
    ratios = tuple(check_int(f"config.json's compress_ratios[{i}]", r, lo=0) for i, r in enumerate(ratios))
    if mtp:
        if num_mtp == 0:
            raise ValueError("mtp=True needs config.json's num_nextn_predict_layers >= 1")
        ratios = (MTP_RATIO,) * num_mtp
    else:
        ratios = ratios[:layers]  # the MTP entries are not the main layers' (module docstring)
    fields = dict(
        num_heads=heads // tp_size,
        compress_ratios=ratios,
        topk=_field(cfg, "index_topk", lo=1),
        window_size=_field(cfg, "window_size", lo=1) if "window_size" in cfg else DEFAULT_WINDOW,
        sm_scale=FIXED_FIELDS["head_dim"] ** -0.5,  # SGLang's softmax_scale = head_dim ** -0.5, bit for bit
    )
    if 1 in ratios:
        # The file is in SGLang's convention, where ratio 1 is a top-k layer: say so explicitly.
        fields["ratio_kinds"] = {1: LayerKind.TOPK}
    return fields
