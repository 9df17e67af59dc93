"""The ``sparse-prefill`` command (also ``python -m sparse_prefill``).

    sparse-prefill demo                 a synthetic DeepSeek-V4 prefill through the backend, checked
    sparse-prefill check [--seconds N]  randomized sweep of every op against its reference
    sparse-prefill bench [--out DIR]    GPU benchmarks next to FlashMLA's figures, with a plot
    sparse-prefill plot RESULTS.json    the plot of an earlier bench run

Exit codes: 0 success, 1 a check failed (or a benchmark raised), 2 a usage error or a request
this machine cannot serve (e.g. ``bench`` without a CUDA GPU).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch

from sparse_prefill import __version__
from sparse_prefill.bench import BENCHMARKS, load
from sparse_prefill.bench.check import OPS as CHECK_OPS
from sparse_prefill.bench.check import run_check
from sparse_prefill.bench.common import Progress, describe_machine, document, machine, write_outputs
from sparse_prefill.bench.demo import CPU_SHAPE, GPU_SHAPE, STACK, DemoShape, run_demo
from sparse_prefill.bench.plot import plot_results, plot_rows

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PLOT_NAME = "results.png"
MAX_SECONDS = 86400.0  # check's budget: a day at most (inf or 1e308 would never end)
MAX_SEED = 2**63 - 1  # torch.manual_seed takes seeds below 2**64; check adds its round number


class UsageError(Exception):
    """A request that cannot be served here: printed, exit code 2."""


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be > 0 and at most {MAX_SECONDS:g} (a day), got {text}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value <= MAX_SEED - 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63 - 2**32 - 1], got {text}")
    return value


def _names(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse type: a comma-separated subset of ``choices``."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names or any(n not in choices for n in names):
            raise argparse.ArgumentTypeError(f"expected names from {', '.join(choices)}, got {text!r}")
        return names

    return parse


def _describe(shape: DemoShape) -> str:
    return f"h_q {shape.num_heads}, topk {shape.topk}, {sum(shape.extend_lens)} query tokens"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available here (torch.cuda.is_available() is False)")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------
# demo


def cmd_demo(args: argparse.Namespace) -> int:
    device = _device(args.device)
    start = time.perf_counter()
    ok = run_demo(device, seed=args.seed)
    print(f"demo took {time.perf_counter() - start:.1f} s")
    return EXIT_OK if ok else EXIT_FAILED


# ---------------------------------------------------------------------------------------------
# check


def _interpreter_rerun(argv: Sequence[str]) -> int | None:
    """Without CUDA the kernels can only run under Triton's interpreter. ``triton.jit`` reads
    ``TRITON_INTERPRET`` when a kernel is decorated, i.e. when ``sparse_prefill`` is imported,
    which has already happened (this module is part of it): setting the variable now would be
    too late. So the command runs again in a fresh interpreter with ``TRITON_INTERPRET=1``;
    returns its exit code, or None when this process can run the kernels itself."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.call([sys.executable, "-m", "sparse_prefill", *argv], env=env)


def cmd_check(args: argparse.Namespace) -> int:
    return EXIT_OK if run_check(args.seconds, seed=args.seed, ops=args.only) else EXIT_FAILED


# ---------------------------------------------------------------------------------------------
# bench and plot


def _write_plot(make: Callable[[], str]) -> bool:
    """Run ``make`` (writes a PNG); on failure say why on stderr and return False."""
    try:
        make()
        return True
    except ImportError:
        print("no plot: matplotlib is not installed (pip install 'sparse_prefill[bench]'); plot later with "
              "`sparse-prefill plot DIR/results.json`", file=sys.stderr)
    except ValueError as e:
        print(f"no plot: {e}", file=sys.stderr)
    return False


