"""What a layer of each compress ratio attends to: the one place that maps ratios to layer kinds.

The ratios are SGLang's ``compress_ratios`` values, taken verbatim (DESIGN.md's table):

| ratio | kind | a query at position ``p`` sees |
| --- | --- | --- |
| 0 | ``SWA`` | its window ``max(0, p - W + 1) .. p`` only |
| 1, 2, 4 | ``TOPK`` | the window + the indexer's top-k compressed entries ``j < (p + 1) // ratio`` |
| 128 | ``DENSE`` | the window + every complete compressed entry ``j < (p + 1) // ratio`` |

(1 and 2 are DeepSeek-V4.1's: a compressor keeps one latent per token or pools two.) A model
with other ratios states their kinds with ``ModelConfig(ratio_kinds={8: "topk"})``; ratio 0 is
always the SWA-only layer and every other ratio has a compressed cache.

This project first called the SWA-only layer "ratio 1". A ratio list that uses 1 but not 0 is
what such a config looks like, and under the new meaning it would silently attend to one
compressed entry per token, so it is rejected unless ``ratio_kinds`` names ratio 1 explicitly
(:func:`resolve_ratio_kinds`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from types import MappingProxyType


class LayerKind(str, enum.Enum):
    """SWA: window only. TOPK: window + the indexer's picks. DENSE: window + every complete entry."""

    SWA = "swa"
    TOPK = "topk"
    DENSE = "dense"


SWA_RATIO = 0

DEFAULT_RATIO_KINDS: Mapping[int, LayerKind] = MappingProxyType(
    {0: LayerKind.SWA, 1: LayerKind.TOPK, 2: LayerKind.TOPK, 4: LayerKind.TOPK, 128: LayerKind.DENSE}
)

OLD_CONVENTION_ERROR = (
    "compress_ratios uses ratio 1 and no ratio 0: that is this library's old convention, where 1 "
    "meant an SWA-only layer. It now follows SGLang: 0 is the SWA-only layer and 1 is a "
    "DeepSeek-V4.1 top-k layer (window + top-k of one compressed entry per token). Write 0 for "
    "SWA-only layers; for a model whose ratio-1 layers really are top-k and that has no SWA-only "
    "layer, pass ratio_kinds={1: 'topk'}"
)


def _kind(name: str, value: object) -> LayerKind:
    try:
        return LayerKind(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {[k.value for k in LayerKind]}, got {value!r}") from None


def resolve_ratio_kinds(
    ratios: Sequence[int], overrides: Mapping[int, object] | None = None
) -> dict[int, LayerKind]:
    """``{ratio: LayerKind}`` of every ratio ``ratios`` uses (ints already checked).

    ``overrides`` (``{ratio: "topk" | "dense" | LayerKind}``) adds or replaces kinds of
    :data:`DEFAULT_RATIO_KINDS`. Raises ValueError naming the layer for a ratio without a kind,
    and for a ratio list in the old convention (see the module docstring).
    """
    kinds = dict(DEFAULT_RATIO_KINDS)
    if overrides is not None:
        if not isinstance(overrides, Mapping):
            raise TypeError(f"ratio_kinds must be a mapping {{ratio: kind}}, got {type(overrides).__name__}")
        for ratio, value in overrides.items():
            name = f"ratio_kinds[{ratio!r}]"
            if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 0:
                raise ValueError(f"ratio_kinds keys must be ints >= 0, got {ratio!r}")
            kind = _kind(name, value)
            if (ratio == SWA_RATIO) != (kind is LayerKind.SWA):
                raise ValueError(f"{name}: ratio 0 is the SWA-only layer and only it, got {kind.value!r}")
            kinds[ratio] = kind
    for i, r in enumerate(ratios):
        if r not in kinds:
            known = ", ".join(f"{k}: {v.value}" for k, v in sorted(kinds.items()))
            raise ValueError(
                f"compress_ratios[{i}] = {r}: no layer kind for ratio {r} (known: {known}); "
                f"pass ratio_kinds={{{r}: 'topk'}} or {{{r}: 'dense'}}"
            )
    if 1 in ratios and SWA_RATIO not in ratios and not (overrides and 1 in overrides):
        raise ValueError(OLD_CONVENTION_ERROR)
    return {r: kinds[r] for r in sorted(set(ratios))}
