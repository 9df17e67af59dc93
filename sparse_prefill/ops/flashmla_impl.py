"""``impl="flashmla"``: FlashMLA's own kernels behind both attention ops (``flash_mla`` installed,
an sm_90 GPU), for comparison and for any shape where its kernel is measured faster
(``kernel_choice.AUTO_PREFERS``; none at present).

- ``sparse_attn_fwd`` -> ``flash_mla.flash_mla_sparse_fwd``; its SM90 kernel takes h_q 64 or 128
  (``csrc/api/sparse_fwd.h``) and a top-k width that is a multiple of 128
  (``csrc/sm90/prefill/sparse/phase1.cuh``: ``KU_ASSERT(params.topk % (2*B_TOPK) == 0)``), reads
  ``q`` by TMA (16-byte aligned rows) and takes strides as int32. It allocates its outputs: they
  are copied into ours.
- ``paged_fp8_sparse_attn_fwd`` -> ``flash_mla.flash_mla_with_kvcache`` in its sparse FP8 mode,
  one query per batch row, over FlashMLA's float8 view of the same cache bytes
  (:func:`cache_view`). It takes h_q 64 or 128 (``csrc/api/sparse_decode.h``) and returns no
  ``max_logits``: ours is filled with NaN. Index rows are passed with every invalid id as -1
  (FlashMLA's convention) and padded with -1 to its 64-wide index blocks.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from sparse_prefill.layout import KVCacheLayout

INT32_MAX = torch.iinfo(torch.int32).max

# FlashMLA's FP8 decode kernel aborts the whole process (``get_decoding_sched_meta.cu:111:
# invalid argument``) on a batch of 32768 query rows on an H200 and works at 8192
# (benchmarks/RESULTS.md, H200 section, backend table): calls past the measured-good size are
# refused rather than let it kill the process.
FLASHMLA_DECODE_MAX_ROWS = 8192
FLASHMLA_HEADS = (64, 128)
PREFILL_TOPK_MULTIPLE = 128  # SM90 sparse prefill: two 64-wide top-k blocks per step
DECODE_TOPK_BLOCK = 64  # SM90 sparse FP8 decode: index blocks of 64


@functools.lru_cache(maxsize=None)
def flash_mla_module() -> ModuleType | str:
    """The ``flash_mla`` module, or why it does not import (cached: "auto" asks every call)."""
    try:
        import flash_mla
    except (ImportError, OSError) as error:  # OSError: a build whose shared library fails to load
        return f"flash_mla does not import ({type(error).__name__}: {error})"
    return flash_mla


@functools.lru_cache(maxsize=None)
@torch._dynamo.assume_constant_result  # torch.compile runs it once at trace time, as a constant
def _device_reason(device: torch.device) -> str | None:
    module = flash_mla_module()
    if isinstance(module, str):
        return module
    if device.type != "cuda":
        return f"it needs CUDA tensors, got {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return f"it is enabled on sm_90 (Hopper) GPUs only, got sm_{major}{minor}"
    return None


def device_reason(device: torch.device, shape: object = None) -> str | None:
    """Why FlashMLA's kernels cannot run on ``device`` (None if they can)."""
    return _device_reason(device)


def _heads_reason(h_q: object) -> str | None:
    if h_q not in FLASHMLA_HEADS:
        return f"FlashMLA's kernels take h_q {FLASHMLA_HEADS[0]} or {FLASHMLA_HEADS[1]}, got {h_q}"
    return None


def sparse_shape_reason(device: torch.device, shape) -> str | None:
    """Why ``flash_mla_sparse_fwd`` (SM90) does not take a ``sparse_attn_fwd`` call of
    ``shape`` (h_q, topk), None if it does."""
    topk = shape["topk"]
    if topk % PREFILL_TOPK_MULTIPLE:
        return f"FlashMLA's SM90 sparse prefill needs topk a multiple of {PREFILL_TOPK_MULTIPLE}, got {topk}"
    return _heads_reason(shape["h_q"])


def decode_shape_reason(device: torch.device, shape) -> str | None:
    """Why FlashMLA's sparse FP8 decode does not take a ``paged_fp8_sparse_attn_fwd`` call of
    ``shape`` (s_q, h_q, layout, and whether it has an extra scope or lengths: ``extra``,
    ``lengths``), None if it does."""
    if shape["s_q"] > FLASHMLA_DECODE_MAX_ROWS:
        return (f"FlashMLA's FP8 decode kernel aborted the process on 32768 query rows and ran on "
                f"{FLASHMLA_DECODE_MAX_ROWS} (H200): at most {FLASHMLA_DECODE_MAX_ROWS} rows, got {shape['s_q']}")
    if shape["layout"] is KVCacheLayout.V32 and (shape.get("extra") or shape.get("lengths")):
        # Seen on the H200 with FlashMLA 9241ae3 (benchmarks/data/gpu_tests_h200_third_session.log):
        # the V3.2 layout ran without them and crashed the process (segfault) with either.
        return ("FlashMLA's FP8 decode kernel crashed the process on the V3.2 layout with an extra scope or "
                "topk_length / extra_topk_length (H200); with V3.2 it takes neither")
    return _heads_reason(shape["h_q"])


