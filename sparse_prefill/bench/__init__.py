"""All benchmark and profiling code: what the ``sparse-prefill`` CLI runs (the GPU benchmarks,
their plot, the demo and the randomized correctness sweep) and the studies run on their own.

One module per CLI benchmark (``BENCHMARKS``), each with ``run(quick=..., progress=...)``
returning a :class:`~sparse_prefill.bench.common.BenchResult` (rows + markdown table), and its own
``main`` with the knobs the CLI leaves out (``python -m sparse_prefill.bench.<name> --help``).
Run only as ``python -m sparse_prefill.bench.<name>``: ``parallel`` (several GPUs),
``stack_vs_original``, ``fp8_small_batch``, ``tune_sparse_attn``, ``few_heads``,
``chunk_cache_build``, ``op_overhead`` (the public op against its kernel), ``profile_sparse_attn``
(one launch for ncu), ``ncu_source`` (ncu's stall samples per instruction, summed per
partition), ``compile_offline`` (ptxas' report without a GPU; Triton 3.6) and
``device_session`` (one call on the GPU machine). Their results go to ``benchmarks/``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# In the order `sparse-prefill bench` runs them: the headline kernel comparison first.
BENCHMARKS = ("sparse_attn", "cache", "indices", "backend")


def load(name: str) -> ModuleType:
    """The module of benchmark ``name`` (one of ``BENCHMARKS``)."""
    if name not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {name!r}")
    return importlib.import_module(f"sparse_prefill.bench.{name}")
