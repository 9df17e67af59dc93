"""Shared plumbing: which implementation runs, argument checks, and one Triton helper.

Every public op takes ``impl`` ("auto" | "triton" | "reference"). "auto" runs the Triton kernel
for CUDA tensors and the PyTorch reference for CPU tensors. "triton" on CPU tensors runs the
kernel under Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``) before
``sparse_prefill`` is imported, because ``triton.jit`` reads it when a kernel is decorated.
The two attention ops also take "gluon" and "flashmla"; their choice is ``ops/kernel_choice.py``.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence

import torch
import triton
import triton.language as tl

IMPLS = ("auto", "triton", "reference")

# Magnitudes a float scale may have (besides 0): the normal float32 range, less a factor 2 at the
# top so that the kernels' ``scale * log2(e)`` stays finite.
FLOAT32_SCALE_MIN = 2.0**-126
FLOAT32_SCALE_MAX = 2.0**127

# Read once, like triton.jit does at decoration time, so the two never disagree.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

VALUE_CHECKS_ENV = "SPARSE_PREFILL_VALUE_CHECKS"
# Spellings of the modes "on" | "off" | "strict" (see value_checks).
_ENV_MODES = {"1": "on", "on": "on", "true": "on", "yes": "on", "0": "off", "off": "off", "false": "off",
              "no": "off", "strict": "strict"}


def parse_value_checks_env(text: str | None) -> str:
    """``$SPARSE_PREFILL_VALUE_CHECKS`` -> "on" | "off" | "strict": unset or empty means on;
    1/on/true/yes, 0/off/false/no and strict (any case) select; anything else is a ValueError
    (a typo must not leave checks on silently)."""
    key = (text or "1").strip().lower() or "1"
    if key not in _ENV_MODES:
        raise ValueError(
            f"environment variable {VALUE_CHECKS_ENV} must be one of {sorted(_ENV_MODES)}, got {text!r}"
        )
    return _ENV_MODES[key]


_VALUE_CHECKS = parse_value_checks_env(os.environ.get(VALUE_CHECKS_ENV))


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map ``impl`` and the tensors' device to "triton" or "reference"."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if impl == "triton" and device.type != "cuda" and not INTERPRET:
        raise ValueError(
            "impl='triton' with CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before importing sparse_prefill"
        )
    return impl


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host ints. (``triton.cdiv`` is a constexpr function in recent Triton:
    calling it from Python goes through the JIT's dispatch, several microseconds a call.)"""
    return -(-a // b)


def value_checks_enabled() -> bool:
    """Whether checks that read tensor *values* run (see ``value_checks``)."""
    return _VALUE_CHECKS != "off"


def value_check_site(device: torch.device) -> str | None:
    """Where a value check of tensors on ``device`` runs now: "host" (read the values, raise
    ValueError: CPU tensors, or CUDA tensors in strict mode), "device" (``device_assert``, no
    sync: CUDA tensors by default, meta tensors, and any tensor while ``torch.compile`` traces)
    or None (value checks off)."""
    if _VALUE_CHECKS == "off":
        return None
    if torch.compiler.is_compiling() or device.type == "meta":
        return "device"
    if device.type == "cpu" or _VALUE_CHECKS == "strict":
        return "host"
    return "device"


def values_readable(device: torch.device) -> bool:
    """Whether tensor values on ``device`` can be read on the host now: not on meta tensors, not
    while ``torch.compile`` traces (a read would break the graph)."""
    return device.type != "meta" and not torch.compiler.is_compiling()


def device_assert(ok: torch.Tensor, message: str) -> None:
    """Assert the bool tensor ``ok`` is all true without a host sync (``torch._assert_async``):
    on CUDA a violation fails the stream with a device-side assert carrying ``message``."""
    torch._assert_async(ok.all(), message)


@contextlib.contextmanager
def value_checks(enabled: bool | str) -> Iterator[None]:
    """Set how checks of tensor *values* run inside a ``with`` block.

    Shape, dtype and device checks are free and always run. Checks of values (an id beyond a
    cache's capacity, a length out of range) need the data:

    - ``True`` (the default, ``SPARSE_PREFILL_VALUE_CHECKS=1``): CPU tensors are checked on the
      host (ValueError naming the argument); CUDA tensors on the device with
      ``torch._assert_async`` (no host sync: a violation fails the stream with a device-side
      assert, before the op's kernel reads anything), as is everything inside ``torch.compile``.
      Ops whose output sizes follow from the values (``build_swa_token_ids``,
      ``build_workspace_plan``) still read them on the host in eager mode.
    - ``"strict"`` (``SPARSE_PREFILL_VALUE_CHECKS=strict``): CUDA tensors are checked on the
      host too, with the ValueError messages; each check costs a device sync.
    - ``False`` (``SPARSE_PREFILL_VALUE_CHECKS=0``): no value checks, for engines that validate
      their metadata once.

    The environment variable is read at import (see ``parse_value_checks_env``). ``enabled`` must
    be a bool or ``"strict"`` (a string such as ``"false"`` is truthy: it is rejected with
    TypeError rather than read as on).
    """
    if not (isinstance(enabled, bool) or (isinstance(enabled, str) and enabled == "strict")):
        raise TypeError(f"value_checks takes a bool or 'strict' (enabled), got {enabled!r}")
    global _VALUE_CHECKS
    previous = _VALUE_CHECKS
    _VALUE_CHECKS = "strict" if enabled == "strict" else ("on" if enabled else "off")
    try:
        yield
    finally:
        _VALUE_CHECKS = previous


def _fmt_shape(shape: Sequence[object]) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raise TypeError/ValueError naming ``name`` unless ``t`` is a tensor as described.

    ``shape`` gives the expected sizes, ``None`` for a free dimension; its length is the rank.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {want}, got {t.dtype}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
            raise ValueError(f"{name} must have shape {_fmt_shape(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    return t


def check_int(name: str, value: object, *, lo: int | None = None, hi: int | None = None) -> int:
    """Raise unless ``value`` is a Python int (not bool) in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_float32_scale(name: str, value: object) -> float:
    """Raise unless ``value`` is a real number (not bool) that float32 holds without overflow or
    underflow: 0, or a magnitude in ``[2**-126, 2**127]`` (normal float32, with room for the
    kernels' ``* log2(e)``). ``1e39`` would become inf and ``1e-50`` zero on the device. Returns
    ``float(value)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond any float
        v = math.inf
    if v != 0.0 and not FLOAT32_SCALE_MIN <= abs(v) <= FLOAT32_SCALE_MAX:
        raise ValueError(
            f"{name} must be finite as a float32: 0 or a magnitude in [2**-126, 2**127] (normal "
            f"float32), got {value}"
        )
    return v


def check_no_overlap(name: str, t: torch.Tensor) -> None:
    """Raise ValueError unless no two elements of output ``t`` share memory (a stride-0 or
    ``expand``ed dim, or strides that interleave). The test is the usual sufficient one: with the
    dims of size > 1 sorted by stride, each stride is at least the span of the smaller ones.
    Dense, sliced, permuted and row-strided tensors all pass it."""
    span = 1  # elements covered by the dims so far, plus one
    dims = [(st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1]
    # Sorted by stride with a plain insertion sort: torch.compile cannot trace sorted() on tuples.
    for i in range(1, len(dims)):
        j = i
        while j > 0 and dims[j - 1][0] > dims[j][0]:
            dims[j - 1], dims[j] = dims[j], dims[j - 1]
            j -= 1
    for stride, size in dims:
        if stride < span:
            raise ValueError(
                f"{name} is an output, so its elements must not share memory; got shape "
                f"{tuple(t.shape)} with strides {tuple(t.stride())} (expanded or overlapping); "
                f"pass a tensor from torch.empty"
            )
        span = stride * (size - 1) + span


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses ``t``'s elements lie in."""
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def check_disjoint(name: str, out: torch.Tensor, **inputs: torch.Tensor | None) -> None:
    """Raise ValueError naming both when output ``out`` shares memory with one of ``inputs``
    (the kernel would overwrite what it still reads). The test compares the byte ranges the
    tensors span, a sufficient one: two interleaved views of one buffer are rejected even where
    no element is shared. Skipped while ``torch.compile`` traces (fake tensors have no
    addresses; the eager call of the same shapes checked them)."""
    if torch.compiler.is_compiling() or out.device.type == "meta" or out.numel() == 0:
        return
    lo, hi = _byte_span(out)
    for arg, t in inputs.items():
        if t is None or t.numel() == 0 or t.device != out.device:
            continue
        a, b = _byte_span(t)
        if a < hi and lo < b:
            raise ValueError(
                f"{name} must not share memory with {arg} (the op would overwrite what it reads); "
                f"pass a separate buffer"
            )


def check_unit_stride(name: str, t: torch.Tensor) -> None:
    """Kernels address the last dim with stride 1 (other dims take any stride)."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have unit stride in its last dim, got strides {tuple(t.stride())}; "
            f"pass {name}.contiguous()"
        )


@triton.jit
def mma_operand(x, UPCAST: tl.constexpr):
    """Operand for ``tl.dot``: Triton's interpreter multiplies the raw bits of bf16 operands,
    so under the interpreter (``UPCAST=INTERPRET``) they go in as float32; never on the GPU."""
    if UPCAST:
        return x.to(tl.float32)
    return x


@triton.jit
def to_bf16(x, INTERPRETED: tl.constexpr):
    """float32 -> bfloat16, rounding to nearest even like the GPU does. Triton's interpreter
    truncates instead; under it (``INTERPRETED=INTERPRET``) round the bits first (finite x)."""
    if INTERPRETED:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(tl.bfloat16)
