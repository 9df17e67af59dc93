"""The DeepSeek-V4 attention backend: what an engine calls once per attention layer.

Two interchangeable paths compute DESIGN.md's attention table (``naive.py`` is its reference):

* **sparse** (DESIGN.md steps 1-5): a :class:`SparsePrefillChunkCache` built at the first
  sparse layer of a forward holds the SWA gather, the workspace plan of each ratio and the
  ratio-1/128 index rows; each layer dequantizes its own caches by the plan into one reused
  bf16 workspace, recombines its rows from its top-k (ratio 4 only) and runs
  ``sparse_attn_fwd`` with ``topk_length``.
* **regular**: ``paged_fp8_sparse_attn_fwd`` straight from the FP8 caches, no workspace. The
  main scope is the compressed cache (ratio 4: the top-k picks mapped through the compressed
  token table, -1 where not complete/causal; ratio 128: every complete entry), the extra scope
  the SWA cache (the query's window, W wide, -1 where clipped at 0). Ratio-1 layers use the SWA
  cache as the only scope. The layer-independent rows (window ids, ratio-128 ids) are built once
  per forward.

``routing.py`` decides which path each ratio's layers take. Work is split over query rows where
``max_query_rows`` says so; the results do not depend on the split.
"""

from __future__ import annotations

import torch

from sparse_prefill._utils import check_int, check_tensor, resolve_impl, value_checks_enabled
from sparse_prefill.backend import routing
from sparse_prefill.backend.chunk_cache import SparsePrefillChunkCache
from sparse_prefill.backend.config import ModelConfig
from sparse_prefill.backend.metadata import BatchMetadata, LayerCaches
from sparse_prefill.ops.cache import dequantize_k_cache_paged
from sparse_prefill.ops.fp8_sparse_attn import paged_fp8_sparse_attn_fwd
from sparse_prefill.ops.sparse_attn import sparse_attn_fwd


class _ForwardState:
    """Everything derived from one metadata generation; dropped as a whole when it changes."""

    def __init__(self, metadata: BatchMetadata) -> None:
        self.metadata = metadata
        self.generation = metadata.generation
        self.paths: dict[int, str] = {}
        self.chunk_cache: SparsePrefillChunkCache | None = None
        self.workspace: torch.Tensor | None = None
        # ratio -> (indices, lengths) of the regular path's layer-independent scopes.
        self.regular_rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


