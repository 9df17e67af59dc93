"""What the benchmarks share: their result type, timing, a progress bar, markdown tables, output
files and a description of the machine."""

from __future__ import annotations

import cProfile
import datetime
import io
import json
import math
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

import torch
import triton

from sparse_prefill.ops import flashmla_impl, kernel_choice

# NVLink multicast off in NCCL, torch and NVSHMEM: on the shared GPU hosts a program that uses it
# can take the host's GPUs out of service. Set before any process group or child process exists.
NVLS_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class BenchResult:
    """One benchmark's outcome.

    name:     the benchmark (``sparse_prefill.bench.BENCHMARKS``).
    title:    one line saying what was measured.
    markdown: the tables (``###`` headings at most), ready to print.
    rows:     one dict per measured row (JSON-able).
    extra:    anything else worth keeping (JSON-able), written next to ``rows``.
    """

    name: str
    title: str
    markdown: str
    rows: list[dict]
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """``title``, ``rows`` and the ``extra`` keys, as one JSON-able dict."""
        return dict(title=self.title, rows=self.rows, **self.extra)


def host_us(fn: Callable[[], object], calls: int) -> float:
    """Host time per call of ``fn`` over ``calls`` back-to-back calls (after a warm-up call),
    with no sync inside the timed loop: what its Python, dispatch and launches cost, whatever
    the GPU does."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return elapsed / calls * 1e6


def host_profile(fn: Callable[[], object], calls: int, lines: int) -> str:
    """``cProfile`` of ``calls`` calls of ``fn`` (after a warm-up call): the ``lines`` functions
    with the most time of their own, as pstats prints them."""
    fn()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).strip_dirs().sort_stats("tottime").print_stats(lines)
    return text.getvalue().strip()


def median_us(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median microseconds of ``fn``: ``triton.testing.do_bench`` (``warmup`` / ``rep`` in ms)
    on CUDA; elsewhere (smoke runs of the scripts) one warm-up call and two timed ones."""
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3
    fn()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def import_flash_mla():
    """The ``flash_mla`` module when it imports (FlashMLA's columns are optional), else None."""
    try:
        import flash_mla
    except ImportError:
        return None
    return flash_mla


def own_attn_impl(device: torch.device, h_q: int, d_qk: int = 512) -> str:
    """The ``impl`` to time this library's own attention kernels with (as "ours"): "auto" where
    its choice is always ours, else (``flash_mla`` runs here and ``kernel_choice.AUTO_PREFERS``
    names it for ``h_q`` / ``d_qk``) the kernel "auto" takes among ours, by name. The same value
    serves ``paged_fp8_sparse_attn_fwd`` (whose "auto" is never FlashMLA's): there it is the
    Gluon kernel exactly where its own "auto" is."""
    shape = {"h_q": h_q, "d_qk": d_qk}
    if kernel_choice.auto_prefers(kernel_choice.SPARSE_ATTN, shape) is None or flashmla_impl.device_reason(device):
        return "auto"
    return kernel_choice.first_taker(kernel_choice.SPARSE_ATTN, device, shape, ours_only=True)


def machine() -> dict:
    """Device, library versions and date, for the head of every results file."""
    flash_mla = import_flash_mla()
    return dict(
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        torch=torch.__version__,
        triton=triton.__version__,
        flash_mla=getattr(flash_mla, "__version__", "imported") if flash_mla else None,
        date=datetime.date.today().isoformat(),
    )


def describe_machine(info: dict) -> str:
    """One line naming the device, versions and date of a :func:`machine` dict."""
    flash = f"flash_mla {info['flash_mla']}" if info["flash_mla"] else "flash_mla not importable"
    return f"{info['device']}, torch {info['torch']}, Triton {info['triton']}, {flash}, {info['date']}"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Lines of a markdown table (cells formatted with ``str``)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in cells) + " |" for cells in rows]
    return lines


