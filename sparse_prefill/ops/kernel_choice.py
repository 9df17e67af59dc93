"""Which kernel runs an attention op: the implementations of ``sparse_attn_fwd`` and
``paged_fp8_sparse_attn_fwd``, declared in one place (adding or removing one touches this file).

Each op family lists its implementations (:class:`Impl`) in ``auto``'s order of preference, each
with where it runs (``device_reason``: why not on a device), which calls it takes
(``shape_reason``: why not these shapes; ``data_reason``: why not these tensors, from their data
pointers and strides) and whether ``impl="auto"`` takes it (``auto``). Every reason is a string
that completes "impl='<name>' cannot run here: ...", None where it can run.

Two entry points, both ValueError naming ``impl`` and the reason, before any launch:

- :func:`resolve` runs in the op's Python wrapper: it checks ``impl`` against the device and the
  shapes and returns the implementation, or "auto" on CUDA (the choice reads data pointers,
  which ``torch.compile``'s fake tensors lack, so it is made inside the registered torch op: the
  impl string is part of the op's schema).
- :func:`pick` runs inside the registered op, on real tensors: the data checks, and the final
  ``auto`` choice.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping

import torch

from sparse_prefill._utils import INTERPRET
from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops import flashmla_impl

logger = logging.getLogger(__name__)

SPARSE_ATTN = "sparse_attn_fwd"
PAGED_FP8 = "paged_fp8_sparse_attn_fwd"

# The facts of a call a choice looks at: s_q, h_q, d_qk, topk (both ops) and layout
# (paged_fp8_sparse_attn_fwd).
Shape = Mapping[str, object]
Reason = Callable[[torch.device, Shape], "str | None"]


def _runs(*args: object) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Impl:
    """One implementation of an op family.

    Attributes:
        name: the ``impl`` string that selects it.
        device_reason: ``(device, shape) -> why it cannot run on device`` (None: it can).
        shape_reason: ``(device, shape) -> why it does not take these shapes`` (None: it does).
        data_reason: ``(q, kv) -> why it cannot read these tensors`` (None: it can; ``kv`` is
            the FP8 op's main cache); called inside the torch op (real tensors).
        auto: ``(device, shape) -> whether "auto" takes it`` for CUDA tensors, where it runs
            included (asked in the family's order; None: never). The last entry of a family
            takes every call.
        ours: this library's own kernel (benchmarks time these as "ours").
    """

    name: str
    device_reason: Reason = _runs
    shape_reason: Reason = _runs
    data_reason: Callable[[torch.Tensor, torch.Tensor], "str | None"] = _runs
    auto: Callable[[torch.device, Shape], bool] | None = None
    ours: bool = True

    def reason(self, device: torch.device, shape: Shape) -> str | None:
        """Why it cannot run this call (device first, then shapes), None if it can."""
        return self.device_reason(device, shape) or self.shape_reason(device, shape)


# ---------------------------------------------------------------------------------------------
# Where "auto" prefers FlashMLA's kernel: (op, h_q, d_qk) -> impl, only the shapes where it was
# measured faster in the same call on an H200. Empty since the run of benchmarks/RESULTS.md
# "H200, 2026-12-03 (second run)": flash_mla us / our us 1.09, 1.06, 1.04 over the three h_q 64 /
# d_qk 512 rows (the one entry, taken from the first run's 1.01 / 0.99 / 0.98, same kernel SASS),
# 1.01-1.03 at h_q 128 / d_qk 512, 0.98-1.00 at 576, 1.05-1.46 below 64 heads, which FlashMLA
# must pad. With both runs our kernel is as fast or faster on every row, and one kernel for every
# head count keeps results independent of whether flash_mla is installed (a tensor-parallel rank
# and one process then agree bit for bit). paged_fp8_sparse_attn_fwd has no entry: FlashMLA's
# FP8 decode kernel took 1.4-2.5x the time of our paths on the same layer stacks (RESULTS.md,
# "H200, 2026-12-02", the backend end to end).
AUTO_PREFERS: dict[tuple[str, int, int], str] = {}

_LOGGED: set[str] = set()  # ops whose auto choice of FlashMLA was logged (once per process)


def auto_prefers(op: str, shape: Shape) -> str | None:
    """The implementation ``AUTO_PREFERS`` names for this call, None where it names none."""
    return AUTO_PREFERS.get((op, shape["h_q"], shape["d_qk"]))


def _auto_flashmla(op: str) -> Callable[[torch.device, Shape], bool]:
    """"auto" takes FlashMLA's kernel of ``op`` where ``AUTO_PREFERS`` names it and it runs."""

    def takes(device: torch.device, shape: Shape) -> bool:
        if auto_prefers(op, shape) != "flashmla" or _entry(op, "flashmla").reason(device, shape) is not None:
            return False
        if op not in _LOGGED:
            _LOGGED.add(op)
            logger.info("sparse_prefill: %s impl='auto' runs FlashMLA's kernel for h_q %s, d_qk %s "
                        "(faster there: benchmarks/RESULTS.md, H200 section)", op, shape["h_q"], shape["d_qk"])
        return True

    return takes


def _triton_reason(device: torch.device, shape: Shape) -> str | None:
    if device.type != "cuda" and not INTERPRET:
        return "with CPU tensors it needs Triton's interpreter: set TRITON_INTERPRET=1 before importing sparse_prefill"
    return None


def _always(device: torch.device, shape: Shape) -> bool:
    return True


# The Gluon kernels' facts live beside them (imported here lazily: the kernel modules import the
# ops' packages, which import this one).
def _attn_gluon_reason(device: torch.device, shape: Shape) -> str | None:
    from sparse_prefill.ops.sparse_attn import gluon_kernel

    return gluon_kernel.unsupported_reason(device)


def _attn_gluon_inputs(q: torch.Tensor, kv: torch.Tensor) -> str | None:
    from sparse_prefill.ops.sparse_attn import gluon_kernel

    return gluon_kernel.inputs_reason(q, kv)


def _attn_gluon_auto(device: torch.device, shape: Shape) -> bool:
    from sparse_prefill.ops.sparse_attn import gluon_kernel

    return gluon_kernel.auto_picks_gluon(device, shape["h_q"])


def _fp8_gluon_reason(device: torch.device, shape: Shape) -> str | None:
    from sparse_prefill.ops.fp8_sparse_attn import gluon_kernel

    return gluon_kernel.unsupported_reason(device, shape["layout"])


def _fp8_gluon_inputs(q: torch.Tensor, cache: torch.Tensor) -> str | None:
    from sparse_prefill.ops.fp8_sparse_attn import gluon_kernel

    return gluon_kernel.inputs_reason(q, cache)


def _fp8_gluon_auto(device: torch.device, shape: Shape) -> bool:
    from sparse_prefill.ops.fp8_sparse_attn import gluon_kernel

    return gluon_kernel.auto_picks_gluon(device, shape["layout"])


SPARSE_ATTN_IMPLS = (
    Impl("reference"),
    Impl("flashmla", flashmla_impl.device_reason, flashmla_impl.sparse_shape_reason, flashmla_impl.inputs_reason,
         auto=_auto_flashmla(SPARSE_ATTN), ours=False),
    Impl("gluon", _attn_gluon_reason, data_reason=_attn_gluon_inputs, auto=_attn_gluon_auto),
    Impl("triton", _triton_reason, auto=_always),
)
PAGED_FP8_IMPLS = (
    Impl("reference"),
    Impl("flashmla", flashmla_impl.device_reason, flashmla_impl.decode_shape_reason, ours=False),
    Impl("gluon", _fp8_gluon_reason, data_reason=_fp8_gluon_inputs, auto=_fp8_gluon_auto),
    Impl("triton", _triton_reason, auto=_always),
)
FAMILIES: dict[str, tuple[Impl, ...]] = {SPARSE_ATTN: SPARSE_ATTN_IMPLS, PAGED_FP8: PAGED_FP8_IMPLS}
# Both families take the same names: the backend passes one impl to both.
ATTN_IMPLS = ("auto", *(impl.name for impl in SPARSE_ATTN_IMPLS))


def _entry(op: str, name: str) -> Impl:
    return next(impl for impl in FAMILIES[op] if impl.name == name)


def check_name(impl: object) -> str:
    """Raise ValueError unless ``impl`` is one of ``ATTN_IMPLS``; return it."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"impl must be one of {ATTN_IMPLS}, got {impl!r}")
    return impl


def _raise(name: str, reason: str | None) -> None:
    if reason is not None:
        raise ValueError(f"impl={name!r} cannot run here: {reason}")


def check_device(op: str, impl: object, device: torch.device, layout: KVCacheLayout = KVCacheLayout.V4) -> None:
    """Raise ValueError unless ``impl`` names an implementation of ``op`` that runs on
    ``device`` (shapes aside): the backend's check before a layer's work starts."""
    check_name(impl)
    if impl != "auto":
        _raise(impl, _entry(op, impl).device_reason(device, {"layout": layout}))


def first_taker(op: str, device: torch.device, shape: Shape, tensors: tuple[torch.Tensor, ...] | None = None,
                *, ours_only: bool = False) -> str:
    """"auto"'s choice on CUDA: the first implementation of ``op`` (in ``FAMILIES`` order) whose
    ``auto`` takes the call and, given real ``tensors`` (q, kv), whose ``data_reason`` passes;
    ``ours_only`` skips FlashMLA's (benchmarks time "ours" with it, installed or not).
    Each ``auto`` checks where its kernel runs itself, as a constant under ``torch.compile``."""
    for entry in FAMILIES[op]:
        if entry.auto is None or (ours_only and not entry.ours):
            continue
        if tensors is not None and entry.data_reason(*tensors) is not None:
            continue
        if entry.auto(device, shape):
            return entry.name
    raise AssertionError(f"{op}: no implementation takes the call")  # pragma: no cover - triton takes all


def resolve(op: str, impl: object, device: torch.device, shape: Shape) -> str:
    """``impl`` of a call of ``op`` on ``device`` with ``shape`` -> the implementation to run, or
    "auto" (on CUDA: :func:`pick` decides inside the torch op). "auto" on CPU is the PyTorch
    reference. ValueError naming ``impl`` and the reason where it cannot run."""
    check_name(impl)
    if impl == "auto":
        return "auto" if device.type == "cuda" else "reference"
    _raise(impl, _entry(op, impl).reason(device, shape))
    return impl


def sparse_attn_shape(q: torch.Tensor, indices: torch.Tensor) -> dict[str, int]:
    """The call facts of ``sparse_attn_fwd`` (q [s_q, h_q, d_qk], indices [s_q, 1, topk])."""
    s_q, h_q, d_qk = q.shape
    return {"s_q": s_q, "h_q": h_q, "d_qk": d_qk, "topk": indices.shape[-1]}


def paged_fp8_shape(q: torch.Tensor, indices: torch.Tensor, layout: KVCacheLayout, extra: bool,
                    lengths: bool) -> dict[str, object]:
    """The call facts of ``paged_fp8_sparse_attn_fwd`` (q [s_q, h_q, d_qk], indices [s_q, topk];
    ``extra``: an extra scope is given, ``lengths``: either top-k length is)."""
    s_q, h_q, d_qk = q.shape
    return {"s_q": s_q, "h_q": h_q, "d_qk": d_qk, "topk": indices.shape[-1], "layout": layout,
            "extra": extra, "lengths": lengths}


def pick(op: str, impl: str, shape: Shape, q: torch.Tensor, kv: torch.Tensor) -> str:
    """Inside the torch op of ``op``, on real tensors (``kv``: the FP8 op's main cache): the
    resolved ``impl`` once its ``data_reason`` passes (ValueError naming it and the reason where
    not), or for "auto" the :func:`first_taker`."""
    if impl == "auto":
        return first_taker(op, q.device, shape, (q, kv))
    _raise(impl, _entry(op, impl).data_reason(q, kv))
    return impl
