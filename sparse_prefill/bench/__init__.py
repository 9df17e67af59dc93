"""What the ``sparse-prefill`` CLI runs: the GPU benchmarks, their plot, the demo and the
randomized correctness sweep.

One module per benchmark (``BENCHMARKS``), each with ``run(quick=..., progress=...)`` returning a
:class:`~sparse_prefill.bench.common.BenchResult` (rows + markdown table), and its own ``main``
with the knobs the CLI leaves out (``python -m sparse_prefill.bench.<name> --help``).
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
