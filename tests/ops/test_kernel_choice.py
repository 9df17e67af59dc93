"""ops/kernel_choice.py: the implementations each attention op declares, how ``impl`` is checked
before launch, "auto"'s order and its FlashMLA table; and impl="flashmla" refused where
``flash_mla`` does not import or the device is not an sm_90 GPU. CPU only (the device facts are
faked where a test needs a GPU's answer)."""

from __future__ import annotations

import logging
import types

import pytest
import torch

from sparse_prefill import ModelConfig, SparsePrefillBackend, paged_fp8_sparse_attn_fwd, sparse_attn_fwd
from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops import flashmla_impl, kernel_choice
from sparse_prefill.ops.fp8_sparse_attn import gluon_kernel as fp8_gluon
from sparse_prefill.ops.kernel_choice import PAGED_FP8, SPARSE_ATTN
from sparse_prefill.ops.sparse_attn import gluon_kernel as attn_gluon
from tests.ops.conftest import forget_flash_mla
from tests.ops.test_fp8_sparse_attn import make_fp8_case
from tests.ops.test_sparse_attn import make_case

CUDA = torch.device("cuda")  # a device object only: nothing runs on it here
CPU = torch.device("cpu")
V4 = KVCacheLayout.V4


def shape(h_q=64, d_qk=512, topk=512, s_q=16, layout=V4):
    return {"s_q": s_q, "h_q": h_q, "d_qk": d_qk, "topk": topk, "layout": layout}


@pytest.fixture
def no_flash_mla(flash_mla_as):
    flash_mla_as(None)


@pytest.fixture
def fake_flash_mla(flash_mla_as):
    """A stand-in module whose kernels are never called here."""
    flash_mla_as(types.ModuleType("flash_mla"))


@pytest.fixture
def hopper_with_flash_mla(monkeypatch):
    """FlashMLA runs on "cuda" (an sm_90 GPU with flash_mla installed), the Gluon kernels are
    not taken by auto, and the once-per-process log is fresh."""
    monkeypatch.setattr(flashmla_impl, "_device_reason", lambda device: None if device.type == "cuda" else "cpu")
    monkeypatch.setattr(attn_gluon, "auto_picks_gluon", lambda device, h_q: False)
    monkeypatch.setattr(fp8_gluon, "auto_picks_gluon", lambda device, layout: False)
    monkeypatch.setattr(kernel_choice, "_LOGGED", set())


def test_both_families_declare_the_same_names_ending_in_a_kernel_that_takes_all():
    for impls in kernel_choice.FAMILIES.values():
        assert ("auto", *(i.name for i in impls)) == kernel_choice.ATTN_IMPLS
        assert impls[-1].name == "triton" and impls[-1].auto(CUDA, shape())
        assert [i.name for i in impls if not i.ours] == ["flashmla"]
    assert set(kernel_choice.ATTN_IMPLS) == {"auto", "reference", "triton", "gluon", "flashmla"}


@pytest.mark.parametrize("op", [SPARSE_ATTN, PAGED_FP8])
def test_resolve_names_and_cpu(op):
    with pytest.raises(ValueError, match="impl must be one of"):
        kernel_choice.resolve(op, "cuda", CPU, shape())
    assert kernel_choice.resolve(op, "auto", CPU, shape()) == "reference"
    assert kernel_choice.resolve(op, "reference", CPU, shape()) == "reference"
    with pytest.raises(ValueError, match="impl='gluon' cannot run here: it needs CUDA tensors"):
        kernel_choice.resolve(op, "gluon", CPU, shape())
    if not kernel_choice.INTERPRET:
        with pytest.raises(ValueError, match="impl='triton' cannot run here: .*TRITON_INTERPRET=1"):
            kernel_choice.resolve(op, "triton", CPU, shape())


def test_sparse_attn_auto_on_cuda_is_decided_in_the_op():
    """The wrapper leaves "auto" to the torch op (its choice reads data pointers)."""
    assert kernel_choice.resolve(SPARSE_ATTN, "auto", CUDA, shape()) == "auto"


