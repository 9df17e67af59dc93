"""Which path a batch takes: the one place where that is decided.

Two paths compute the same attention (``backend.py``):

* **sparse**: dequantize the referenced cache tokens into a bf16 workspace, build combined index
  rows (top-k layers), run ``sparse_attn_fwd`` on the workspace;
* **regular**: ``paged_fp8_sparse_attn_fwd`` straight from the FP8 caches, no workspace.

The rule: decode batches always take the regular path; extend batches take the path whose
estimated time for a layer is lower, per compress ratio (an SWA-only layer attends to 128 tokens
per query and is cheap next to its dequantize; a top-k layer attends to ``topk + 128``). The
estimate is a linear cost model, :class:`PathCosts`, whose constants are measured per path:

    regular_us = REGULAR_FIXED + flops(regular rows) / REGULAR_TFLOPS
    sparse_us  = SPARSE_FIXED + flops(sparse rows) / SPARSE_TFLOPS
                 + workspace_rows * DEQUANT_NS_PER_ROW + combined_entries * COMBINE_NS_PER_ENTRY

with ``flops = 2 * sum over queries of scanned kv * max(h_q, MIN_HEADS) * (d_qk + d_v)``.

Where the constants come from: ``sparse_prefill.bench.backend`` fitted them to our own kernels
on one H200 (torch 2.11, Triton 3.6, 2026-12-03, second run; tables in ``benchmarks/RESULTS.md``,
data in ``benchmarks/data/backend_h200_2026-12-03_*``), with the sparse path on the
warp-specialized Gluon ``sparse_attn_fwd`` kernel and the regular path on the Gluon FP8 kernel:
throughputs and the combine's cost are medians over the eight measured cases (chunks 8192 and
32768, one call each); the dequantize's cost per row is the slope of the ratio-1 sweep (the
sparse path's extra time for 122880 more workspace rows at equal attention work: 1.35-2.35 ns,
mean of the two calls' medians), since a per-call ratio mostly measures host time; the fixed
per-layer costs are the mean of the two calls' small-batch runs. ``sparse_attn_fwd`` on the
workspace runs at 528 / 587 TFLOP/s (h_q 64 / 128), the regular kernel at 365 / 413; the fixed
per-layer costs are 310 us (regular) and 299 us (sparse): at small batches both paths are bound
by the host, about equally. With these constants auto's picks on the sweep (64 rows, both calls)
cost 1.2 ms over the best choice in all, against 2.0 ms with the previous ones (fixed costs
90 / 154 us, 2.2 ns per row). Re-measure with ``python -m sparse_prefill.bench.backend`` when a
kernel changes.

Memory: the sparse path keeps per-forward state that grows with the chunk: the chunk cache's
combined rows (``num_tokens x ceil((entries + W) / 128) * 128`` int32 per ratio, entries =
topk for top-k layers, the longest request's complete entries for dense ones) and one workspace
per ratio (1 KiB per row). Where that would pass ``SPARSE_STATE_BYTES_LIMIT``, auto routes to the regular path,
whose transients are bounded per block of rows. (At 65536 tokens of 4 requests with 16384-token
prefixes and topk 1024 it is about 0.5 GiB.)

Override: ``SPARSE_PREFILL_PATH=auto|sparse|regular`` in the environment, or the backend's
``path`` argument; an explicit ``sparse``/``regular`` argument wins over the environment, and
``auto`` defers to it. Decode stays regular whatever is forced.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from sparse_prefill.backend.config import ModelConfig
from sparse_prefill.backend.layer_kinds import LayerKind
from sparse_prefill.backend.metadata import BatchMetadata
from sparse_prefill.ops.indices.plan import combined_width, swa_gather_lens

logger = logging.getLogger(__name__)

ENV_VAR = "SPARSE_PREFILL_PATH"
PATH_SETTINGS = ("auto", "sparse", "regular")
SPARSE = "sparse"
REGULAR = "regular"

# Auto takes the regular path where the sparse path's per-forward state would pass this.
SPARSE_STATE_BYTES_LIMIT = 8 << 30


@dataclass(frozen=True)
class PathCosts:
    """Measured constants of the cost model above (H200 figures, see the module docstring).

    Throughputs are given at h_q 64 and 128 and interpolated linearly in between; fewer heads
    than ``min_heads`` cost as much as ``min_heads`` (a head block is computed whole).
    """

    regular_tflops_h64: float = 364.5
    regular_tflops_h128: float = 413.4
    sparse_tflops_h64: float = 527.6
    sparse_tflops_h128: float = 587.4
    min_heads: int = 64
    dequant_ns_per_row: float = 1.805
    combine_ns_per_entry: float = 0.004096
    regular_fixed_us: float = 309.9  # per layer: the kernel + the index arithmetic's launches
    sparse_fixed_us: float = 298.9  # per layer: dequantize x2, combine, attention launches

    def tflops(self, path: str, num_heads: int) -> float:
        lo, hi = (
            (self.regular_tflops_h64, self.regular_tflops_h128)
            if path == REGULAR
            else (self.sparse_tflops_h64, self.sparse_tflops_h128)
        )
        h = min(max(num_heads, 64), 128)
        return lo + (hi - lo) * (h - 64) / 64


DEFAULT_COSTS = PathCosts()


@dataclass(frozen=True)
class LayerWork:
    """What one layer of a compress ratio costs each path for a batch (host arithmetic only).

    ``regular_kv``: kv entries the regular kernel scans, summed over queries (a top-k layer scans
    all ``topk`` picks, masked ones included); ``sparse_kv``: entries a combined row's
    ``topk_length`` covers (valid picks are compacted); ``workspace_rows``: rows dequantized per
    layer; ``combined_entries``: index entries combined per layer (top-k layers only).
    """

    ratio: int
    num_tokens: int
    num_heads: int
    regular_kv: int
    sparse_kv: int
    workspace_rows: int
    combined_entries: int


def _window_sum(positions: torch.Tensor, window: int) -> int:
    return int(torch.clamp(positions + 1, max=window).sum())


def workspace_rows(config: ModelConfig, metadata: BatchMetadata, ratio: int) -> int:
    """Rows of the sparse path's workspace for a ratio: every request's SWA gather and (ratio
    > 0) its complete compressed entries."""
    seq, ext = torch.tensor(metadata.seq_lens_host), torch.tensor(metadata.extend_lens_host)  # host copies
    rows = int(swa_gather_lens(seq, ext, config.window_size).sum())
    return rows + (sum(s // ratio for s in metadata.seq_lens_host) if ratio > 0 else 0)


def layer_work(config: ModelConfig, metadata: BatchMetadata, ratio: int) -> LayerWork:
    """The :class:`LayerWork` of a ratio-``ratio`` layer for ``metadata``'s batch."""
    w, topk = config.window_size, config.topk
    kind = config.kind_of(ratio)
    regular = sparse = 0
    for prefix, seq in zip(metadata.prefix_lens_host, metadata.seq_lens_host):
        pos = torch.arange(prefix, seq, dtype=torch.int64)
        win = _window_sum(pos, w)
        if kind is LayerKind.SWA:
            regular += win
            sparse += win
            continue
        visible = (pos + 1) // ratio
        if kind is LayerKind.TOPK:
            regular += win + topk * len(pos)
            sparse += win + int(torch.clamp(visible, max=topk).sum())
        else:
            regular += win + int(visible.sum())
            sparse += win + int(visible.sum())
    width = combined_width(topk, w)
    return LayerWork(
        ratio=ratio,
        num_tokens=metadata.num_tokens,
        num_heads=config.num_heads,
        regular_kv=regular,
        sparse_kv=sparse,
        workspace_rows=workspace_rows(config, metadata, ratio),
        combined_entries=metadata.num_tokens * width if kind is LayerKind.TOPK else 0,
    )


