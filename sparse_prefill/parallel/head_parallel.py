"""Head parallelism: the query heads of every layer split across the ranks of a group.

DeepSeek-V4 attention is MQA over one shared latent KV, so a rank attending ``h_q / world``
heads needs the same KV as one GPU and no communication inside attention: rank ``r`` runs the
single-GPU backend on heads ``r * h_loc .. (r + 1) * h_loc - 1`` (its ``attn_sink`` slice) with a
config of ``h_loc`` heads, on the same metadata lengths and caches. Outputs stay per rank (as
tensor parallelism wants them, ahead of the row-parallel output projection) or are gathered
along heads. Every layer takes the path one GPU takes for all ``h_q`` heads (see
``common.LocalBackends``), so each head's output equals one GPU's bit for bit wherever the
kernel's per-head arithmetic does not depend on how many heads run together (the tests prove
it for the CPU reference at 4 and 8 heads per rank).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from sparse_prefill._utils import check_tensor
from sparse_prefill.backend import BatchMetadata, LayerCaches, SparsePrefillBackend
from sparse_prefill.parallel.common import (
    LocalBackends,
    ParallelLayer,
    broadcast_shards,
    check_bool,
    output_buffer,
)


class _State(NamedTuple):
    metadata: BatchMetadata  # the whole model's
    generation: int
    local: BatchMetadata  # the same batch for the rank's config of h_q / world_size heads


class HeadParallelPrefill(ParallelLayer):
    """One layer's attention with ``h_q / world_size`` heads per rank of ``group``.

    Args:
        backend: the single-GPU :class:`SparsePrefillBackend` of the whole model (its config's
            ``num_heads`` is ``h_q``, all heads); its path setting, impl, ``max_query_rows`` and
            cost model are used.
        group: a ``torch.distributed`` process group (None: the default group). ``h_q`` must be
            divisible by its size (ValueError naming ``h_q`` otherwise); the kernels take any
            head count per rank (e.g. 8 or 16).

    Attributes: ``heads`` (this rank's ``slice`` of the ``h_q`` heads), ``local_config`` (the
    config of ``h_q / world_size`` heads the rank's backend runs), ``stats`` (:class:`CommStats`;
    only gathers and checks communicate).

    Every rank holds the same metadata and caches (the engine stores K on each, as tensor
    parallelism does: the latent KV is not split by head).
    """

    _state: _State | None  # set by ParallelLayer.__init__ and begin_forward

    def __init__(self, backend: SparsePrefillBackend, group=None) -> None:
        super().__init__(backend, group)
        h_q = self.config.num_heads
        if h_q % self.world_size:
            raise ValueError(
                f"h_q (backend.config.num_heads = {h_q}) must be divisible by the group's size {self.world_size}"
            )
        h_loc = h_q // self.world_size
        self.heads = slice(self.rank * h_loc, (self.rank + 1) * h_loc)
        self.local_config = dataclasses.replace(self.config, num_heads=h_loc)
        self._local = LocalBackends(backend, self.local_config)

    def begin_forward(self, metadata: BatchMetadata) -> None:
        """Start a forward over ``metadata`` (built with the whole model's config). Collective
        when value checks are on (ValueError naming ``metadata`` unless all ranks agree)."""
        self._check_batch(metadata)
        md = metadata
        local = BatchMetadata(
            self.local_config, md.prefix_lens_host, md.extend_lens_host, md.swa_token_table,
            md.compressed_token_tables, md.forward_mode,
        )
        self._state = _State(metadata, metadata.generation, local)

    def _local_heads(self, name: str, t: torch.Tensor, dim: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
        """``t`` with this rank's heads (dim ``dim`` of size h_loc), or its slice of all h_q."""
        check_tensor(name, t, dtypes=(dtype,))
        h_q, h_loc = self.config.num_heads, self.local_config.num_heads
        if t.dim() == len(shape) and t.shape[dim] == h_q != h_loc:
            return t.narrow(dim, self.heads.start, h_loc)
        want = list(shape)
        want[dim] = h_loc
        check_tensor(name, t, shape=tuple(want))
        return t

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        caches: LayerCaches | tuple[torch.Tensor, torch.Tensor | None],
        topk_indices: torch.Tensor | None = None,
        attn_sink: torch.Tensor | None = None,
        *,
        metadata: BatchMetadata | None = None,
        gather: bool = False,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of one layer for this rank's heads; collective when ``gather``.

        Args:
            layer: the layer index, ``0 <= layer < config.num_layers``.
            q: ``[num_tokens, h_q / world_size, 512]`` bfloat16, this rank's heads (``heads``),
                or ``[num_tokens, h_q, 512]``, of which the rank takes its heads (a view, no
                copy). Unit stride in the last dim.
            caches: the layer's caches (the same on every rank).
            topk_indices: top-k layers: ``[num_tokens, topk]`` int32 (shared by all heads).
            attn_sink: ``[h_q]`` float32 (the rank takes its slice) or ``[h_q / world_size]``
                (already sliced), or None.
            metadata: the batch, built with the whole model's config; defaults to the current.
            gather: False: return this rank's heads; True: every head, on every rank.
            out: optional bfloat16 buffer of the returned shape; contiguous when gathering.

        Returns:
            ``[num_tokens, h_q / world_size, 512]`` bfloat16 (heads ``heads`` of one GPU's
            ``backend.forward`` output), or ``[num_tokens, h_q, 512]`` when gathering, which
            adds ``num_tokens * h_q * 1024`` bytes to ``stats.out_bytes``.
        """
        md, _, local_md = self._current(metadata)
        check_bool("gather", gather)
        cfg, h_q, h_loc = self.config, self.config.num_heads, self.local_config.num_heads
        n, d = md.num_tokens, cfg.head_dim
        q = self._local_heads("q", q, 1, torch.bfloat16, (n, h_q, d))
        if attn_sink is not None:
            attn_sink = self._local_heads("attn_sink", attn_sink, 0, torch.float32, (h_q,))
        backend = self._local.for_layer(layer, md)
        if not gather:
            return backend.forward(layer, q, caches, topk_indices, attn_sink, metadata=local_md, out=out)
        out = output_buffer(out, (n, h_q, d), md.device)
        # Heads of one rank are not contiguous in [n, h_q, d]: gather [world, n, h_loc, d], then place.
        shards = torch.empty(self.world_size, n, h_loc, d, dtype=torch.bfloat16, device=md.device)
        backend.forward(layer, q, caches, topk_indices, attn_sink, metadata=local_md, out=shards[self.rank])
        ranges = [(r, r + 1) for r in range(self.world_size)]
        self.stats.out_bytes += broadcast_shards(shards, ranges, self.group)
        out.view(n, self.world_size, h_loc, d).copy_(shards.transpose(0, 1))
        return out
