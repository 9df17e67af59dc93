"""sparse_prefill: DeepSeek-V4 sparse-attention prefill over a paged FP8 KV cache.

The package follows the data flow: ``layout`` (the cache byte formats) -> ``ops.cache`` (store,
dequantize) -> ``ops.indices`` (SWA ids, workspace plan, combined index rows) ->
``ops.sparse_attn`` / ``ops.fp8_sparse_attn`` (the attention kernels) -> ``backend`` (chunk cache,
routing, the per-layer entry point) -> ``parallel`` (several ranks) -> ``cli``.

CUDA tensors run the Triton kernels (the attention ops: the kernel ``ops/kernel_choice.py`` picks,
Gluon or FlashMLA's where faster); CPU tensors run the PyTorch references (``impl="triton"``
runs the kernels under Triton's interpreter when ``TRITON_INTERPRET=1`` was set before import).
"""

from sparse_prefill._utils import value_checks, value_checks_enabled
from sparse_prefill._version import __version__
from sparse_prefill.backend import (
    BatchMetadata,
    ForwardMode,
    LayerCaches,
    LayerKind,
    ModelConfig,
    PathCosts,
    SparsePrefillBackend,
    SyntheticBatch,
    make_synthetic_batch,
    naive_layer_forward,
)
from sparse_prefill.backend.chunk_cache import (
    ChunkCacheBuilder,
    LayerIndices,
    SparsePrefillChunkCache,
    StaleChunkCacheError,
)
from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops.cache import (
    dequantize_k_cache,
    dequantize_k_cache_paged,
    quantize_k_cache,
    store_k_cache,
)
from sparse_prefill.ops.fp8_sparse_attn import paged_fp8_sparse_attn_fwd
from sparse_prefill.ops.indices import (
    SwaTokenIds,
    WorkspacePlan,
    build_swa_token_ids,
    build_workspace_plan,
    combine_topk_swa_indices,
    combined_width,
)
from sparse_prefill.ops.sparse_attn import sparse_attn_fwd
from sparse_prefill.parallel import ContextParallelPrefill, HeadParallelPrefill, ShardedOutput


__all__ = [
    "__version__",
    "BatchMetadata",
    "ChunkCacheBuilder",
    "ContextParallelPrefill",
    "ForwardMode",
    "HeadParallelPrefill",
    "KVCacheLayout",
    "LayerCaches",
    "LayerIndices",
    "LayerKind",
    "ModelConfig",
    "PathCosts",
    "ShardedOutput",
    "SparsePrefillBackend",
    "SparsePrefillChunkCache",
    "StaleChunkCacheError",
    "SwaTokenIds",
    "SyntheticBatch",
    "WorkspacePlan",
    "build_swa_token_ids",
    "build_workspace_plan",
    "combine_topk_swa_indices",
    "combined_width",
    "dequantize_k_cache",
    "dequantize_k_cache_paged",
    "make_synthetic_batch",
    "naive_layer_forward",
    "paged_fp8_sparse_attn_fwd",
    "quantize_k_cache",
    "sparse_attn_fwd",
    "store_k_cache",
    "value_checks",
    "value_checks_enabled",
]
