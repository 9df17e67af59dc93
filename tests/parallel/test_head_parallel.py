"""Head parallelism over gloo (2 and 4 spawned CPU processes) equals one process bit for bit:
each rank's heads (given all heads or only its own) and the outputs gathered along heads, for
mixed batches, every ratio (a 0, 4, 128 layer stack) and both paths."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sparse_prefill.backend import ForwardMode
from sparse_prefill.parallel import HeadParallelPrefill
from tests.parallel.cases import D, MIXED, Case, assert_bitwise, build, single_process
from tests.parallel.harness import requires_gloo, run_ranks


def hp_worker(rank: int, world: int, cases: list[Case], truths: list[dict] | None) -> None:
    """Run every case head-parallel and compare with ``truths`` (None: computed per rank)."""
    for i, case in enumerate(cases):
        truth = single_process(case, store=False) if truths is None else truths[i]
        batch, _ = build(case)
        md, cfg = batch.metadata, case.config
        n, h_q, h_loc = md.num_tokens, cfg.num_heads, cfg.num_heads // world
        hp = HeadParallelPrefill(case.backend())
        assert hp.heads == slice(rank * h_loc, (rank + 1) * h_loc) and hp.local_config.num_heads == h_loc
        for layer, ratio in enumerate(cfg.compress_ratios):
            tag = f"{case.path} {case.mode.value} rank {rank}/{world} layer {layer} (ratio {ratio})"
            _, q, caches, topk, sink = batch.layer_inputs(layer)
            want = truth["out"][layer]
            if layer % 2 == 0:
                # All heads in: the rank takes its slice (a strided view of q).
                got = hp.forward(layer, q, caches, topk, sink, metadata=md)
            else:
                # Only its heads in (what a tensor-parallel engine holds), into a poisoned buffer.
                got = torch.full((n, h_loc, D), float("nan"), dtype=torch.bfloat16, device=md.device)
                hp.forward(layer, q[:, hp.heads].contiguous(), caches, topk, sink[hp.heads].clone(), out=got)
            assert_bitwise(f"{tag} own heads", got, want[:, hp.heads])
            out = torch.full((n, h_q, D), float("nan"), dtype=torch.bfloat16, device=md.device)
            assert hp.forward(layer, q, caches, topk, sink, gather=True, out=out) is out
            assert_bitwise(f"{tag} gathered", out, want)
        assert hp.stats.out_bytes == cfg.num_layers * n * h_q * D * 2
        with pytest.raises(ValueError, match="q must have shape"):
            hp.forward(0, q[:, : h_loc + 1], caches, None, sink)
        with pytest.raises(ValueError, match="attn_sink must have shape"):
            hp.forward(0, q, caches, None, sink[:-1])


@requires_gloo
@pytest.mark.parametrize("world", [2, 4])
def test_head_parallel_equals_one_process(world):
    # 16 heads: 8 or 4 per rank.
    cases = [
        Case(*MIXED, num_heads=16, path="sparse", seed=1),
        Case(*MIXED, num_heads=16, path="regular", seed=2),
        Case(prefix=(5, 140, 300, 0), extend=(1,) * 4, num_heads=16, mode=ForwardMode.DECODE, seed=3),
    ]
    run_ranks(hp_worker, world, cases, [single_process(c, store=False) for c in cases])


@requires_gloo
@pytest.mark.gpu
@pytest.mark.alone
def test_head_parallel_equals_one_process_gpu():
    # 128 heads, 64 per rank: the kernels' head block is 64 either way.
    base = Case(
        prefix=(0, 3000, 700), extend=(2500, 1100, 300), num_heads=128, window=128, topk=512, page_size=64,
        device="cuda",
    )
    run_ranks(hp_worker, 2, [dataclasses.replace(base, path=p) for p in ("sparse", "regular")], None)
