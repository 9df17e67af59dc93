"""Prefill across ranks through ``torch.distributed``, as thin layers over the single-GPU backend.

* :class:`ContextParallelPrefill`: the query rows of a chunk split across ranks by attention
  work; new cache entries exchanged so every rank's cache copy is one GPU's; outputs gathered
  in the engine's order or left sharded.
* :class:`HeadParallelPrefill`: ``h_q / world_size`` heads per rank, the same KV everywhere,
  no communication inside attention; outputs optionally gathered along heads.

Both give one GPU's answer bit for bit (see each module for the conditions).
"""

from sparse_prefill.parallel.common import CommStats
from sparse_prefill.parallel.context_parallel import (
    ContextParallelPrefill,
    ShardedOutput,
    new_entries,
    new_slots,
    partition_rows,
    row_costs,
    shard_metadata,
)
from sparse_prefill.parallel.head_parallel import HeadParallelPrefill

__all__ = [
    "CommStats",
    "ContextParallelPrefill",
    "HeadParallelPrefill",
    "ShardedOutput",
    "new_entries",
    "new_slots",
    "partition_rows",
    "row_costs",
    "shard_metadata",
]
