"""The ``sparse_prefill`` torch.library namespace: every op is registered here as a torch op
(``torch.ops.sparse_prefill.<name>``), so ``torch.compile`` traces through it, meta and fake
tensors run its shape-only implementation, and the arguments it writes are declared in its
schema (``Tensor(a!)``).

Ops are defined with the low-level ``torch.library.Library`` API rather than
``torch.library.custom_op``: the latter's Python dispatch costs tens of microseconds per call,
which an engine would pay on every layer; a schema with per-device kernels costs a few.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NAMESPACE = "sparse_prefill"

_LIB = torch.library.Library(NAMESPACE, "DEF")  # kept alive: dropping it unregisters the ops


def define_op(schema: str, impl: Callable, fake: Callable) -> torch._ops.OpOverload:
    """Define ``sparse_prefill::<schema>`` with ``impl`` as its CPU and CUDA kernel and ``fake``
    (same arguments; outputs from shapes alone) for meta and fake tensors; return the op."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    for key in ("CPU", "CUDA"):
        _LIB.impl(name, impl, key)
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def direct_call_ok(t: torch.Tensor) -> bool:
    """Whether an op called with ``t`` among its tensors may run its implementation directly,
    skipping the dispatcher: ``t`` a plain CUDA tensor, no ``torch.compile`` trace, and no
    dispatch or function mode (fake tensors, op counters, a ``torch.device`` context) that
    expects to see the op. For ops whose boxing costs tens of microseconds a call (lists of
    arguments or outputs); everything else goes through the registered op."""
    return (
        type(t) is torch.Tensor
        and t.device.type == "cuda"
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
    )


def writes_only(*args: object) -> None:
    """The fake implementation of an op that only writes its output arguments."""
    return None
