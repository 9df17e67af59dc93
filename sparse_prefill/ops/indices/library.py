"""The index ops as registered torch ops (``ops/registry.py``). They take validated arguments (``ops/indices/__init__.py`` checks them) and the resolved
``impl``. An output whose size depends on length values (the SWA gather, the compressed rows)
has the exact size the caller passes, or, when it passes None, a data-dependent size under
``torch.compile`` (the eager op reads the lengths: one host sync on CUDA)."""

from __future__ import annotations

import torch

from sparse_prefill.ops.indices.kernels import (
    build_chunk_indices_triton,
    build_swa_token_ids_triton,
    build_workspace_plan_triton,
    combine_topk_swa_indices_triton,
)
from sparse_prefill.ops.indices.naive import (
    build_chunk_indices_ref,
    build_swa_token_ids_ref,
    build_workspace_plan_ref,
    combine_topk_swa_indices_ref,
)
from sparse_prefill.ops.indices.plan import (
    ChunkIndices,
    SwaTokenIds,
    WorkspacePlan,
    empty_chunk_indices,
    flatten_chunk_indices,
    swa_gather_lens,
    unflatten_chunk_indices,
)
from sparse_prefill.ops.registry import define_op, writes_only


def _size(known: int | None):
    """``known``, or under fake tensors a fresh data-dependent size."""
    return known if known is not None else torch.library.get_ctx().new_dynamic_size()


