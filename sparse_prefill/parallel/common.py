"""What context and head parallelism share: the process group, forced-path local backends,
cross-rank checks and the one collective pattern they use (per-rank shards broadcast in turn).

Only ``broadcast`` and ``all_reduce`` are used: NCCL supports them on CUDA, gloo on CPU and CUDA
(gloo has no CUDA ``all_gather``), so the same code runs under ``torchrun`` with NCCL and in the
gloo tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sparse_prefill._utils import check_int, check_tensor, value_checks_enabled
from sparse_prefill.backend import BatchMetadata, ModelConfig, SparsePrefillBackend, routing
from sparse_prefill.backend.layer_kinds import SWA_RATIO

# Fingerprints are compared through an all_reduce(MAX) of (fp, -fp): keep -fp representable.
_FP_MASK = (1 << 62) - 1


@dataclass
class CommStats:
    """Bytes moved by a parallel layer's collectives since construction (or ``reset``).

    Each field is the payload of the gathers of that kind: every rank's shard counted once, i.e.
    the size of what every rank holds afterwards; a rank receives that minus its own shard.

    kv_bytes:    new cache entries shared by context parallelism (bf16 K rows, 1024 B each).
    out_bytes:   attention outputs gathered (bf16, ``h * 512 * 2`` B per row).
    check_bytes: cross-rank metadata checks (16 B per check; only with value checks on).
    """

    kv_bytes: int = 0
    out_bytes: int = 0
    check_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.kv_bytes + self.out_bytes + self.check_bytes

    def reset(self) -> None:
        self.kv_bytes = self.out_bytes = self.check_bytes = 0


def group_rank_world(group: object) -> tuple[dist.ProcessGroup, int, int]:
    """``(group, rank in it, its size)``; ``None`` means the default (WORLD) group.

    Raises ValueError naming ``group`` when torch.distributed is not initialized or this
    process is not a member of ``group``; TypeError when it is not a ProcessGroup.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialized (call init_process_group first)")
    if group is None:
        group = dist.group.WORLD
    # new_group() hands processes outside the group a sentinel instead of a group.
    member = group is not dist.GroupMember.NON_GROUP_MEMBER
    if member and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group) if member else -1
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group")
    return group, rank, dist.get_world_size(group)


def check_metadata(metadata: object, config: ModelConfig | None = None, config_name: str = "config") -> BatchMetadata:
    """``metadata`` checked as a BatchMetadata (TypeError naming it otherwise), built for
    ``config`` when one is given (ValueError naming both otherwise)."""
    if not isinstance(metadata, BatchMetadata):
        raise TypeError(f"metadata must be a BatchMetadata, got {type(metadata).__name__}")
    if config is not None and metadata.config != config:
        raise ValueError(f"metadata was built for a different ModelConfig than {config_name}")
    return metadata


def check_batch(config: object, metadata: object) -> BatchMetadata:
    """What the free functions taking a ``config`` and its batch's ``metadata`` accept."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    return check_metadata(metadata, config)


def check_ratio(config: ModelConfig, ratio: object, *, swa: bool = False) -> int:
    """``ratio`` checked as the int compress ratio of some layer of ``config`` that has a
    compressed cache (or, with ``swa``, 0: the SWA cache); errors name ``ratio``."""
    check_int("ratio", ratio)
    if not (swa and ratio == SWA_RATIO):
        config.page_size_of(ratio)  # ValueError naming the ratio unless some layer uses it
    return ratio


def check_bool(name: str, value: object) -> bool:
    """``value`` checked as a bool (a truthy string or int would silently pick a mode)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


class ParallelLayer:
    """What both parallel layers hold: the single-GPU ``backend``, its ``config``, the
    ``group`` with this process's ``rank`` and its ``world_size``, ``stats``, and per-forward
    state (``self._state``, with ``metadata`` and ``generation``) that a new metadata object, or
    one refilled by ``copy_``, rebuilds through ``begin_forward``."""

    def __init__(self, backend: SparsePrefillBackend, group) -> None:
        if not isinstance(backend, SparsePrefillBackend):
            raise TypeError(f"backend must be a SparsePrefillBackend, got {type(backend).__name__}")
        self.backend = backend
        self.config = backend.config
        self.group, self.rank, self.world_size = group_rank_world(group)
        self.stats = CommStats()
        self._state = None

    def begin_forward(self, metadata: BatchMetadata) -> None:
        raise NotImplementedError

    def _check_batch(self, metadata: object) -> BatchMetadata:
        """``metadata`` of the backend's config, the same on every rank (see check_same_batch)."""
        check_metadata(metadata, self.config, "the backend's (backend.config)")
        check_same_batch(self.config, metadata, self.group, self.stats)
        return metadata

    def _current(self, metadata: BatchMetadata | None):
        st = self._state
        if metadata is None:
            if st is None:
                raise ValueError("no batch metadata: call begin_forward(metadata) or pass metadata=")
            metadata = st.metadata
        if st is None or st.metadata is not metadata or st.generation != metadata.generation:
            self.begin_forward(metadata)
        return self._state


