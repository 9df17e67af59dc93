"""Bad input at every public entry point: wrong dtypes, ranks, sizes, strides (stride 0
included), devices, non-tensors and scalar values of every kind, one argument at a time, then
random pairs.

Every call must either be accepted or raise TypeError/ValueError whose message names the
argument (a size mismatch or a device mismatch may name the other argument of the pair), and
always before any kernel launch: the launchers are replaced by a sentinel that raises
``Launched``, so an accepted call ends there (and nothing runs: the pass takes seconds).
Mutations that can never be valid (a wrong dtype, a non-tensor, a wrong scalar type, an
out-of-range scalar, an output whose elements share memory) must be rejected.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist

import sparse_prefill as sp
from sparse_prefill import parallel
from sparse_prefill.backend.chunk_cache import SparsePrefillChunkCache
from sparse_prefill.ops import flashmla_impl
from sparse_prefill.ops.cache import library as cache_ops
from sparse_prefill.ops.fp8_sparse_attn import gluon_kernel
from sparse_prefill.ops.indices import library as index_ops
from sparse_prefill.ops.sparse_attn import gluon_kernel as attn_gluon
from sparse_prefill.ops.fp8_sparse_attn import kernel as fp8_kernel
from sparse_prefill.ops.fp8_sparse_attn import library as fp8_library
from sparse_prefill.ops.sparse_attn import kernel as attn_kernel
from sparse_prefill.ops.sparse_attn import library as attn_library

V4, V32 = sp.KVCacheLayout.V4, sp.KVCacheLayout.V32
CLEAN = (TypeError, ValueError)


class Launched(Exception):
    """A kernel launch was reached: every check passed."""


# Every module that holds or imports a kernel launcher: the ops' kernel and library modules.
LAUNCHER_MODULES = (attn_kernel, attn_gluon, attn_library, fp8_kernel, gluon_kernel, fp8_library, cache_ops,
                    index_ops, flashmla_impl)
LAUNCHER = re.compile(r"\w+_(triton|gluon|gluon_wide|flashmla)$")


def launcher_names(module) -> list[str]:
    """The launchers a module holds: functions named ``*_triton``, ``*_gluon``, ``*_gluon_wide``
    or ``*_flashmla`` (on CUDA an accepted fuzz call reaches one; with bad data it could fault the
    GPU, so every one of them, FlashMLA's included, is replaced)."""
    return [name for name, value in vars(module).items() if LAUNCHER.match(name) and callable(value)]


@pytest.fixture
def arm(monkeypatch):
    """Returns ``arm()``: call it once the valid arguments are built (on CUDA building them runs
    kernels); from then on every launcher raises ``Launched``, and value checks run on the host
    for CUDA tensors too (by default they are device asserts, which a bad value turns into a
    failed stream and a dead CUDA context for every later test, not a ValueError to read)."""
    def sentinel(*args, **kwargs):
        raise Launched

    with contextlib.ExitStack() as stack:
        def arm_now():
            for module in LAUNCHER_MODULES:
                for name in launcher_names(module):
                    monkeypatch.setattr(module, name, sentinel)
            stack.enter_context(sp.value_checks("strict"))

        yield arm_now
        monkeypatch.undo()  # before value checks go back: nothing patched outlives the test


def test_every_launcher_is_replaced():
    names = {name for module in LAUNCHER_MODULES for name in launcher_names(module)}
    assert {"sparse_attn_fwd_triton", "sparse_attn_fwd_gluon", "sparse_attn_fwd_flashmla",
            "paged_fp8_sparse_attn_triton", "paged_fp8_sparse_attn_gluon", "paged_fp8_sparse_attn_flashmla",
            "store_k_cache_triton", "dequantize_k_cache_paged_triton", "build_chunk_indices_triton",
            "build_swa_token_ids_triton", "build_workspace_plan_triton", "combine_topk_swa_indices_triton"} <= names


@dataclass
class Entry:
    """A public entry point: ``call(args)`` runs it on the dict ``args`` (``base`` when valid)."""

    call: Callable[[dict], object]
    base: Callable[[torch.device], dict]
    outputs: tuple[str, ...] = ()
    # Float arguments that must be real numbers float32 holds.
    scales: tuple[str, ...] = ()
    # Arguments whose None is valid (the others must reject None).
    optional: tuple[str, ...] = field(default=())
    # A parallel layer's: runs in a process group (of this process alone).
    needs_group: bool = False


def i32(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def bf16(*shape, device) -> torch.Tensor:
    return (torch.randn(*shape, device=device) / 10).bfloat16()


def small_cache(device, page_size=4, pages=3, layout=V4) -> torch.Tensor:
    return torch.zeros(pages, layout.page_bytes(page_size), dtype=torch.uint8, device=device)


# -- the index ops: two requests, seq 5 and 9, extend 3 and 9, window 4, ratio 4, topk 8 -----

SEQ, EXT, WINDOW, RATIO, TOPK = [5, 9], [3, 9], 4, 4, 8


def swa_args(device) -> dict:
    return dict(seq_lens=i32(SEQ, device), extend_lens=i32(EXT, device),
                req_token_table=torch.arange(24, dtype=torch.int32, device=device).view(2, 12),
                swa_window=WINDOW, total=None)


def real_swa(device) -> sp.SwaTokenIds:
    a = swa_args(device)
    return sp.build_swa_token_ids(a["seq_lens"], a["extend_lens"], a["req_token_table"], WINDOW, impl="reference")


def plan_args(device) -> dict:
    swa = real_swa(device)
    return {"seq_lens": i32(SEQ, device), "swa.token_ids": swa.token_ids, "swa.first_pos": swa.first_pos,
            "swa.gather_lens": swa.gather_lens, "swa.offsets": swa.offsets, "compress_ratio": RATIO,
            "compressed_token_table": torch.arange(6, dtype=torch.int32, device=device).view(2, 3),
            "num_compressed": None}


def call_plan(a: dict):
    swa = sp.SwaTokenIds(a["swa.token_ids"], a["swa.first_pos"], a["swa.gather_lens"], a["swa.offsets"])
    return sp.build_workspace_plan(a["seq_lens"], swa, a["compress_ratio"], a["compressed_token_table"],
                                   num_compressed=a["num_compressed"], impl="triton")


def combine_args(device) -> dict:
    swa = real_swa(device)
    plan = sp.build_workspace_plan(i32(SEQ, device), swa, RATIO,
                                   torch.arange(6, dtype=torch.int32, device=device).view(2, 3), impl="reference")
    n = sum(EXT)
    pos = [s - e + i for s, e in zip(SEQ, EXT) for i in range(e)]
    return dict(topk_indices=torch.randint(-1, 3, (n, TOPK), dtype=torch.int32, device=device),
                query_start_loc=i32([0, EXT[0], n], device), query_pos=i32(pos, device),
                seq_lens=i32(SEQ, device), gather_lens=swa.gather_lens, compressed_base=plan.compressed_base,
                swa_base=plan.swa_base, window_size=WINDOW, compress_ratio=RATIO, topk=TOPK,
                out_indices=torch.empty(n, sp.combined_width(TOPK, WINDOW), dtype=torch.int32, device=device),
                out_lens=torch.empty(n, dtype=torch.int32, device=device))


# -- attention: s_q 4, h_q 3 ----------------------------------------------------------------


def attn_args(device) -> dict:
    return dict(q=bf16(4, 3, 512, device=device), kv=bf16(20, 1, 512, device=device),
                indices=torch.randint(-1, 20, (4, 1, 8), dtype=torch.int32, device=device), sm_scale=0.5,
                d_v=512, attn_sink=torch.zeros(3, device=device), topk_length=i32([8, 0, 3, 8], device),
                out=torch.empty(4, 3, 512, dtype=torch.bfloat16, device=device))


def fp8_args(device) -> dict:
    return dict(q=bf16(4, 3, 512, device=device), cache=small_cache(device),
                indices=torch.randint(-1, 12, (4, 8), dtype=torch.int32, device=device), page_size=4,
                sm_scale=0.5, extra_cache=small_cache(device, 2, 5),
                extra_indices=torch.randint(-1, 10, (4, 5), dtype=torch.int32, device=device),
                extra_page_size=2, topk_length=i32([8, 0, 3, 8], device), extra_topk_length=i32([5, 5, 0, 1], device),
                attn_sink=torch.zeros(3, device=device), layout=V4, d_v=512,
                out=torch.empty(4, 3, 512, dtype=torch.bfloat16, device=device))


# -- the backend: the config, a batch, a layer --------------------------------------------

CONFIG = dict(num_heads=4, compress_ratios=(0, 4, 128), topk=16, window_size=8, swa_page_size=4,
              compressed_page_size=4, sm_scale=None)


def synthetic(device) -> sp.SyntheticBatch:
    return sp.make_synthetic_batch(sp.ModelConfig(**CONFIG), [3, 0], [5, 6], device=device, seed=1)


def metadata_args(device) -> dict:
    md = synthetic(device).metadata
    return {"prefix_lens": [3, 0], "extend_lens": [5, 6], "swa_token_table": md.swa_token_table,
            "compressed_token_tables[4]": md.compressed_token_tables[4],
            "compressed_token_tables[128]": md.compressed_token_tables[128]}


def call_metadata(a: dict):
    tables = {4: a["compressed_token_tables[4]"], 128: a["compressed_token_tables[128]"]}
    return sp.BatchMetadata(sp.ModelConfig(**CONFIG), a["prefix_lens"], a["extend_lens"], a["swa_token_table"], tables)


def forward_args(device, layer: int) -> dict:
    batch = synthetic(device)
    _, q, caches, topk, sink = batch.layer_inputs(layer)
    return {"_batch": batch, "layer": layer, "q": q, "caches.swa": caches.swa, "caches.compressed": caches.compressed,
            "topk_indices": topk, "attn_sink": sink, "out": torch.empty_like(q), "path": "sparse"}


def call_forward(a: dict):
    batch = a["_batch"]
    backend = sp.SparsePrefillBackend(batch.config, a["path"], impl="triton")
    return backend.forward(a["layer"], a["q"], sp.LayerCaches(a["caches.swa"], a["caches.compressed"]),
                           a["topk_indices"], a["attn_sink"], metadata=batch.metadata, out=a["out"])


def chunk_cache_args(device) -> dict:
    md = synthetic(device).metadata
    return {"seq_lens": md.seq_lens, "extend_lens": md.extend_lens, "swa_token_table": md.swa_token_table,
            "window_size": CONFIG["window_size"], "ratios": [0, 4, 128],  # a set is valid here
            "compressed_token_tables[4]": md.compressed_token_tables[4],
            "compressed_token_tables[128]": md.compressed_token_tables[128], "topk": CONFIG["topk"]}


def call_chunk_cache(a: dict):
    tables = {4: a["compressed_token_tables[4]"], 128: a["compressed_token_tables[128]"]}
    return SparsePrefillChunkCache.build(
        key=1, seq_lens=a["seq_lens"], extend_lens=a["extend_lens"], swa_token_table=a["swa_token_table"],
        window_size=a["window_size"], ratios=a["ratios"], compressed_token_tables=tables, topk=a["topk"],
        impl="triton")


# -- the parallel layers, in a process group of this process alone (rank 0 owns every row) -----


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo group of this process alone; destroyed afterwards (other tests need none)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def parallel_layer_args(device) -> dict:
    batch = synthetic(device)
    return dict(backend=sp.SparsePrefillBackend(batch.config, "sparse", impl="triton"), group=None)


def begun(device, layer_type) -> tuple[object, sp.SyntheticBatch]:
    """A parallel layer of ``layer_type`` over the synthetic batch, its forward begun."""
    batch = synthetic(device)
    layer = layer_type(sp.SparsePrefillBackend(batch.config, "sparse", impl="triton"))
    layer.begin_forward(batch.metadata)
    return layer, batch


def store_kv_args(device, layer: int) -> dict:
    cp, batch = begun(device, sp.ContextParallelPrefill)
    _, _, caches, _, _ = batch.layer_inputs(layer)
    ratio = batch.config.compress_ratios[layer]
    entries = cp.entry_rows(ratio) if ratio else None
    return {"_cp": cp, "layer": layer, "caches.swa": caches.swa, "caches.compressed": caches.compressed,
            "k": bf16(batch.metadata.num_tokens, 512, device=device),
            "compressed_k": None if entries is None else bf16(entries[1] - entries[0], 512, device=device),
            "metadata": batch.metadata}


def call_store_kv(a: dict):
    return a["_cp"].store_kv(a["layer"], sp.LayerCaches(a["caches.swa"], a["caches.compressed"]), a["k"],
                             a["compressed_k"], metadata=a["metadata"])


def parallel_forward_args(device, layer_type, layer: int, gather: bool) -> dict:
    par, batch = begun(device, layer_type)
    _, q, caches, topk, sink = batch.layer_inputs(layer)
    shape = (batch.metadata.num_tokens, batch.config.num_heads, 512)
    return {"_layer": par, "layer": layer, "q": q, "caches.swa": caches.swa, "caches.compressed": caches.compressed,
            "topk_indices": topk, "attn_sink": sink, "metadata": batch.metadata, "gather": gather,
            "out": torch.empty(shape, dtype=torch.bfloat16, device=device)}


def call_parallel_forward(a: dict):
    return a["_layer"].forward(a["layer"], a["q"], sp.LayerCaches(a["caches.swa"], a["caches.compressed"]),
                               a["topk_indices"], a["attn_sink"], metadata=a["metadata"], gather=a["gather"],
                               out=a["out"])


def batch_args(device, **more) -> dict:
    batch = synthetic(device)
    return dict(config=batch.config, metadata=batch.metadata, **more)


def parallel_entry(call, base, **kw) -> Entry:
    return Entry(call, base, needs_group=True, **kw)


PARALLEL_FORWARD = dict(outputs=("out",), optional=("attn_sink", "out", "metadata"))

ENTRIES = {
    "quantize_k_cache": Entry(lambda a: sp.quantize_k_cache(a["k"], a["layout"], impl="triton"),
                              lambda d: dict(k=bf16(2, 4, 1, 512, device=d), layout=V4)),
    "store_k_cache": Entry(lambda a: sp.store_k_cache(a["cache"], a["k"], a["slot_ids"], a["page_size"], a["layout"], impl="triton"),
                           lambda d: dict(cache=small_cache(d), k=bf16(3, 512, device=d), slot_ids=i32([0, 5, -1], d),
                                          page_size=4, layout=V4), outputs=("cache",)),
    "dequantize_k_cache_paged": Entry(
        lambda a: sp.dequantize_k_cache_paged(a["cache"], a["token_ids"], a["page_size"], a["layout"], a["out"], impl="triton"),
        lambda d: dict(cache=small_cache(d, layout=V32), token_ids=i32([0, 11, -1], d), page_size=4, layout=V32,
                       out=torch.empty(3, 1, 576, dtype=torch.bfloat16, device=d)),
        outputs=("out",), optional=("out",)),
    "dequantize_k_cache": Entry(lambda a: sp.dequantize_k_cache(a["cache"], a["layout"], a["page_size"], impl="triton"),
                                lambda d: dict(cache=small_cache(d), layout=V4, page_size=4)),
    "build_swa_token_ids": Entry(
        lambda a: sp.build_swa_token_ids(a["seq_lens"], a["extend_lens"], a["req_token_table"], a["swa_window"],
                                         total=a["total"], impl="triton"),
        swa_args, optional=("total",)),
    "build_workspace_plan": Entry(call_plan, plan_args, optional=("num_compressed",)),
    "combine_topk_swa_indices": Entry(
        lambda a: sp.combine_topk_swa_indices(**a, impl="triton"), combine_args,
        outputs=("out_indices", "out_lens"), optional=("topk_indices", "out_indices", "out_lens")),
    "sparse_attn_fwd": Entry(lambda a: sp.sparse_attn_fwd(**a, impl="triton"), attn_args, outputs=("out",),
                             scales=("sm_scale",), optional=("attn_sink", "topk_length", "out")),
    "paged_fp8_sparse_attn_fwd": Entry(
        lambda a: sp.paged_fp8_sparse_attn_fwd(**a, impl="triton"), fp8_args, outputs=("out",), scales=("sm_scale",),
        optional=("topk_length", "extra_topk_length", "attn_sink", "out")),
    # Where the Hopper kernel runs (skipped elsewhere): its impl goes through its own checks.
    "paged_fp8_sparse_attn_fwd gluon": Entry(
        lambda a: sp.paged_fp8_sparse_attn_fwd(**a, impl="gluon"), fp8_args, outputs=("out",), scales=("sm_scale",),
        optional=("topk_length", "extra_topk_length", "attn_sink", "out")),
    "sparse_attn_fwd gluon": Entry(lambda a: sp.sparse_attn_fwd(**a, impl="gluon"), attn_args, outputs=("out",),
                                   scales=("sm_scale",), optional=("attn_sink", "topk_length", "out")),
    "SparsePrefillChunkCache.build": Entry(call_chunk_cache, chunk_cache_args),
    "ModelConfig": Entry(lambda a: sp.ModelConfig(**a), lambda d: dict(CONFIG), scales=("sm_scale",),
                         optional=("sm_scale", "compressed_page_size")),
    "BatchMetadata": Entry(call_metadata, metadata_args),
    "backend.forward ratio 1": Entry(call_forward, lambda d: forward_args(d, 0), outputs=("out",),
                                     optional=("caches.compressed", "topk_indices", "attn_sink", "out")),
    "backend.forward ratio 4": Entry(call_forward, lambda d: forward_args(d, 1), outputs=("out",),
                                     optional=("attn_sink", "out")),
    "backend.forward ratio 128 regular": Entry(
        call_forward, lambda d: dict(forward_args(d, 2), path="regular"), outputs=("out",),
        optional=("topk_indices", "attn_sink", "out")),
    "value_checks": Entry(lambda a: sp.value_checks(a["enabled"]).__enter__(), lambda d: dict(enabled=True)),
    "ContextParallelPrefill": parallel_entry(lambda a: sp.ContextParallelPrefill(**a), parallel_layer_args,
                                             optional=("group",)),
    "HeadParallelPrefill": parallel_entry(lambda a: sp.HeadParallelPrefill(**a), parallel_layer_args,
                                          optional=("group",)),
    "ContextParallelPrefill.begin_forward": parallel_entry(
        lambda a: a["_cp"].begin_forward(a["metadata"]),
        lambda d: dict(_cp=begun(d, sp.ContextParallelPrefill)[0], metadata=synthetic(d).metadata)),
    "ContextParallelPrefill.entry_rows": parallel_entry(
        lambda a: a["_cp"].entry_rows(a["ratio"]), lambda d: dict(_cp=begun(d, sp.ContextParallelPrefill)[0], ratio=4)),
    "ContextParallelPrefill.store_kv ratio 1": parallel_entry(
        call_store_kv, lambda d: store_kv_args(d, 0), outputs=("caches.swa",),
        optional=("caches.compressed", "compressed_k", "metadata")),
    "ContextParallelPrefill.store_kv ratio 4": parallel_entry(
        call_store_kv, lambda d: store_kv_args(d, 1), outputs=("caches.swa", "caches.compressed"),
        optional=("metadata",)),
    "ContextParallelPrefill.forward ratio 4": parallel_entry(
        call_parallel_forward, lambda d: parallel_forward_args(d, sp.ContextParallelPrefill, 1, True),
        **PARALLEL_FORWARD),
    "ContextParallelPrefill.forward ratio 128 sharded": parallel_entry(
        call_parallel_forward, lambda d: parallel_forward_args(d, sp.ContextParallelPrefill, 2, False),
        outputs=("out",), optional=("topk_indices", "attn_sink", "out", "metadata")),
    "HeadParallelPrefill.forward ratio 4": parallel_entry(
        call_parallel_forward, lambda d: parallel_forward_args(d, sp.HeadParallelPrefill, 1, False),
        **PARALLEL_FORWARD),
    "HeadParallelPrefill.forward ratio 1 gathered": parallel_entry(
        call_parallel_forward, lambda d: parallel_forward_args(d, sp.HeadParallelPrefill, 0, True),
        outputs=("out",), optional=("caches.compressed", "topk_indices", "attn_sink", "out", "metadata")),
    "partition_rows": parallel_entry(lambda a: parallel.partition_rows(**a), lambda d: batch_args(d, world_size=2)),
    "row_costs": parallel_entry(lambda a: parallel.row_costs(**a), batch_args),
    "shard_metadata": parallel_entry(lambda a: parallel.shard_metadata(**a),
                                     lambda d: dict(metadata=synthetic(d).metadata, start=2, stop=9, anchor=False)),
    "new_entries": parallel_entry(lambda a: parallel.new_entries(**a),
                                  lambda d: dict(metadata=synthetic(d).metadata, ratio=4)),
    "new_slots": parallel_entry(lambda a: parallel.new_slots(**a),
                                lambda d: dict(metadata=synthetic(d).metadata, ratio=128)),
}


# -- mutations ----------------------------------------------------------------------------


def other_device(device: torch.device) -> torch.device:
    return torch.device("cpu") if device.type == "cuda" else torch.device("meta")


def tensor_mutations(t: torch.Tensor, device: torch.device, is_output: bool) -> dict[str, tuple[object, bool]]:
    """name -> (mutated value, must it be rejected?)."""
    wrong = torch.float16 if t.is_floating_point() else torch.float32
    if t.dtype == torch.uint8:
        wrong = torch.int8
    out = {
        "dtype": (t.to(wrong), True),
        "int64": (t.long(), False) if not t.is_floating_point() else (t.to(torch.float64), True),
        "list": (t.tolist(), True),
        "rank-": (t[0], True) if t.dim() and t.shape[0] else None,
        "rank+": (t[None], True),
        "empty": (t[:0], False),
        "grow": (torch.cat([t, t[:1]]), False) if t.dim() and t.shape[0] else None,
        "device": (t.to(other_device(device)), False),
    }
    if t.dim() and t.shape[0] > 1:
        out["stride0"] = (t[:1].expand(t.shape), is_output)
    if t.dim() and t.shape[-1] > 1:
        out["last stride 2"] = (torch.stack([t, t], -1)[..., 0], is_output)
    return {k: v for k, v in out.items() if v is not None}


def scalar_mutations(value: object, is_scale: bool) -> dict[str, tuple[object, bool]]:
    if is_scale:
        return {"nan": (float("nan"), True), "inf": (float("inf"), True), "1e39": (1e39, True),
                "1e-50": (1e-50, True), "-1e39": (-1e39, True), "str": ("0.5", True), "bool": (True, True),
                "complex": (1j, True), "tensor": (torch.tensor(0.5), True)}
    if isinstance(value, bool):
        return {"str": ("false", True), "int": (0, True), "None": (None, True)}
    if isinstance(value, int):
        return {"-1": (-1, True), "2**40": (2**40, True), "float": (float(value), True), "str": (str(value), True),
                "bool": (True, True), "None": (None, True), "tensor": (torch.tensor(value), True)}
    if isinstance(value, sp.KVCacheLayout):
        return {"str": ("v4", True), "None": (None, True)}
    if isinstance(value, tuple):  # compress_ratios
        return {"dict": (dict.fromkeys(value, 1), True), "set": (set(value), True), "str": ("14", True),
                "bad ratio": ((*value, 3), True), "empty": ((), True), "2**40": ((2**40,), True)}
    if isinstance(value, list):  # prefix / extend lengths
        return {"negative": ([-1] * len(value), True), "shorter": (value[:-1], True),
                "floats": ([float(v) for v in value], True), "huge": ([2**40] * len(value), True)}
    if isinstance(value, str):
        return {"bogus": ("fast", True), "None": (None, True)}
    return {"str": ("x", True), "int": (7, True)}  # an object (a backend, config, metadata)


def mutations(entry: Entry, base: dict, device: torch.device):
    """(argument, mutation name, value, must reject) of every single-argument mutation."""
    for name, value in base.items():
        if name.startswith("_"):
            continue
        if isinstance(value, torch.Tensor):
            muts = tensor_mutations(value, device, name in entry.outputs)
        elif value is None:
            muts = {"str": ("x", True), "int": (7, False)}
        else:
            muts = scalar_mutations(value, name in entry.scales)
        if name in entry.optional:
            muts.pop("None", None)  # None is valid here
        elif value is not None:
            muts.setdefault("None", (None, True))
        for what, (mutated, must_reject) in muts.items():
            yield name, what, mutated, must_reject


def names_an_argument(message: str, names) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", message) for n in names)


def arg_names(name: str) -> list[str]:
    """How a message may spell argument ``name``: itself, its top-level part, its keys."""
    names = [name, name.split(".")[0], name.split("[")[0]]
    if name in ("prefix_lens", "extend_lens"):  # BatchMetadata names a request's length
        names.append(name[:-1])
    if name.startswith("swa."):
        names.append("swa")
    return names


def call_names(base: dict) -> list[str]:
    """Every name a message about this call may use: each argument's spellings, and ``impl``,
    which every entry forces (a tensor moved to another device conflicts with it)."""
    return [*(n for k in base for n in arg_names(k)), "impl"]


def outcome(entry: Entry, args: dict) -> BaseException | None:
    """None when accepted (launch reached or returned), else the exception raised."""
    try:
        entry.call(args)
    except Launched:
        return None
    except Exception as e:  # noqa: BLE001 - judged by the caller
        return e
    return None


MISMATCHES = ("grow", "empty", "device", "rank-", "rank+", "dtype", "int64")


@pytest.mark.parametrize("entry_name", list(ENTRIES))
def test_every_single_bad_argument_is_rejected_cleanly(entry_name, device, request, arm):
    entry = ENTRIES[entry_name]
    if entry_name.endswith("gluon") and gluon_kernel.unsupported_reason(device, V4) is not None:
        pytest.skip(f"Gluon kernel: {gluon_kernel.unsupported_reason(device, V4)}")
    if entry.needs_group:
        request.getfixturevalue("one_rank_group")
    base = entry.base(device)
    arm()
    assert outcome(entry, dict(base)) is None, f"{entry_name}: the valid call was rejected"
    every_name = call_names(base)
    cases = list(mutations(entry, base, device))
    assert len(cases) >= 3
    for name, what, value, must_reject in cases:
        err = outcome(entry, dict(base, **{name: value}))
        label = f"{entry_name}: {name} <- {what}"
        if err is None:
            assert not must_reject, f"{label} was accepted"
            continue
        assert isinstance(err, CLEAN), f"{label} raised {type(err).__name__}: {err}"
        message = str(err)
        if names_an_argument(message, arg_names(name)):
            continue
        # Only a mismatch between two arguments (sizes, devices, dtypes; the layout against
        # the cache; a device against the forced impl) may blame the other one of the pair.
        assert what in MISMATCHES or name == "layout", f"{label}: the message does not name {name}: {message}"
        assert names_an_argument(message, every_name), f"{label}: the message names no argument: {message}"


def test_random_pairs_of_bad_arguments(device, one_rank_group, arm):
    """Two arguments mutated at once, across all entry points: never anything but a clean error
    naming an argument (or acceptance), in bounded time (a fixed number of draws)."""
    rng = random.Random(17)
    entries = {n: e for n, e in ENTRIES.items() if not n.endswith("gluon") or gluon_kernel.unsupported_reason(device, V4) is None}
    bases = {name: e.base(device) for name, e in entries.items()}
    pools = {name: list(mutations(e, bases[name], device)) for name, e in entries.items()}
    arm()
    for _ in range(300):
        entry_name = rng.choice([n for n in entries if len({m[0] for m in pools[n]}) > 1])
        entry, base = entries[entry_name], bases[entry_name]
        first, second = rng.sample(pools[entry_name], 2)
        if first[0] == second[0]:
            continue
        changes = {first[0]: first[2], second[0]: second[2]}
        err = outcome(entry, dict(base, **changes))
        label = f"{entry_name}: {first[0]} <- {first[1]}, {second[0]} <- {second[1]}"
        if err is None:
            assert not (first[3] or second[3]), f"{label} was accepted"
            continue
        assert isinstance(err, CLEAN), f"{label} raised {type(err).__name__}: {err}"
        assert names_an_argument(str(err), call_names(base)), \
            f"{label}: the message names no argument: {err}"
