"""TFLOP/s of our attention kernels next to FlashMLA's, from a benchmark results file.

One panel per shape, bars against ``s_kv``: the top row is ``sparse_attn_fwd`` on ANCHORS.md's
eight rows (d_qk, h_q, topk), ours next to FlashMLA's anchor figure and, when ``flash_mla``
was importable on the benchmark machine, ``flash_mla_sparse_fwd`` measured in the same run; the
bottom row is the regular path (``paged_fp8_sparse_attn_fwd``) on ANCHORS.md's second table,
next to FlashMLA's FP8 decode kernel and both ``sparse_fwd`` figures on a bf16 workspace.
Only default launches are plotted (``--config`` variants of the benchmark are left out).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

SPARSE_OP = "sparse_attn_fwd"
FP8_OP = "paged_fp8_sparse_attn_fwd"
ANCHOR_HEADS = (64, 128)  # FlashMLA's head counts: the rows ANCHORS.md measured

# (label, row key of a time in us or "tflops" for our figure, colour) per bar of a panel.
SERIES = {
    SPARSE_OP: (
        ("ours: sparse_attn_fwd", "tflops", "tab:blue"),
        ("FlashMLA sparse_fwd (ANCHORS.md, H100 figures)", "anchor_us", "tab:orange"),
        ("flash_mla_sparse_fwd, this run", "flash_mla_us", "tab:green"),
    ),
    FP8_OP: (
        ("ours: paged_fp8_sparse_attn_fwd (auto: the Gluon kernel on Hopper)", "tflops", "tab:blue"),
        ("ours: its Triton kernel (non-Hopper fallback)", "triton_us", "tab:purple"),
        ("FlashMLA FP8 decode, regular path (ANCHORS.md, H100)", "anchor_us", "tab:orange"),
        ("ours: sparse_attn_fwd on the bf16 workspace", "sparse_workspace_us", "tab:cyan"),
        ("FlashMLA sparse_fwd on the workspace (ANCHORS.md, H100)", "anchor_sparse_us", "tab:red"),
        ("flash_mla_sparse_fwd on the workspace, this run", "flash_mla_us", "tab:green"),
    ),
}


def load_rows(json_path: str | os.PathLike) -> tuple[list[dict], str]:
    """The sparse_attn benchmark's rows and the device they were measured on, from the
    ``results.json`` of ``sparse-prefill bench``, the ``sparse_attn.json`` of
    ``python -m sparse_prefill.bench.sparse_attn``, or the bare row list older runs wrote."""
    with open(json_path) as f:
        try:
            data = json.load(f)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{json_path}: not a JSON file ({e})") from None
    if isinstance(data, list):
        return _checked_rows(data, json_path), ""
    if not isinstance(data, dict):
        raise ValueError(f"{json_path}: expected a JSON object or a list of rows, got {type(data).__name__}")
    benchmarks = data.get("benchmarks", {})
    section = benchmarks.get("sparse_attn", data) if isinstance(benchmarks, dict) else data
    if not isinstance(section, dict) or "rows" not in section:
        raise ValueError(f"{json_path} holds no sparse_attn benchmark rows")
    device = data.get("device", "")
    return _checked_rows(section["rows"], json_path), device if isinstance(device, str) else ""


# What a plotted row must hold (the benchmark writes more).
ROW_KEYS = {"d_qk": int, "h_q": int, "topk": int, "s_kv": int, "us": (int, float),
            "tflops": (int, float)}


def _checked_rows(rows: object, json_path: str | os.PathLike) -> list[dict]:
    """``rows`` if it is a list of benchmark rows whose plotted ones have ``ROW_KEYS``; else a
    ValueError that names the file and the first bad row."""
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{json_path}: the rows must be a list of JSON objects")
    for i, r in enumerate(rows):
        if r.get("variant") or r.get("op") not in SERIES:
            continue  # not plotted
        for key, kind in ROW_KEYS.items():
            if isinstance(r.get(key), bool) or not isinstance(r.get(key), kind):
                raise ValueError(f"{json_path}: row {i} needs a number {key!r}, got {r.get(key)!r}")
    return rows


def _panels(rows: Sequence[dict]) -> dict[str, list[tuple[str, str, list[dict]]]]:
    """op -> [(title, x label, rows sorted by s_kv)] per shape."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("variant") or r.get("op") not in SERIES:
            continue
        if r["op"] == SPARSE_OP and r["h_q"] not in ANCHOR_HEADS:
            continue
        groups.setdefault((r["op"], r["d_qk"], r["h_q"], r["topk"]), []).append(r)
    panels: dict[str, list] = {}
    for (op, d_qk, h_q, topk), group in sorted(groups.items(), key=lambda kv: (kv[0][0] != SPARSE_OP, kv[0][1:])):
        if op == SPARSE_OP:
            title, xlabel = f"sparse_attn_fwd: d_qk {d_qk}, h_q {h_q}, topk {topk}", "s_kv"
        else:
            title = f"regular path: h_q {h_q}, topk {topk} + {group[0].get('extra_topk', 128)} window"
            xlabel = "compressed tokens"
        panels.setdefault(op, []).append((title, xlabel, sorted(group, key=lambda r: r["s_kv"])))
    return panels


