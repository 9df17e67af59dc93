"""One call on the GPU machine: FlashMLA from ``.anchors/`` (carried), then the steps named in
``STEPS``, each under a time limit so that a hung kernel cannot eat the lease.

    STEPS="tests bench" python3 -m sparse_prefill.bench.device_session [--dry-run]

Steps (default ``tests bench``), each writing its whole output under ``$OUT`` (default
``/tmp/out``) and printing its last lines:

* ``tests``: ``pytest -x -m gpu tests/ops/test_sparse_attn.py -k $TEST_K`` (default ``gluon``),
  ``$TEST_S`` seconds (240); ``OUT/gpu_tests.log``.
* ``bench``: ``sparse_prefill.bench.sparse_attn --op sparse --out $OUT $BENCH_ARGS``, ``$BENCH_S``
  seconds (300); ``OUT/bench.log``.
* ``backend<chunks>`` (e.g. ``backend8192``): ``sparse_prefill.bench.backend --chunks <chunks>``
  into ``OUT/b<chunks>``, ``$BACKEND_S`` seconds (420); ``OUT/b<chunks>/backend.log``.
* ``suite``: ``pytest -n $XDIST -m "gpu and not alone" $SUITE_PATHS`` (defaults 8, ``tests``),
  ``$SUITE_S`` seconds (500), ``OUT/gpu_suite.log``; then the tests marked ``alone`` (most of the
  GPU's memory, or spawned processes: under xdist they ran out of memory) one at a time,
  ``pytest -m "gpu and alone" $SUITE_PATHS``, ``$ALONE_S`` seconds (200), ``OUT/gpu_suite_alone.log``.
* ``fixture``: the device-fixture pass, the tests that are not marked ``gpu`` (they take the
  ``device`` fixture, i.e. run the kernels on CUDA here): ``pytest -n $XDIST -m "not gpu"
  $SUITE_PATHS``, ``$FIXTURE_S`` seconds (400); ``OUT/fixture_tests.log``.
* ``chunkcache``: ``sparse_prefill.bench.chunk_cache_build --out $OUT``, ``$CHUNKCACHE_S`` seconds
  (200); ``OUT/chunk_cache_build.log``.
* ``fewheads``: ``sparse_prefill.bench.few_heads --out $OUT`` (every few-head variant beside
  FlashMLA padded to 64 heads and the gather floor), ``$FEWHEADS_S`` seconds (300);
  ``OUT/few_heads.log``.
* ``overhead``: ``sparse_prefill.bench.op_overhead --out $OUT`` (the public ``sparse_attn_fwd``
  against its kernel's launch, timed three ways), ``$OVERHEAD_S`` seconds (200);
  ``OUT/op_overhead.log``.
* ``ncu``: per kernel of ``$NCU_KERNELS`` (default ``gluon flash_mla``), Nsight Compute on the
  second launch of ``sparse_prefill.bench.profile_sparse_attn --kernel K $NCU_ARGS``, 200 s
  each; ``OUT/ncu_K.txt``, of which the stall, throughput and hit-rate lines are printed.
  ``$NCU_FLAGS`` go to ``ncu`` itself (e.g. ``--page source --print-source sass`` for stall
  samples per instruction).

Children get ``PYTHONPATH=.:/tmp/fm`` (FlashMLA unpacked there), unbuffered output and NVLink
multicast off. ``--dry-run`` prints what would run and runs nothing. Exit code 1 when a step
failed or ran out of time (the later steps still run), 2 for an unknown step.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass

from sparse_prefill.bench.common import NVLS_ENV

FLASH_MLA_DIR = "/tmp/fm"
NCU_S = 200
NCU_SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "WarpStateStats", "SchedulerStats", "SourceCounters")
# The kernel each --kernel of profile_sparse_attn launches (what ncu's -k filter matches).
NCU_KERNEL_NAMES = {
    "gluon": "_sparse_attn_(ws|few_heads)_kernel",  # the 64-head kernel, or the few-head one at h_q <= 16
    "triton": "_sparse_attn_fwd_kernel",
    "flash_mla": "sparse_attn_fwd_kernel",
}
NCU_SUMMARY = re.compile(r"Duration|Throughput|Stall|Warp Cycles|Hit Rate|Issued|Eligible|Bank")


@dataclass(frozen=True)
class Step:
    """One command, ``name``: ``argv`` under ``timeout_s`` seconds, its output into ``log`` (None:
    straight to stdout), then ``show`` lines of the log printed: the last ones, or with
    ``summary`` the first that match it."""

    name: str
    argv: tuple[str, ...]
    timeout_s: float
    log: str | None = None
    show: int = 0
    summary: re.Pattern | None = None


def knob(env: Mapping[str, str], name: str, default: str) -> str:
    """``env[name]``, or ``default`` when unset or empty (as the shell's ``${NAME:-default}``)."""
    return env.get(name) or default


def plan(env: Mapping[str, str], python: str = sys.executable) -> list[Step]:
    """The commands one session runs for the knobs in ``env`` (``STEPS`` and the rest, see the
    module docstring). ValueError names an unknown step."""
    out = knob(env, "OUT", "/tmp/out")
    steps = [
        Step("gpu", ("nvidia-smi", "--query-gpu=name,clocks.sm,clocks.mem,temperature.gpu", "--format=csv,noheader"), 60),
        Step("versions", (python, "-c", "from sparse_prefill.bench.common import describe_machine, machine; "
                                        "print(describe_machine(machine()))"), 120),
    ]
    pytest_any = (python, "-m", "pytest", "-q", "-p", "no:cacheprovider")
    pytest = (*pytest_any, "-m", "gpu")
    paths = tuple(shlex.split(knob(env, "SUITE_PATHS", "tests")))
    suite_args = ("-n", knob(env, "XDIST", "8"), *paths)
    for name in knob(env, "STEPS", "tests bench").split():
        if name == "tests":
            argv = (*pytest, "-x", "tests/ops/test_sparse_attn.py", "-k", knob(env, "TEST_K", "gluon"))
            steps.append(Step(name, argv, float(knob(env, "TEST_S", "240")), f"{out}/gpu_tests.log", 25))
        elif name == "bench":
            argv = (python, "-m", "sparse_prefill.bench.sparse_attn", "--op", "sparse", "--out", out,
                    *shlex.split(knob(env, "BENCH_ARGS", "")))
            steps.append(Step(name, argv, float(knob(env, "BENCH_S", "300")), f"{out}/bench.log", 40))
        elif name.startswith("backend") and name[len("backend"):]:
            chunks = name[len("backend"):]
            argv = (python, "-m", "sparse_prefill.bench.backend", "--chunks", chunks, "--out", f"{out}/b{chunks}")
            steps.append(Step(name, argv, float(knob(env, "BACKEND_S", "420")), f"{out}/b{chunks}/backend.log", 45))
        elif name == "suite":
            argv = (*pytest_any, "-m", "gpu and not alone", *suite_args)
            steps.append(Step(name, argv, float(knob(env, "SUITE_S", "500")), f"{out}/gpu_suite.log", 30))
            argv = (*pytest_any, "-m", "gpu and alone", *paths)
            steps.append(Step("suite alone", argv, float(knob(env, "ALONE_S", "200")), f"{out}/gpu_suite_alone.log", 20))
        elif name == "fixture":
            argv = (*pytest_any, "-m", "not gpu", *suite_args)
            steps.append(Step(name, argv, float(knob(env, "FIXTURE_S", "400")), f"{out}/fixture_tests.log", 30))
        elif name == "chunkcache":
            argv = (python, "-m", "sparse_prefill.bench.chunk_cache_build", "--out", out)
            steps.append(Step(name, argv, float(knob(env, "CHUNKCACHE_S", "200")), f"{out}/chunk_cache_build.log", 30))
        elif name == "fewheads":
            argv = (python, "-m", "sparse_prefill.bench.few_heads", "--out", out)
            steps.append(Step(name, argv, float(knob(env, "FEWHEADS_S", "300")), f"{out}/few_heads.log", 40))
        elif name == "overhead":
            argv = (python, "-m", "sparse_prefill.bench.op_overhead", "--out", out)
            steps.append(Step(name, argv, float(knob(env, "OVERHEAD_S", "200")), f"{out}/op_overhead.log", 20))
        elif name == "ncu":
            for kernel in knob(env, "NCU_KERNELS", "gluon flash_mla").split():
                if kernel not in NCU_KERNEL_NAMES:
                    raise ValueError(f"NCU_KERNELS: {kernel!r} is not one of {tuple(NCU_KERNEL_NAMES)}")
                sections = [a for s in NCU_SECTIONS for a in ("--section", s)]
                argv = ("ncu", "--clock-control", "none", *sections, *shlex.split(knob(env, "NCU_FLAGS", "")),
                        "-k", f"regex:{NCU_KERNEL_NAMES[kernel]}", "--launch-skip", "1", "--launch-count", "1",
                        python, "-m", "sparse_prefill.bench.profile_sparse_attn", "--kernel", kernel,
                        *shlex.split(knob(env, "NCU_ARGS", "")))
                steps.append(Step(f"ncu {kernel}", argv, NCU_S, f"{out}/ncu_{kernel}.txt", 40, NCU_SUMMARY))
        else:
            raise ValueError(f"STEPS: unknown step {name!r}; expected tests, bench, ncu, suite, fixture, chunkcache, fewheads, overhead or backend<chunks>")
    return steps


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with FlashMLA and the work tree on the path, unbuffered output and NVLink
    multicast off (set before any child imports torch)."""
    return {**env, "PYTHONPATH": f".:{FLASH_MLA_DIR}", "PYTHONUNBUFFERED": "1", **NVLS_ENV}


def unpack_flash_mla() -> None:
    """Unpack the carried FlashMLA build(s) into ``FLASH_MLA_DIR`` (its columns are optional:
    without one, say so and go on)."""
    archives = sorted(glob.glob(".anchors/flash_mla-*.tgz"))
    if not archives:
        print("no .anchors/flash_mla-*.tgz: FlashMLA will not import", flush=True)
    os.makedirs(FLASH_MLA_DIR, exist_ok=True)
    for path in archives:
        with tarfile.open(path) as tar:
            tar.extractall(FLASH_MLA_DIR, filter="data")


def run_step(step: Step, env: Mapping[str, str]) -> int | None:
    """Run ``step``; its exit code (127: no such program), or None when it ran out of time (its
    whole process group is then killed, as ``timeout`` does, so that no pytest worker outlives it)."""
    log = None
    if step.log:
        os.makedirs(os.path.dirname(step.log), exist_ok=True)
        log = open(step.log, "w")  # written as it runs: a session cut short keeps what it printed
    try:
        try:
            proc = subprocess.Popen(step.argv, env=env, stdout=log, stderr=subprocess.STDOUT if log else None,
                                    start_new_session=True)
        except FileNotFoundError as e:
            print(e, file=log or sys.stdout, flush=True)
            return 127
        try:
            rc = proc.wait(timeout=step.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            rc = None
    finally:
        if log:
            log.close()
    if step.log and step.show:
        with open(step.log, errors="replace") as f:
            lines = f.read().splitlines()
        shown = [ln for ln in lines if step.summary.search(ln)][: step.show] if step.summary else lines[-step.show:]
        print("\n".join(shown), flush=True)
    return rc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    try:
        steps = plan(os.environ)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"unpack .anchors/flash_mla-*.tgz into {FLASH_MLA_DIR}")
        for step in steps:
            print(f"{step.name} [{step.timeout_s:g} s]: {shlex.join(step.argv)}" + (f" > {step.log}" if step.log else ""))
        return 0
    unpack_flash_mla()
    env = child_env(os.environ)
    failed = False
    for step in steps:
        start = time.monotonic()
        rc = run_step(step, env)
        failed |= rc != 0
        status = f"ran out of its {step.timeout_s:g} s" if rc is None else f"exit {rc}"
        print(f"== {step.name}: {status} after {time.monotonic() - start:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