def _build_swa_token_ids(
    seq_lens: torch.Tensor, extend_lens: torch.Tensor, req_token_table: torch.Tensor, swa_window: int,
    total: int | None, impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``SwaTokenIds`` fields (token_ids, first_pos, gather_lens, offsets); see ``build_swa_token_ids``."""
    if impl == "reference":
        return tuple(build_swa_token_ids_ref(seq_lens, extend_lens, req_token_table, swa_window))
    if total is None:
        total = int(swa_gather_lens(seq_lens, extend_lens, swa_window).sum())
    return tuple(build_swa_token_ids_triton(seq_lens, extend_lens, req_token_table, swa_window, total))


def _build_swa_token_ids_fake(seq_lens, extend_lens, req_token_table, swa_window, total, impl):
    num_reqs, device = seq_lens.shape[0], seq_lens.device
    return (
        seq_lens.new_empty(_size(total)),
        seq_lens.new_empty(num_reqs),
        seq_lens.new_empty(num_reqs),
        torch.empty(num_reqs + 1, dtype=torch.int64, device=device),
    )


def _build_workspace_plan(
    seq_lens: torch.Tensor, swa_token_ids: torch.Tensor, swa_first_pos: torch.Tensor,
    swa_gather_lens: torch.Tensor, swa_offsets: torch.Tensor, compress_ratio: int,
    compressed_token_table: torch.Tensor | None, num_compressed: int | None, impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``WorkspacePlan`` tensors (compressed_token_ids, compressed_base, swa_base); see
    ``build_workspace_plan``."""
    swa = SwaTokenIds(swa_token_ids, swa_first_pos, swa_gather_lens, swa_offsets)
    if impl == "reference":
        plan = build_workspace_plan_ref(seq_lens, swa, compress_ratio, compressed_token_table)
    else:
        if num_compressed is None:
            num_compressed = int((seq_lens // compress_ratio).sum()) if compress_ratio > 0 else 0
        plan = build_workspace_plan_triton(seq_lens, swa, compress_ratio, compressed_token_table, num_compressed)
    return plan.compressed_token_ids, plan.compressed_base, plan.swa_base


def _build_workspace_plan_fake(seq_lens, swa_token_ids, swa_first_pos, swa_gather_lens, swa_offsets,
                               compress_ratio, compressed_token_table, num_compressed, impl):
    rows = 0 if compressed_token_table is None else _size(num_compressed)
    num_reqs = seq_lens.shape[0]
    return seq_lens.new_empty(rows), seq_lens.new_empty(num_reqs), seq_lens.new_empty(num_reqs)


def _combine_topk_swa_indices(
    topk_indices: torch.Tensor | None, query_start_loc: torch.Tensor, query_pos: torch.Tensor,
    seq_lens: torch.Tensor, gather_lens: torch.Tensor, compressed_base: torch.Tensor, swa_base: torch.Tensor,
    window_size: int, compress_ratio: int, topk: int, out_indices: torch.Tensor, out_lens: torch.Tensor,
    impl: str,
) -> None:
    """Write the combined rows into ``out_indices`` / ``out_lens``; see ``combine_topk_swa_indices``."""
    vectors = (query_start_loc, query_pos, seq_lens, gather_lens, compressed_base, swa_base)
    # Ratio 0 (SWA only) takes no entries (topk 0): ratio 1 gives the same rows, no division by 0.
    sizes = (window_size, max(compress_ratio, 1), topk)
    if impl == "reference":
        indices, lens = combine_topk_swa_indices_ref(topk_indices, *vectors, *sizes)
        out_indices.copy_(indices)
        out_lens.copy_(lens)
    else:
        vectors = (v.contiguous() for v in vectors)
        combine_topk_swa_indices_triton(topk_indices, *vectors, *sizes, out_indices, out_lens)


def build_chunk_indices(
    seq_lens: torch.Tensor, extend_lens: torch.Tensor, swa_token_table: torch.Tensor,
    compressed_token_tables: list[torch.Tensor], ratios: list[int], row_topks: list[int], window_size: int,
    num_tokens: int, num_swa: int, num_compressed: list[int], impl: str, pooled: bool = False,
) -> ChunkIndices:
    """The chunk's ``ChunkIndices``; ``compressed_token_tables`` are those of the ratios > 0, in
    order; ``row_topks[k] < 0``: ratio ``k`` has no rows; ``pooled``: as ``empty_chunk_indices``'
    (the Triton path)."""
    tables = dict(zip([c for c in ratios if c > 0], compressed_token_tables))
    if impl == "reference":
        return build_chunk_indices_ref(
            seq_lens, extend_lens, swa_token_table, tables, ratios, row_topks, window_size, num_tokens
        )
    ci = empty_chunk_indices(seq_lens, ratios, row_topks, window_size, num_tokens, num_swa, num_compressed, pooled)
    build_chunk_indices_triton(seq_lens, extend_lens, swa_token_table, tables, row_topks, window_size, ci)
    return ci


def _build_chunk_indices_op(*args) -> list[torch.Tensor]:
    """The op's kernel: ``flatten_chunk_indices`` of ``build_chunk_indices``, unpooled (an op's
    outputs must not alias one another)."""
    return flatten_chunk_indices(build_chunk_indices(*args))


def _build_chunk_indices_fake(seq_lens, extend_lens, swa_token_table, compressed_token_tables, ratios, row_topks,
                              window_size, num_tokens, num_swa, num_compressed, impl):
    return flatten_chunk_indices(
        empty_chunk_indices(seq_lens, ratios, row_topks, window_size, num_tokens, num_swa, num_compressed)
    )


build_swa_token_ids_op = define_op(
    "build_swa_token_ids(Tensor seq_lens, Tensor extend_lens, Tensor req_token_table, int swa_window, int? total, "
    "str impl) -> (Tensor, Tensor, Tensor, Tensor)",
    _build_swa_token_ids, _build_swa_token_ids_fake,
)
build_workspace_plan_op = define_op(
    "build_workspace_plan(Tensor seq_lens, Tensor swa_token_ids, Tensor swa_first_pos, Tensor swa_gather_lens, "
    "Tensor swa_offsets, int compress_ratio, Tensor? compressed_token_table, int? num_compressed, str impl) "
    "-> (Tensor, Tensor, Tensor)",
    _build_workspace_plan, _build_workspace_plan_fake,
)
combine_topk_swa_indices_op = define_op(
    "combine_topk_swa_indices(Tensor? topk_indices, Tensor query_start_loc, Tensor query_pos, Tensor seq_lens, "
    "Tensor gather_lens, Tensor compressed_base, Tensor swa_base, int window_size, int compress_ratio, int topk, "
    "Tensor(a!) out_indices, Tensor(b!) out_lens, str impl) -> ()",
    _combine_topk_swa_indices, writes_only,
)
build_chunk_indices_op = define_op(
    "build_chunk_indices(Tensor seq_lens, Tensor extend_lens, Tensor swa_token_table, Tensor[] compressed_token_tables, "
    "int[] ratios, int[] row_topks, int window_size, int num_tokens, int num_swa, int[] num_compressed, str impl) "
    "-> Tensor[]",
    _build_chunk_indices_op, _build_chunk_indices_fake,
)