def _tflops(row: dict, key: str) -> float | None:
    """TFLOP/s of the time ``row[key]`` on the row's FLOPs (``tflops * us`` of our time)."""
    if key == "tflops":
        return row["tflops"]
    us = row.get(key)
    return None if us is None else row["tflops"] * row["us"] / us


def plot_results(json_path: str | os.PathLike, png_path: str | os.PathLike) -> str:
    """Write the PNG of TFLOP/s per shape (module docstring) for a benchmark results file
    (see :func:`load_rows`); return ``png_path``.

    Raises ValueError when the file has no plottable row, ImportError without matplotlib
    (``pip install 'sparse_prefill[bench]'``).
    """
    rows, device = load_rows(json_path)
    return plot_rows(rows, device, png_path, source=str(json_path))


def plot_rows(rows: Sequence[dict], device: str, png_path: str | os.PathLike, *, source: str = "the rows") -> str:
    """:func:`plot_results` on the sparse_attn benchmark's ``rows`` measured on ``device``."""
    from matplotlib.figure import Figure

    panels = _panels(rows)
    if not panels:
        raise ValueError(f"{source} has no default-launch rows of {SPARSE_OP} or {FP8_OP} to plot")
    ncols = max(len(p) for p in panels.values())
    fig = Figure(figsize=(5.2 * ncols, 4.6 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), ncols, squeeze=False)
    top = 0.0
    for axes_row, (op, op_panels) in zip(axes, panels.items()):
        for ax in axes_row[len(op_panels):]:
            ax.set_visible(False)
        for ax, (title, xlabel, group) in zip(axes_row, op_panels):
            series = [(label, [_tflops(r, key) for r in group], colour) for label, key, colour in SERIES[op]]
            series = [s for s in series if any(v is not None for v in s[1])]
            width = 0.8 / len(series)
            for i, (label, values, colour) in enumerate(series):
                xs = [x + (i - (len(series) - 1) / 2) * width for x, v in enumerate(values) if v is not None]
                heights = [v for v in values if v is not None]
                bars = ax.bar(xs, heights, width, label=label, color=colour)
                ax.bar_label(bars, fmt="%.0f", fontsize=7)
                top = max([top, *heights])
            ax.set_xticks(range(len(group)), [f"{r['s_kv'] // 1024}K" for r in group])
            ax.set_xlabel(xlabel)
            ax.set_ylabel("TFLOP/s")
            ax.set_title(title, fontsize=10)
        axes_row[0].legend(fontsize=7, loc="upper left")
    for ax in axes.flat:
        ax.set_ylim(0, 1.6 * top)  # one scale for every panel, headroom for the legend
    where = f" ({device})" if device else ""
    fig.suptitle(f"Attention TFLOP/s, s_q 4096, FLOPs counted as FlashMLA does; ours{where} vs FlashMLA")
    fig.savefig(png_path, dpi=100)
    return str(png_path)
