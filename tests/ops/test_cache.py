"""FP8 paged KV cache ops: the Triton kernels (interpreter on CPU) against the PyTorch reference,
byte for byte, and the reference against DESIGN.md's quantization formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparse_prefill._utils import value_checks
from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops.cache import (
    dequantize_k_cache,
    dequantize_k_cache_paged,
    quantize_k_cache,
    store_k_cache,
)
from sparse_prefill.ops.cache.kernels import (
    GATHER_DEFAULTS,
    STORE_DEFAULTS,
    dequantize_k_cache_paged_triton,
    store_k_cache_triton,
)
from sparse_prefill.ops.cache.naive import (
    dequantize_tokens,
    quantize_tokens,
    scale_bytes_per_token,
    scale_exponents,
    token_byte_offsets,
)

LAYOUTS = [KVCacheLayout.V4, KVCacheLayout.V32]
INT32_MIN = -(2**31)
# fp8 448 times the largest scales is inf by design; the interpreter warns about it.
ALLOW_INF = pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
# Per-tile magnitudes: zero tiles, tiny (scale clamped at 2**-13), ordinary, huge.
MAGNITUDES = torch.tensor([0.0, 1e-30, 1e-12, 1e-3, 1.0, 7.0, 1e3, 1e12, 1e30])


def random_k(n: int, layout: KVCacheLayout) -> torch.Tensor:
    """[n, d] bf16 whose tiles have random magnitudes and a wide range inside each tile."""
    x = torch.randn(n, layout.dim) * torch.exp2(torch.randint(-12, 13, (n, layout.dim)).float())
    tiles = x[:, : layout.nope_dim].view(n, layout.num_tiles, layout.tile_size)
    tiles *= MAGNITUDES[torch.randint(len(MAGNITUDES), (n, layout.num_tiles))][..., None]
    x[:, layout.nope_dim :] *= MAGNITUDES[torch.randint(1, len(MAGNITUDES), (n, 1))]
    return x.bfloat16()


def random_cache(num_pages: int, page_size: int, layout: KVCacheLayout) -> torch.Tensor:
    """Poison: random bytes, so a byte the kernel forgets to write (or writes wrongly) differs."""
    return torch.randint(0, 256, (num_pages, layout.page_bytes(page_size)), dtype=torch.uint8)


def valid_cache(num_pages: int, page_size: int, layout: KVCacheLayout) -> torch.Tensor:
    """A cache of random quantized tokens (every slot decodes without NaN), whose padding bytes
    (page tail, V4's pad byte per token) are poisoned with random bytes."""
    k = random_k(num_pages * page_size, layout).view(num_pages, page_size, 1, layout.dim)
    cache = quantize_k_cache(k, layout, impl="reference")
    poison = random_cache(num_pages, page_size, layout)
    pad = torch.ones_like(cache, dtype=torch.bool)
    data_off, scale_off = token_byte_offsets(torch.arange(page_size), page_size, layout)
    pad[:, data_off[:, None] + torch.arange(layout.data_bytes)] = False
    pad[:, scale_off[:, None] + torch.arange(layout.num_tiles if layout is KVCacheLayout.V4 else 0)] = False
    return torch.where(pad, poison, cache)


def bits(x: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns, so -0.0 != 0.0 and NaN == NaN in comparisons."""
    return x.view(torch.int16)


def design_roundtrip(k: torch.Tensor, layout: KVCacheLayout) -> torch.Tensor:
    """DESIGN.md's formula, independently in float64: s = 2**ceil(log2(max(amax / 448, 1e-4))),
    fp8 = e4m3(x / s), back = bf16(fp8 * s); rope unchanged."""
    n = k.shape[0]
    nope = k[:, : layout.nope_dim].double().view(n, layout.num_tiles, layout.tile_size)
    s = torch.exp2(torch.ceil(torch.log2(torch.clamp(nope.abs().amax(-1) / 448, min=1e-4))))[..., None]
    back = ((nope / s).to(torch.float8_e4m3fn).double() * s).view(n, layout.nope_dim)
    return torch.cat([back.bfloat16(), k[:, layout.nope_dim :]], dim=1)


def store(cache, k, slots, page_size, layout, impl, device):
    out = cache.to(device, copy=True)
    store_k_cache(out, k.to(device), slots.to(device), page_size, layout, impl=impl)
    return out.cpu()


def gather(cache, ids, page_size, layout, impl, device):
    return dequantize_k_cache_paged(cache.to(device), ids.to(device), page_size, layout, impl=impl).cpu()


# --------------------------------------------------------------------------- exact quantization


def test_scale_exponents_exhaustive_over_bf16():
    """k is the smallest integer with amax <= 448 * 2**k (>= -13) for every finite bf16 amax,
    and equals DESIGN.md's ceil(log2(max(amax / 448, 1e-4)))."""
    patterns = torch.arange(0, 0x7F80, dtype=torch.int32).to(torch.int16)  # +0 .. largest finite
    amax = patterns.view(torch.bfloat16).float()
    k = scale_exponents(amax).double()
    a = amax.double()
    assert bool((a <= 448 * torch.exp2(k)).all())
    assert bool(((k == -13) | (a > 448 * torch.exp2(k - 1))).all())
    design = np.ceil(np.log2(np.maximum(a.numpy() / 448, 1e-4)))
    assert np.array_equal(k.numpy(), design)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp8_rounding_every_value_and_midpoint(layout, device):
    """Tiles with amax 448 (scale 1) holding every finite e4m3 value, every midpoint between
    neighbours (ties to even) and the bf16 values just around each midpoint: the stored bytes
    equal torch's float32 -> float8_e4m3fn cast, on the kernel and the reference."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    pos = values[:127].double()  # +0 .. 448, ascending (0x7F is NaN)
    mids = (pos[1:] + pos[:-1]) / 2
    up = mids.bfloat16().view(torch.int16) + 1
    down = mids.bfloat16().view(torch.int16) - 1
    around = torch.cat([up.view(torch.bfloat16).double(), down.view(torch.bfloat16).double()])
    mags = torch.cat([pos, mids, around]).clamp(max=448)
    vals = torch.cat([mags, -mags]).bfloat16()
    assert bool((vals.double().abs() == torch.cat([mags, mags])).all())  # all exact in bf16
    tile = layout.tile_size
    per_tile = tile - 1
    n_tiles = -(-vals.numel() // per_tile)
    body = torch.cat([vals, torch.zeros(n_tiles * per_tile - vals.numel(), dtype=torch.bfloat16)])
    head = torch.full((n_tiles, 1), 448.0, dtype=torch.bfloat16)
    tiles = torch.cat([head, body.view(n_tiles, per_tile)], 1)
    n = -(-n_tiles // layout.num_tiles)
    nope = torch.cat([tiles, torch.zeros((n * layout.num_tiles - n_tiles, tile), dtype=torch.bfloat16)])
    k = torch.cat([nope.view(n, layout.nope_dim), torch.zeros(n, layout.rope_dim, dtype=torch.bfloat16)], 1)

    cache = random_cache(n, 1, layout)
    slots = torch.arange(n)
    got = store(cache, k, slots, 1, layout, "triton", device)
    ref = store(cache, k, slots, 1, layout, "reference", "cpu")
    assert torch.equal(got, ref)
    stored = ref[:, : layout.nope_dim].reshape(-1)
    expected = nope.reshape(-1).float().to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(stored, expected)


@ALLOW_INF
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dequantize_every_fp8_byte(layout, device):
    """Cache bytes covering every non-NaN e4m3 byte (0x7F/0xFF are never written) under random
    scales: kernel == reference, bit for bit."""
    n = 64
    cache = random_cache(n, 1, layout)
    fp8 = torch.arange(n * layout.nope_dim) % 254
    fp8 = torch.where(fp8 >= 0x7F, fp8 + 1, fp8)  # skip 0x7F, and 0xFF lies beyond 254
    cache[:, : layout.nope_dim] = fp8.view(n, layout.nope_dim).to(torch.uint8)
    exps = torch.randint(-20, 121, (n, layout.num_tiles), dtype=torch.int32)
    if layout is KVCacheLayout.V4:
        cache[:, layout.data_bytes : layout.data_bytes + layout.num_tiles] = (exps + 127).to(torch.uint8)
    else:
        lo = layout.scale_offset
        cache[:, lo : lo + 4 * layout.num_tiles] = torch.exp2(exps.float()).view(torch.uint8)
    rope = torch.randint(-(2**15), 2**15, (n, layout.rope_dim), dtype=torch.int16)
    rope = torch.where((rope & 0x7F80) == 0x7F80, rope & ~0x4000, rope)  # finite bf16 patterns
    lo = layout.rope_offset
    cache[:, lo : lo + 2 * layout.rope_dim] = rope.view(torch.uint8)
    ids = torch.randperm(n)
    got = gather(cache, ids, 1, layout, "triton", device)
    ref = gather(cache, ids, 1, layout, "reference", "cpu")
    assert torch.equal(bits(got), bits(ref))
    assert torch.equal(bits(ref[:, 0, layout.nope_dim :]), rope[ids])


# --------------------------------------------------------------------------- store + gather


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "page_size,id_dtype",
    [(1, torch.int64), (2, torch.int32), (5, torch.int32), (64, torch.int64), (128, torch.int64), (256, torch.int32)]
)
def test_store_and_gather_match_reference(layout, page_size, id_dtype, device):
    num_pages = max(2, 320 // page_size)
    capacity = num_pages * page_size
    n = min(capacity, 150)
    k_wide = random_k(n, layout)
    k = torch.cat([k_wide, k_wide[:, :7]], dim=1)[:, : layout.dim]  # row stride d + 7
    slots = torch.randperm(capacity)[:n]
    slots[torch.randperm(n)[: n // 8]] = torch.tensor([-1, -7, INT32_MIN])[torch.arange(n // 8) % 3]
    slots = slots.to(id_dtype)
    cache = valid_cache(num_pages, page_size, layout)

    got = store(cache, k, slots, page_size, layout, "triton", device)
    ref = store(cache, k, slots, page_size, layout, "reference", "cpu")
    assert torch.equal(got, ref)

    # The reference writes exactly the valid slots' data and scale bytes.
    keep = slots >= 0
    data_off, scale_off = token_byte_offsets(slots[keep], page_size, layout)
    written = torch.zeros(cache.numel(), dtype=torch.bool)
    for off, width in ((data_off, layout.data_bytes), (scale_off, scale_bytes_per_token(layout))):
        written[off[:, None] + torch.arange(width)] = True
    assert torch.equal(ref.view(-1)[~written], cache.view(-1)[~written])

    ids = torch.cat([slots, torch.randint(-3, capacity, (n,), dtype=id_dtype)])
    got_rows = gather(ref, ids, page_size, layout, "triton", device)
    ref_rows = gather(ref, ids, page_size, layout, "reference", "cpu")
    assert torch.equal(bits(got_rows), bits(ref_rows))
    assert bool((ref_rows[ids < 0] == 0).all())
    # dequantize(store(x)) is DESIGN.md's quantize-dequantize of x; padding slots came back zero.
    stored = ref_rows[:n, 0][keep]
    assert torch.equal(bits(stored), bits(design_roundtrip(k[keep], layout)))
    assert torch.equal(bits(stored), bits(dequantize_tokens(*quantize_tokens(k[keep], layout), layout)))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("page_size", [1, 2, 3, 64, 256])
def test_quantize_and_dequantize_whole_cache(layout, page_size, device):
    num_pages = max(1, 130 // page_size)
    k = random_k(num_pages * page_size, layout).view(num_pages, page_size, 1, layout.dim)
    got = quantize_k_cache(k.to(device), layout, impl="triton").cpu()
    ref = quantize_k_cache(k, layout, impl="reference")
    assert got.shape == (num_pages, layout.page_bytes(page_size)) and got.dtype == torch.uint8
    assert torch.equal(got, ref)
    used = page_size * layout.bytes_per_token
    assert bool((ref[:, used:] == 0).all())  # page padding
    rope_lo = layout.rope_offset
    tokens = ref[:, : page_size * layout.data_bytes].reshape(num_pages, page_size, layout.data_bytes)
    rope_bytes = tokens[..., rope_lo : rope_lo + 2 * layout.rope_dim]
    rope_in = k[..., layout.nope_dim :].contiguous().view(torch.uint8)
    assert torch.equal(rope_bytes.reshape(-1), rope_in.reshape(-1))
    if layout is KVCacheLayout.V4:
        scales = ref[:, page_size * layout.data_bytes : used].reshape(num_pages, page_size, 8)
        assert bool((scales[..., 7] == 0).all())  # the pad byte

    back = dequantize_k_cache(got.to(device), layout, page_size, impl="triton").cpu()
    back_ref = dequantize_k_cache(ref, layout, page_size, impl="reference")
    assert back.shape == (num_pages, page_size, 1, layout.dim)
    assert torch.equal(bits(back), bits(back_ref))
    design = design_roundtrip(k.view(-1, layout.dim), layout)
    assert torch.equal(bits(back_ref.view(-1, layout.dim)), bits(design))


@ALLOW_INF
@pytest.mark.parametrize("layout", LAYOUTS)
def test_special_tiles(layout, device):
    """Zero and -0 tiles, amax exactly 448 * 2**j and the next bf16 above it, tiny, subnormal,
    huge and the largest finite bf16: stored scales are the expected powers of two."""
    tile = layout.tile_size
    cases = []  # (tile values, expected scale exponent or None, index of an element 448 * 2**k)
    cases.append((torch.zeros(tile), -13, None))
    cases.append((torch.full((tile,), -0.0), -13, None))
    for j in (-13, -6, 0, 1, 7, 50, 100):
        exact = torch.rand(tile) * 448 * 2.0**j
        exact[3] = -448 * 2.0**j
        cases.append((exact, j, 3))
        above = exact.clone()
        next_bf16 = torch.tensor(448 * 2.0**j).bfloat16().view(torch.int16).add(1).view(torch.bfloat16)
        above[5] = next_bf16.float()
        cases.append((above, j + 1, None))
    cases.append((torch.randn(tile) * 1e-30, -13, None))
    cases.append((torch.full((tile,), 1e-40), -13, None))  # bf16 subnormals
    cases.append((torch.randn(tile) * 1e30, None, None))
    biggest = torch.randn(tile)
    biggest[0] = torch.finfo(torch.bfloat16).max
    cases.append((biggest, 120, None))
    n = -(-len(cases) // layout.num_tiles)
    nope = torch.zeros(n * layout.num_tiles, tile)
    for i, (values, _, _) in enumerate(cases):
        nope[i] = values
    rope = torch.randn(n, layout.rope_dim) * 1e20
    k = torch.cat([nope.view(n, layout.nope_dim), rope], 1).bfloat16()

    got = quantize_k_cache(k.view(n, 1, 1, -1).to(device), layout, impl="triton").cpu()
    ref = quantize_k_cache(k.view(n, 1, 1, -1), layout, impl="reference")
    assert torch.equal(got, ref)
    k_tiles = k[:, : layout.nope_dim].reshape(-1, tile)
    fp8_tiles = ref[:, : layout.nope_dim].reshape(-1, tile)
    if layout is KVCacheLayout.V4:
        stored = ref[:, layout.data_bytes : layout.data_bytes + layout.num_tiles].int() - 127
    else:
        lo = layout.scale_offset
        stored = torch.log2(ref[:, lo : lo + 4 * layout.num_tiles].contiguous().view(torch.float32)).int()
    stored = stored.view(-1)
    assert torch.equal(stored, scale_exponents(k_tiles.float().abs().amax(-1)))
    for i, (_, expected, _) in enumerate(cases):
        if expected is not None:
            assert stored[i] == expected, f"case {i}"
    assert bool((fp8_tiles[0] == 0).all()) and bool((fp8_tiles[1] == 0x80).all())  # +0 and -0

    back = dequantize_k_cache(got.to(device), layout, 1, impl="triton").cpu().view(n, -1)
    back_ref = dequantize_k_cache(ref, layout, 1, impl="reference").view(n, -1)
    assert torch.equal(bits(back), bits(back_ref))
    assert torch.equal(bits(back[:, layout.nope_dim :]), bits(k[:, layout.nope_dim :]))  # rope
    back_tiles = back[:, : layout.nope_dim].reshape(-1, tile)
    for i, (_, _, at) in enumerate(cases):
        if at is not None:
            assert fp8_tiles[i, at] == 0xFE and back_tiles[i, at] == k_tiles[i, at], f"case {i}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernels_with_gpu_launch_configs(layout, device):
    """The GPU's block shapes (few tokens per program, dims in chunks); under the interpreter the
    public ops run larger blocks."""
    page_size, num_pages, n = 16, 5, 45
    cache = valid_cache(num_pages, page_size, layout)
    k = random_k(n, layout)
    slots = torch.randperm(num_pages * page_size)[:n]
    slots[::7] = -1
    ref = store(cache, k, slots, page_size, layout, "reference", "cpu")
    for cfg in (STORE_DEFAULTS, {"BLOCK_T": 4, "num_warps": 2}):
        got = cache.to(device, copy=True)
        store_k_cache_triton(got, k.to(device), slots.to(device), page_size, layout, **cfg)
        assert torch.equal(got.cpu(), ref), cfg
    ids = torch.randint(-2, num_pages * page_size, (n,))
    rows = gather(ref, ids, page_size, layout, "reference", "cpu")[:, 0]
    for cfg in (GATHER_DEFAULTS, {"BLOCK_T": 8, "BLOCK_D": 128, "num_warps": 4}):
        out = torch.full((n, layout.dim), float("nan"), dtype=torch.bfloat16, device=device)
        dequantize_k_cache_paged_triton(ref.to(device), ids.to(device), page_size, layout, out, **cfg)
        assert torch.equal(bits(out.cpu()), bits(rows)), cfg


# --------------------------------------------------------------------------- gather edge cases


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_gather_empty_single_and_padding(layout, id_dtype, device):
    page_size = 4
    cache = quantize_k_cache(random_k(12, layout).view(3, page_size, 1, -1), layout, impl="reference")
    for impl, dev in (("triton", device), ("reference", "cpu")):
        no_ids = torch.empty(0, dtype=id_dtype, device=dev)
        empty = dequantize_k_cache_paged(cache.to(dev), no_ids, page_size, layout, impl=impl)
        assert empty.shape == (0, 1, layout.dim) and empty.dtype == torch.bfloat16
    for ids in ([11], [-1], [INT32_MIN, -2, 0, 5, -1, 11]):
        ids = torch.tensor(ids, dtype=id_dtype)
        out = torch.full((len(ids), 1, layout.dim), float("nan"), dtype=torch.bfloat16, device=device)
        got = dequantize_k_cache_paged(
            cache.to(device), ids.to(device), page_size, layout, out, impl="triton"
        )
        assert got is out
        ref = gather(cache, ids, page_size, layout, "reference", "cpu")
        assert torch.equal(bits(got.cpu()), bits(ref))
        assert bool((ref[ids < 0] == 0).all()) and not bool(ref[ids >= 0].isnan().any())


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_gather_into_strided_workspace(impl, device):
    layout, page_size, n = KVCacheLayout.V4, 16, 37
    dev = device if impl == "triton" else "cpu"
    cache = quantize_k_cache(random_k(64, layout).view(4, page_size, 1, -1), layout, impl="reference")
    ids = torch.randint(-2, 64, (2 * n,))[::2]  # non-contiguous ids
    workspace = torch.full((n + 9, 3, layout.dim), float("nan"), dtype=torch.bfloat16, device=dev)
    out = workspace[5 : 5 + n, 1:2]
    got = dequantize_k_cache_paged(cache.to(dev), ids.to(dev), page_size, layout, out=out, impl=impl)
    assert got.data_ptr() == out.data_ptr() and got.shape == (n, 1, layout.dim)
    ref = gather(cache, ids, page_size, layout, "reference", "cpu")
    assert torch.equal(bits(workspace[5 : 5 + n, 1:2].cpu()), bits(ref))
    untouched = torch.ones(n + 9, 3, dtype=torch.bool)
    untouched[5 : 5 + n, 1] = False
    assert bool(workspace.cpu()[untouched].isnan().all())


# --------------------------------------------------------------------------- errors


def _v4_cache(page_size: int = 64, num_pages: int = 2) -> torch.Tensor:
    return torch.zeros(num_pages, KVCacheLayout.V4.page_bytes(page_size), dtype=torch.uint8)


def on_device(value, device: torch.device):
    """A tensor moved to ``device`` with its strides (a transposed or sliced view stays one);
    anything else as it is."""
    if not isinstance(value, torch.Tensor):
        return value
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=device).copy_(value)


@value_checks("strict")  # on CUDA too, the value checks raise ValueError here
def test_bad_inputs_raise_before_writing(device):
    L4, L32 = KVCacheLayout.V4, KVCacheLayout.V32
    cache = _v4_cache().to(device)
    k = torch.zeros(3, 512, dtype=torch.bfloat16)
    slots = torch.tensor([0, 1, 2])
    bad_store = [
        (TypeError, "cache", dict(cache=cache.to(torch.int8))),
        (ValueError, "cache", dict(cache=cache.view(-1))),
        (ValueError, "contiguous", dict(cache=torch.zeros(cache.shape[1], 2, dtype=torch.uint8).t())),
        (ValueError, r"page sizes of V4 that fit this cache: \[64\]", dict(page_size=32)),
        (ValueError, "needs", dict(layout=L32)),  # a V4 cache read as V3.2
        (TypeError, "layout", dict(layout="v4")),
        (ValueError, "page_size", dict(page_size=0)),
        (TypeError, "page_size", dict(page_size=64.0)),
        (TypeError, "k", dict(k=k.float())),
        (ValueError, "k", dict(k=torch.zeros(3, 576, dtype=torch.bfloat16))),  # V3.2 dims for V4
        (ValueError, "k", dict(k=torch.zeros(512, 3, dtype=torch.bfloat16).t())),
        (TypeError, "slot_ids", dict(slot_ids=slots.float())),
        (ValueError, "slot_ids", dict(slot_ids=torch.tensor([0, 1]))),
        (ValueError, "capacity of 128", dict(slot_ids=torch.tensor([0, 128, 1]))),
        (ValueError, "more than once", dict(slot_ids=torch.tensor([5, -1, 5]))),
        (ValueError, "impl", dict(impl="cuda")),
    ]
    for exc, match, change in bad_store:
        args = dict(cache=cache, k=k, slot_ids=slots, page_size=64, layout=L4, impl="triton") | change
        with pytest.raises(exc, match=match):
            store_k_cache(**{name: on_device(value, device) for name, value in args.items()})
        assert bool((cache == 0).all())
    store_k_cache(cache, k.to(device), torch.tensor([-1, -1, 7], device=device), 64)  # padding may repeat

    ids = torch.tensor([0, 127, -5])
    bad_gather = [
        (ValueError, "capacity of 128", dict(token_ids=torch.tensor([0, 128]))),
        (TypeError, "token_ids", dict(token_ids=ids.to(torch.int16))),
        (ValueError, "token_ids", dict(token_ids=ids.view(3, 1))),
        (ValueError, r"page sizes of V32 that fit this cache: none", dict(layout=L32)),
        (TypeError, "out", dict(out=torch.zeros(3, 1, 512))),
        (ValueError, "out", dict(out=torch.zeros(3, 512, dtype=torch.bfloat16))),
        (ValueError, "out", dict(out=torch.zeros(3, 1, 576, dtype=torch.bfloat16))),
        (ValueError, "unit stride", dict(out=torch.zeros(3, 512, 2, dtype=torch.bfloat16)[..., :1].mT)),
    ]
    for exc, match, change in bad_gather:
        args = dict(cache=cache, token_ids=ids, page_size=64, layout=L4, out=None, impl="triton") | change
        with pytest.raises(exc, match=match):
            dequantize_k_cache_paged(**{name: on_device(value, device) for name, value in args.items()})

    with pytest.raises(ValueError, match="page size"):
        quantize_k_cache(torch.zeros(2, 0, 1, 512, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="k"):
        quantize_k_cache(torch.zeros(2, 4, 512, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="page sizes of V4 that fit this cache: \\[64\\]"):
        dequantize_k_cache(cache, L4, 65)
    no_pages = quantize_k_cache(torch.zeros(0, 4, 1, 576, dtype=torch.bfloat16), L32)
    assert no_pages.shape == (0, L32.page_bytes(4))
    assert dequantize_k_cache(no_pages, L32, 4).shape == (0, 4, 1, 576)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_value_checks_off_skips_capacity_check(layout, device):
    """With value checks off nothing reads the ids on the host: an id past the cache is not
    caught. Here the cache is the first half of a larger buffer, so the kernel's reads and writes
    past it land in the second half, where the reference on the whole buffer puts them."""
    page_size, half = 8, 3
    whole = valid_cache(2 * half, page_size, layout)
    beyond = torch.tensor([half * page_size + 5, 2])
    k = random_k(2, layout)
    with value_checks("strict"), pytest.raises(ValueError, match="capacity"):
        dequantize_k_cache_paged(whole.to(device)[:half], beyond.to(device), page_size, layout, impl="triton")
    with value_checks(False):
        whole_dev = whole.to(device, copy=True)
        got = dequantize_k_cache_paged(whole_dev[:half], beyond.to(device), page_size, layout, impl="triton")
        store_k_cache(whole_dev[:half], k.to(device), beyond.to(device), page_size, layout, impl="triton")
    assert torch.equal(bits(got.cpu()), bits(gather(whole, beyond, page_size, layout, "reference", "cpu")))
    assert torch.equal(whole_dev.cpu(), store(whole, k, beyond, page_size, layout, "reference", "cpu"))


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("page_size", [2, 64, 256])
def test_gpu_large_random_store_and_gather(layout, page_size):
    num_pages = 4096 * 64 // page_size  # 262144 tokens
    capacity = num_pages * page_size
    n = 200_000
    cache = valid_cache(num_pages, page_size, layout)
    k = random_k(n, layout)
    slots = torch.randperm(capacity)[:n]
    slots[:1000] = -1
    got = store(cache, k, slots.int(), page_size, layout, "auto", "cuda")
    ref = store(cache, k, slots, page_size, layout, "reference", "cpu")
    assert torch.equal(got, ref)
    ids = torch.randint(-100, capacity, (300_000,))
    rows = gather(ref, ids, page_size, layout, "auto", "cuda")
    assert torch.equal(bits(rows), bits(gather(ref, ids, page_size, layout, "reference", "cpu")))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_cache_beyond_2gb(layout):
    """Byte offsets past 2**31: store tokens into the last pages of a > 2 GiB cache and read
    them back, against the reference on a small cache holding just those pages."""
    page_size, tail_pages = 64, 16
    num_pages = 2**31 // layout.page_bytes(page_size) + 64
    assert num_pages * layout.page_bytes(page_size) > 2**31 + tail_pages * layout.page_bytes(page_size)
    cache = torch.full((num_pages, layout.page_bytes(page_size)), 0x7F, dtype=torch.uint8, device="cuda")
    tail = random_cache(tail_pages, page_size, layout)
    cache[-tail_pages:] = tail.cuda()
    n = tail_pages * page_size - 3
    k = random_k(n, layout)
    local = torch.randperm(tail_pages * page_size)[:n]
    first = num_pages - tail_pages
    store_k_cache(cache, k.cuda(), (local + first * page_size).cuda(), page_size, layout)
    ref_tail = store(tail, k, local, page_size, layout, "reference", "cpu")
    assert torch.equal(cache[-tail_pages:].cpu(), ref_tail)
    assert bool((cache[:first:997] == 0x7F).all())
    ids = torch.cat([local + first * page_size, torch.tensor([-1, num_pages * page_size - 1])])
    rows = dequantize_k_cache_paged(cache, ids.cuda(), page_size, layout).cpu()
    ref_ids = torch.cat([local, torch.tensor([-1, tail_pages * page_size - 1])])
    assert torch.equal(bits(rows), bits(gather(ref_tail, ref_ids, page_size, layout, "reference", "cpu")))
