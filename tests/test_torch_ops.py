"""The ops as registered torch ops: schemas, fake implementations (opcheck, meta tensors),
``torch.compile(fullgraph=True)`` of each op and of a backend layer stack, and where value checks
run (host, device, under compile)."""

import pytest
import torch

import sparse_prefill._utils as utils
from sparse_prefill import (
    ModelConfig,
    SparsePrefillBackend,
    build_swa_token_ids,
    build_workspace_plan,
    combine_topk_swa_indices,
    dequantize_k_cache_paged,
    make_synthetic_batch,
    paged_fp8_sparse_attn_fwd,
    sparse_attn_fwd,
    store_k_cache,
    value_checks,
)

CFG = ModelConfig(num_heads=4, compress_ratios=(0, 4, 128, 4), topk=16, window_size=8, swa_page_size=4,
                  compressed_page_size={4: 3, 128: 2})
W, SM_SCALE = CFG.window_size, CFG.sm_scale

# op name -> the arguments it writes
MUTATED = {
    "store_k_cache": {"cache"},
    "dequantize_k_cache_paged": {"out"},
    "build_swa_token_ids": set(),
    "build_workspace_plan": set(),
    "combine_topk_swa_indices": {"out_indices", "out_lens"},
    "sparse_attn_fwd": {"out", "max_logits", "lse"},
    "paged_fp8_sparse_attn_fwd": {"out", "max_logits", "lse"},
}


@pytest.fixture
def batch():
    return make_synthetic_batch(CFG, [0, 40], [20, 9], seed=int(torch.randint(1 << 30, ())))


def public_calls(b):
    """op name -> (function of tensors calling the public op, its tensor arguments): random
    inputs built from a synthetic batch, the results of one op feeding the next."""
    md, n = b.metadata, b.metadata.num_tokens
    swa_cache, c4_cache = b.caches[1]
    c4_page, swa_page = CFG.page_size_of(4), CFG.swa_page_size
    swa = build_swa_token_ids(md.seq_lens, md.extend_lens, md.swa_token_table, W)
    total = swa.token_ids.shape[0]
    plan = build_workspace_plan(md.seq_lens, swa, 4, md.compressed_token_tables[4])
    num_compressed = plan.num_compressed_rows
    topk = b.topk_indices[1]
    indices, lens = combine_topk_swa_indices(topk, md.query_start_loc, md.query_pos, md.seq_lens, swa.gather_lens,
                                             plan.compressed_base, plan.swa_base, W, 4, CFG.topk)
    kv = torch.cat([dequantize_k_cache_paged(c4_cache, plan.compressed_token_ids, c4_page),
                    dequantize_k_cache_paged(swa_cache, plan.swa_token_ids, swa_page)])
    capacity = swa_cache.shape[0] * swa_page
    ids = torch.randint(-1, capacity, (n,), dtype=torch.int32)
    c4_ids = torch.randint(-1, c4_cache.shape[0] * c4_page, (n, 24), dtype=torch.int32)
    swa_ids = torch.randint(-1, capacity, (n, W), dtype=torch.int32)
    q, sink = b.q[1], b.attn_sink[1]

    def store(cache, k, slots):
        cache = cache.clone()
        store_k_cache(cache, k, slots, swa_page)
        return cache

    def swa_ids_of(seq_lens, extend_lens, table):
        return tuple(build_swa_token_ids(seq_lens, extend_lens, table, W, total=total))

    def plan_of(seq_lens, token_ids, first_pos, gather_lens, offsets, table):
        p = build_workspace_plan(seq_lens, type(swa)(token_ids, first_pos, gather_lens, offsets), 4, table,
                                 num_compressed=num_compressed)
        return p.compressed_token_ids, p.compressed_base, p.swa_base

    def combine(topk, *vectors):
        return combine_topk_swa_indices(topk, *vectors, W, 4, CFG.topk)

    def attend(q, kv, indices, sink, lens):
        return sparse_attn_fwd(q, kv, indices[:, None], SM_SCALE, 512, sink, lens)

    def attend_fp8(q, cache, ids, extra_cache, extra_ids, sink, extra_lens):
        return paged_fp8_sparse_attn_fwd(q, cache, ids, c4_page, SM_SCALE, extra_cache=extra_cache,
                                         extra_indices=extra_ids, extra_page_size=swa_page, attn_sink=sink,
                                         extra_topk_length=extra_lens)

    k = torch.randn(n, 512).to(torch.bfloat16)
    slots = torch.randperm(capacity)[:n].to(torch.int32)
    slots[0] = -1
    extra_lens = torch.randint(0, W + 1, (n,), dtype=torch.int32)
    return {
        "store_k_cache": (store, (swa_cache, k, slots)),
        "dequantize_k_cache_paged": (lambda cache, ids: dequantize_k_cache_paged(cache, ids, swa_page), (swa_cache, ids)),
        "build_swa_token_ids": (swa_ids_of, (md.seq_lens, md.extend_lens, md.swa_token_table)),
        "build_workspace_plan": (plan_of, (md.seq_lens, *swa, md.compressed_token_tables[4])),
        "combine_topk_swa_indices": (combine, (topk, md.query_start_loc, md.query_pos, md.seq_lens,
                                               swa.gather_lens, plan.compressed_base, plan.swa_base)),
        "sparse_attn_fwd": (attend, (q, kv, indices, sink, lens)),
        "paged_fp8_sparse_attn_fwd": (attend_fp8, (q, c4_cache, c4_ids, swa_cache, swa_ids, sink, extra_lens)),
    }