def sparse_state_bytes(config: ModelConfig, metadata: BatchMetadata) -> int:
    """Bytes the sparse path holds for a forward: every ratio's combined rows and lengths, plus
    every ratio's workspace (bf16, 1 KiB per row; one per ratio, so that shared caches are
    dequantized once per forward)."""
    n, w = metadata.num_tokens, config.window_size
    rows_bytes, ws_rows = 0, 0
    for ratio, kind in config.ratio_kinds.items():
        if kind is LayerKind.SWA:
            entries = 0
        elif kind is LayerKind.TOPK:
            entries = config.topk
        else:
            entries = max(s // ratio for s in metadata.seq_lens_host)
        rows_bytes += 4 * n * (combined_width(entries, w) + 1)
        ws_rows += workspace_rows(config, metadata, ratio)
    return rows_bytes + ws_rows * 2 * config.head_dim


def estimate_us(path: str, work: LayerWork, costs: PathCosts = DEFAULT_COSTS) -> float:
    """Estimated microseconds of one layer on ``path`` (the cost model of this module)."""
    heads = max(work.num_heads, costs.min_heads)
    kv = work.regular_kv if path == REGULAR else work.sparse_kv
    attn_us = 2 * kv * heads * 1024 / (costs.tflops(path, work.num_heads) * 1e12) * 1e6
    if path == REGULAR:
        return costs.regular_fixed_us + attn_us
    return (
        costs.sparse_fixed_us
        + attn_us
        + work.workspace_rows * costs.dequant_ns_per_row * 1e-3
        + work.combined_entries * costs.combine_ns_per_entry * 1e-3
    )


def path_setting(path: str = "auto") -> str:
    """The effective setting: ``path`` unless it is "auto", then ``$SPARSE_PREFILL_PATH`` (default auto)."""
    if path not in PATH_SETTINGS:
        raise ValueError(f"path must be one of {PATH_SETTINGS}, got {path!r}")
    if path != "auto":
        return path
    env = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if env not in PATH_SETTINGS:
        raise ValueError(f"environment variable {ENV_VAR} must be one of {PATH_SETTINGS}, got {env!r}")
    return env


def choose_path(
    setting: str,
    config: ModelConfig,
    metadata: BatchMetadata,
    ratio: int,
    costs: PathCosts = DEFAULT_COSTS,
) -> str:
    """"sparse" or "regular" for the ratio-``ratio`` layers of ``metadata``'s batch.

    ``setting`` is :func:`path_setting`'s result. Decode batches are always regular.
    """
    if metadata.is_decode:
        chosen, why = REGULAR, "decode batch"
    elif setting != "auto":
        chosen, why = setting, "forced"
    elif (state := sparse_state_bytes(config, metadata)) > SPARSE_STATE_BYTES_LIMIT:
        chosen, why = REGULAR, f"sparse state {state / 2**30:.1f} GiB > {SPARSE_STATE_BYTES_LIMIT / 2**30:.0f} GiB"
    else:
        work = layer_work(config, metadata, ratio)
        est = {p: estimate_us(p, work, costs) for p in (SPARSE, REGULAR)}
        chosen = SPARSE if est[SPARSE] < est[REGULAR] else REGULAR
        why = f"estimated sparse {est[SPARSE]:.1f} us vs regular {est[REGULAR]:.1f} us"
    if not torch.compiler.is_compiling():  # Dynamo cannot trace logging calls
        logger.debug(
            "sparse_prefill: ratio-%d layers of %r take the %s path (%s)", ratio, metadata, chosen, why
        )
    return chosen
