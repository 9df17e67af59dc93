"""Context parallelism: the query rows of one prefill chunk split across the ranks of a group.

Rank ``r`` owns a contiguous range of the chunk's rows (engine order: request by request),
chosen so that every rank gets about the same attention work (:func:`partition_rows`). Per
layer it:

1. stores K of its rows' new tokens (and of the compressed entries its rows complete) and
   receives every other rank's (:meth:`ContextParallelPrefill.store_kv`), so every rank's cache
   copy ends up byte for byte what one GPU's would be. What travels is the bf16 K rows
   (1024 B per token or entry); slot ids do not travel, every rank derives them from the
   metadata. Each rank then quantizes every row with ``store_k_cache``: quantization is
   deterministic, so the copies agree. (FP8 bytes would be 584 B per token, but no op writes
   raw token bytes into a cache, and the K exchange is small next to attention: one
   ``[num_tokens, 512]`` bf16 tensor per cache per layer.)
2. attends its rows with the single-GPU backend over a sub-batch (:func:`shard_metadata`): a
   request cut by a range boundary becomes a request whose cached prefix includes the rows
   before the cut, so every row keeps its absolute position and sees exactly the keys it sees
   on one GPU.
3. optionally gathers the outputs back into the engine's order.

The answer equals one GPU's bit for bit: each row's keys, their order and the path (routed on
the whole batch, see ``common.LocalBackends``) are those of one GPU. One detail: the PyTorch
reference reduces over the whole padded index row, whose width for a dense-ratio (128) layer
follows the batch's longest request; on the reference path a rank whose sub-batch is shorter
appends a one-row "anchor" request at the longest request's last position (its output is
dropped) so the widths match. The Triton kernels stop at each row's length and need no anchor.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import torch

from sparse_prefill._utils import check_int, check_tensor, resolve_impl
from sparse_prefill.backend import BatchMetadata, LayerCaches, ModelConfig, SparsePrefillBackend
from sparse_prefill.backend.layer_kinds import SWA_RATIO, LayerKind
from sparse_prefill.ops.cache import store_k_cache
from sparse_prefill.parallel.common import (
    LocalBackends,
    ParallelLayer,
    broadcast_shards,
    check_batch,
    check_bool,
    check_metadata,
    check_ratio,
    output_buffer,
)

RowRange = tuple[int, int]
# Beyond any context-parallel group; it bounds the host work (one range per rank) of a bad value.
MAX_WORLD_SIZE = 1 << 16


def row_costs(config: ModelConfig, metadata: BatchMetadata) -> torch.Tensor:
    """Attention work of each query row over the whole layer stack (host arithmetic).

    Returns ``[num_tokens]`` int64 on the CPU: for the row at absolute position ``p``, the keys
    it attends to, summed over ``config.compress_ratios``: the window ``min(p + 1, W)`` per
    layer, plus ``min((p + 1) // ratio, topk)`` per top-k layer and ``(p + 1) // ratio`` per
    dense layer. Rows near the start of a request cost less. TypeError/ValueError name
    ``config`` or ``metadata`` unless ``metadata`` is a BatchMetadata built for ``config``.
    """
    check_batch(config, metadata)
    pos = torch.cat([
        torch.arange(p, s, dtype=torch.int64) for p, s in zip(metadata.prefix_lens_host, metadata.seq_lens_host)
    ])
    w = config.window_size
    cost = torch.zeros_like(pos)
    for ratio, layers in Counter(config.compress_ratios).items():
        keys = torch.clamp(pos + 1, max=w)
        kind = config.kind_of(ratio)
        if kind is LayerKind.TOPK:
            keys = keys + torch.clamp((pos + 1) // ratio, max=config.topk)
        elif kind is LayerKind.DENSE:
            keys = keys + (pos + 1) // ratio
        cost += layers * keys
    return cost


def partition_rows(config: ModelConfig, metadata: BatchMetadata, world_size: int) -> tuple[RowRange, ...]:
    """Split the chunk's rows into ``world_size`` contiguous ranges of about equal work.

    Args:
        config, metadata: the model and the whole batch.
        world_size: number of ranks, ``1 .. MAX_WORLD_SIZE``.

    Returns:
        ``world_size`` half-open ranges ``(start, stop)`` of query rows (engine order), in rank
        order, covering ``0 .. num_tokens`` without overlap. Boundary ``k`` is the row where the
        prefix sum of :func:`row_costs` comes nearest to ``k / world_size`` of the total; a range
        may be empty when there are fewer rows than ranks. Deterministic (host integers only),
        so every rank computes the same split.
    """
    check_batch(config, metadata)
    check_int("world_size", world_size, lo=1, hi=MAX_WORLD_SIZE)
    csum = row_costs(config, metadata).cumsum(0)
    total = int(csum[-1])
    # Rows before boundary b cost before[b]; b = 0 .. num_tokens.
    before = torch.cat([torch.zeros(1, dtype=torch.int64), csum])
    targets = torch.tensor([total * k // world_size for k in range(1, world_size)], dtype=torch.int64)
    hi = torch.searchsorted(before, targets)  # first b with before[b] >= target
    lo = torch.clamp(hi - 1, min=0)
    nearer_lo = (targets - before[lo]) <= (before[hi] - targets)
    bounds = [0, *torch.where(nearer_lo, lo, hi).tolist(), metadata.num_tokens]
    return tuple((bounds[k], bounds[k + 1]) for k in range(world_size))


def _sub_requests(metadata: BatchMetadata, start: int, stop: int) -> tuple[list[int], list[int], list[int]]:
    """(request, prefix, extend) of each request part within rows ``start .. stop - 1``."""
    reqs, prefix, extend = [], [], []
    q0 = 0
    for r, (p, e) in enumerate(zip(metadata.prefix_lens_host, metadata.extend_lens_host)):
        lo, hi = max(start, q0), min(stop, q0 + e)
        if lo < hi:
            reqs.append(r)
            prefix.append(p + lo - q0)
            extend.append(hi - lo)
        q0 += e
    return reqs, prefix, extend


def shard_metadata(metadata: BatchMetadata, start: int, stop: int, *, anchor: bool = False) -> BatchMetadata:
    """The sub-batch of query rows ``start .. stop - 1`` of ``metadata``, as its own metadata.

    Request ``r`` owns rows ``q0 .. q0 + extend_len - 1`` of the chunk; its part ``lo .. hi - 1``
    inside the range becomes a request with prefix ``prefix_len + (lo - q0)`` and extend
    ``hi - lo`` over the same token-table rows: its rows keep their absolute positions and reach
    the same cache tokens (everything before ``lo`` counts as cached prefix).

    Args:
        metadata: the whole batch.
        start, stop: ``0 <= start < stop <= num_tokens``.
        anchor: append a one-row request at the last position of the batch's longest request
            (first among equals), so that ``max(seq_lens)`` of the sub-batch is the batch's
            (see the module docstring). Its row is the sub-batch's last.

    Returns:
        :class:`BatchMetadata` of ``stop - start`` rows (``+ 1`` with ``anchor``), same config
        and forward mode. Built on the host lengths; value checks re-run on the sub-tables.
    """
    check_metadata(metadata)
    check_bool("anchor", anchor)
    check_int("start", start, lo=0, hi=metadata.num_tokens - 1)
    check_int("stop", stop, lo=start + 1, hi=metadata.num_tokens)
    return _sub_batch(metadata, *_sub_requests(metadata, start, stop), anchor)


def _sub_batch(
    metadata: BatchMetadata, reqs: list[int], prefix: list[int], extend: list[int], anchor: bool
) -> BatchMetadata:
    """:func:`shard_metadata` of the parts ``_sub_requests`` found (the lists are extended)."""
    if anchor:
        longest = max(range(metadata.num_requests), key=metadata.seq_lens_host.__getitem__)
        reqs.append(longest)
        prefix.append(metadata.seq_lens_host[longest] - 1)
        extend.append(1)
    idx = torch.tensor(reqs, device=metadata.device)
    tables = {ratio: t[idx] for ratio, t in metadata.compressed_token_tables.items()}
    return BatchMetadata(
        metadata.config, prefix, extend, metadata.swa_token_table[idx], tables, metadata.forward_mode
    )


def new_entries(metadata: BatchMetadata, ratio: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The compressed entries of ``ratio`` that the chunk completes: the ones to store.

    Entry ``j`` of a request is complete once position ``ratio * (j + 1) - 1`` is; the chunk
    completes ``j`` in ``[prefix_len // ratio, seq_len // ratio)``, each at the query row of
    that position (engine order).

    Returns:
        ``(row, request, entry)``, ``[E]`` int64 CPU tensors in row order (host arithmetic):
        the completing row, its request and the request-local entry id ``j`` (its slot is
        ``compressed_token_tables[ratio][request, entry]``).

    Raises TypeError/ValueError naming ``ratio`` unless it is a compressed ratio of
    ``metadata.config`` (naming ``metadata`` unless it is a BatchMetadata).
    """
    check_ratio(check_metadata(metadata).config, ratio)
    rows, reqs, entries = [], [], []
    q0 = 0
    for r, (p, s) in enumerate(zip(metadata.prefix_lens_host, metadata.seq_lens_host)):
        j = torch.arange(p // ratio, s // ratio, dtype=torch.int64)
        rows.append(q0 + ratio * (j + 1) - 1 - p)
        reqs.append(torch.full_like(j, r))
        entries.append(j)
        q0 += s - p
    return torch.cat(rows), torch.cat(reqs), torch.cat(entries)


def new_slots(metadata: BatchMetadata, ratio: int) -> torch.Tensor:
    """Cache slots of what the chunk adds to the caches of compress ratio ``ratio``.

    Returns:
        ratio 0: ``[num_tokens]`` int32 on the metadata's device, the SWA-cache slot
        ``swa_token_table[request, position]`` of each query row's token (engine order).
        ratio > 0: ``[E]`` int32 on that device, the compressed-cache slot
        ``compressed_token_tables[ratio][request, entry]`` of each entry of
        :func:`new_entries` (same order).

    Raises TypeError/ValueError naming the ratio unless it is 0 or a compressed ratio of
    ``metadata.config`` (naming ``metadata`` unless it is a BatchMetadata).
    """
    check_ratio(check_metadata(metadata).config, ratio, swa=True)
    if ratio == SWA_RATIO:
        return metadata.swa_token_table[metadata.query_req, metadata.query_pos.long()]
    return _entry_slots(metadata, ratio, *new_entries(metadata, ratio))


def _entry_slots(
    metadata: BatchMetadata, ratio: int, rows: torch.Tensor, reqs: torch.Tensor, entries: torch.Tensor
) -> torch.Tensor:
    """The compressed-cache slots of what :func:`new_entries` returned."""
    dev = metadata.device
    return metadata.compressed_token_tables[ratio][reqs.to(dev), entries.to(dev)]


class ShardedOutput(NamedTuple):
    """This rank's outputs, not gathered: ``out`` is rows ``start .. stop - 1`` of the chunk."""

    out: torch.Tensor
    start: int
    stop: int


class _State:
    """What one metadata generation implies for this rank; rebuilt when it changes."""

    def __init__(self, cp: ContextParallelPrefill, metadata: BatchMetadata) -> None:
        self.metadata = metadata
        self.generation = metadata.generation
        self.ranges = partition_rows(cp.config, metadata, cp.world_size)
        start, stop = self.ranges[cp.rank]
        self.start, self.stop = start, stop
        self.anchor = False
        self.local = None
        if stop > start:
            parts = _sub_requests(metadata, start, stop)
            _, prefix, extend = parts
            self.anchor = (
                resolve_impl(cp.backend.ops_impl, metadata.device) == "reference"
                and max(p + e for p, e in zip(prefix, extend)) < metadata.max_seq_len
            )
            self.local = _sub_batch(metadata, *parts, self.anchor)
        # ratio -> (per-rank ranges into the new entries of that cache, their slot ids on device)
        self._scopes: dict[int, tuple[tuple[RowRange, ...], torch.Tensor]] = {}

    def scope(self, ratio: int) -> tuple[tuple[RowRange, ...], torch.Tensor]:
        """Per-rank ranges of the new tokens (ratio 0: the SWA cache's raw tokens, one per row)
        or new compressed entries of ``ratio``, and the slot of each in its cache."""
        if ratio not in self._scopes:
            md = self.metadata
            if ratio == SWA_RATIO:
                ranges, slots = self.ranges, new_slots(md, SWA_RATIO)
            else:
                found = new_entries(md, ratio)  # (row, request, entry)
                bounds = torch.searchsorted(found[0], torch.tensor([a for a, _ in self.ranges] + [md.num_tokens]))
                ranges = tuple(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
                slots = _entry_slots(md, ratio, *found)
            self._scopes[ratio] = (ranges, slots)
        return self._scopes[ratio]


class ContextParallelPrefill(ParallelLayer):
    """Prefill of one chunk with its query rows split across the ranks of ``group``.

    Args:
        backend: the single-GPU :class:`SparsePrefillBackend` (its config, path setting, impl,
            ``max_query_rows`` and cost model are used; every rank passes an equal one).
        group: a ``torch.distributed`` process group (None: the default group). Collectives:
            ``broadcast`` and (value checks on) one ``all_reduce`` per forward, on the
            metadata's device: NCCL for CUDA, gloo for CPU (gloo also works on CUDA).

    Every rank holds the whole batch's metadata and a full copy of every layer's caches, and
    calls the same methods in the same order (they are collective). Use::

        cp = ContextParallelPrefill(backend, group)
        cp.begin_forward(metadata)                  # once per forward: partition + sub-batch
        start, stop = cp.rows                       # this rank's query rows
        for layer in range(config.num_layers):
            cp.store_kv(layer, caches[layer], k[start:stop], compressed_k)   # collective
            out = cp.forward(layer, q[start:stop], caches[layer], topk[start:stop], sink)

    ``stats`` counts the bytes each kind of collective moved (:class:`CommStats`).
    """

    _state: _State | None  # set by ParallelLayer.__init__ and begin_forward

    def __init__(self, backend: SparsePrefillBackend, group=None) -> None:
        super().__init__(backend, group)
        self._local = LocalBackends(backend, self.config)

    # -- per-forward state -------------------------------------------------------------------

    def begin_forward(self, metadata: BatchMetadata) -> None:
        """Start a forward over ``metadata`` (the whole batch): partition its rows and build this
        rank's sub-batch. Collective when value checks are on (checks every rank has the same
        batch: ValueError naming ``metadata`` otherwise)."""
        self._check_batch(metadata)
        self._state = _State(self, metadata)

    @property
    def row_ranges(self) -> tuple[RowRange, ...]:
        """Every rank's ``(start, stop)`` query rows of the current forward, in rank order."""
        return self._current(None).ranges

    @property
    def rows(self) -> RowRange:
        """This rank's ``(start, stop)`` query rows of the current forward."""
        st = self._current(None)
        return st.start, st.stop

    def entry_rows(self, ratio: int) -> RowRange:
        """This rank's ``(start, stop)`` among the chunk's new compressed entries of ``ratio``
        (in row order: the entries its rows complete), i.e. which rows ``store_kv`` expects in
        ``compressed_k``."""
        check_ratio(self.config, ratio)
        return self._current(None).scope(ratio)[0][self.rank]

    # -- KV store ------------------------------------------------------------------------------

    def store_kv(
        self,
        layer: int,
        caches: LayerCaches | tuple[torch.Tensor, torch.Tensor | None],
        k: torch.Tensor,
        compressed_k: torch.Tensor | None = None,
        *,
        metadata: BatchMetadata | None = None,
    ) -> None:
        """Store this rank's new K into its cache copy and every other rank's (collective).

        Args:
            layer: the layer index (its ratio decides whether there is a compressed cache).
            caches: this rank's copy of the layer's :class:`LayerCaches` (V4 FP8 paged uint8),
                modified in place.
            k: ``[stop - start, 512]`` bfloat16: K of the raw tokens of this rank's rows
                (``rows``), stored at their SWA-cache slots (``swa_token_table[req, pos]``).
            compressed_k: ratio > 0 layers: ``[e_stop - e_start, 512]`` bfloat16, K of the
                compressed entries this rank's rows complete (``entry_rows(ratio)``: the row at
                position ``ratio * (j + 1) - 1`` completes entry ``j``), stored at their
                compressed-cache slots. None for SWA-only (ratio-0) layers.
            metadata: the batch; defaults to the current forward's.

        Afterwards every rank's caches hold the chunk's new tokens and entries exactly as one
        GPU's ``store_k_cache`` of all of them would write. ``stats.kv_bytes`` grows by
        ``1024 * (num_tokens + new entries)``.
        """
        st = self._current(metadata)
        ratio = self.config.ratio_of(layer)
        # The backend's own checks of a layer's caches (page bytes, contiguity, and with value
        # checks the batch's largest slot against their capacity), before any collective.
        caches = self.backend._check_caches(caches, ratio, st.metadata)
        scopes = [(SWA_RATIO, caches.swa, k, "k", self.config.swa_page_size)]
        if ratio == SWA_RATIO:
            if compressed_k is not None:
                raise ValueError(f"compressed_k is for ratio > 0 layers; layer {layer} has ratio 0 (SWA only)")
        else:
            scopes.append((ratio, caches.compressed, compressed_k, "compressed_k", self.config.page_size_of(ratio)))
        device, d = st.metadata.device, self.config.head_dim
        plans = []
        for scope, cache, rows, name, page_size in scopes:
            ranges, slots = st.scope(scope)
            a, b = ranges[self.rank]
            check_tensor(name, rows, dtypes=(torch.bfloat16,), shape=(b - a, d), device=device)
            plans.append((cache, rows, ranges, slots, page_size))
        for cache, rows, ranges, slots, page_size in plans:
            buf = torch.empty(ranges[-1][1], d, dtype=torch.bfloat16, device=device)
            a, b = ranges[self.rank]
            buf[a:b].copy_(rows)
            self.stats.kv_bytes += broadcast_shards(buf, ranges, self.group)
            store_k_cache(cache, buf, slots, page_size, self.config.layout, impl=self.backend.ops_impl)

    # -- attention -----------------------------------------------------------------------------

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        caches: LayerCaches | tuple[torch.Tensor, torch.Tensor | None],
        topk_indices: torch.Tensor | None = None,
        attn_sink: torch.Tensor | None = None,
        *,
        metadata: BatchMetadata | None = None,
        gather: bool = True,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor | ShardedOutput:
        """Attention of one layer for this rank's rows; collective when ``gather``.

        Args:
            layer: the layer index, ``0 <= layer < config.num_layers``.
            q: ``[stop - start, h_q, 512]`` bfloat16: the queries of this rank's rows
                (``rows``), at their absolute positions in their requests.
            caches: this rank's copy of the layer's caches, holding every token the rows reach
                (after ``store_kv`` of this chunk on every rank).
            topk_indices: top-k layers: ``[stop - start, topk]`` int32, the indexer's
                request-local picks of this rank's rows (as ``SparsePrefillBackend.forward``).
            attn_sink: ``[h_q]`` float32 or None.
            metadata: the whole batch; defaults to the current forward's.
            gather: True: return every row, in engine order, on every rank; False: return this
                rank's rows only, as :class:`ShardedOutput` ``(out, start, stop)``.
            out: optional contiguous bfloat16 buffer of the returned shape (``[num_tokens, h_q,
                512]`` when gathering, else ``[stop - start, h_q, 512]``).

        Returns:
            bfloat16 attention outputs equal bit for bit to ``backend.forward`` on one GPU over
            the whole batch (rows ``start .. stop - 1`` of it when not gathering). Gathering
            adds ``num_tokens * h_q * 1024`` bytes to ``stats.out_bytes``.
        """
        st = self._current(metadata)
        cfg = self.config
        ratio = cfg.ratio_of(layer)
        check_bool("gather", gather)
        start, stop = st.start, st.stop
        n, h, d = stop - start, cfg.num_heads, cfg.head_dim
        device = st.metadata.device
        check_tensor("q", q, dtypes=(torch.bfloat16,), shape=(n, h, d), device=device)
        if cfg.kind_of(ratio) is LayerKind.TOPK:
            check_tensor("topk_indices", topk_indices, dtypes=(torch.int32,), shape=(n, cfg.topk), device=device)
        out = output_buffer(out, (st.metadata.num_tokens if gather else n, h, d), device)
        mine = out[start:stop] if gather else out
        if n:
            backend = self._local.for_layer(layer, st.metadata)
            if st.anchor:
                # Reference path only (CPU): the anchor row's inputs are arbitrary, its output dropped.
                q = torch.cat([q, q.new_zeros(1, h, d)])
                if topk_indices is not None:
                    topk_indices = torch.cat([topk_indices, topk_indices.new_full((1, cfg.topk), -1)])
                mine.copy_(backend.forward(layer, q, caches, topk_indices, attn_sink, metadata=st.local)[:n])
            else:
                backend.forward(layer, q, caches, topk_indices, attn_sink, metadata=st.local, out=mine)
        if not gather:
            return ShardedOutput(out, start, stop)
        self.stats.out_bytes += broadcast_shards(out, st.ranges, self.group)
        return out
