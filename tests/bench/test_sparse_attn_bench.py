"""bench.sparse_attn's interleaved timing (CPU: the timer is replaced)."""

from __future__ import annotations

import torch

from sparse_prefill.bench import sparse_attn


def test_alternating_us_rotates_rounds_and_takes_medians(monkeypatch):
    """Each round starts one function later, so each function follows a different one from
    round to round; each result is the median of its own rounds."""
    order = []
    times = {"a": iter([5.0, 1.0, 3.0]), "b": iter([2.0, 2.0, 9.0]), "c": iter([4.0, 7.0, 6.0])}
    monkeypatch.setattr(sparse_attn, "bench_us", lambda fn: fn())

    def timed(name):
        def fn():
            order.append(name)
            return next(times[name])
        return fn

    result = sparse_attn.alternating_us({name: timed(name) for name in "abc"}, rounds=3)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert result == {"a": 3.0, "b": 2.0, "c": 6.0}


def test_op_overhead_interleaves_every_way_and_refuses_without_cuda(monkeypatch, capsys):
    from sparse_prefill.bench import op_overhead

    calls = []
    for way, attr in [("do_bench", "bench_us"), ("back_to_back", "back_to_back_us"), ("host", "host_us")]:
        monkeypatch.setattr(op_overhead, attr, lambda fn, way=way, **kw: calls.append((way, fn())) or len(calls))
    result = op_overhead.measure_ways({"kernel": lambda: "k", "public op": lambda: "p"}, rounds=2)
    one_round = [(w, f) for w in op_overhead.WAYS for f in "kp"]
    assert calls == one_round * 2
    assert result["kernel"] == {"do_bench": 4.0, "back_to_back": 6.0, "host": 8.0}  # medians of rounds 1 and 2
    if not torch.cuda.is_available():
        assert op_overhead.main([]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