class LocalBackends:
    """One single-GPU backend per path, each forced to it, all like ``backend`` otherwise.

    A rank attends a part of the batch (some rows, or some heads); left to route on its part,
    it could pick another path than one GPU does on the whole batch and give other bits. So
    every layer takes the path ``backend.path_for(ratio, metadata)`` gives the whole batch.
    """

    def __init__(self, backend: SparsePrefillBackend, config: ModelConfig) -> None:
        self.backend = backend
        self.config = config
        self._by_path: dict[str, SparsePrefillBackend] = {}
        self._paths: dict[int, str] = {}
        self._paths_of: tuple[BatchMetadata, int] | None = None  # (metadata, generation)

    def path_for(self, ratio: int, metadata: BatchMetadata) -> str:
        """``backend.path_for(ratio, metadata)``, from the host lengths alone: ``path_for`` would
        first build the whole batch's forward state on every rank (the chunk cache: launches,
        before the layer's arguments are checked, and work no rank uses)."""
        if self._paths_of is None or self._paths_of[0] is not metadata or self._paths_of[1] != metadata.generation:
            self._paths, self._paths_of = {}, (metadata, metadata.generation)
        if ratio not in self._paths:
            b = self.backend
            setting = routing.REGULAR if b.cuda_graph else b.path_setting  # as path_for
            self._paths[ratio] = routing.choose_path(setting, b.config, metadata, ratio, b.costs)
        return self._paths[ratio]

    def for_layer(self, layer: int, metadata: BatchMetadata) -> SparsePrefillBackend:
        path = self.path_for(self.config.ratio_of(layer), metadata)
        if path not in self._by_path:
            b = self.backend
            self._by_path[path] = SparsePrefillBackend(
                self.config, path, impl=b.impl, max_query_rows=b.max_query_rows, costs=b.costs
            )
        return self._by_path[path]


def _fingerprint(config: ModelConfig, metadata: BatchMetadata) -> int:
    # Numbers only: hash() of ints, floats and tuples of them is the same in every process.
    cfg = (
        config.num_heads, config.compress_ratios, config.topk, config.window_size, config.swa_page_size,
        tuple(sorted(config.compressed_page_size.items())), config.sm_scale,
        config.topk_ratios,  # with compress_ratios it fixes every layer's kind (ints: no str hash)
    )
    batch = (metadata.prefix_lens_host, metadata.extend_lens_host, metadata.is_decode)
    return hash((cfg, batch)) & _FP_MASK


def check_same_batch(
    config: ModelConfig, metadata: BatchMetadata, group: dist.ProcessGroup, stats: CommStats
) -> None:
    """With value checks on: ValueError unless every rank of ``group`` has the same config and
    batch lengths (one 16-byte all_reduce, which syncs the device)."""
    if not value_checks_enabled():
        return
    fp = _fingerprint(config, metadata)
    t = torch.tensor([fp, -fp], dtype=torch.int64, device=metadata.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    stats.check_bytes += t.numel() * t.element_size()
    hi, neg_lo = t.tolist()
    if hi != fp or -neg_lo != fp:
        raise ValueError(
            "metadata: the ranks of group hold different batches or configs (prefix/extend lengths, "
            "forward mode or model config differ); every rank must pass the same batch"
        )


def output_buffer(out: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``out`` checked as a contiguous bfloat16 ``shape`` tensor on ``device`` (collectives write
    whole row ranges of it), or a new one."""
    if out is None:
        return torch.empty(shape, dtype=torch.bfloat16, device=device)
    check_tensor("out", out, dtypes=(torch.bfloat16,), shape=shape, device=device)
    if not out.is_contiguous():
        raise ValueError(f"out must be contiguous, got strides {tuple(out.stride())}")
    return out


def broadcast_shards(
    buf: torch.Tensor, ranges: Sequence[tuple[int, int]], group: dist.ProcessGroup
) -> int:
    """Rank ``r`` of ``group`` holds rows ``ranges[r]`` of ``buf`` (contiguous); afterwards every
    rank holds every range. Returns the payload in bytes (each range once).

    One broadcast per non-empty range rather than an all_gather: ranges may differ in size (no
    padding, no extra copy, rows land in place), and gloo has no CUDA all_gather.
    """
    row_bytes = buf[0].numel() * buf.element_size() if buf.shape[0] else 0
    works = []
    for r, (a, b) in enumerate(ranges):
        if b > a:
            src = dist.get_global_rank(group, r)
            works.append(dist.broadcast(buf[a:b], src=src, group=group, async_op=True))
    for w in works:
        w.wait()
    return sum(b - a for a, b in ranges) * row_bytes
