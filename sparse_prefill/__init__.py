"""sparse_prefill: DeepSeek-V4 sparse-attention prefill over a paged FP8 KV cache."""

from sparse_prefill._utils import value_checks, value_checks_enabled
from sparse_prefill.layout import KVCacheLayout

__version__ = "0.1.0"

__all__ = [
    "KVCacheLayout",
    "value_checks",
    "value_checks_enabled",
]
