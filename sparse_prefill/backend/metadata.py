"""Batch-level metadata of one forward: which tokens each request adds and where its KV lives."""

from __future__ import annotations

import enum
import itertools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from sparse_prefill._utils import check_int, check_tensor, value_checks_enabled
from sparse_prefill.backend.config import ModelConfig

INT32_MAX = 2**31 - 1

_generation = itertools.count()


class LayerCaches(NamedTuple):
    """One layer's FP8 paged KV caches (V4 layout, ``[num_pages, page_bytes]`` uint8 each).

    swa:        the layer's SWA cache of raw tokens (page size ``config.swa_page_size``),
                addressed by ``BatchMetadata.swa_token_table``.
    compressed: the layer's compressed cache (page size ``config.page_size_of(ratio)``),
                addressed by ``BatchMetadata.compressed_token_tables[ratio]``; None for SWA-only
                (ratio-0) layers.
    """

    swa: torch.Tensor
    compressed: torch.Tensor | None = None


class ForwardMode(enum.Enum):
    """EXTEND: a chunk of new tokens per request (prefill, possibly after a cached prefix).
    DECODE: exactly one new token per request."""

    EXTEND = "extend"
    DECODE = "decode"


def _host_ints(name: str, v: object) -> tuple[int, ...]:
    if isinstance(v, torch.Tensor):
        if v.dim() != 1 or v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool:
            raise TypeError(
                f"{name} must be a 1-D integer tensor or a sequence of ints, got {v.dtype} {tuple(v.shape)}"
            )
        return tuple(int(x) for x in v.tolist())
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise TypeError(f"{name} must be a sequence of ints or a 1-D integer tensor, got {type(v).__name__}")
    return tuple(check_int(f"{name}[{i}]", x) for i, x in enumerate(v))


