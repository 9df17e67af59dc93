"""The DeepSeek-V4 attention backend: what an engine calls once per attention layer.

Layer kinds by compress ratio (``layer_kinds.py``): 0 SWA only; 1, 2, 4 top-k; 128 dense.
Two interchangeable paths compute DESIGN.md's attention table (``naive.py`` is its reference):

* **sparse** (DESIGN.md steps 1-5): a :class:`SparsePrefillChunkCache` built by
  ``begin_forward`` holds the SWA gather, the workspace plan of each ratio and the
  SWA-only / dense index rows; each layer dequantizes its caches by the plan into its ratio's
  bf16 workspace (one per ratio, reused by every layer of it), recombines its rows from its
  top-k (top-k layers only) and runs ``sparse_attn_fwd`` with ``topk_length``. A workspace
  region is not dequantized again when the layer passes the same cache tensor as the layer that
  filled it and nothing was written to it since (DeepSeek-V4.1's shared "kv source" caches:
  once per forward, not per layer), nor are a top-k layer's rows recombined for the same
  ``topk_indices`` tensor (``reuse.py`` decides both).
* **regular**: ``paged_fp8_sparse_attn_fwd`` straight from the FP8 caches, no workspace. The
  main scope is the compressed cache (top-k: the picks mapped through the compressed token
  table, -1 where not complete/causal; dense: every complete entry), the extra scope the SWA
  cache (the query's window, W wide, -1 where clipped at 0). SWA-only layers use the SWA cache
  as the only scope. The layer-independent rows (window ids, dense ids) are built once per
  forward; a top-k layer passing the previous one's ``topk_indices`` tensor, unwritten, reuses
  its mapped ids (when the batch fits one block of ``REGULAR_INDEX_ROWS`` rows).

``routing.py`` decides which path each ratio's layers take. Work is split over query rows where
``max_query_rows`` says so; the results do not depend on the split.
"""

from __future__ import annotations

import torch

from sparse_prefill._utils import (
    IMPLS,
    check_disjoint,
    check_int,
    check_no_overlap,
    check_tensor,
    check_unit_stride,
    resolve_impl,
    value_checks_enabled,
)
from sparse_prefill.backend import routing
from sparse_prefill.backend.chunk_cache import ChunkCacheBuilder, SparsePrefillChunkCache
from sparse_prefill.backend.config import ModelConfig
from sparse_prefill.backend.layer_kinds import SWA_RATIO, LayerKind
from sparse_prefill.backend.metadata import BatchMetadata, LayerCaches
from sparse_prefill.backend.reuse import stamp, unchanged
from sparse_prefill.ops.cache import dequantize_k_cache_paged
from sparse_prefill.ops import kernel_choice
from sparse_prefill.ops.flashmla_impl import FLASHMLA_DECODE_MAX_ROWS
from sparse_prefill.ops.fp8_sparse_attn import paged_fp8_sparse_attn_fwd
from sparse_prefill.ops.sparse_attn import sparse_attn_fwd


# Query rows whose top-k picks the regular path maps at once (int64 transients of
# ~20 bytes per pick: 16384 rows x topk 1024 stay near 350 MB).
REGULAR_INDEX_ROWS = 16384
# The regular path keeps a forward's dense rows for all its layers up to this size; larger
# ones (very long contexts) are rebuilt per block of REGULAR_INDEX_ROWS rows in each layer.
REGULAR_SHARED_ROWS_BYTES = 1 << 30