def inputs_reason(q: torch.Tensor, kv: torch.Tensor) -> str | None:
    """Why ``flash_mla_sparse_fwd`` cannot read ``q`` / ``kv`` (None if it can): rows start
    16-byte aligned (q by TMA, kv by 16-byte copies) and strides fit its int32 arguments."""
    for name, t, strides in (("q", q, q.stride()[:2]), ("kv", kv, kv.stride()[:1])):
        if t.data_ptr() % 16 or any(st % 8 or st > INT32_MAX for st in strides):
            return f"{name} must start 16-byte aligned with strides {tuple(strides)} multiples of 8 below 2**31"
    return None


def sparse_attn_fwd_flashmla(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    attn_sink: torch.Tensor | None,
    topk_length: torch.Tensor | None,
    out: torch.Tensor,
    max_logits: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """``flash_mla_sparse_fwd`` on validated ``sparse_attn_fwd`` arguments (kv [s_kv, 1, d_qk],
    indices [s_q, 1, topk]), its results copied into the outputs."""
    results = flash_mla_module().flash_mla_sparse_fwd(q, kv, indices, sm_scale, out.shape[-1], attn_sink, topk_length)
    for buffer, value in zip((out, max_logits, lse), results):
        buffer.copy_(value)


def cache_view(cache: torch.Tensor, page_size: int, layout: KVCacheLayout) -> torch.Tensor:
    """FlashMLA's float8 view ``[num_pages, page_size, 1, bytes_per_token]`` of our uint8 cache
    ``[num_pages, layout.page_bytes(page_size)]``: the same bytes (its pages are ours, padding
    aside)."""
    per_token = layout.bytes_per_token
    fp8 = cache.view(torch.float8_e4m3fn)[:, : page_size * per_token]
    return fp8.view(cache.shape[0], page_size, 1, per_token)


def _decode_ids(ids: torch.Tensor, capacity: int) -> torch.Tensor:
    """[s_q, topk] ids -> [s_q, 1, width] with every invalid id -1, width padded to 64."""
    ids = torch.where((ids < 0) | (ids >= capacity), -1, ids)
    return torch.nn.functional.pad(ids, (0, -ids.shape[1] % DECODE_TOPK_BLOCK), value=-1)[:, None]


def paged_fp8_sparse_attn_flashmla(
    q: torch.Tensor,
    cache: torch.Tensor,
    indices: torch.Tensor,
    page_size: int,
    extra_cache: torch.Tensor | None,
    extra_indices: torch.Tensor | None,
    extra_page_size: int | None,
    topk_length: torch.Tensor | None,
    extra_topk_length: torch.Tensor | None,
    sm_scale: float,
    attn_sink: torch.Tensor | None,
    layout: KVCacheLayout,
    out: torch.Tensor,
    max_logits: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """``flash_mla_with_kvcache`` (sparse FP8) on validated ``paged_fp8_sparse_attn_fwd``
    arguments, each query row its own batch entry; out and lse copied into ours, max_logits NaN
    (FlashMLA's decode kernel does not return it)."""
    flash_mla = flash_mla_module()
    s_q, h_q, _ = q.shape
    extra = {}
    if extra_cache is not None:
        extra = dict(extra_k_cache=cache_view(extra_cache, extra_page_size, layout),
                     extra_indices_in_kvcache=_decode_ids(extra_indices, extra_cache.shape[0] * extra_page_size),
                     extra_topk_length=extra_topk_length)
    meta, _ = flash_mla.get_mla_metadata()
    result_out, result_lse = flash_mla.flash_mla_with_kvcache(
        q[:, None], cache_view(cache, page_size, layout), None, None, out.shape[-1], meta,
        softmax_scale=sm_scale, is_fp8_kvcache=True, indices=_decode_ids(indices, cache.shape[0] * page_size),
        attn_sink=attn_sink, topk_length=topk_length, **extra,
    )
    out.copy_(result_out[:, 0])
    lse.copy_(result_lse.reshape(s_q, h_q))
    max_logits.fill_(float("nan"))