class BatchMetadata:
    """Per-request lengths and token tables of one forward, validated once, shared by every layer.

    Args:
        config: the model's :class:`ModelConfig` (window and ratios decide what must be mapped).
        prefix_lens: ``[R]`` cached prefix length of each request (>= 0): tokens already in the
            caches before this forward. Python ints or a 1-D integer tensor (a CUDA tensor costs
            one device sync; engines usually have these on the host).
        extend_lens: ``[R]`` new (query) tokens of each request in this forward (>= 1; exactly 1
            in DECODE mode). Their KV must already be stored in the caches (the engine writes
            the chunk's KV before attention), at positions ``prefix_len .. prefix_len + extend_len - 1``.
        swa_token_table: ``[R, max_pos]`` int32 on the device of the forward: SWA-cache token id
            (``page * swa_page_size + offset``) of each position of each request. Only the
            positions some query's window reaches must be valid, i.e.
            ``[max(0, seq_len - extend_len - W + 1), seq_len)``; others may hold anything.
            ``max_pos >= max(seq_len)``.
        compressed_token_tables: ``{ratio: [R, max_entries] int32}`` for every ratio > 0 of
            ``config.compress_ratios``: compressed-cache token id of compressed entry ``j`` of each
            request. Entries ``j < seq_len // ratio`` (the complete ones) must be valid;
            ``max_entries >= max(seq_len // ratio)``.
        forward_mode: :class:`ForwardMode` (EXTEND by default).

    Derived (on the tables' device): ``seq_lens [R]`` int32 (prefix + extend),
    ``query_start_loc [R+1]`` int32 (cumulative extend lengths), ``query_pos [num_tokens]`` int32
    (absolute position of each query token), ``query_req [num_tokens]`` int64 (its request).
    Host copies: ``prefix_lens_host``, ``extend_lens_host``, ``seq_lens_host``, ``num_tokens``,
    ``max_seq_len``.

    With value checks on (``sparse_prefill.value_checks``), every table entry that some query
    may reach is checked to be >= 0 (one device sync); ``max_swa_id`` / ``max_compressed_id``
    then record the largest such id so that the backend can check it against each cache's
    capacity for free. With value checks off they are None.

    ``generation`` is unique per object and bumped by :meth:`copy_`: state derived from a
    metadata (the backend's chunk cache) is keyed by it and never outlives a change.
    """

    def __init__(
        self,
        config: ModelConfig,
        prefix_lens: Sequence[int] | torch.Tensor,
        extend_lens: Sequence[int] | torch.Tensor,
        swa_token_table: torch.Tensor,
        compressed_token_tables: Mapping[int, torch.Tensor],
        forward_mode: ForwardMode = ForwardMode.EXTEND,
    ) -> None:
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        if not isinstance(forward_mode, ForwardMode):
            raise TypeError(f"forward_mode must be a ForwardMode, got {type(forward_mode).__name__}")
        self.config = config
        self.forward_mode = forward_mode
        self._set(prefix_lens, extend_lens, swa_token_table, compressed_token_tables)
        self.generation = next(_generation)

    def _set(self, prefix_lens, extend_lens, swa_token_table, compressed_token_tables) -> None:
        config = self.config
        prefix = _host_ints("prefix_lens", prefix_lens)
        extend = _host_ints("extend_lens", extend_lens)
        if len(prefix) != len(extend):
            raise ValueError(
                f"prefix_lens and extend_lens must have the same length, got {len(prefix)} and {len(extend)}"
            )
        num_reqs = len(prefix)
        if num_reqs == 0:
            raise ValueError("prefix_lens must name at least one request, got 0")
        for i, (p, e) in enumerate(zip(prefix, extend)):
            if p < 0:
                raise ValueError(f"prefix_lens[{i}] must be >= 0, got {p}")
            if e < 1:
                raise ValueError(f"extend_lens[{i}] must be >= 1, got {e}")
            if self.forward_mode is ForwardMode.DECODE and e != 1:
                raise ValueError(f"extend_lens[{i}] must be 1 in DECODE mode, got {e}")
        seq = tuple(p + e for p, e in zip(prefix, extend))
        num_tokens = sum(extend)
        # Positions and query offsets are int32 in every kernel.
        if max(seq) > INT32_MAX or num_tokens > INT32_MAX:
            raise ValueError(
                f"prefix_lens + extend_lens (a request's length) and sum(extend_lens) (the token count) "
                f"must stay below 2**31, got {max(seq)} and {num_tokens}"
            )

        check_tensor("swa_token_table", swa_token_table, dtypes=(torch.int32,), shape=(num_reqs, None))
        device = swa_token_table.device
        if swa_token_table.shape[1] < max(seq):
            raise ValueError(
                f"swa_token_table must have at least max(seq_lens) = {max(seq)} columns, got {swa_token_table.shape[1]}"
            )
        if not isinstance(compressed_token_tables, Mapping):
            raise TypeError(
                "compressed_token_tables must be a mapping {ratio: tensor}, "
                f"got {type(compressed_token_tables).__name__}"
            )
        if set(compressed_token_tables) != set(config.compressed_ratios):
            raise ValueError(
                f"compressed_token_tables must have exactly the ratios {config.compressed_ratios}, "
                f"got {tuple(sorted(compressed_token_tables))}"
            )
        tables = {}
        for ratio in config.compressed_ratios:
            name = f"compressed_token_tables[{ratio}]"
            t = check_tensor(
                name, compressed_token_tables[ratio], dtypes=(torch.int32,), shape=(num_reqs, None), device=device
            )
            need = max(s // ratio for s in seq)
            if t.shape[1] < need:
                raise ValueError(
                    f"{name} must have at least max(seq_lens) // {ratio} = {need} columns, got {t.shape[1]}"
                )
            tables[ratio] = t

        self.prefix_lens_host = prefix
        self.extend_lens_host = extend
        self.seq_lens_host = seq
        self.num_tokens = num_tokens
        self.max_seq_len = max(seq)
        self.swa_token_table = swa_token_table
        self.compressed_token_tables = tables
        self.device = device

        i32 = dict(dtype=torch.int32, device=device)
        self.prefix_lens = torch.tensor(prefix, **i32)
        self.extend_lens = torch.tensor(extend, **i32)
        self.seq_lens = torch.tensor(seq, **i32)
        self.query_start_loc = torch.tensor((0, *itertools.accumulate(extend)), **i32)
        self.query_req = torch.repeat_interleave(
            torch.arange(num_reqs, device=device), self.extend_lens.long(), output_size=num_tokens
        )
        qsl = self.query_start_loc.long()
        self.query_pos = (
            torch.arange(num_tokens, device=device) - qsl[self.query_req] + self.prefix_lens.long()[self.query_req]
        ).to(torch.int32)

        self.max_swa_id = None
        self.max_compressed_id = None
        if value_checks_enabled():
            self._check_values()

    def _reached(self, table: torch.Tensor, lo: Sequence[int], hi: Sequence[int]) -> torch.Tensor:
        # Entries of column range [lo[r], hi[r]) per row r: the ones some query reaches.
        cols = torch.arange(table.shape[1], device=table.device)
        lo_t = torch.tensor(lo, device=table.device)[:, None]
        hi_t = torch.tensor(hi, device=table.device)[:, None]
        return table[(cols >= lo_t) & (cols < hi_t)]

    def _check_values(self) -> None:
        w = self.config.window_size
        lo = [max(0, s - e - w + 1) for s, e in zip(self.seq_lens_host, self.extend_lens_host)]
        reached = {"swa_token_table": self._reached(self.swa_token_table, lo, self.seq_lens_host)}
        for ratio, t in self.compressed_token_tables.items():
            reached[f"compressed_token_tables[{ratio}]"] = self._reached(
                t, [0] * len(lo), [s // ratio for s in self.seq_lens_host]
            )
        # One transfer for every min/max: each costs a device sync on CUDA.
        empty = torch.tensor([0, -1], device=self.device)
        stats = torch.stack(
            [torch.stack([v.min(), v.max()]).long() if v.numel() else empty for v in reached.values()]
        ).tolist()
        extrema = {}
        for (name, v), (mn, mx) in zip(reached.items(), stats):
            if v.numel() and mn < 0:
                raise ValueError(f"{name} holds a negative token id ({mn}) at a position some query reaches")
            extrema[name] = mx
        self.max_swa_id = extrema.pop("swa_token_table")
        self.max_compressed_id = {r: extrema[f"compressed_token_tables[{r}]"] for r in self.compressed_token_tables}

    @property
    def num_requests(self) -> int:
        """``R``, the requests of the batch."""
        return len(self.seq_lens_host)

    @property
    def is_decode(self) -> bool:
        """Whether the batch is in DECODE mode (one new token per request)."""
        return self.forward_mode is ForwardMode.DECODE

    def copy_(self, other: BatchMetadata, *, in_place: bool = False) -> None:
        """Take ``other``'s batch and bump ``generation``.

        Tensors whose shapes match are copied into the existing storage (the tables this object
        was built with included), so a captured CUDA graph reads the new values; state derived
        from the old batch becomes stale. With ``in_place=True`` (refilling the metadata of a
        captured graph) every tensor must be refilled in place: a different request count,
        token count, forward mode or table shape raises ValueError, before anything changes.
        """
        if not isinstance(other, BatchMetadata):
            raise TypeError(f"other must be a BatchMetadata, got {type(other).__name__}")
        if other.config != self.config:
            raise ValueError("other must have the same config")
        if in_place:
            self._check_same_shapes(other)
        old = {name: getattr(self, name) for name in _DEVICE_FIELDS}
        old_tables = self.compressed_token_tables
        self.forward_mode = other.forward_mode
        self._set(other.prefix_lens_host, other.extend_lens_host, other.swa_token_table, other.compressed_token_tables)
        for name, t in old.items():
            setattr(self, name, _refill(t, getattr(self, name)))
        for ratio, t in old_tables.items():
            self.compressed_token_tables[ratio] = _refill(t, self.compressed_token_tables[ratio])
        self.generation = next(_generation)

    def _check_same_shapes(self, other: BatchMetadata) -> None:
        mine = {"forward_mode": self.forward_mode, "num_requests": self.num_requests, "num_tokens": self.num_tokens,
                "swa_token_table shape": tuple(self.swa_token_table.shape)}
        theirs = {"forward_mode": other.forward_mode, "num_requests": other.num_requests,
                  "num_tokens": other.num_tokens, "swa_token_table shape": tuple(other.swa_token_table.shape)}
        for ratio in self.compressed_token_tables:
            name = f"compressed_token_tables[{ratio}] shape"
            mine[name] = tuple(self.compressed_token_tables[ratio].shape)
            theirs[name] = tuple(other.compressed_token_tables[ratio].shape)
        for name, value in mine.items():
            if theirs[name] != value:
                raise ValueError(
                    f"copy_(in_place=True) needs the same {name}: this metadata has {value}, other {theirs[name]}"
                )

    def __repr__(self) -> str:
        return (
            f"BatchMetadata(mode={self.forward_mode.value}, requests={self.num_requests}, "
            f"tokens={self.num_tokens}, max_seq_len={self.max_seq_len}, generation={self.generation})"
        )


_DEVICE_FIELDS = (
    "swa_token_table", "prefix_lens", "extend_lens", "seq_lens", "query_start_loc", "query_req", "query_pos",
)


def _refill(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new``'s values in ``old``'s storage when the shapes match (a captured graph reads that
    storage), else ``new`` itself."""
    if old.shape == new.shape and old.data_ptr() != new.data_ptr():
        old.copy_(new)
        return old
    return new
