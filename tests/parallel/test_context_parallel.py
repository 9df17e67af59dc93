"""Context parallelism over gloo (2 and 4 spawned CPU processes) equals one process bit for bit:
the caches after the K exchange, the sharded and the gathered outputs, for mixed batches, every
ratio (a 0, 4, 128 layer stack) and both paths; plus the partition and sub-batch helpers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sparse_prefill.backend import ForwardMode, LayerCaches, make_synthetic_batch
from sparse_prefill.backend import routing
from sparse_prefill.parallel import (
    ContextParallelPrefill,
    HeadParallelPrefill,
    new_entries,
    new_slots,
    partition_rows,
    row_costs,
    shard_metadata,
)
from tests.parallel.cases import D, MIXED, Case, assert_bitwise, build, new_entry_slots, single_process
from tests.parallel.harness import requires_gloo, run_ranks

DECODE = Case(prefix=(5, 140, 300, 0, 77, 9), extend=(1,) * 6, mode=ForwardMode.DECODE, seed=3)
# Fewer rows than 4 ranks: some rank owns none.
TINY = Case(prefix=(300, 2), extend=(2, 1), seed=4)


def _metadata(case: Case):
    batch = make_synthetic_batch(
        case.config, case.prefix, case.extend, seed=case.seed, forward_mode=case.mode, layers=()
    )
    return batch.metadata


def routing_split_case(world: int) -> Case:
    """MIXED on the "auto" path, with costs under which the whole batch routes its SWA-only layer
    to the sparse path while some rank's rows alone would route it to the regular one."""
    base = Case(*MIXED, seed=5)
    costs = routing.PathCosts(
        regular_tflops_h64=1e-3, regular_tflops_h128=1e-3, dequant_ns_per_row=0.0, combine_ns_per_entry=0.0,
        regular_fixed_us=0.0, sparse_fixed_us=0.0,
    )
    md, cfg = _metadata(base), base.config

    def gap(m):  # regular minus sparse without fixed costs: sparse wins iff its fixed cost is below
        w = routing.layer_work(cfg, m, 0)
        return routing.estimate_us(routing.REGULAR, w, costs) - routing.estimate_us(routing.SPARSE, w, costs)

    shards = [shard_metadata(md, a, b) for a, b in partition_rows(cfg, md, world)]
    fixed = (gap(md) + min(gap(m) for m in shards)) / 2
    case = dataclasses.replace(base, costs=dataclasses.replace(costs, sparse_fixed_us=fixed))
    chosen = [routing.choose_path("auto", cfg, m, 0, case.costs) for m in (md, *shards)]
    assert chosen[0] == routing.SPARSE and routing.REGULAR in chosen[1:], chosen
    return case


def _clone(caches: LayerCaches) -> LayerCaches:
    return LayerCaches(*(None if t is None else t.clone() for t in caches))


def cp_worker(rank: int, world: int, cases: list[Case], truths: list[dict] | None) -> None:
    """Run every case context-parallel and compare with ``truths`` (None: each rank computes
    them itself, which keeps large GPU tensors out of the spawn arguments)."""
    for i, case in enumerate(cases):
        truth = single_process(case) if truths is None else truths[i]
        batch, new_k = build(case)
        md, cfg = batch.metadata, case.config
        n, h = md.num_tokens, cfg.num_heads
        cp = ContextParallelPrefill(case.backend())
        cp.begin_forward(md)
        assert cp.row_ranges == partition_rows(cfg, md, world)
        a, b = cp.rows
        assert cp.row_ranges[rank] == (a, b)
        caches = [_clone(c) for c in batch.caches]
        for layer, ratio in enumerate(cfg.compress_ratios):
            tag = f"{case.path} {case.mode.value} rank {rank}/{world} layer {layer} (ratio {ratio})"
            k, ck = new_k[layer]
            kv_bytes = cp.stats.kv_bytes
            if ratio > 0:
                ea, eb = cp.entry_rows(ratio)
                cp.store_kv(layer, caches[layer], k[a:b], ck[ea:eb])
            else:
                cp.store_kv(layer, caches[layer], k[a:b])
            new_rows = n + (0 if ck is None else ck.shape[0])
            assert cp.stats.kv_bytes - kv_bytes == new_rows * D * 2
            for name, got, want in zip(("swa", "compressed"), caches[layer], truth["caches"][layer]):
                if want is not None:
                    assert_bitwise(f"{tag} caches.{name}", got, want)

            _, q, _, topk, sink = batch.layer_inputs(layer)
            topk = None if topk is None else topk[a:b]
            if layer == 0:  # gathering adds only a broadcast: one sharded call suffices
                shard = cp.forward(layer, q[a:b], caches[layer], topk, sink, gather=False)
                assert (shard.start, shard.stop) == (a, b)
                assert_bitwise(f"{tag} sharded out", shard.out, truth["out"][layer][a:b])
            out = torch.full((n, h, D), float("nan"), dtype=torch.bfloat16, device=md.device)  # poison
            assert cp.forward(layer, q[a:b], caches[layer], topk, sink, out=out) is out
            assert_bitwise(f"{tag} gathered out", out, truth["out"][layer])
        assert cp.stats.out_bytes == cfg.num_layers * n * h * D * 2