def test_flashmla_refused_without_flash_mla(no_flash_mla):
    reason = flashmla_impl.device_reason(CUDA)
    assert reason.startswith("flash_mla does not import")
    for op in (SPARSE_ATTN, PAGED_FP8):
        with pytest.raises(ValueError, match="impl='flashmla' cannot run here: flash_mla does not import"):
            kernel_choice.resolve(op, "flashmla", CUDA, shape())
    case = make_case(4, 20, 64, 512, 128, "cpu")
    with pytest.raises(ValueError, match="impl='flashmla' cannot run here: flash_mla does not import"):
        sparse_attn_fwd(*case.args(), impl="flashmla")


def test_flashmla_refused_on_cpu_even_when_it_imports(fake_flash_mla):
    assert flashmla_impl.device_reason(CPU) == "it needs CUDA tensors, got cpu"
    case = make_case(4, 20, 64, 512, 128, "cpu")
    with pytest.raises(ValueError, match="impl='flashmla' cannot run here: it needs CUDA tensors"):
        sparse_attn_fwd(*case.args(), impl="flashmla")
    fp8 = make_fp8_case(4, 64, V4, (4, 3, 64), (4, 3, 8), "cpu")
    with pytest.raises(ValueError, match="impl='flashmla' cannot run here: it needs CUDA tensors"):
        paged_fp8_sparse_attn_fwd(*fp8.args(), **fp8.kwargs(), impl="flashmla")


