"""Whether a tensor still holds what a per-forward result was computed from.

DeepSeek-V4.1 layers share inputs: later layers of a ratio read their "kv source" layer's
compressed cache and reuse their "index source" layer's top-k. When a layer passes the same
tensor as an earlier one and nothing was written to it in between, what the backend derived
from it (a dequantized workspace region, combined index rows) is still right and is reused.

The test lives here alone (torch.compile may need another one): the same storage, shape,
strides and dtype, and an unchanged autograd version counter, which every in-place write bumps
(``store_k_cache``, ``copy_``, an engine's own kernel launched through torch) and which views
share with their base. Tensors created under ``torch.inference_mode()`` have no version
counter: they are never reused (each layer recomputes), which is always correct; so is
everything while ``torch.compile`` traces (neither the counter nor ``is_inference`` can be
traced).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Stamp(NamedTuple):
    """What :func:`unchanged` compares. Holding ``tensor`` keeps its memory from being freed and
    handed to another tensor at the same address while the stamp lives."""

    tensor: torch.Tensor
    version: int


def stamp(t: torch.Tensor) -> Stamp | None:
    """The stamp of ``t`` now; None when ``t`` has no version counter (never reused)."""
    if torch.compiler.is_compiling() or t.is_inference():
        return None
    return Stamp(t, t._version)


def unchanged(s: Stamp | None, t: torch.Tensor) -> bool:
    """Whether ``t`` is (a view of the same elements of) the tensor ``s`` stamped, not written since."""
    if s is None or torch.compiler.is_compiling() or t.is_inference():
        return False
    old = s.tensor
    same = t is old or (
        t.data_ptr() == old.data_ptr() and t.shape == old.shape and t.stride() == old.stride()
        and t.dtype == old.dtype and t.device == old.device
    )
    return same and t._version == s.version
