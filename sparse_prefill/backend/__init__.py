"""The DeepSeek-V4 prefill attention backend: config, batch metadata, routing and the two paths."""

from sparse_prefill.backend.backend import SparsePrefillBackend
from sparse_prefill.backend.config import ModelConfig
from sparse_prefill.backend.layer_kinds import LayerKind
from sparse_prefill.backend.metadata import BatchMetadata, ForwardMode, LayerCaches
from sparse_prefill.backend.naive import naive_layer_forward
from sparse_prefill.backend.routing import PathCosts
from sparse_prefill.backend.synthetic import SyntheticBatch, make_synthetic_batch

__all__ = [
    "BatchMetadata",
    "ForwardMode",
    "LayerCaches",
    "LayerKind",
    "ModelConfig",
    "PathCosts",
    "SparsePrefillBackend",
    "SyntheticBatch",
    "make_synthetic_batch",
    "naive_layer_forward",
]
