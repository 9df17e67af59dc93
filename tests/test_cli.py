"""The ``sparse-prefill`` CLI: demo, check and bench's refusal in a subprocess on CPU (as a user
runs them), help and usage errors, bench's output files with stand-in benchmarks (the real ones
need a GPU), and the plot of a fabricated results file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch

from sparse_prefill import cli
from sparse_prefill.bench import check as check_module
from sparse_prefill.bench.check import Round
from sparse_prefill.bench.common import BenchResult
from sparse_prefill.bench.plot import plot_results
from sparse_prefill.bench.sparse_attn import FP8_ROWS, S_Q, SPARSE_ROWS

HAS_CUDA = torch.cuda.is_available()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, interpreter: bool | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m sparse_prefill ARGS`` in a subprocess; ``interpreter=False`` removes
    TRITON_INTERPRET from its environment (conftest sets it for this process on CPU)."""
    env = dict(os.environ)
    if interpreter is False:
        env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "sparse_prefill", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# The commands, as a user runs them


def test_demo_prints_path_error_and_time_per_layer():
    proc = run_cli("demo")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "ops:" in out and "batch:" in out and "routing (auto" in out
    # "layer ratio | auto picks ms max|err| | other path ms max|err| | check", one row per layer.
    row = re.compile(r"^\s*(\d+)\s+(0|1|2|4|128) \| (sparse|regular)\s+([\d.]+)\s+([\d.e+-]+) \| "
                     r"(sparse|regular)\s+([\d.]+)\s+([\d.e+-]+) \| ok$", re.M)
    rows = row.findall(out)
    assert [int(r[0]) for r in rows] == list(range(8)), out
    assert {r[1] for r in rows} == {"0", "1", "2", "4", "128"}  # every DeepSeek-V4.1 layer kind
    for _, _, pick, ms, err, other, other_ms, other_err in rows:
        assert {pick, other} == {"sparse", "regular"}
        assert float(ms) > 0 and float(other_ms) > 0
        assert 0 <= float(err) < 1e-2 and 0 <= float(other_err) < 1e-2
    assert "PASS" in out and re.search(r"demo took [\d.]+ s", out)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter re-run happens only without CUDA")