def _lookup(table: torch.Tensor, req: torch.Tensor, cols: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``table[req, cols]`` where ``valid`` (those columns exist), -1 elsewhere; int32."""
    if table.shape[1] == 0:  # e.g. no request has a complete compressed entry yet
        return torch.full(valid.shape, -1, dtype=torch.int32, device=table.device)
    return torch.where(valid, table[req, torch.where(valid, cols, 0)], -1)


def window_token_ids(metadata: BatchMetadata, window_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SWA-cache token ids of each query's window, as the regular path's SWA scope.

    Returns ``(ids [num_tokens, W] int32, lens [num_tokens] int32)``: row ``i`` (position ``p``)
    holds positions ``max(0, p - W + 1) ..`` ascending, mapped through
    ``metadata.swa_token_table``, ``lens[i] = min(p + 1, W)`` of them, then -1.
    """
    md = metadata
    pos = md.query_pos.long()[:, None]
    cols = torch.clamp(pos - window_size + 1, min=0) + torch.arange(window_size, device=md.device)
    lens = torch.clamp(pos[:, 0] + 1, max=window_size).to(torch.int32)
    return _lookup(md.swa_token_table, md.query_req[:, None], cols, cols <= pos), lens


def dense_width(metadata: BatchMetadata, ratio: int) -> int:
    """Columns of ``dense_token_ids``: the longest request's complete entries (at least 1)."""
    return max(1, max(s // ratio for s in metadata.seq_lens_host))  # kernels need >= 1 column


def dense_token_ids(
    metadata: BatchMetadata, ratio: int, start: int = 0, stop: int | None = None, *, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed-cache token ids of every complete entry of query rows ``start:stop`` (dense
    layers).

    Returns ``(ids [rows, width] int32, lens [rows] int32)`` (``width`` defaults to
    ``dense_width(metadata, ratio)``; a wider one pads with -1): row ``i``
    (position ``p``) holds entries ``0 .. (p + 1) // ratio - 1`` mapped through
    ``metadata.compressed_token_tables[ratio]``, ``lens[i]`` of them, then -1.
    """
    md = metadata
    count = (md.query_pos[start:stop].long() + 1) // ratio
    cols = torch.arange(dense_width(md, ratio) if width is None else width, device=md.device)
    valid = cols < count[:, None]
    ids = _lookup(md.compressed_token_tables[ratio], md.query_req[start:stop, None], cols, valid)
    return ids, count.to(torch.int32)


def picked_token_ids(
    metadata: BatchMetadata, topk_indices: torch.Tensor, ratio: int, start: int = 0, stop: int | None = None
) -> torch.Tensor:
    """Compressed-cache token ids of a top-k layer's indexer picks of query rows ``start:stop``.

    ``topk_indices`` is the layer's ``[num_tokens, topk]`` int32 request-local entry ids. Returns
    ``[stop - start, topk]`` int32: a pick ``j`` of a query at position ``p`` maps through
    ``metadata.compressed_token_tables[ratio]`` when complete and causal
    (``0 <= j < (p + 1) // ratio``), else -1 (in place: the row is not compacted).
    """
    md = metadata
    picks = topk_indices[start:stop].long()
    valid = (picks >= 0) & (picks < ((md.query_pos[start:stop].long() + 1) // ratio)[:, None])
    return _lookup(md.compressed_token_tables[ratio], md.query_req[start:stop, None], picks, valid)


class _ForwardState:
    """Everything derived from one metadata generation; dropped as a whole when it changes."""

    def __init__(self, metadata: BatchMetadata) -> None:
        self.metadata = metadata
        self.generation = metadata.generation
        self.paths: dict[int, str] = {}
        self.chunk_cache: SparsePrefillChunkCache | None = None
        # ratio -> the sparse path's bf16 workspace of that ratio's layers.
        self.workspaces: dict[int, torch.Tensor] = {}
        # (ratio, "compressed" | "swa") -> stamp of the cache that region was dequantized from.
        self.filled: dict[tuple[int, str], object] = {}
        # ratio -> (ids, lengths) of the regular path's layer-independent rows (0: the window).
        self.regular_rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # top-k ratio -> (stamp of the picks, their mapped ids) of the regular path's last layer.
        self.regular_picks: dict[int, tuple[object, torch.Tensor]] = {}


class SparsePrefillBackend:
    """DeepSeek-V4 attention over paged FP8 caches, for extend (prefill) and decode batches.

    Args:
        config: the model (:class:`ModelConfig`).
        path: "auto" (the routing rule of ``routing.py``; defers to ``$SPARSE_PREFILL_PATH``),
            "sparse" or "regular" (forced for extend batches; decode is always regular).
        impl: the attention ops' implementation (``sparse_attn_fwd`` / ``paged_fp8_sparse_attn_fwd``):
            "auto" (their own choice: ``ops/kernel_choice.py``), "triton", "gluon", "flashmla"
            (FlashMLA's kernels; the regular path then runs at most ``FLASHMLA_DECODE_MAX_ROWS``
            rows a launch) or "reference". The index and cache ops take the same value where
            they have it ("auto", "triton", "reference"), else "auto" (their Triton kernels on
            CUDA). An implementation that cannot run on the batch's device raises ValueError at
            the layer's start.
        max_query_rows: at most this many query rows per attention launch (None: no limit;
            kernels handle any row count, this bounds per-launch transients).
        costs: the routing cost model's constants (``routing.DEFAULT_COSTS``).
        cuda_graph: make ``begin_forward`` + the layers capturable in one CUDA graph (see
            "CUDA graphs" below). Every batch then takes the regular path (the sparse path's
            workspace and gather sizes follow the request lengths, fixed at capture) and the
            ratio-128 rows span the whole compressed token table (its width, not the longest
            request's entries), so no size depends on the lengths. ``path="sparse"`` is refused.

    Use::

        backend.begin_forward(metadata)          # once per forward (or pass metadata=...)
        for layer in range(config.num_layers):
            out = backend.forward(layer, q, caches[layer], topk_indices, attn_sink)

    State built for a forward (chunk cache, workspace, index rows, path choices) belongs to one
    metadata object and generation: a new object, or ``metadata.copy_``, rebuilds it at the next
    layer when Python runs it, so stale state is never used.

    CUDA graphs (decode batches, and extend batches of a fixed request and token count): build
    a static ``BatchMetadata`` whose token tables are sized by the maxima (columns for the
    longest sequence), static ``q`` / ``topk_indices`` / ``out`` buffers, and a backend with
    ``cuda_graph=True``; run one forward eagerly (compiles the kernels), then capture
    ``begin_forward(static)`` and the layers. Before each replay, refill the buffers and
    ``static.copy_(new, in_place=True)``: the lengths and tables land in the captured tensors
    (it raises instead when a shape differs), and the replay recomputes the index rows from
    them on the device. A plain backend raises when ``begin_forward`` runs under capture.
    """

    def __init__(
        self,
        config: ModelConfig,
        path: str = "auto",
        *,
        impl: str = "auto",
        max_query_rows: int | None = None,
        costs: routing.PathCosts = routing.DEFAULT_COSTS,
        cuda_graph: bool = False,
    ) -> None:
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self._ratios = sorted(set(config.compress_ratios))  # distinct, ascending
        self.path_setting = routing.path_setting(path)
        self.impl = kernel_choice.check_name(impl)
        # The index and cache ops have no Gluon or FlashMLA kernel.
        self.ops_impl = impl if impl in IMPLS else "auto"
        if max_query_rows is not None:
            check_int("max_query_rows", max_query_rows, lo=1)
        self.max_query_rows = max_query_rows
        if not isinstance(costs, routing.PathCosts):
            raise TypeError(f"costs must be a routing.PathCosts, got {type(costs).__name__}")
        self.costs = costs
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
        if cuda_graph and self.path_setting == routing.SPARSE:
            raise ValueError(
                "cuda_graph=True takes the regular path only (the sparse path's sizes follow the request "
                "lengths): use path='auto' or 'regular'"
            )
        self.cuda_graph = cuda_graph
        self._state: _ForwardState | None = None
        # (sparse ratios, device type) -> their chunk-cache builder: the model's side of the
        # build is validated once, not every forward.
        self._chunk_builders: dict[tuple[tuple[int, ...], str], ChunkCacheBuilder] = {}

    # -- per-forward state -------------------------------------------------------------------

    def begin_forward(self, metadata: BatchMetadata) -> None:
        """Start a forward over ``metadata``'s batch (drops all state of the previous one) and
        build its per-forward state: the path of every ratio, the sparse path's chunk cache and
        workspace, the regular path's shared index rows. That is all the host work of a forward
        (no device sync), so the per-layer ``forward`` calls only queue device work: call this
        outside a ``torch.compile``-d layer stack or a captured CUDA graph."""
        self._check_metadata(metadata)
        if not self.cuda_graph and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "begin_forward is being captured in a CUDA graph, but this backend sizes its state by the "
                "request lengths, which a replay would not update: use SparsePrefillBackend(..., cuda_graph=True)"
            )
        self._state = state = _ForwardState(metadata)
        ratios = self._ratios
        paths = {r: self.path_for(r) for r in ratios}  # every ratio's, in state.paths from here on
        if routing.SPARSE in paths.values():
            self.chunk_cache()
        if routing.REGULAR in paths.values():
            self._shared_rows(state, SWA_RATIO)
        for r in ratios:
            if paths[r] == routing.REGULAR and self._shares_dense_rows(metadata, r):
                self._shared_rows(state, r)

    def _check_metadata(self, metadata: object) -> None:
        if not isinstance(metadata, BatchMetadata):
            raise TypeError(f"metadata must be a BatchMetadata, got {type(metadata).__name__}")
        if metadata.config != self.config:
            raise ValueError("metadata was built for a different ModelConfig than the backend's")

    def _current(self, metadata: BatchMetadata | None) -> _ForwardState:
        state = self._state
        if metadata is None:
            if state is None:
                raise ValueError("no batch metadata: call begin_forward(metadata) or pass metadata=")
            metadata = state.metadata
        elif state is None or state.metadata is not metadata:
            self.begin_forward(metadata)
            return self._state
        if state.generation != metadata.generation:  # refilled in place (copy_)
            self.begin_forward(metadata)
        return self._state

    def path_for(self, ratio: int, metadata: BatchMetadata | None = None) -> str:
        """The path ("sparse" or "regular") the ratio-``ratio`` layers take for the batch."""
        state = self._current(metadata)
        if ratio not in state.paths:
            setting = routing.REGULAR if self.cuda_graph else self.path_setting
            state.paths[ratio] = routing.choose_path(setting, self.config, state.metadata, ratio, self.costs)
        return state.paths[ratio]

    # -- forward -----------------------------------------------------------------------------

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        caches: LayerCaches | tuple[torch.Tensor, torch.Tensor | None],
        topk_indices: torch.Tensor | None = None,
        attn_sink: torch.Tensor | None = None,
        *,
        metadata: BatchMetadata | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of one layer for every query token of the batch.

        Args:
            layer: the layer index, ``0 <= layer < config.num_layers`` (its compress ratio
                comes from ``config.compress_ratios``).
            q: ``[num_tokens, h_q, 512]`` bfloat16, unit stride in the last dim: the batch's
                query tokens, request by request (``metadata.query_start_loc``), at positions
                ``metadata.query_pos``.
            caches: the layer's :class:`LayerCaches` ``(swa, compressed)``: V4 FP8 paged uint8
                ``[num_pages, page_bytes]`` caches with the config's page sizes, holding every
                token the batch's tables map (the chunk's own K included). ``compressed`` is
                None for SWA-only (ratio-0) layers. Layers may pass the same compressed cache
                (V4.1's shared caches): the sparse path then dequantizes it once per forward
                unless it was written in between.
            topk_indices: top-k layers (ratios 1, 2, 4): ``[num_tokens, topk]`` int32, the
                indexer's request-local compressed entry ids per query, duplicate-free per row;
                entries that are negative or not complete for the query
                (``j >= (p + 1) // ratio``) are ignored. None for SWA-only and dense layers.
                Layers may pass the same tensor (V4.1's index sharing): its rows are reused.
            attn_sink: ``[h_q]`` float32 per-head sink, or None.
            metadata: the batch; defaults to the one given to ``begin_forward``. Passing a
                different object (or one refilled by ``copy_``) starts a new forward.
            out: optional ``[num_tokens, h_q, 512]`` bfloat16 output buffer, unit stride in the
                last dim, no two elements sharing memory; written and returned.

        Returns:
            ``[num_tokens, h_q, 512]`` bfloat16: per query at position ``p``, softmax attention
            over the tokens DESIGN.md's table makes visible (window ``max(0, p - W + 1) .. p``
            plus, top-k layers, its complete picks, dense layers, every complete entry), with
            ``sm_scale``, times ``exp(lse) / (exp(lse) + exp(attn_sink[h]))``.

        Raises TypeError/ValueError naming the argument before any launch.
        """
        # Every argument is checked before _current may build the forward's state (launches).
        if metadata is None:
            if self._state is None:
                raise ValueError("no batch metadata: call begin_forward(metadata) or pass metadata=")
            md = self._state.metadata
        else:
            self._check_metadata(metadata)
            md = metadata
        cfg = self.config
        check_int("layer", layer, lo=0, hi=cfg.num_layers - 1)
        ratio = cfg.compress_ratios[layer]
        device = md.device
        q_shape = (md.num_tokens, cfg.num_heads, cfg.head_dim)
        check_tensor("q", q, dtypes=(torch.bfloat16,), shape=q_shape, device=device)
        check_unit_stride("q", q)  # the ops check it too, but after the sparse path's dequantize
        caches = self._check_caches(caches, ratio, md)
        if cfg.kind_of(ratio) is LayerKind.TOPK:
            check_tensor(
                "topk_indices", topk_indices, dtypes=(torch.int32,), shape=(md.num_tokens, cfg.topk), device=device
            )
        elif topk_indices is not None:
            raise ValueError(
                f"topk_indices is for top-k layers only; layer {layer} has ratio {ratio} ({cfg.kind_of(ratio).value})"
            )
        if attn_sink is not None:
            check_tensor("attn_sink", attn_sink, dtypes=(torch.float32,), shape=(cfg.num_heads,), device=device)
        if out is None:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        else:
            check_tensor("out", out, dtypes=(torch.bfloat16,), shape=tuple(q.shape), device=device)
            check_unit_stride("out", out)
            check_no_overlap("out", out)
            check_disjoint("out", out, q=q, **{"caches.swa": caches.swa, "caches.compressed": caches.compressed},
                           topk_indices=topk_indices, attn_sink=attn_sink)
        resolve_impl(self.ops_impl, device)

        state = self._current(metadata)
        sparse = self.path_for(ratio) == routing.SPARSE
        op = kernel_choice.SPARSE_ATTN if sparse else kernel_choice.PAGED_FP8
        kernel_choice.check_device(op, self.impl, device, cfg.layout)
        if sparse:
            self._forward_sparse(state, ratio, q, caches, topk_indices, attn_sink, out)
        else:
            self._forward_regular(state, ratio, q, caches, topk_indices, attn_sink, out)
        return out

    __call__ = forward

    def _check_caches(self, caches: object, ratio: int, md: BatchMetadata) -> LayerCaches:
        if not isinstance(caches, tuple) or len(caches) != 2:
            raise TypeError(f"caches must be a LayerCaches(swa, compressed) pair, got {type(caches).__name__}")
        caches = LayerCaches(*caches)
        device = md.device
        check_tensor("caches.swa", caches.swa, dtypes=(torch.uint8,), shape=(None, None), device=device)
        scopes = [("caches.swa", caches.swa, self.config.swa_page_size, md.max_swa_id)]
        if ratio == SWA_RATIO:
            if caches.compressed is not None:
                raise ValueError("caches.compressed must be None for an SWA-only (ratio-0) layer")
        else:
            check_tensor(
                "caches.compressed", caches.compressed, dtypes=(torch.uint8,), shape=(None, None), device=device
            )
            max_id = None if md.max_compressed_id is None else md.max_compressed_id[ratio]
            scopes.append(("caches.compressed", caches.compressed, self.config.page_size_of(ratio), max_id))
        for name, cache, page_size, max_id in scopes:
            want = self.config.layout.page_bytes(page_size)
            if cache.shape[1] != want:
                raise ValueError(
                    f"{name} must have {want} bytes per page (V4, page size {page_size}), got {cache.shape[1]}"
                )
            # Checked here too so that the message names the caller's argument, not the op's.
            if cache.shape[0] < 1:
                raise ValueError(f"{name} must have at least one page, got shape {tuple(cache.shape)}")
            if not cache.is_contiguous():
                raise ValueError(f"{name} must be contiguous, got strides {tuple(cache.stride())}")
            # The metadata measured its largest reachable id once (value checks on): free here.
            if value_checks_enabled() and max_id is not None and max_id >= cache.shape[0] * page_size:
                raise ValueError(
                    f"the batch's tables reach token id {max_id}, beyond {name}'s capacity of "
                    f"{cache.shape[0] * page_size} tokens"
                )
        return caches

    def _row_blocks(self, n: int, limit: int | None = None) -> list[tuple[int, int]]:
        """Row ranges of at most ``max_query_rows`` (and ``limit``) rows covering ``0 .. n - 1``."""
        step = min(x for x in (self.max_query_rows, limit, max(n, 1)) if x is not None)
        return [(a, min(n, a + step)) for a in range(0, n, step)]

    # -- sparse path -------------------------------------------------------------------------

    def chunk_cache(self, metadata: BatchMetadata | None = None) -> SparsePrefillChunkCache:
        """The sparse path's chunk cache of the current forward (built now if not yet), for the
        ratios routed sparse (every ratio when none is). No device sync.

        Its accessors take ``key=metadata.generation``."""
        state = self._current(metadata)
        md, cfg = state.metadata, self.config
        if state.chunk_cache is None or not state.chunk_cache.is_valid_for(state.generation):
            # The ratios routed sparse (all when none is, for callers that ask anyway); the host
            # lengths spare the build its device sync.
            ratios = [r for r in self._ratios if state.paths[r] == routing.SPARSE] or self._ratios
            builder_key = (tuple(ratios), md.device.type)
            builder = self._chunk_builders.get(builder_key)
            if builder is None:
                builder = self._chunk_builders[builder_key] = SparsePrefillChunkCache.builder(
                    window_size=cfg.window_size,
                    ratios=ratios,
                    topk=cfg.topk if any(r in cfg.topk_ratios for r in ratios) else None,
                    ratio_kinds=cfg.ratio_kinds,
                    impl=self.ops_impl,
                    device=md.device,
                )
            state.chunk_cache = builder.build(
                key=state.generation,
                seq_lens=md.seq_lens,
                extend_lens=md.extend_lens,
                swa_token_table=md.swa_token_table,
                compressed_token_tables={r: md.compressed_token_tables[r] for r in ratios if r > 0},
                host_lens=(md.seq_lens_host, md.extend_lens_host),
            )
            state.workspaces, state.filled = {}, {}
        return state.chunk_cache

    def _forward_sparse(self, state, ratio, q, caches, topk_indices, attn_sink, out) -> None:
        cfg = self.config
        chunk = self.chunk_cache()
        plan, indices, lens = chunk.layer(ratio, state.generation, topk_indices)
        if ratio not in state.workspaces:
            state.workspaces[ratio] = torch.empty(
                max(plan.num_rows, 1), 1, cfg.head_dim, dtype=torch.bfloat16, device=q.device
            )
        ws = state.workspaces[ratio]
        regions = [("swa", caches.swa, plan.swa_token_ids, cfg.swa_page_size, plan.swa_rows)]
        if plan.num_compressed_rows:
            regions.append(("compressed", caches.compressed, plan.compressed_token_ids, cfg.page_size_of(ratio),
                            plan.compressed_rows))
        for name, cache, ids, page_size, rows in regions:
            if unchanged(state.filled.get((ratio, name)), cache):
                continue  # the region holds this cache's tokens already (a shared cache)
            state.filled[(ratio, name)] = None  # being overwritten
            dequantize_k_cache_paged(cache, ids, page_size, cfg.layout, out=ws[rows], impl=self.ops_impl)
            state.filled[(ratio, name)] = stamp(cache)
        for a, b in self._row_blocks(q.shape[0]):
            sparse_attn_fwd(
                q[a:b], ws, indices[a:b, None, :], cfg.sm_scale, cfg.head_dim, attn_sink, lens[a:b],
                out=out[a:b], impl=self.impl,
            )

    # -- regular path ------------------------------------------------------------------------

    def _shared_rows(self, state: _ForwardState, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer-independent index rows of the regular path, built once per forward: the window
        (ratio 0) or every complete entry of a dense ratio."""
        if ratio not in state.regular_rows:
            md = state.metadata
            if ratio == SWA_RATIO:
                rows = window_token_ids(md, self.config.window_size)
            else:
                rows = dense_token_ids(md, ratio, width=self._dense_width(md, ratio))
            state.regular_rows[ratio] = rows
        return state.regular_rows[ratio]

    def _dense_width(self, md: BatchMetadata, ratio: int) -> int:
        """Columns of the regular path's rows of a dense ratio: the table's under ``cuda_graph``
        (fixed at capture), else the longest request's entries."""
        return max(1, md.compressed_token_tables[ratio].shape[1]) if self.cuda_graph else dense_width(md, ratio)

    def _shares_dense_rows(self, md: BatchMetadata, ratio: int) -> bool:
        """Whether the regular path keeps a dense ratio's rows for all its layers."""
        return (self.config.kind_of(ratio) is LayerKind.DENSE
                and md.num_tokens * self._dense_width(md, ratio) * 4 <= REGULAR_SHARED_ROWS_BYTES)

    def _picked_rows(self, state: _ForwardState, ratio: int, topk_indices: torch.Tensor, a: int, b: int):
        """``picked_token_ids`` of rows ``a:b``; for the whole batch, kept for a later layer of
        ``ratio`` that passes the same, unwritten ``topk_indices`` (V4.1's index sharing)."""
        md = state.metadata
        if (a, b) != (0, md.num_tokens):
            return picked_token_ids(md, topk_indices, ratio, a, b)
        kept = state.regular_picks.get(ratio)
        if kept is not None and unchanged(kept[0], topk_indices):
            return kept[1]
        ids = picked_token_ids(md, topk_indices, ratio, a, b)
        state.regular_picks[ratio] = (stamp(topk_indices), ids)
        return ids

    def _forward_regular(self, state, ratio, q, caches, topk_indices, attn_sink, out) -> None:
        cfg = self.config
        swa_ids, swa_lens = self._shared_rows(state, SWA_RATIO)
        md = state.metadata
        kind = cfg.kind_of(ratio)
        shared_dense = self._shares_dense_rows(md, ratio)
        if shared_dense:
            dense_ids, dense_lens = self._shared_rows(state, ratio)
        # Top-k picks (and a large dense layer) map per block of rows: that bounds the transients.
        # FlashMLA's decode kernel takes at most FLASHMLA_DECODE_MAX_ROWS rows (it aborts past them).
        limit = min(REGULAR_INDEX_ROWS, FLASHMLA_DECODE_MAX_ROWS) if self.impl == "flashmla" else REGULAR_INDEX_ROWS
        for a, b in self._row_blocks(q.shape[0], limit):
            common = dict(attn_sink=attn_sink, layout=cfg.layout, d_v=cfg.head_dim, out=out[a:b], impl=self.impl)
            if kind is LayerKind.SWA:
                paged_fp8_sparse_attn_fwd(
                    q[a:b], caches.swa, swa_ids[a:b], cfg.swa_page_size, cfg.sm_scale,
                    topk_length=swa_lens[a:b], **common,
                )
                continue
            if kind is LayerKind.TOPK:
                ids, lens = self._picked_rows(state, ratio, topk_indices, a, b), None
            elif shared_dense:
                ids, lens = dense_ids[a:b], dense_lens[a:b]
            else:
                ids, lens = dense_token_ids(md, ratio, a, b, width=self._dense_width(md, ratio))
            paged_fp8_sparse_attn_fwd(
                q[a:b], caches.compressed, ids, cfg.page_size_of(ratio), cfg.sm_scale,
                extra_cache=caches.swa, extra_indices=swa_ids[a:b], extra_page_size=cfg.swa_page_size,
                topk_length=lens, extra_topk_length=swa_lens[a:b], **common,
            )