def test_flashmla_refused_off_hopper(fake_flash_mla, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert flashmla_impl.device_reason(CUDA) == "it is enabled on sm_90 (Hopper) GPUs only, got sm_100"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    forget_flash_mla()
    assert flashmla_impl.device_reason(CUDA) is None


@pytest.mark.parametrize("h_q,topk,why", [
    (64, 512, None), (128, 2048, None), (128, 128, None),
    (32, 512, "take h_q 64 or 128, got 32"), (96, 512, "got 96"),
    (64, 500, "topk a multiple of 128, got 500"), (64, 64, "got 64"),
])
def test_flashmla_sparse_prefill_admission(h_q, topk, why):
    reason = flashmla_impl.sparse_shape_reason(CUDA, shape(h_q=h_q, topk=topk))
    assert reason is None if why is None else why in reason


@pytest.mark.parametrize("s_q,h_q,why", [
    (1, 64, None), (8192, 128, None), (8193, 64, "at most 8192 rows, got 8193"), (32768, 128, "aborted"),
    (16, 16, "take h_q 64 or 128, got 16"),
])
def test_flashmla_decode_admission(s_q, h_q, why):
    reason = flashmla_impl.decode_shape_reason(CUDA, shape(s_q=s_q, h_q=h_q))
    assert reason is None if why is None else why in reason


@pytest.mark.parametrize("layout", [V4, KVCacheLayout.V32])
@pytest.mark.parametrize("extra,lengths", [(False, False), (True, False), (False, True)])
def test_flashmla_decode_v32_takes_no_extra_scope_or_lengths(layout, extra, lengths):
    """FlashMLA's decode kernel crashed the process on V3.2 with either (H200): refused."""
    reason = flashmla_impl.decode_shape_reason(CUDA, {**shape(layout=layout), "extra": extra, "lengths": lengths})
    if layout is KVCacheLayout.V32 and (extra or lengths):
        assert "crashed the process on the V3.2 layout" in reason
    else:
        assert reason is None


def test_flashmla_shape_limits_give_value_errors(hopper_with_flash_mla):
    for op, bad, match in [
        (SPARSE_ATTN, shape(h_q=32), "impl='flashmla' cannot run here: FlashMLA's kernels take h_q 64 or 128"),
        (SPARSE_ATTN, shape(topk=200), "impl='flashmla' cannot run here: FlashMLA's SM90 sparse prefill needs topk"),
        (PAGED_FP8, shape(s_q=32768), "impl='flashmla' cannot run here: FlashMLA's FP8 decode kernel aborted"),
    ]:
        with pytest.raises(ValueError, match=match):
            kernel_choice.resolve(op, "flashmla", CUDA, bad)
        assert kernel_choice.resolve(op, "flashmla", CUDA, shape()) == "flashmla"


@pytest.mark.parametrize("width,offset,ok", [(512, 0, True), (520, 0, True), (516, 0, False), (512, 4, False)])
def test_flashmla_input_alignment_rule(width, offset, ok):
    """Rows 16-byte aligned: a start at a multiple of 16 bytes, row strides multiples of 8."""
    kv = torch.zeros(10 * width + offset, dtype=torch.bfloat16)[offset:].view(10, 1, width)[..., :512]
    q = torch.zeros(4, 64, 512, dtype=torch.bfloat16)
    assert (flashmla_impl.inputs_reason(q, kv) is None) == ok


def test_auto_table_names_flashmla_nowhere_since_ours_measured_as_fast():
    # benchmarks/RESULTS.md, "H200, 2026-12-03 (second run)": ours as fast or faster on every row.
    assert kernel_choice.AUTO_PREFERS == {}
    for h_q, d_qk in [(64, 512), (128, 512), (128, 576), (64, 576), (32, 512), (16, 512), (8, 576)]:
        assert kernel_choice.auto_prefers(SPARSE_ATTN, shape(h_q=h_q, d_qk=d_qk)) is None
    for h_q in (64, 128):
        assert kernel_choice.auto_prefers(PAGED_FP8, shape(h_q=h_q)) is None


def test_auto_takes_flashmla_where_the_table_says_and_logs_once(hopper_with_flash_mla, monkeypatch, caplog):
    monkeypatch.setattr(kernel_choice, "AUTO_PREFERS", {(SPARSE_ATTN, 64, 512): "flashmla"})
    q = torch.zeros(4, 64, 512, dtype=torch.bfloat16)
    kv = torch.zeros(10, 1, 512, dtype=torch.bfloat16)
    with caplog.at_level(logging.INFO, logger=kernel_choice.logger.name):
        for _ in range(3):
            assert kernel_choice.first_taker(SPARSE_ATTN, CUDA, shape(), (q, kv)) == "flashmla"
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "runs FlashMLA's kernel for h_q 64, d_qk 512" in infos[0]
    # Not where FlashMLA cannot take the call, nor for benchmarks timing ours, nor for the FP8 op.
    assert kernel_choice.first_taker(SPARSE_ATTN, CUDA, shape(topk=200)) == "triton"
    assert kernel_choice.first_taker(SPARSE_ATTN, CUDA, shape(h_q=32)) == "triton"
    misaligned = torch.zeros(10 * 512 + 4, dtype=torch.bfloat16)[4:].view(10, 1, 512)
    assert kernel_choice.first_taker(SPARSE_ATTN, CUDA, shape(), (q, misaligned)) == "triton"
    assert kernel_choice.first_taker(SPARSE_ATTN, CUDA, shape(), (q, kv), ours_only=True) == "triton"
    assert kernel_choice.first_taker(PAGED_FP8, CUDA, shape()) == "triton"
    assert kernel_choice.resolve(PAGED_FP8, "auto", CUDA, shape()) == "auto"  # decided inside the op


def test_auto_order_of_our_kernels(hopper_with_flash_mla, monkeypatch):
    """Where FlashMLA is not taken, the Gluon kernel where ``auto_picks_gluon`` says so and the
    data admits its copies, else Triton; the FP8 op's Gluon kernel by ``auto_picks_gluon``."""
    monkeypatch.setattr(attn_gluon, "auto_picks_gluon", lambda device, h_q: h_q >= attn_gluon.MIN_AUTO_HEADS)
    monkeypatch.setattr(fp8_gluon, "auto_picks_gluon", lambda device, layout: layout is V4)
    q = torch.zeros(4, 32, 512, dtype=torch.bfloat16)
    kv = torch.zeros(10, 1, 512, dtype=torch.bfloat16)
    assert kernel_choice.pick(SPARSE_ATTN, "auto", shape(h_q=32, topk=128, s_q=4), q, kv) == "gluon"
    assert kernel_choice.first_taker(SPARSE_ATTN, CUDA, shape(h_q=8)) == "gluon"  # the few-head kernel
    assert kernel_choice.first_taker(SPARSE_ATTN, CUDA, shape(), ours_only=True) == "gluon"
    assert kernel_choice.first_taker(PAGED_FP8, CUDA, shape()) == "gluon"
    assert kernel_choice.first_taker(PAGED_FP8, CUDA, shape(layout=KVCacheLayout.V32)) == "triton"


def test_pick_checks_the_data_of_a_named_impl(hopper_with_flash_mla):
    """Inside the op, a named kernel whose data checks fail raises ValueError naming it."""
    q = torch.zeros(4, 64, 512, dtype=torch.bfloat16)
    misaligned = torch.zeros(10 * 512 + 4, dtype=torch.bfloat16)[4:].view(10, 1, 512)
    for impl, match in [("flashmla", "impl='flashmla' cannot run here: kv must start"),
                        ("gluon", "impl='gluon' cannot run here: kv must start")]:
        with pytest.raises(ValueError, match=match):
            kernel_choice.pick(SPARSE_ATTN, impl, shape(topk=128, s_q=4), q, misaligned)
    assert kernel_choice.pick(SPARSE_ATTN, "triton", shape(topk=128, s_q=4), q, misaligned) == "triton"


def test_fp8_gluon_needs_aligned_q_and_auto_falls_back(hopper_with_flash_mla, monkeypatch):
    """The FP8 Gluon kernel copies q rows with 16-byte ``cp.async``: a q at an odd offset (or
    with a row stride not a multiple of 16) is refused by name, and ``auto`` takes Triton."""
    monkeypatch.setattr(fp8_gluon, "auto_picks_gluon", lambda device, layout: layout is V4)
    cache = torch.zeros(3, V4.page_bytes(64), dtype=torch.uint8)
    q = torch.zeros(4, 64, 512, dtype=torch.bfloat16)
    odd = torch.zeros(4 * 64 * 512 + 3, dtype=torch.bfloat16)[3:].view(4, 64, 512)
    fp8 = shape(topk=128, s_q=4)
    assert kernel_choice.pick(PAGED_FP8, "auto", fp8, q, cache) == "gluon"
    assert kernel_choice.pick(PAGED_FP8, "auto", fp8, odd, cache) == "triton"
    with pytest.raises(ValueError, match=r"impl='gluon' cannot run here: q must start 16-byte aligned"):
        kernel_choice.pick(PAGED_FP8, "gluon", fp8, odd, cache)
    assert kernel_choice.pick(PAGED_FP8, "triton", fp8, odd, cache) == "triton"


def test_backend_takes_every_attention_impl(no_flash_mla):
    cfg = ModelConfig(num_heads=4, compress_ratios=(0, 4), topk=16, window_size=8, swa_page_size=4,
                      compressed_page_size={4: 3})
    with pytest.raises(ValueError, match="impl must be one of"):
        SparsePrefillBackend(cfg, impl="cuda")
    for impl, ops_impl in [("auto", "auto"), ("reference", "reference"), ("triton", "triton"),
                           ("gluon", "auto"), ("flashmla", "auto")]:
        backend = SparsePrefillBackend(cfg, impl=impl)
        assert (backend.impl, backend.ops_impl) == (impl, ops_impl)
    with pytest.raises(ValueError, match="impl='flashmla' cannot run here: flash_mla does not import"):
        kernel_choice.check_device(SPARSE_ATTN, "flashmla", CPU)
    with pytest.raises(ValueError, match="impl='gluon' cannot run here: it reads the V4 layout only"):
        kernel_choice.check_device(PAGED_FP8, "gluon", CUDA, KVCacheLayout.V32)


def test_benchmarks_time_our_kernel_even_where_auto_takes_flashmla(hopper_with_flash_mla, monkeypatch):
    from sparse_prefill.bench.common import own_attn_impl

    assert own_attn_impl(CUDA, 64) == "auto"  # the table is empty: auto's choice is ours
    monkeypatch.setattr(kernel_choice, "AUTO_PREFERS", {(SPARSE_ATTN, 64, 512): "flashmla"})
    assert own_attn_impl(CUDA, 64) == "triton" and own_attn_impl(CUDA, 128, 576) == "auto"
    monkeypatch.setattr(attn_gluon, "auto_picks_gluon", lambda device, h_q: True)
    assert own_attn_impl(CUDA, 64) == "gluon"
    assert own_attn_impl(CUDA, 32) == "auto"  # auto never takes FlashMLA there
    monkeypatch.setattr(flashmla_impl, "_device_reason", lambda device: "flash_mla does not import")
    assert own_attn_impl(CUDA, 64) == "auto"