def cmd_bench(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if not torch.cuda.is_available():
        raise UsageError("needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured. "
                         "On CPU, `sparse-prefill demo` and `sparse-prefill check` run.")
    names = [n for n in BENCHMARKS if n in (args.only or BENCHMARKS)]
    info = dict(machine(), command="sparse-prefill " + " ".join(argv), quick=args.quick)
    print(describe_machine(info) + "\n", flush=True)
    progress = Progress()
    results, failed, written, plotted = {}, [], [], False
    for i, name in enumerate(names):
        progress.prefix = f"({i + 1}/{len(names)}) "
        try:
            result = load(name).run(quick=args.quick, progress=progress)
        except Exception as e:  # one failing benchmark (e.g. out of memory) does not lose the others
            progress.clear()
            print(f"benchmark {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(name)
            continue
        finally:
            torch.cuda.empty_cache()
        progress.clear()
        print(f"## {result.title}\n\n{result.markdown}\n", flush=True)
        results[name] = result
        if not args.out:
            continue
        png = os.path.join(args.out, PLOT_NAME)
        if name == "sparse_attn":
            os.makedirs(args.out, exist_ok=True)
            plotted = _write_plot(lambda: plot_rows(result.rows, info["device"], png))
        # After every benchmark, so that a run cut short keeps what it measured.
        preamble = f"`{info['command']}`" + (f"\n\n![TFLOP/s against FlashMLA]({PLOT_NAME})" if plotted else "")
        text = document("sparse_prefill benchmarks", info, [(r.title, r.markdown) for r in results.values()], preamble)
        data = dict(info, failed=failed, benchmarks={n: r.to_json() for n, r in results.items()})
        written = write_outputs(args.out, "results", text, data) + ([png] if plotted else [])
    if written:
        print("wrote " + ", ".join(written), file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    if os.path.isdir(args.results):
        raise UsageError(f"{args.results}: is a directory; give the results.json file in it")
    if not os.path.isfile(args.results):
        raise UsageError(f"{args.results}: no such file")
    png = args.png or os.path.join(os.path.dirname(args.results), PLOT_NAME)
    folder = os.path.dirname(png) or "."
    if not os.path.isdir(folder):
        raise UsageError(f"{png}: the directory {folder} does not exist")
    if os.path.isdir(png):
        raise UsageError(f"{png}: is a directory; --png takes a file name")
    try:
        if not _write_plot(lambda: plot_results(args.results, png)):
            return EXIT_USAGE
    except OSError as e:  # unreadable results, unwritable PNG
        raise UsageError(f"{e.filename or png}: {e.strerror or e}") from None
    print(f"wrote {png}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="sparse-prefill", formatter_class=raw,
        description="DeepSeek-V4 sparse-attention prefill over a paged FP8 KV cache: demo, "
                    "correctness sweep and GPU benchmarks.",
        epilog="Exit codes: 0 success, 1 a check failed (or a benchmark raised), 2 a usage error or a "
               "request this machine cannot serve.\nRun `sparse-prefill COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"sparse-prefill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo", formatter_class=raw, help="a synthetic DeepSeek-V4 prefill through the backend, checked",
        description=f"Run a synthetic DeepSeek-V4 prefill ({len(CPU_SHAPE.extend_lens)} requests with cached "
                    f"prefixes, layers of compress\nratios {STACK}) through SparsePrefillBackend with auto "
                    "routing, then each layer\nagain through the other path. Prints the path auto picks per "
                    "layer, each layer's time\nand its error against the float32 reference "
                    "(naive_layer_forward).\n\n"
                    f"On a CUDA GPU: Triton kernels, {_describe(GPU_SHAPE)}.\n"
                    f"On CPU: the ops' PyTorch reference implementations, {_describe(CPU_SHAPE)} (seconds).",
        epilog="Exit codes: 0 every layer matches, 1 a mismatch, 2 --device cuda without a GPU.",
    )
    demo.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                      help="where to run (default: cuda when available, else cpu)")
    demo.add_argument("--seed", type=_seed, default=0, help="seed of the synthetic batch (default 0)")

    check = sub.add_parser(
        "check", formatter_class=raw, help="randomized correctness sweep of every op against its reference",
        description="Draw random shapes and inputs (invalid indices, empty inputs, odd sizes included) for\n"
                    "every op, run the Triton kernel and the PyTorch reference on them and compare: store /\n"
                    "dequantize and the index ops bit for bit, attention under FlashMLA's tolerances. Rounds\n"
                    "go to the ops in turn until --seconds have passed (each op gets at least one round).\n"
                    "Prints one line per op: rounds, worst error, and each failing case with its seed.\n\n"
                    "Without a CUDA GPU the kernels run under Triton's interpreter on small shapes: the\n"
                    "command then re-runs itself with TRITON_INTERPRET=1, which must be set before\n"
                    "sparse_prefill is imported.",
        epilog="Exit codes: 0 all rounds match, 1 a mismatch (or a kernel error), 2 bad arguments.",
    )
    check.add_argument("--seconds", type=_positive, default=30.0, help="time budget, at most a day (default 30)")
    check.add_argument("--seed", type=_seed, default=0, help="base seed; round i of the sweep uses seed + i")
    check.add_argument("--only", metavar="OP[,OP...]", type=_names(tuple(CHECK_OPS)),
                       help="ops to check (default all): " + ", ".join(CHECK_OPS))

    bench = sub.add_parser(
        "bench", formatter_class=raw, help="GPU benchmarks of the ops and the backend, next to FlashMLA",
        description="Benchmark on a CUDA GPU, printing a markdown table per benchmark (progress on stderr):\n"
                    "  sparse_attn  sparse_attn_fwd and the FP8 regular path on ANCHORS.md's rows, ratio to\n"
                    "               FlashMLA (and flash_mla measured here when it imports)\n"
                    "  cache        store / dequantize throughput against the device copy bandwidth\n"
                    "  indices      the chunk cache build and a ratio-4 layer's index recombine\n"
                    "  backend      both paths of the backend, routing, the original SGLang pipeline\n"
                    "--out DIR writes DIR/results.md, DIR/results.json and DIR/results.png (TFLOP/s against\n"
                    "s_kv per shape, ours next to FlashMLA's; needs matplotlib). More knobs per benchmark:\n"
                    "python -m sparse_prefill.bench.NAME --help.",
        epilog="Exit codes: 0 done, 1 a benchmark raised (the others still run), 2 no CUDA GPU or bad arguments.",
    )
    bench.add_argument("--out", metavar="DIR", help="write results.md, results.json and results.png here")
    bench.add_argument("--quick", action="store_true", help="a few rows per benchmark (minutes less)")
    bench.add_argument("--only", metavar="NAME[,NAME...]", type=_names(BENCHMARKS),
                       help="benchmarks to run (default all): " + ", ".join(BENCHMARKS))

    plot = sub.add_parser(
        "plot", help="plot the results.json of an earlier bench run",
        description="Write the TFLOP/s plot of a results.json (sparse-prefill bench --out) or sparse_attn.json "
                    "(python -m sparse_prefill.bench.sparse_attn --out). Needs matplotlib.",
        epilog="Exit codes: 0 written, 2 no such file, nothing to plot or no matplotlib.",
    )
    plot.add_argument("results", help="the results.json to plot")
    plot.add_argument("--png", help=f"where to write the PNG (default: {PLOT_NAME} next to the results)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sparse-prefill ARGV`` (default ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check":
            rerun = _interpreter_rerun(argv)
            if rerun is not None:
                return rerun
            return cmd_check(args)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "bench":
            return cmd_bench(args, argv)
        return cmd_plot(args)
    except UsageError as e:
        print(f"sparse-prefill {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