def test_check_reruns_itself_under_the_interpreter_and_passes():
    # Without TRITON_INTERPRET the kernels cannot run on CPU in this process: exit 0 means the
    # command re-ran itself with it.
    proc = run_cli("check", "--seconds", "5", interpreter=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for op in check_module.OPS:
        line = re.search(rf"^{op}\s+(\d+) rounds\s+ok\s+worst: .+$", proc.stdout, re.M)
        assert line and int(line.group(1)) >= 1, proc.stdout
    assert re.search(r"^PASS: (\d+) of \1 rounds match", proc.stdout, re.M), proc.stdout


@pytest.mark.skipif(HAS_CUDA, reason="bench runs on a GPU")
def test_bench_refuses_without_cuda(tmp_path):
    out = tmp_path / "results"
    proc = run_cli("bench", "--out", str(out))
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr and "nothing was measured" in proc.stderr
    assert not out.exists()


def test_top_level_help():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("demo", "check", "bench", "plot", "Exit codes"):
        assert command in proc.stdout


# ---------------------------------------------------------------------------------------------
# Help and usage errors (in process: the parser is the same)


@pytest.mark.parametrize("command", ["demo", "check", "bench", "plot"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: sparse-prefill {command}")
    assert "Exit codes" in text


@pytest.mark.parametrize("argv, message", [
    (["bench", "--only", "nope"], "expected names from sparse_attn, cache, indices, backend"),
    (["check", "--seconds", "0"], "must be > 0"),
    (["check", "--seconds", "inf"], "must be > 0 and at most 86400"),
    (["check", "--seconds", "1e308"], "must be > 0 and at most 86400"),
    (["check", "--seconds", "nan"], "must be > 0 and at most 86400"),
    (["check", "--seed", str(2**70)], "must be in [0, 2**63"),
    (["demo", "--seed", str(2**70)], "must be in [0, 2**63"),
    (["demo", "--seed", "-1"], "must be in [0, 2**63"),
    (["demo", "--seed", "1.5"], "expected an integer seed"),
    (["check", "--seconds", "soon"], "expected a number of seconds"),
    (["check", "--only", "cache,bogus"], "expected names from cache, indices"),
    (["demo", "--device", "tpu"], "invalid choice"),
    ([], "required: COMMAND"),
])
def test_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_impossible_requests_exit_2(tmp_path, capsys):
    assert cli.main(["demo", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert cli.main(["plot", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": {"sparse_attn": {"rows": []}}}))
    assert cli.main(["plot", str(empty)]) == 2
    assert "no default-launch rows" in capsys.readouterr().err


def test_version(capsys):
    import sparse_prefill

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"sparse-prefill {sparse_prefill.__version__}"


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a JSON file"),
    ("\"rows\"", "expected a JSON object or a list of rows, got str"),
    (json.dumps({"rows": [1, 2]}), "the rows must be a list of JSON objects"),
    (json.dumps({"benchmarks": {"sparse_attn": {"rows": "x"}}}), "the rows must be a list of JSON objects"),
    (json.dumps({"benchmarks": []}), "holds no sparse_attn benchmark rows"),
    (json.dumps([{"op": "sparse_attn_fwd", "d_qk": 512, "h_q": 64, "topk": 512, "s_kv": "8K"}]), "row 0 needs a number 's_kv'"),
])
def test_plot_bad_results_file_exits_2_with_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "results.json"
    path.write_text(content)
    assert cli.main(["plot", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(path) in err and message in err, err
    assert not (tmp_path / "results.png").exists()


def test_plot_bad_paths_exit_2_with_one_line(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(fabricated_rows()))
    missing_dir = tmp_path / "nowhere" / "plot.png"
    cases = [
        (["plot", str(tmp_path)], f"{tmp_path}: is a directory"),
        (["plot", str(results), "--png", str(missing_dir)], f"the directory {missing_dir.parent} does not exist"),
        (["plot", str(results), "--png", str(tmp_path)], f"{tmp_path}: is a directory; --png takes a file"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err


# ---------------------------------------------------------------------------------------------
# check's failure path (stand-in ops)


def test_check_exits_1_on_a_mismatch_or_an_error(monkeypatch, capsys):
    def mismatch(rng, device, sizes):
        rnd = Round("a case")
        rnd.compare("out", torch.ones(3), torch.tensor([1.0, 2.0, float("nan")]), check_module.OUT_TOL)
        return rnd

    def raises(rng, device, sizes):
        raise RuntimeError("kernel crashed")

    def fine(rng, device, sizes):
        rnd = Round("fine")
        rnd.count("bits", torch.arange(4), torch.arange(4))
        return rnd

    ops = {"bad": ("a mismatch", mismatch), "boom": ("an error", raises), "good": ("fine", fine)}
    monkeypatch.setattr(check_module, "OPS", ops)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # run in this process
    monkeypatch.setattr(cli, "_interpreter_rerun", lambda argv: None)
    assert cli.main(["check", "--seconds", "0.05", "--seed", "7"]) == 1
    out = capsys.readouterr().out
    assert "FAIL bad round seed 7: a case" in out and "NaN at different places" in out
    assert "FAIL boom round seed 8: (raised)" in out and "RuntimeError: kernel crashed" in out
    assert re.search(r"^good\s+\d+ rounds\s+ok\s+worst: bits 0\b", out, re.M)
    assert re.search(r"^bad\s+(\d+) rounds\s+FAILED \1\b", out, re.M)
    assert out.rstrip().splitlines()[-1].startswith("FAIL: ")


# ---------------------------------------------------------------------------------------------
# bench's composition and output files (stand-in benchmarks; the real ones need a GPU)


def fabricated_rows() -> list[dict]:
    """sparse_attn benchmark rows as the GPU run writes them (ours at half FlashMLA's speed),
    plus a tuning variant and a TP row, which the plot leaves out."""
    rows = []
    for d_qk, h_q, topk, s_kv, anchor_us in SPARSE_ROWS:
        us = 2 * anchor_us
        rows.append(dict(op="sparse_attn_fwd", variant={}, d_qk=d_qk, h_q=h_q, topk=topk, s_kv=s_kv, s_q=S_Q,
                         us=us, tflops=2 * S_Q * topk * h_q * (d_qk + 512) / us / 1e6, anchor_us=anchor_us,
                         flash_mla_us=None))
    rows.append(dict(rows[0], variant={"BLOCK_N": 32}))
    rows.append(dict(rows[0], h_q=16))
    for h_q, topk, tokens, regular_us, sparse_us in FP8_ROWS:
        tflops = 2 * S_Q * (topk + 128) * h_q * 1024 / regular_us / 1e6
        rows.append(dict(op="paged_fp8_sparse_attn_fwd", variant={}, d_qk=512, h_q=h_q, topk=topk, extra_topk=128,
                         s_kv=tokens, s_q=S_Q, us=regular_us, tflops=tflops, anchor_us=regular_us,
                         sparse_workspace_us=sparse_us, anchor_sparse_us=sparse_us, flash_mla_us=sparse_us))
    return rows


def assert_png(path) -> None:
    data = open(path, "rb").read()
    assert len(data) > 10_000 and data.startswith(PNG_MAGIC)


def test_plot_results_writes_a_png(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"device": "H100 (fabricated)",
                                   "benchmarks": {"sparse_attn": {"rows": fabricated_rows()}}}))
    assert plot_results(results, tmp_path / "plot.png") == str(tmp_path / "plot.png")
    assert_png(tmp_path / "plot.png")
    # The row list older runs of the benchmark wrote plots too; the CLI defaults next to it.
    bare = tmp_path / "old" / "sparse_attn.json"
    bare.parent.mkdir()
    bare.write_text(json.dumps(fabricated_rows()))
    assert cli.main(["plot", str(bare)]) == 0
    assert_png(tmp_path / "old" / "results.png")


def test_bench_writes_results_and_plot_and_keeps_going_after_a_failure(tmp_path, monkeypatch, capsys):
    calls = []

    def stand_in(name):
        def run(*, quick, progress):
            calls.append((name, quick))
            progress.section(name, 1)
            progress.step("only row")
            if name == "cache":
                raise RuntimeError("out of memory")
            rows = fabricated_rows() if name == "sparse_attn" else [{"x": 1}]
            return BenchResult(name, f"{name} title", f"| {name} | table |", rows, {"extra": name})
        return types.SimpleNamespace(run=run)

    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli, "load", stand_in)
    info = dict(device="H100 (stand-in)", torch="t", triton="tr", flash_mla=None, date="2026-01-01")
    monkeypatch.setattr(cli, "machine", lambda: dict(info))
    out = tmp_path / "bench"
    assert cli.main(["bench", "--quick", "--out", str(out)]) == 1  # cache failed
    assert calls == [("sparse_attn", True), ("cache", True), ("indices", True), ("backend", True)]
    captured = capsys.readouterr()
    assert "benchmark cache failed: RuntimeError: out of memory" in captured.err
    assert "## sparse_attn title" in captured.out and "| backend | table |" in captured.out

    data = json.loads((out / "results.json").read_text())
    assert data["failed"] == ["cache"] and data["quick"] is True and data["device"] == "H100 (stand-in)"
    assert list(data["benchmarks"]) == ["sparse_attn", "indices", "backend"]
    assert data["benchmarks"]["indices"] == {"title": "indices title", "rows": [{"x": 1}], "extra": "indices"}
    md = (out / "results.md").read_text()
    assert md.startswith("# sparse_prefill benchmarks") and "![TFLOP/s against FlashMLA](results.png)" in md
    assert md.index("## sparse_attn title") < md.index("## indices title") < md.index("## backend title")
    assert_png(out / "results.png")

    # --only: just those, in the CLI's order; no sparse_attn rows, no plot.
    calls.clear()
    assert cli.main(["bench", "--only", "backend,indices", "--out", str(tmp_path / "two")]) == 0
    assert calls == [("indices", False), ("backend", False)]
    assert not (tmp_path / "two" / "results.png").exists()
    assert "![" not in (tmp_path / "two" / "results.md").read_text()
