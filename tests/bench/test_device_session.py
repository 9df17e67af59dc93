"""The GPU session driver on CPU: the commands its knobs give, that everything they name exists,
``--dry-run`` running nothing, and a step's log, tail and time limit."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import time

import pytest

from sparse_prefill.bench import device_session as ds
from sparse_prefill.bench.common import NVLS_ENV

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def by_name(steps):
    return {s.name: s for s in steps}


def test_defaults_are_tests_then_bench():
    steps = by_name(ds.plan({}, python="py"))
    assert list(steps) == ["gpu", "versions", "tests", "bench"]
    tests = steps["tests"]
    assert tests.argv[-2:] == ("-k", "gluon") and "-x" in tests.argv and tests.argv[tests.argv.index("-m", 3) + 1] == "gpu"
    assert (tests.timeout_s, tests.log, tests.show) == (240, "/tmp/out/gpu_tests.log", 25)
    assert steps["bench"].argv == ("py", "-m", "sparse_prefill.bench.sparse_attn", "--op", "sparse", "--out", "/tmp/out")
    assert steps["bench"].timeout_s == 300


def test_knobs():
    env = dict(STEPS="suite backend8192 ncu tests bench", OUT="/o", XDIST="2", SUITE_PATHS="tests/ops tests/backend",
               SUITE_S="9", BACKEND_S="8", NCU_KERNELS="triton", NCU_ARGS="--h-q 128 BLOCK_N=32", TEST_K="fp8",
               TEST_S="7", BENCH_ARGS="--quick --d-qk 576", BENCH_S="6")
    steps = by_name(ds.plan(env, python="py"))
    assert list(steps) == ["gpu", "versions", "suite", "suite alone", "backend8192", "ncu triton", "tests", "bench"]
    suite, alone = steps["suite"], steps["suite alone"]
    assert suite.argv[-6:] == ("-m", "gpu and not alone", "-n", "2", "tests/ops", "tests/backend")
    assert (suite.timeout_s, suite.log) == (9, "/o/gpu_suite.log")
    assert alone.argv[-4:] == ("-m", "gpu and alone", "tests/ops", "tests/backend") and "-n" not in alone.argv
    assert (alone.timeout_s, alone.log) == (200, "/o/gpu_suite_alone.log")
    backend = steps["backend8192"]
    assert backend.argv[-4:] == ("--chunks", "8192", "--out", "/o/b8192") and backend.timeout_s == 8
    assert backend.log == "/o/b8192/backend.log"
    ncu = steps["ncu triton"]
    assert ncu.argv[0] == "ncu" and "regex:_sparse_attn_fwd_kernel" in ncu.argv and ncu.log == "/o/ncu_triton.txt"
    assert ncu.argv[-5:] == ("--kernel", "triton", "--h-q", "128", "BLOCK_N=32")
    assert "--page" not in ncu.argv  # NCU_FLAGS unset
    assert steps["tests"].argv[-1] == "fp8" and steps["tests"].timeout_s == 7
    assert steps["bench"].argv[-3:] == ("--quick", "--d-qk", "576") and steps["bench"].timeout_s == 6
    fixture = by_name(ds.plan(dict(STEPS="fixture chunkcache", XDIST="3", FIXTURE_S="5"), python="py"))
    assert fixture["fixture"].argv[-4:] == ("not gpu", "-n", "3", "tests") and fixture["fixture"].timeout_s == 5
    assert fixture["fixture"].argv[fixture["fixture"].argv.index("-m", 3) + 1] == "not gpu"
    assert fixture["fixture"].log == "/tmp/out/fixture_tests.log"
    assert fixture["chunkcache"].argv == ("py", "-m", "sparse_prefill.bench.chunk_cache_build", "--out", "/tmp/out")
    few = by_name(ds.plan(dict(STEPS="fewheads", FEWHEADS_S="4"), python="py"))["fewheads"]
    assert few.argv == ("py", "-m", "sparse_prefill.bench.few_heads", "--out", "/tmp/out") and few.timeout_s == 4
    # Empty knobs mean their defaults, as ${NAME:-default} does.
    assert by_name(ds.plan(dict(STEPS="", TEST_K=""), python="py"))["tests"].argv[-1] == "gluon"


def test_ncu_flags_go_to_ncu_itself():
    argv = by_name(ds.plan(dict(STEPS="ncu", NCU_KERNELS="gluon", NCU_FLAGS="--page source --print-source sass --csv"),
                           python="py"))["ncu gluon"].argv
    k = argv.index("-k")
    assert argv[k - 5 : k] == ("--page", "source", "--print-source", "sass", "--csv")
    assert argv.index("py") > k  # ncu's options, then the profiled command


@pytest.mark.parametrize("env, message", [
    (dict(STEPS="tests benhc"), "STEPS: unknown step 'benhc'"),
    (dict(STEPS="backend"), "STEPS: unknown step 'backend'"),
    (dict(STEPS="ncu", NCU_KERNELS="gluon cutlass"), "NCU_KERNELS: 'cutlass' is not one of"),
])
def test_unknown_steps_are_refused_before_anything_runs(env, message):
    with pytest.raises(ValueError, match=message):
        ds.plan(env)


def test_every_module_and_path_it_names_exists():
    env = dict(STEPS="tests bench backend8192 suite fixture chunkcache fewheads ncu", NCU_KERNELS=" ".join(ds.NCU_KERNEL_NAMES))
    for step in ds.plan(env, python="py"):
        argv = step.argv[step.argv.index("py"):] if "py" in step.argv else step.argv
        if argv[1] == "-m":
            assert importlib.util.find_spec(argv[2]) is not None, argv[2]
        for arg in argv:
            if arg.startswith("tests"):
                assert os.path.exists(os.path.join(REPO, arg)), arg


def test_children_get_flash_mla_and_multicast_off():
    env = ds.child_env({"PATH": "/bin", "PYTHONPATH": "elsewhere", "NCCL_NVLS_ENABLE": "1"})
    assert env["PATH"] == "/bin" and env["PYTHONPATH"] == ".:/tmp/fm" and env["PYTHONUNBUFFERED"] == "1"
    assert all(env[k] == v for k, v in NVLS_ENV.items())


def test_dry_run_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.setenv("STEPS", "tests backend8192")
    monkeypatch.setattr(ds, "run_step", lambda *a: pytest.fail("ran a step"))
    monkeypatch.setattr(ds, "unpack_flash_mla", lambda: pytest.fail("unpacked"))
    assert ds.main(["--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("unpack .anchors/flash_mla-*.tgz")
    assert out[3].startswith("tests [240 s]: ") and out[3].endswith(f"> {tmp_path}/out/gpu_tests.log")
    assert out[4].startswith("backend8192 [420 s]: ")
    assert not (tmp_path / "out").exists()


def test_step_logs_its_output_and_prints_the_tail(tmp_path, capsys):
    code = "import sys; [print(i) for i in range(10)]; print('err', file=sys.stderr); sys.exit(3)"
    step = ds.Step("x", (sys.executable, "-c", code), 60, str(tmp_path / "sub" / "x.log"), 2)
    assert ds.run_step(step, os.environ) == 3
    assert (tmp_path / "sub" / "x.log").read_text().splitlines() == [*map(str, range(10)), "err"]
    assert capsys.readouterr().out.splitlines() == ["9", "err"]
    summary = ds.Step("x", (sys.executable, "-c", code), 60, str(tmp_path / "x.log"), 2, re.compile("[37]"))
    ds.run_step(summary, os.environ)
    assert capsys.readouterr().out.splitlines() == ["3", "7"]


def test_step_out_of_time_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    step = ds.Step("x", (sys.executable, "-c", code), 1.5, str(tmp_path / "x.log"))
    assert ds.run_step(step, os.environ) is None
    child = int(pid_file.read_text())
    for _ in range(50):  # SIGTERM reached the grandchild too; give it a moment to exit
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the step's child outlived its time limit")


def test_a_missing_program_is_a_failed_step(tmp_path):
    assert ds.run_step(ds.Step("x", ("no-such-program-here",), 5, str(tmp_path / "x.log")), os.environ) == 127