@requires_gloo
@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_equals_one_process(world):
    cases = [
        Case(*MIXED, path="sparse", seed=1),
        Case(*MIXED, path="regular", seed=2),
        # DeepSeek-V4.1's kinds: ratio-1/2 top-k layers see (and store) every new token / pair.
        Case(*MIXED, path="sparse", ratios=(0, 1, 2, 128), seed=6),
        Case(*MIXED, path="regular", ratios=(0, 1, 2, 128), seed=7),
        routing_split_case(world),
        DECODE,
        TINY,
    ]
    run_ranks(cp_worker, world, cases, [single_process(c) for c in cases])


# Larger shapes (the model's window and top-k, thousands of rows) on the Triton kernels: two
# ranks share the one GPU through gloo, which broadcasts CUDA tensors.
GPU_CASE = Case(
    prefix=(0, 3000, 700), extend=(2500, 1100, 300), num_heads=64, window=128, topk=512, page_size=64,
    device="cuda",
)


@requires_gloo
@pytest.mark.gpu
@pytest.mark.alone
def test_context_parallel_equals_one_process_gpu():
    cases = [dataclasses.replace(GPU_CASE, path=p) for p in ("sparse", "regular")]
    run_ranks(cp_worker, 2, cases, None)


def errors_worker(rank: int, world: int) -> None:
    import torch.distributed as dist

    case = Case(*MIXED)
    batch, new_k = build(case)
    md = batch.metadata
    cp = ContextParallelPrefill(case.backend())
    cp.begin_forward(md)
    a, b = cp.rows
    _, q, caches, topk, sink = batch.layer_inputs(1)
    with pytest.raises(ValueError, match="q must have shape"):
        cp.forward(1, q, caches, topk, sink)  # all rows, not this rank's
    with pytest.raises(ValueError, match="topk_indices must have shape"):
        cp.forward(1, q[a:b], caches, topk, sink)
    with pytest.raises(ValueError, match=r"compressed_k is for ratio > 0 layers; layer 0 has ratio 0 \(SWA only\)"):
        cp.store_kv(0, batch.caches[0], new_k[0][0][a:b], new_k[1][1])
    with pytest.raises(ValueError, match="compressed_k must have shape"):
        cp.store_kv(1, batch.caches[1], new_k[1][0][a:b], new_k[1][1])
    with pytest.raises(ValueError, match="layer must be in"):
        cp.forward(7, q[a:b], caches, topk[a:b], sink)
    with pytest.raises(ValueError, match="no layer uses compress ratio 64"):
        cp.entry_rows(64)

    # Ranks passing different batches: every rank raises (no rank is left waiting).
    other = Case(prefix=(0,), extend=(9 + rank,))
    with pytest.raises(ValueError, match="metadata: the ranks of group hold different batches"):
        ContextParallelPrefill(other.backend()).begin_forward(_metadata(other))

    # A group this rank is not in. new_group is collective: every rank calls it.
    only_0 = dist.new_group([0])
    if rank != 0:
        with pytest.raises(ValueError, match="group: this process .* is not a member"):
            ContextParallelPrefill(case.backend(), only_0)
        with pytest.raises(ValueError, match="group: this process .* is not a member"):
            HeadParallelPrefill(case.backend(), only_0)
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        ContextParallelPrefill(case.backend(), "world")

    # Heads not divisible by the group's size.
    odd = Case(*MIXED, num_heads=world + 1)
    with pytest.raises(ValueError, match=f"h_q .*= {world + 1}.* divisible by the group's size {world}"):
        HeadParallelPrefill(odd.backend())


@requires_gloo
def test_errors_name_the_argument():
    run_ranks(errors_worker, 2)


def test_without_process_group_is_a_value_error():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    backend = Case(*MIXED).backend()
    with pytest.raises(ValueError, match="group: torch.distributed is not initialized"):
        ContextParallelPrefill(backend)
    with pytest.raises(ValueError, match="group: torch.distributed is not initialized"):
        HeadParallelPrefill(backend)
    with pytest.raises(TypeError, match="backend must be a SparsePrefillBackend"):
        ContextParallelPrefill(backend.config)


# -- partition and sub-batch (no processes) -------------------------------------------------------