def write_outputs(out_dir: str, stem: str, markdown: str, data: object) -> list[str]:
    """Write ``out_dir/stem.md`` and ``out_dir/stem.json`` (creating the folder); return the paths.

    JSON keys that are not strings (e.g. compress ratios) become strings; values JSON cannot
    hold are written with ``str``."""
    os.makedirs(out_dir, exist_ok=True)
    md_path = os.path.join(out_dir, f"{stem}.md")
    with open(md_path, "w") as f:
        f.write(markdown.rstrip("\n") + "\n")
    return [md_path, write_json(out_dir, stem, data)]


def write_json(out_dir: str, stem: str, data: object) -> str:
    """Write ``out_dir/stem.json`` (creating the folder) as :func:`write_outputs` does; return its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stem}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    return path


def require_cuda(what: str) -> str | None:
    """None when a CUDA device is present, else the message to print before exiting 2."""
    if torch.cuda.is_available():
        return None
    return f"{what} needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured"


def refuse_without_cuda(what: str) -> bool:
    """True, after saying why on stderr, when there is no CUDA GPU (the caller exits 2)."""
    why = require_cuda(what)
    if why is not None:
        print(why, file=sys.stderr)
    return why is not None


class Progress:
    """A one-line text progress bar on ``stream`` (stderr by default): redrawn in place on a
    terminal; elsewhere (a log) one line per step, and at most one per ``LOG_EVERY_S`` seconds
    for other updates. ``enabled=False`` is silent.

    Use ``section(name, total)`` then ``step(label)`` before each of the ``total`` items, or
    ``update(fraction, label)`` directly; ``clear()`` before printing anything else. ``prefix``
    goes before the section's name (e.g. which of several sections this is).
    """

    WIDTH = 24
    LOG_EVERY_S = 10.0

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.name, self.total, self.done, self.prefix = "", 0, 0, ""
        self._shown = False
        self._logged = -math.inf

    def section(self, name: str, total: int) -> None:
        self.name, self.total, self.done = name, max(total, 1), 0

    def step(self, label: str) -> None:
        """Item ``done + 1`` of the section starts."""
        self.done += 1
        self.update((self.done - 1) / self.total, f"{self.done}/{self.total} {label}", force=True)

    def update(self, fraction: float, label: str, *, force: bool = False) -> None:
        if not self.enabled:
            return
        filled = round(self.WIDTH * min(max(fraction, 0.0), 1.0))
        line = f"{self.prefix}{self.name} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {label}"
        if self.tty:
            try:
                columns = os.get_terminal_size(self.stream.fileno()).columns
            except OSError:
                columns = 0
            self.stream.write("\r\033[K" + line[: (columns or 80) - 1])  # one line, or it scrolls
            self._shown = True
        elif force or time.monotonic() - self._logged >= self.LOG_EVERY_S:
            self.stream.write(line + "\n")
            self._logged = time.monotonic()
        self.stream.flush()

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False


SILENT = Progress(enabled=False)


def document(title: str, info: dict, sections: Sequence[tuple[str, str]], preamble: str = "") -> str:
    """A markdown document: ``# title``, the machine, ``preamble``, then ``## heading`` + body
    per section."""
    parts = [f"# {title}", describe_machine(info)] + ([preamble] if preamble else [])
    parts += [f"## {heading}\n\n{body.strip()}" for heading, body in sections]
    return "\n\n".join(parts) + "\n"


def fmt(value: float | None, spec: str = ".0f") -> str:
    """A table cell: ``value`` formatted with ``spec``, or "-" for None (not measured)."""
    return "-" if value is None else format(value, spec)


def bench_main(out_dir: str | None, measure: Callable[[Progress], BenchResult], refusal: str | None = None) -> int:
    """What a benchmark module's own ``main`` does after parsing its arguments; returns the exit
    code. With a ``refusal`` (e.g. :func:`require_cuda`'s): print it on stderr, measure nothing,
    return 2. Otherwise ``measure(progress)`` with a progress bar on stderr, print the result's
    document, and with ``out_dir`` write ``<name>.md`` / ``<name>.json`` there; return 0."""
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    progress = Progress()
    result = measure(progress)
    progress.clear()
    info = machine()
    text = document(result.title, info, [("Results", result.markdown)])
    print(text)
    if out_dir:
        write_outputs(out_dir, result.name, text, dict(info, **result.to_json()))
    return 0
