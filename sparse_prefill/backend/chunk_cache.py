"""Per-chunk index state of the sparse prefill path (DESIGN.md step 4).

Everything that is the same for every layer of a chunk is built once per chunk (the backend
builds it in ``begin_forward``): the SWA gather, the workspace plan of each compress ratio, and
the combined index rows of the SWA-only (ratio 0) and dense (ratio 128) layers. Top-k layers (ratios 1, 2, 4; kinds in
``layer_kinds.py``) have their indexer's top-k, so their rows are recombined per layer into
buffers kept here, one pair per ratio; a layer that passes the same ``topk_indices`` tensor as
the previous combine of its ratio, unwritten since (DeepSeek-V4.1's index-sharing layers), gets
those rows back without a recombine (``reuse.py``).

Staleness: the cache belongs to one batch-metadata state. ``build`` records the caller's
``key`` (the metadata object, or a generation token that changes whenever the metadata is
refilled) and the autograd version counters of the tensors it was built from. Every accessor
takes the key and raises ``StaleChunkCacheError`` when the key differs, ``invalidate()`` was
called, or a source tensor was modified in place (e.g. a metadata ``copy_``; not checked while
``torch.compile`` traces; inference-mode tensors have no version counter, so engines that build
metadata under ``torch.inference_mode()`` must pass a fresh key or call ``invalidate()`` when
they refill it).
The backend's pattern::

    cache = metadata.sparse_prefill_cache
    if cache is None or not cache.is_valid_for(metadata):
        cache = metadata.sparse_prefill_cache = SparsePrefillChunkCache.build(key=metadata, ...)
    layer = cache.layer(compress_ratio, metadata, topk_indices)  # top-k layers: their picks
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import NamedTuple

import torch

from sparse_prefill._utils import check_int, check_tensor, device_assert, resolve_impl, value_check_site
from sparse_prefill.backend.layer_kinds import LayerKind, resolve_ratio_kinds
from sparse_prefill.backend.reuse import stamp, unchanged
from sparse_prefill.ops.indices import check_request_lengths, chunk_indices, combine
from sparse_prefill.ops.indices.plan import (
    INT32_MAX,
    SwaTokenIds,
    WorkspacePlan,
    check_workspace_rows,
    combined_width,
    swa_gather_len,
)

_I32 = (torch.int32,)


class StaleChunkCacheError(RuntimeError):
    """A ``SparsePrefillChunkCache`` was used for batch metadata it was not built from."""


class LayerIndices(NamedTuple):
    """What one layer's attention needs from the chunk cache.

    plan:    the workspace plan of the layer's ratio (dequantize the layer's caches with it).
    indices: ``[num_tokens, ceil((topk + W) / 128) * 128]`` int32 workspace rows per query.
    lens:    ``[num_tokens]`` int32 valid entries per row (``topk_length``).
    """

    plan: WorkspacePlan
    indices: torch.Tensor
    lens: torch.Tensor


def _key_getter(key: object) -> Callable[[], object]:
    # A weak reference, so a cache stored on its metadata object does not keep it alive.
    try:
        return weakref.ref(key)
    except TypeError:
        return lambda: key


def _same_key(a: object, b: object) -> bool:
    """Objects match by identity; int and str generation tokens by value."""
    return a is b or (type(a) in (int, str) and type(a) is type(b) and a == b)


def _host_lens(
    host_lens: object, seq_lens: torch.Tensor, extend_lens: torch.Tensor
) -> tuple[list[int], list[int]]:
    """Validate ``host_lens`` against the ``[R]`` length tensors; return them as lists."""
    if not isinstance(host_lens, Sequence) or len(host_lens) != 2:
        raise TypeError(f"host_lens must be a (seq_lens, extend_lens) pair of int sequences, got {host_lens!r}")
    names = ("seq_lens", "extend_lens")
    lists = []
    for name, values, t in zip(names, host_lens, (seq_lens, extend_lens)):
        if type(values) not in (list, tuple) and (
            isinstance(values, (str, bytes, torch.Tensor)) or not isinstance(values, Sequence)
        ):
            raise TypeError(f"host_lens' {name} must be a sequence of ints, got {type(values).__name__}")
        if all(type(v) is int for v in values):  # the usual case, checked in one pass
            values = list(values)
        else:
            values = [check_int(f"host_lens' {name}[{i}]", v) for i, v in enumerate(values)]
        if len(values) != t.shape[0]:
            raise ValueError(f"host_lens' {name} has {len(values)} entries, the {name} tensor {t.shape[0]}")
        lists.append(values)
    site = value_check_site(seq_lens.device)
    if site == "device":  # the host lists travel to the device: no sync
        host = torch.tensor(lists).to(seq_lens.device, non_blocking=True)
        device_assert(host == torch.stack([seq_lens, extend_lens]), "host_lens differ from seq_lens / extend_lens")
    elif site == "host":
        on_device = torch.stack([seq_lens, extend_lens]).tolist()  # one sync for both
        for name, values, actual in zip(names, lists, on_device):
            if values != actual:
                raise ValueError(f"host_lens' {name} {values} differ from the {name} tensor {actual}")
    return lists[0], lists[1]


class SparsePrefillChunkCache:
    """Index state of one prefill chunk, shared by all its sparse layers (use ``build``)."""

    def __init__(
        self,
        *,
        key: object,
        seq_lens: torch.Tensor,
        sources: list[torch.Tensor],
        window_size: int,
        topk: int | None,
        kinds: dict[int, LayerKind],
        query_start_loc: torch.Tensor,
        query_pos: torch.Tensor,
        swa: SwaTokenIds,
        plans: dict[int, WorkspacePlan],
        rows: dict[int, tuple[torch.Tensor, torch.Tensor]],
        impl: str,
    ) -> None:
        self._key = _key_getter(key)
        # Inference tensors track no versions: the key and invalidate() cover them.
        self._versions = [(t, t._version) for t in sources if not t.is_inference()]
        self._valid = True
        self._seq_lens = seq_lens
        self.window_size = window_size
        self.topk = topk
        self._kinds = kinds
        self._picks_stamp: dict[int, object] = {}  # top-k ratio -> stamp of its rows' picks
        self._query_start_loc = query_start_loc
        self._query_pos = query_pos
        self._swa = swa
        self._plans = plans
        self._rows = rows
        self._impl = impl

    @classmethod
    def builder(
        cls,
        *,
        window_size: int,
        ratios: Collection[int],
        topk: int | None = None,
        ratio_kinds: Mapping[int, object] | None = None,
        impl: str = "auto",
        device: torch.device | str | None = None,
    ) -> ChunkCacheBuilder:
        """Validate the model's side of ``build`` once; the returned builder's ``build`` takes
        the batch's side (an engine keeps one builder per set of ratios and calls it every
        forward).

        Args:
            window_size, ratios, topk, ratio_kinds, impl: as in ``build`` (ints, a collection of
                distinct ints >= 0, an int or None, a ``{ratio: kind}`` mapping or None, a str).
            device: the device type the batches' tensors will be on (None: CUDA if available,
                else CPU); ``impl`` is resolved for it.

        Returns a ``ChunkCacheBuilder`` holding the validated values (``ratios`` sorted, each
        ratio's ``LayerKind``, the resolved ``impl``). Raises as ``build`` does for these
        arguments."""
        check_int("window_size", window_size, lo=1, hi=INT32_MAX)
        if not isinstance(ratios, Collection) or isinstance(ratios, (str, Mapping)) or not ratios:
            raise ValueError(f"ratios must be a non-empty collection of ints, got {ratios!r}")
        for c in ratios:
            check_int("each of ratios", c, lo=0, hi=INT32_MAX)
        ratio_list = sorted(set(ratios))
        if len(ratio_list) != len(ratios):
            raise ValueError(f"ratios must be distinct, got {ratios!r}")
        kinds = resolve_ratio_kinds(ratio_list, ratio_kinds)
        topk_ratios = [c for c in ratio_list if kinds[c] is LayerKind.TOPK]
        if topk_ratios:
            check_int("topk", topk, lo=1, hi=INT32_MAX)
        elif topk is not None:
            raise ValueError(f"topk is for top-k layers; ratios {ratio_list} have none")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        return ChunkCacheBuilder(window_size, ratio_list, kinds, topk_ratios, topk, resolve_impl(impl, device),
                                 device.type)

    @classmethod
    def build(
        cls,
        *,
        key: object,
        seq_lens: torch.Tensor,
        extend_lens: torch.Tensor,
        swa_token_table: torch.Tensor,
        window_size: int,
        ratios: Collection[int],
        compressed_token_tables: Mapping[int, torch.Tensor] | None = None,
        topk: int | None = None,
        ratio_kinds: Mapping[int, object] | None = None,
        impl: str = "auto",
        host_lens: tuple[Sequence[int], Sequence[int]] | None = None,
    ) -> SparsePrefillChunkCache:
        """Build the cache of one chunk. Without ``host_lens``, one host sync (the ``[R]``
        lengths are read once); with them, none, so the build queues behind the GPU's work
        instead of draining it. ``builder(...).build(...)`` is the same in two steps.

        Args:
            key: the batch metadata this cache belongs to (not None): the metadata object
                (matched by identity, held weakly) or an int/str generation token (matched by
                value). Every accessor must be given the same key.
            seq_lens: ``[R]`` int32 tokens of each request including the new ones.
            extend_lens: ``[R]`` int32 new tokens of each request, ``0 <= extend_len <= seq_len``.
                Queries are the chunk's tokens request by request: ``num_tokens = sum(extend_lens)``.
            swa_token_table: ``[R, max_len]`` int32 SWA-cache token id of (request, position),
                ``max_len >= max(seq_lens)``.
            window_size: the SWA window ``W >= 1``.
            ratios: the compress ratios of the model's layers (distinct ints >= 0), SGLang's
                values: 0 SWA only; 1, 2, 4 top-k picked per layer by the indexer
                (``combine_topk``); 128 every complete compressed entry.
            compressed_token_tables: for each ratio > 0 in ``ratios`` (exactly those), ``[R,
                max_entries]`` int32 token id of (request, compressed entry ``j``) in that
                ratio's compressed cache, ``max_entries >= max(seq_lens // ratio)``.
            topk: the indexer's top-k (512 or 1024); required iff a ratio is a top-k one.
            ratio_kinds: ``{ratio: "topk" | "dense"}`` beyond ``layer_kinds.DEFAULT_RATIO_KINDS``
                (``ModelConfig.ratio_kinds``); ratios 1 without 0 need it (``layer_kinds.py``).
            impl: "auto" | "triton" | "reference".
            host_lens: ``(seq_lens, extend_lens)`` as host ints, when the caller has them (an
                engine's scheduler does; ``BatchMetadata`` keeps them). They must equal the
                tensors' values: checked, at the cost of one sync, when value checks are on.

        Raises TypeError/ValueError on bad shapes, dtypes or lengths (always checked: the
        lengths are on the host anyway), on more than ``2**31 - 1`` query tokens, and on a
        workspace of more than ``2**31 - 1`` rows for some ratio (limits: ``ops/indices/plan.py``).
        """
        device = seq_lens.device if isinstance(seq_lens, torch.Tensor) else None
        builder = cls.builder(window_size=window_size, ratios=ratios, topk=topk, ratio_kinds=ratio_kinds,
                              impl=impl, device=device)
        return builder.build(key=key, seq_lens=seq_lens, extend_lens=extend_lens, swa_token_table=swa_token_table,
                             compressed_token_tables=compressed_token_tables, host_lens=host_lens)

    # -- staleness ---------------------------------------------------------------------------

    def invalidate(self) -> None:
        """Mark the cache stale (call when the batch metadata is replaced or refilled)."""
        self._valid = False

    def _stale_reason(self, key: object) -> str | None:
        if not self._valid:
            return "it was invalidated"
        if not _same_key(self._key(), key):
            return "it was built for other batch metadata (key differs)"
        # Version counters are host state Dynamo cannot read: while torch.compile traces, the
        # key and invalidate() are the checks (the backend bumps the key on metadata.copy_).
        if not torch.compiler.is_compiling() and any(t._version != v for t, v in self._versions):
            return "a tensor it was built from was modified in place"
        return None

    def is_valid_for(self, key: object) -> bool:
        """Whether this cache may serve the batch metadata identified by ``key``."""
        return self._stale_reason(key) is None

    def check(self, key: object) -> None:
        """Raise ``StaleChunkCacheError`` unless ``is_valid_for(key)``."""
        reason = self._stale_reason(key)
        if reason is not None:
            raise StaleChunkCacheError(f"SparsePrefillChunkCache is stale: {reason}; rebuild it")

    # -- accessors (each checks the key) -----------------------------------------------------

    @property
    def ratios(self) -> tuple[int, ...]:
        return tuple(self._plans)

    @property
    def num_tokens(self) -> int:
        return self._query_pos.shape[0]

    @property
    def max_workspace_rows(self) -> int:
        """Rows of a workspace that fits every ratio's plan (allocate it once per chunk)."""
        return max(p.num_rows for p in self._plans.values())

    def plan(self, ratio: int, key: object) -> WorkspacePlan:
        """The workspace plan of ``ratio`` (shared by all layers of that ratio)."""
        self.check(key)
        if ratio not in self._plans:
            raise ValueError(f"ratio must be one of {self.ratios}, got {ratio!r}")
        return self._plans[ratio]

    def swa(self, key: object) -> SwaTokenIds:
        """The chunk's SWA gather (``build_swa_token_ids``)."""
        self.check(key)
        return self._swa

    def combine_topk(
        self, ratio: int, topk_indices: torch.Tensor, key: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of one top-k layer of ``ratio`` from its indexer's picks, in the reused buffers.

        Args:
            ratio: a top-k ratio of the cache (1, 2 or 4 by default).
            topk_indices: ``[num_tokens, topk]`` int32 request-local compressed entry ids
                (negative = no pick), the layer's indexer output.
            key: the batch metadata key given to ``build``.

        Returns:
            ``(indices, lens)`` as ``combine_topk_swa_indices``; the same buffers every call of
            ``ratio``, so a layer's rows are overwritten by the next layer's (stream-ordered on
            the GPU). When ``topk_indices`` is the tensor of that ratio's previous combine, not
            written since (``reuse.py``), the rows are returned as they are.
        """
        self.check(key)
        if self._kinds.get(ratio) is not LayerKind.TOPK:
            raise ValueError(f"combine_topk needs a top-k ratio of the cache {self.ratios}, got {ratio!r}")
        return self._combine_topk(ratio, topk_indices)

    def _combine_topk(self, ratio: int, topk_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``combine_topk`` after the key and ratio checks."""
        check_tensor(
            "topk_indices", topk_indices, dtypes=_I32, shape=(self.num_tokens, self.topk),
            device=self._query_pos.device,
        )
        out_indices, out_lens = self._rows[ratio]
        if unchanged(self._picks_stamp.get(ratio), topk_indices):
            return out_indices, out_lens
        plan = self._plans[ratio]
        self._picks_stamp[ratio] = None  # the buffers are being overwritten
        combine(
            topk_indices, self._query_start_loc, self._query_pos, self._seq_lens, self._swa.gather_lens,
            plan.compressed_base, plan.swa_base, self.window_size, ratio, self.topk,
            out_indices, out_lens, self._impl,
        )
        self._picks_stamp[ratio] = stamp(topk_indices)
        return out_indices, out_lens

    def layer(self, ratio: int, key: object, topk_indices: torch.Tensor | None = None) -> LayerIndices:
        """Plan and combined rows of one layer of ``ratio``.

        ``topk_indices`` (``[num_tokens, topk]`` int32) is required for top-k ratios
        (``combine_topk``) and must be None otherwise (rows built once per chunk).
        """
        plan = self.plan(ratio, key)
        if self._kinds[ratio] is LayerKind.TOPK:
            if topk_indices is None:
                raise ValueError(f"ratio-{ratio} layers (top-k) need their indexer's topk_indices")
            indices, lens = self._combine_topk(ratio, topk_indices)  # plan() checked the key and ratio
        else:
            if topk_indices is not None:
                raise ValueError(
                    f"topk_indices is only for top-k layers, not ratio {ratio} ({self._kinds[ratio].value})"
                )
            indices, lens = self._rows[ratio]
        return LayerIndices(plan, indices, lens)


class ChunkCacheBuilder(NamedTuple):
    """The model's side of ``SparsePrefillChunkCache.build``, validated once
    (``SparsePrefillChunkCache.builder``); ``build`` takes the batch's side."""

    window_size: int
    ratios: list[int]  # sorted
    kinds: dict[int, LayerKind]
    topk_ratios: list[int]
    topk: int | None
    impl: str  # resolved for device_type
    device_type: str

    def build(
        self,
        *,
        key: object,
        seq_lens: torch.Tensor,
        extend_lens: torch.Tensor,
        swa_token_table: torch.Tensor,
        compressed_token_tables: Mapping[int, torch.Tensor] | None = None,
        host_lens: tuple[Sequence[int], Sequence[int]] | None = None,
    ) -> SparsePrefillChunkCache:
        """``SparsePrefillChunkCache.build`` with this builder's model arguments.

        Args:
            key, host_lens: as in ``SparsePrefillChunkCache.build``.
            seq_lens, extend_lens: ``[R]`` int32, on a device of the builder's ``device_type``.
            swa_token_table: ``[R, max_len]`` int32, on the same device.
            compressed_token_tables: ``{ratio: [R, max_entries] int32}`` for exactly the
                builder's ratios > 0, on the same device.

        Returns the chunk's ``SparsePrefillChunkCache``; raises as ``build`` does."""
        if key is None:
            raise ValueError("key must identify the batch metadata (e.g. the metadata object), not None")
        ratio_list, kinds, topk, window_size = self.ratios, self.kinds, self.topk, self.window_size
        check_tensor("seq_lens", seq_lens, dtypes=_I32, shape=(None,))
        num_reqs, device = seq_lens.shape[0], seq_lens.device
        if device.type != self.device_type:
            raise ValueError(f"seq_lens must be on a {self.device_type} device (the builder's), got {device}")
        check_tensor("extend_lens", extend_lens, dtypes=_I32, shape=(num_reqs,), device=device)
        table_shape = (num_reqs, None)
        check_tensor("swa_token_table", swa_token_table, dtypes=_I32, shape=table_shape, device=device)
        tables = dict(compressed_token_tables or {})
        if sorted(tables) != [c for c in ratio_list if c > 0]:
            raise ValueError(
                f"compressed_token_tables must have one table per ratio > 0 of {ratio_list}, "
                f"got ratios {sorted(tables)}"
            )
        for c, t in tables.items():
            check_tensor(f"compressed_token_tables[{c}]", t, dtypes=_I32, shape=table_shape, device=device)

        # Every size below is computed from these host lists.
        if host_lens is None:
            seq, ext = torch.stack([seq_lens, extend_lens]).tolist()  # the one host sync
        else:
            seq, ext = _host_lens(host_lens, seq_lens, extend_lens)
        check_request_lengths(seq, ext, swa_token_table.shape[1], "swa_token_table")
        num_tokens = sum(ext)
        if num_tokens > INT32_MAX:
            raise ValueError(f"sum(extend_lens) = {num_tokens} query tokens exceed int32 ({INT32_MAX})")
        num_swa = sum(swa_gather_len(s, e, window_size) for s, e in zip(seq, ext))
        num_compressed = {}
        for c in ratio_list:
            if c > 0:
                check_request_lengths(seq, None, tables[c].shape[1], f"compressed_token_tables[{c}]", c)
            num_compressed[c] = sum(s // c for s in seq) if c > 0 else 0
            check_workspace_rows(num_compressed[c], num_swa)

        # Rows built once: SWA-only takes no entries; a dense ratio all of the longest request's.
        row_topks = [
            -1 if kinds[c] is LayerKind.TOPK else 0 if c == 0 else max((s // c for s, e in zip(seq, ext) if e), default=0)
            for c in ratio_list
        ]
        chunk = chunk_indices(
            seq_lens, extend_lens, swa_token_table, tables, ratio_list, row_topks, window_size, num_tokens, num_swa,
            [num_compressed[c] for c in ratio_list], self.impl,
        )
        rows = dict(chunk.rows)
        width = combined_width(topk, window_size) if self.topk_ratios else 0
        for c in self.topk_ratios:  # recombined per layer into these
            rows[c] = (
                torch.empty((num_tokens, width), dtype=torch.int32, device=device),
                torch.empty(num_tokens, dtype=torch.int32, device=device),
            )
        return SparsePrefillChunkCache(
            key=key,
            seq_lens=seq_lens,
            sources=[seq_lens, extend_lens, swa_token_table, *tables.values()],
            window_size=window_size,
            topk=topk,
            kinds=kinds,
            query_start_loc=chunk.query_start_loc,
            query_pos=chunk.query_pos,
            swa=chunk.swa,
            plans=chunk.plans,
            rows=rows,
            impl=self.impl,
        )