def test_row_costs_count_the_keys_each_row_reaches():
    case = Case(prefix=(0, 130, 1000), extend=(40, 5, 3), ratios=(0, 1, 2, 4, 4, 128))
    cfg, md = case.config, _metadata(case)
    want = []
    for p0, s in zip(md.prefix_lens_host, md.seq_lens_host):
        for p in range(p0, s):
            window = len(range(max(0, p - cfg.window_size + 1), p + 1))
            c1, c2, c4 = (min(len(range((p + 1) // r)), cfg.topk) for r in (1, 2, 4))
            c128 = len(range((p + 1) // 128))
            want.append(window + (window + c1) + (window + c2) + (window + c4) * 2 + window + c128)
    got = row_costs(cfg, md)
    assert got.dtype == torch.int64 and got.tolist() == want


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("lengths", [MIXED, ((0,), (600,)), ((0, 0, 0), (1, 1, 2)), (DECODE.prefix, DECODE.extend)])
def test_partition_rows_is_contiguous_and_balanced(world, lengths):
    case = Case(*lengths)
    cfg, md = case.config, _metadata(case)
    ranges = partition_rows(cfg, md, world)
    assert len(ranges) == world and ranges[0][0] == 0 and ranges[-1][1] == md.num_tokens
    assert all(a <= b for a, b in ranges) and all(ranges[i][1] == ranges[i + 1][0] for i in range(world - 1))
    # Each boundary is the row whose cost prefix is nearest its share of the total.
    before = torch.cat([torch.zeros(1, dtype=torch.int64), row_costs(cfg, md).cumsum(0)]).tolist()
    total = before[-1]
    for k, (_, bound) in enumerate(ranges[:-1], start=1):
        target = total * k // world
        assert all(abs(before[bound] - target) <= abs(x - target) for x in before), (k, bound)


def test_partition_rows_gives_cheap_early_rows_to_one_rank():
    # One request from position 0: its first rows reach few keys, so rank 0 takes more rows.
    case = Case(prefix=(0,), extend=(2000,))
    ranges = partition_rows(case.config, _metadata(case), 4)
    sizes = [b - a for a, b in ranges]
    assert sizes[0] > sizes[-1] and sum(sizes) == 2000


def test_partition_rows_checks_world_size():
    case = Case(*MIXED)
    md = _metadata(case)
    with pytest.raises(ValueError, match=r"world_size must be in \[1, 65536\], got 0"):
        partition_rows(case.config, md, 0)
    with pytest.raises(TypeError, match="world_size must be an int"):
        partition_rows(case.config, md, 2.0)


@pytest.mark.parametrize("anchor", [False, True])
def test_shard_metadata_keeps_absolute_positions(anchor):
    case = Case(*MIXED)
    md = _metadata(case)
    for a, b in [(0, md.num_tokens), (10, 40), (37, 57), (100, 107), (56, 57)]:
        sub = shard_metadata(md, a, b, anchor=anchor)
        rows = b - a
        assert sub.num_tokens == rows + anchor and sub.forward_mode == md.forward_mode
        assert torch.equal(sub.query_pos[:rows], md.query_pos[a:b])
        # Each row reads its own request's tables.
        assert torch.equal(sub.swa_token_table[sub.query_req[:rows]], md.swa_token_table[md.query_req[a:b]])
        for ratio, t in sub.compressed_token_tables.items():
            assert torch.equal(t[sub.query_req[:rows]], md.compressed_token_tables[ratio][md.query_req[a:b]])
        if anchor:
            assert sub.max_seq_len == md.max_seq_len and int(sub.query_pos[-1]) == md.max_seq_len - 1
    with pytest.raises(ValueError, match="stop must be in"):
        shard_metadata(md, 5, 5)
    with pytest.raises(ValueError, match="stop must be in"):
        shard_metadata(md, 0, md.num_tokens + 1)
    with pytest.raises(ValueError, match="start must be in"):
        shard_metadata(md, -1, 3)


def test_new_entries_and_slots_are_those_the_chunk_completes():
    case = Case(prefix=(0, 130, 5, 300, 127, 3), extend=(37, 20, 141, 9, 1, 1), ratios=(0, 1, 2, 4, 128))
    md = _metadata(case)
    for ratio in (1, 2, 4, 128):
        rows, reqs, entries = new_entries(md, ratio)
        assert rows.dtype == reqs.dtype == entries.dtype == torch.int64
        table = md.compressed_token_tables[ratio]
        got = [(r, int(table[q, j])) for r, q, j in zip(rows.tolist(), reqs.tolist(), entries.tolist())]
        assert got == new_entry_slots(md, ratio) and len(got) > 0
        slots = new_slots(md, ratio)
        assert slots.dtype == torch.int32 and slots.tolist() == [s for _, s in got]
    rows = zip(md.query_req.tolist(), md.query_pos.tolist())
    assert new_slots(md, 0).tolist() == [int(md.swa_token_table[q, p]) for q, p in rows]
    with pytest.raises(ValueError, match="no layer uses compress ratio 64"):
        new_slots(md, 64)