class SparsePrefillBackend:
    """DeepSeek-V4 attention over paged FP8 caches, for extend (prefill) and decode batches.

    Args:
        config: the model (:class:`ModelConfig`).
        path: "auto" (the routing rule of ``routing.py``; defers to ``$SPARSE_PREFILL_PATH``),
            "sparse" or "regular" (forced for extend batches; decode is always regular).
        impl: the ops' implementation: "auto" (Triton on CUDA, PyTorch reference on CPU),
            "triton" or "reference".
        max_query_rows: at most this many query rows per attention launch (None: no limit;
            kernels handle any row count, this bounds per-launch transients).
        costs: the routing cost model's constants (``routing.DEFAULT_COSTS``).

    Use::

        backend.begin_forward(metadata)          # once per forward (or pass metadata=...)
        for layer in range(config.num_layers):
            out = backend.forward(layer, q, caches[layer], topk_indices, attn_sink)

    State built for a forward (chunk cache, workspace, index rows, path choices) belongs to one
    metadata object and generation: a new object, or ``metadata.copy_`` (CUDA-graph replay),
    rebuilds it at the next layer, so stale state is never used.
    """

    def __init__(
        self,
        config: ModelConfig,
        path: str = "auto",
        *,
        impl: str = "auto",
        max_query_rows: int | None = None,
        costs: routing.PathCosts = routing.DEFAULT_COSTS,
    ) -> None:
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.path_setting = routing.path_setting(path)
        if impl not in ("auto", "triton", "reference"):
            raise ValueError(f"impl must be one of ('auto', 'triton', 'reference'), got {impl!r}")
        self.impl = impl
        if max_query_rows is not None:
            check_int("max_query_rows", max_query_rows, lo=1)
        self.max_query_rows = max_query_rows
        if not isinstance(costs, routing.PathCosts):
            raise TypeError(f"costs must be a routing.PathCosts, got {type(costs).__name__}")
        self.costs = costs
        self._state: _ForwardState | None = None

    # -- per-forward state -------------------------------------------------------------------

    def begin_forward(self, metadata: BatchMetadata) -> None:
        """Start a forward over ``metadata``'s batch (drops all state of the previous one)."""
        self._check_metadata(metadata)
        self._state = _ForwardState(metadata)

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
            state.paths[ratio] = routing.choose_path(
                self.path_setting, self.config, state.metadata, ratio, self.costs
            )
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
                None for ratio-1 layers.
            topk_indices: ratio-4 layers: ``[num_tokens, topk]`` int32, the indexer's
                request-local compressed entry ids per query, duplicate-free per row; entries
                that are negative or not complete for the query (``j >= (p + 1) // 4``) are
                ignored. None for ratio 1 and 128.
            attn_sink: ``[h_q]`` float32 per-head sink, or None.
            metadata: the batch; defaults to the one given to ``begin_forward``. Passing a
                different object (or one refilled by ``copy_``) starts a new forward.
            out: optional ``[num_tokens, h_q, 512]`` bfloat16 output buffer.

        Returns:
            ``[num_tokens, h_q, 512]`` bfloat16: per query at position ``p``, softmax attention
            over the tokens DESIGN.md's table makes visible (window ``max(0, p - W + 1) .. p``
            plus, ratio 4, its complete picks, ratio 128, every complete entry), with
            ``sm_scale``, times ``exp(lse) / (exp(lse) + exp(attn_sink[h]))``.

        Raises TypeError/ValueError naming the argument before any launch.
        """
        state = self._current(metadata)
        md = state.metadata
        cfg = self.config
        check_int("layer", layer, lo=0, hi=cfg.num_layers - 1)
        ratio = cfg.compress_ratios[layer]
        device = md.device
        check_tensor("q", q, dtypes=(torch.bfloat16,), shape=(md.num_tokens, cfg.num_heads, cfg.head_dim), device=device)
        caches = self._check_caches(caches, ratio, device)
        if ratio == 4:
            check_tensor("topk_indices", topk_indices, dtypes=(torch.int32,), shape=(md.num_tokens, cfg.topk), device=device)
        elif topk_indices is not None:
            raise ValueError(f"topk_indices is for ratio-4 layers only; layer {layer} has ratio {ratio}")
        if attn_sink is not None:
            check_tensor("attn_sink", attn_sink, dtypes=(torch.float32,), shape=(cfg.num_heads,), device=device)
        if out is None:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        else:
            check_tensor("out", out, dtypes=(torch.bfloat16,), shape=tuple(q.shape), device=device)
        resolve_impl(self.impl, device)

        if self.path_for(ratio) == routing.SPARSE:
            self._forward_sparse(state, ratio, q, caches, topk_indices, attn_sink, out)
        else:
            self._forward_regular(state, ratio, q, caches, topk_indices, attn_sink, out)
        return out

    __call__ = forward

    def _check_caches(self, caches: object, ratio: int, device: torch.device) -> LayerCaches:
        if not isinstance(caches, tuple) or len(caches) != 2:
            raise TypeError(f"caches must be a LayerCaches(swa, compressed) pair, got {type(caches).__name__}")
        caches = LayerCaches(*caches)
        md = self._state.metadata
        check_tensor("caches.swa", caches.swa, dtypes=(torch.uint8,), shape=(None, None), device=device)
        scopes = [("caches.swa", caches.swa, self.config.swa_page_size, md.max_swa_id)]
        if ratio == 1:
            if caches.compressed is not None:
                raise ValueError("caches.compressed must be None for a ratio-1 layer")
        else:
            check_tensor("caches.compressed", caches.compressed, dtypes=(torch.uint8,), shape=(None, None), device=device)
            max_id = None if md.max_compressed_id is None else md.max_compressed_id[ratio]
            scopes.append(("caches.compressed", caches.compressed, self.config.page_size_of(ratio), max_id))
        for name, cache, page_size, max_id in scopes:
            want = self.config.layout.page_bytes(page_size)
            if cache.shape[1] != want:
                raise ValueError(f"{name} must have {want} bytes per page (V4, page size {page_size}), got {cache.shape[1]}")
            # The metadata measured its largest reachable id once (value checks on): free here.
            if value_checks_enabled() and max_id is not None and max_id >= cache.shape[0] * page_size:
                raise ValueError(
                    f"the batch's tables reach token id {max_id}, beyond {name}'s capacity of "
                    f"{cache.shape[0] * page_size} tokens"
                )
        return caches

    def _row_blocks(self, n: int) -> list[tuple[int, int]]:
        step = self.max_query_rows or max(n, 1)
        return [(a, min(n, a + step)) for a in range(0, n, step)]

    # -- sparse path -------------------------------------------------------------------------

    def _chunk_cache(self, state: _ForwardState) -> SparsePrefillChunkCache:
        md, cfg = state.metadata, self.config
        if state.chunk_cache is None or not state.chunk_cache.is_valid_for(state.generation):
            state.chunk_cache = SparsePrefillChunkCache.build(
                key=state.generation,
                seq_lens=md.seq_lens,
                extend_lens=md.extend_lens,
                swa_token_table=md.swa_token_table,
                window_size=cfg.window_size,
                ratios=sorted(set(cfg.compress_ratios)),
                compressed_token_tables=md.compressed_token_tables,
                c4_topk=cfg.topk if 4 in cfg.compress_ratios else None,
                impl=self.impl,
            )
            state.workspace = torch.empty(
                max(state.chunk_cache.max_workspace_rows, 1), 1, cfg.head_dim, dtype=torch.bfloat16, device=md.device
            )
        return state.chunk_cache

    def _forward_sparse(self, state, ratio, q, caches, topk_indices, attn_sink, out) -> None:
        cfg = self.config
        chunk = self._chunk_cache(state)
        plan, indices, lens = chunk.layer(ratio, state.generation, topk_indices)
        ws = state.workspace
        if ratio > 1:
            dequantize_k_cache_paged(
                caches.compressed, plan.compressed_token_ids, cfg.page_size_of(ratio), cfg.layout,
                out=ws[plan.compressed_rows], impl=self.impl,
            )
        dequantize_k_cache_paged(
            caches.swa, plan.swa_token_ids, cfg.swa_page_size, cfg.layout, out=ws[plan.swa_rows], impl=self.impl
        )
        kv = ws[: max(plan.num_rows, 1)]
        for a, b in self._row_blocks(q.shape[0]):
            sparse_attn_fwd(
                q[a:b], kv, indices[a:b, None, :], cfg.sm_scale, cfg.head_dim, attn_sink, lens[a:b],
                out=out[a:b], impl=self.impl,
            )

    # -- regular path ------------------------------------------------------------------------

    def _window_rows(self, state: _ForwardState) -> tuple[torch.Tensor, torch.Tensor]:
        """SWA-cache ids of each query's window ``[num_tokens, W]`` (ascending from
        ``max(0, p - W + 1)``, -1 past ``p``) and its length ``min(p + 1, W)``."""
        if "swa" not in state.regular_rows:
            md, w = state.metadata, self.config.window_size
            pos = md.query_pos.long()[:, None]
            cols = torch.clamp(pos - w + 1, min=0) + torch.arange(w, device=md.device)
            ids = md.swa_token_table[md.query_req[:, None], torch.minimum(cols, pos)]
            ids = torch.where(cols <= pos, ids, -1)
            lens = torch.clamp(pos[:, 0] + 1, max=w).to(torch.int32)
            state.regular_rows["swa"] = (ids, lens)
        return state.regular_rows["swa"]

    def _dense_rows(self, state: _ForwardState, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed-cache ids of every complete entry ``j < (p + 1) // ratio`` of each
        query, ``[num_tokens, max(seq_len // ratio)]`` (-1 past them), and their count."""
        key = f"c{ratio}"
        if key not in state.regular_rows:
            md = state.metadata
            table = md.compressed_token_tables[ratio]
            width = max(1, max(s // ratio for s in md.seq_lens_host))  # kernels need >= 1 column
            count = (md.query_pos.long() + 1) // ratio
            cols = torch.arange(width, device=md.device)
            valid = cols < count[:, None]
            ids = table[md.query_req[:, None], torch.where(valid, cols, 0)]
            state.regular_rows[key] = (torch.where(valid, ids, -1), count.to(torch.int32))
        return state.regular_rows[key]

    def _picked_rows(self, state: _ForwardState, topk_indices: torch.Tensor) -> torch.Tensor:
        """Compressed-cache ids of this layer's complete, causal ratio-4 picks, -1 elsewhere."""
        md = state.metadata
        picks = topk_indices.long()
        valid = (picks >= 0) & (picks < ((md.query_pos.long() + 1) // 4)[:, None])
        ids = md.compressed_token_tables[4][md.query_req[:, None], torch.where(valid, picks, 0)]
        return torch.where(valid, ids, -1)

    def _forward_regular(self, state, ratio, q, caches, topk_indices, attn_sink, out) -> None:
        cfg = self.config
        swa_ids, swa_lens = self._window_rows(state)
        if ratio == 1:
            main = (caches.swa, swa_ids, cfg.swa_page_size, swa_lens)
            extra = None
        else:
            if ratio == 4:
                ids, lens = self._picked_rows(state, topk_indices), None
            else:
                ids, lens = self._dense_rows(state, ratio)
            main = (caches.compressed, ids, cfg.page_size_of(ratio), lens)
            extra = (caches.swa, swa_ids, cfg.swa_page_size, swa_lens)
        cache, ids, page_size, lens = main
        for a, b in self._row_blocks(q.shape[0]):
            kwargs = {}
            if extra is not None:
                e_cache, e_ids, e_page, e_lens = extra
                kwargs = dict(
                    extra_cache=e_cache, extra_indices=e_ids[a:b], extra_page_size=e_page, extra_topk_length=e_lens[a:b]
                )
            paged_fp8_sparse_attn_fwd(
                q[a:b], cache, ids[a:b], page_size, cfg.sm_scale,
                topk_length=None if lens is None else lens[a:b], attn_sink=attn_sink, layout=cfg.layout,
                d_v=cfg.head_dim, out=out[a:b], impl=self.impl, **kwargs,
            )