def op_args(b):
    """op name -> the registered op's arguments (validated inputs, impl "reference")."""
    calls = public_calls(b)
    md, n, h = b.metadata, b.metadata.num_tokens, CFG.num_heads
    _, (cache, k, slots) = calls["store_k_cache"]
    _, (_, ids) = calls["dequantize_k_cache_paged"]
    swa_args = calls["build_swa_token_ids"][1]
    swa = build_swa_token_ids(*swa_args, W)
    plan_args = calls["build_workspace_plan"][1]
    num_compressed = int((md.seq_lens // 4).sum())
    combine_args = calls["combine_topk_swa_indices"][1]
    width = CFG.topk + W + (-(CFG.topk + W) % 128)
    q, kv, indices, sink, lens = calls["sparse_attn_fwd"][1]
    _, c4_cache, c4_ids, swa_cache, swa_ids, _, extra_lens = calls["paged_fp8_sparse_attn_fwd"][1]

    def outputs():
        return (torch.empty(n, h, 512, dtype=torch.bfloat16), torch.empty(n, h), torch.empty(n, h))

    return {
        "store_k_cache": (cache.clone(), k, slots, 4, "V4", "reference"),
        "dequantize_k_cache_paged": (cache, ids, 4, "V4", torch.empty(n, 1, 512, dtype=torch.bfloat16),
                                     "reference"),
        "build_swa_token_ids": (*swa_args, W, swa.token_ids.shape[0], "reference"),
        "build_workspace_plan": (plan_args[0], *plan_args[1:5], 4, plan_args[5], num_compressed, "reference"),
        "combine_topk_swa_indices": (*combine_args, W, 4, CFG.topk, torch.empty(n, width, dtype=torch.int32),
                                     torch.empty(n, dtype=torch.int32), "reference"),
        "sparse_attn_fwd": (q, kv, indices[:, None], SM_SCALE, 512, sink, lens, *outputs(), "reference"),
        "paged_fp8_sparse_attn_fwd": (q, c4_cache, c4_ids, 3, swa_cache, swa_ids, 4, None, extra_lens, SM_SCALE,
                                      sink, "V4", 512, *outputs(), "reference"),
    }


def test_every_op_registered_with_its_mutations():
    for name, writes in MUTATED.items():
        schema = getattr(torch.ops.sparse_prefill, name).default._schema
        written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        assert written == writes, name


@pytest.mark.parametrize("name", sorted(MUTATED))
def test_opcheck(batch, name):
    """Schema (mutations as declared), fake implementation, autograd registration and AOT
    dispatch, against the real (reference) implementation."""
    torch.library.opcheck(getattr(torch.ops.sparse_prefill, name), op_args(batch)[name])


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
        return
    assert len(a) == len(b)
    for x, y in zip(a, b):
        _equal(x, y)


@pytest.mark.parametrize("name", sorted(MUTATED))
def test_compile_fullgraph_matches_eager(batch, name):
    fn, args = public_calls(batch)[name]
    torch._dynamo.reset()
    _equal(torch.compile(fn, fullgraph=True)(*args), fn(*args))


def test_compile_with_data_dependent_sizes(batch):
    """Without ``total`` / ``num_compressed`` the compiled graph sizes the gathers from the data."""
    md = batch.metadata

    def plan_of(seq_lens, extend_lens, table, c4_table):
        swa = build_swa_token_ids(seq_lens, extend_lens, table, W)
        plan = build_workspace_plan(seq_lens, swa, 4, c4_table)
        return (*swa, plan.compressed_token_ids, plan.compressed_base, plan.swa_base)

    args = (md.seq_lens, md.extend_lens, md.swa_token_table, md.compressed_token_tables[4])
    torch._dynamo.reset()
    _equal(torch.compile(plan_of, fullgraph=True)(*args), plan_of(*args))


def test_meta_tensors_give_meta_outputs(batch):
    for name, (fn, args) in public_calls(batch).items():
        eager = fn(*args)
        meta = fn(*(a.to("meta") for a in args))
        eager, meta = (eager, meta) if isinstance(eager, tuple) else ((eager,), (meta,))
        for e, m in zip(eager, meta):
            assert m.device.type == "meta" and m.shape == e.shape and m.dtype == e.dtype, name


def test_meta_sizes_from_values_must_be_given(batch):
    md = batch.metadata.seq_lens.to("meta"), batch.metadata.extend_lens.to("meta")
    table = batch.metadata.swa_token_table.to("meta")
    with pytest.raises(ValueError, match="pass total"):
        build_swa_token_ids(*md, table, W)


@pytest.mark.parametrize("path", ["sparse", "regular"])
def test_compile_backend_stack(path):
    """A whole layer stack compiled with fullgraph (state built by begin_forward, eagerly)
    equals the eager stack, for two batches in a row."""
    def stack(backend, b):
        return [backend.forward(*b.layer_inputs(layer)) for layer in range(CFG.num_layers)]

    torch._dynamo.reset()
    compiled = torch.compile(stack, fullgraph=True)
    backend = SparsePrefillBackend(CFG, path)
    for seed, (prefix, extend) in enumerate([([0, 40], [20, 9]), ([5, 3], [30, 2])]):
        b = make_synthetic_batch(CFG, prefix, extend, seed=seed)
        eager = SparsePrefillBackend(CFG, path)
        eager.begin_forward(b.metadata)
        backend.begin_forward(b.metadata)
        _equal(compiled(backend, b), stack(eager, b))


# ---------------------------------------------------------------------------------------------
# Where value checks run


def test_value_check_sites():
    cpu, cuda, meta = (torch.device(d) for d in ("cpu", "cuda", "meta"))
    assert [utils.value_check_site(d) for d in (cpu, cuda, meta)] == ["host", "device", "device"]
    with value_checks("strict"):
        assert [utils.value_check_site(d) for d in (cpu, cuda, meta)] == ["host", "host", "device"]
    with value_checks(False):
        assert {utils.value_check_site(d) for d in (cpu, cuda, meta)} == {None}
    with pytest.raises(TypeError, match="a bool or 'strict'"):
        with value_checks("loose"):
            pass
    for env, mode in [("0", "off"), ("1", "on"), (" Strict ", "strict")]:
        assert utils.parse_value_checks_env(env) == mode
    with pytest.raises(ValueError, match="SPARSE_PREFILL_VALUE_CHECKS"):
        utils.parse_value_checks_env("maybe")


def test_compiled_value_checks_run_on_the_device(batch):
    """Inside a compiled graph a length out of range fails the device assert (no graph break);
    eager CPU calls raise the ValueError."""
    fn, (q, kv, indices, sink, lens) = public_calls(batch)["sparse_attn_fwd"]
    bad = lens.clone()
    bad[-1] = indices.shape[1] + 1
    with pytest.raises(ValueError, match="topk_length values must be in"):
        fn(q, kv, indices, sink, bad)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    _equal(compiled(q, kv, indices, sink, lens), fn(q, kv, indices, sink, lens))
    with pytest.raises(RuntimeError, match="topk_length values must be in"):
        compiled(q, kv, indices, sink, bad)


def test_device_checks_of_cache_ids(batch):
    """The device-side checks of ``store_k_cache``'s slots (traced by compile on CPU)."""
    fn, (cache, k, slots) = public_calls(batch)["store_k_cache"]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    capacity = cache.shape[0] * CFG.swa_page_size
    beyond, twice = slots.clone(), slots.clone()
    beyond[1] = capacity
    twice[2] = twice[1]
    with pytest.raises(RuntimeError, match="beyond the cache's capacity"):
        compiled(cache, k, beyond)
    with pytest.raises(RuntimeError, match="more than once"):
        compiled(cache, k, twice)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["sparse", "regular"])
def test_gpu_compile_backend_stack(path):
    """The Triton kernels inside a compiled layer stack give the eager results bit for bit."""
    cfg = ModelConfig(num_heads=16, compress_ratios=(0, 4, 128), topk=512, window_size=128, swa_page_size=64,
                      compressed_page_size=64)
    b = make_synthetic_batch(cfg, [0, 300, 5000], [700, 129, 1], device="cuda", seed=5, share_q=True,
                             q_std=1.0, k_std=0.1, k_mean=0.05)

    def stack(backend):
        return [backend.forward(*b.layer_inputs(layer)) for layer in range(cfg.num_layers)]

    eager = SparsePrefillBackend(cfg, path)
    eager.begin_forward(b.metadata)
    backend = SparsePrefillBackend(cfg, path)
    backend.begin_forward(b.metadata)
    torch._dynamo.reset()
    _equal(torch.compile(stack, fullgraph=True)(backend), stack(eager))



I32_MAX = 2**31 - 1
# The value checks of combine_topk_swa_indices (tests/ops/test_indices.py's host cases).
COMBINE_VALUE_CASES = [
    (dict(query_pos=torch.tensor([8, 9, 3, 4, 6], dtype=torch.int32)), "query_pos must be"),
    (dict(query_start_loc=torch.tensor([1, 2, 5], dtype=torch.int32)), "run from 0"),
    (dict(query_start_loc=torch.tensor([0, 6, 5], dtype=torch.int32),
          gather_lens=torch.tensor([10, 6], dtype=torch.int32)), "extend lengths"),
    (dict(seq_lens=torch.tensor([10, 2], dtype=torch.int32)), "extend lengths"),
    (dict(gather_lens=torch.tensor([4, 6], dtype=torch.int32)), "gather_lens must cover"),
    (dict(gather_lens=torch.tensor([5, 7], dtype=torch.int32)), "gather_lens must cover"),
    (dict(swa_base=torch.tensor([-1, 9], dtype=torch.int32)), "swa_base puts rows"),
    (dict(swa_base=torch.tensor([4, I32_MAX - 2], dtype=torch.int32)), "swa_base puts rows"),
    (dict(compressed_base=torch.tensor([I32_MAX - 1, 0], dtype=torch.int32)), "compressed_base puts rows"),
    (dict(topk_indices=None, topk=1), "topk_indices=None takes entries"),
]


def test_combine_value_checks_on_the_device(monkeypatch):
    """The device-side checks of ``combine_topk_swa_indices`` (CUDA's default) catch what the
    host checks catch, and pass valid rows unchanged."""
    from tests.ops.test_indices import _combine_args

    host = combine_topk_swa_indices(**_combine_args())
    for change, _ in COMBINE_VALUE_CASES:
        with pytest.raises(ValueError):
            combine_topk_swa_indices(**{**_combine_args(), **change})
    monkeypatch.setattr("sparse_prefill.ops.indices.value_check_site", lambda device: "device")
    _equal(combine_topk_swa_indices(**_combine_args()), host)
    for change, match in COMBINE_VALUE_CASES:
        with pytest.raises(RuntimeError, match=match):
            combine_topk_swa_indices(**{**_combine_args(), **change})
