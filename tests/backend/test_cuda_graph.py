"""``SparsePrefillBackend(cuda_graph=True)``: one CUDA graph of ``begin_forward`` + the layers,
replayed over batches of other lengths after ``metadata.copy_(new, in_place=True)``."""

import pytest
import torch

from sparse_prefill import BatchMetadata, ForwardMode, ModelConfig, SparsePrefillBackend, make_synthetic_batch
from sparse_prefill.backend import naive_layer_forward
from sparse_prefill.backend.synthetic import _random_picks
from tests.backend.test_backend import check_against_naive, run_layers, small_config
from tests.tolerance import OUT_TOL, assert_close


def test_cuda_graph_argument_checks():
    cfg = small_config()
    with pytest.raises(ValueError, match="regular path only"):
        SparsePrefillBackend(cfg, "sparse", cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph must be a bool"):
        SparsePrefillBackend(cfg, cuda_graph=1)


def test_plain_backend_refuses_capture(monkeypatch):
    """Capturing a backend whose state is sized by the request lengths raises instead of
    recording sizes a replay would keep."""
    batch = make_synthetic_batch(small_config(), [3, 40], [20, 9], seed=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="cuda_graph=True"):
        SparsePrefillBackend(small_config()).begin_forward(batch.metadata)
    SparsePrefillBackend(small_config(), cuda_graph=True).begin_forward(batch.metadata)


@pytest.mark.parametrize("mode", [ForwardMode.EXTEND, ForwardMode.DECODE])
def test_cuda_graph_backend_eager_matches_naive(mode):
    """Regular path everywhere, ratio-128 rows as wide as the table (here wider than the longest
    request needs): the same attention as the reference."""
    cfg = small_config()
    extend = [20, 9, 1] if mode is ForwardMode.EXTEND else [1, 1, 1]
    batch = make_synthetic_batch(cfg, [0, 300, 41], extend, seed=2, forward_mode=mode)
    wide = {r: torch.nn.functional.pad(t, (0, 5), value=-1) for r, t in batch.metadata.compressed_token_tables.items()}
    md = batch.metadata
    batch.metadata = BatchMetadata(cfg, md.prefix_lens_host, md.extend_lens_host, md.swa_token_table, wide, mode)
    backend = SparsePrefillBackend(cfg, "auto", impl="reference", cuda_graph=True)
    outs = run_layers(backend, batch)
    assert {backend.path_for(r) for r in set(cfg.compress_ratios)} == {"regular"}
    check_against_naive(batch, outs, tight=True)


def _v4_config():
    return ModelConfig(num_heads=16, compress_ratios=(0, 4, 128, 4), topk=512, window_size=128, swa_page_size=64,
                       compressed_page_size=64)


def _capture_and_replay(cfg, base, first, batches, mode):
    """Capture one forward over static metadata (``first``'s lengths on ``base``'s tables and
    caches), then for each (prefix, extend) of ``batches`` refill the metadata and the query /
    pick buffers in place, replay, and compare every layer with an eager forward of the same
    batch (bit for bit) and with the reference (FlashMLA's tolerances)."""
    tables = base.metadata.compressed_token_tables
    swa_table = base.metadata.swa_token_table

    def metadata(prefix, extend):
        return BatchMetadata(cfg, prefix, extend, swa_table.clone(), {r: t.clone() for r, t in tables.items()}, mode)

    static = metadata(*first)
    n, layers = static.num_tokens, range(cfg.num_layers)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(int(torch.randint(1 << 30, ())))
    q = torch.empty(n, cfg.num_heads, cfg.head_dim, dtype=torch.bfloat16, device="cuda")
    picks = {layer: torch.empty(n, cfg.topk, dtype=torch.int32, device="cuda")
             for layer in layers if cfg.compress_ratios[layer] == 4}
    outs = [torch.empty_like(q) for _ in layers]

    def fill(md):
        q.copy_(torch.randn(q.shape, generator=gen, device="cuda"))
        for p in picks.values():
            p.copy_(_random_picks(md, cfg.topk, 4, 0.1, gen))

    backend = SparsePrefillBackend(cfg, cuda_graph=True)

    def forward():
        backend.begin_forward(static)
        for layer in layers:
            backend.forward(layer, q, base.caches[layer], picks.get(layer), base.attn_sink[layer], out=outs[layer])

    fill(static)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()

    for prefix, extend in [first, *batches]:
        new = metadata(prefix, extend)
        static.copy_(new, in_place=True)
        fill(new)
        graph.replay()
        eager = SparsePrefillBackend(cfg, cuda_graph=True)
        eager.begin_forward(new)
        for layer in layers:
            inputs = (layer, q, base.caches[layer], picks.get(layer), base.attn_sink[layer])
            expect = eager.forward(*inputs)
            assert torch.equal(outs[layer], expect), f"{prefix} {extend} layer {layer}"
            ref = naive_layer_forward(cfg, new, *inputs)
            assert_close(f"{prefix} {extend} layer {layer}", outs[layer], ref, **OUT_TOL)


@pytest.mark.gpu
def test_gpu_cuda_graph_decode_replay():
    cfg = _v4_config()
    longest = [5000, 300, 128, 0]
    base = make_synthetic_batch(cfg, longest, [1] * 4, device="cuda", seed=7, k_std=0.1, k_mean=0.05,
                                forward_mode=ForwardMode.DECODE, evict_outside_window=False)
    batches = [([4000, 17, 127, 0], [1] * 4), ([10, 299, 0, 0], [1] * 4), ([5000, 300, 128, 0], [1] * 4)]
    _capture_and_replay(cfg, base, (longest, [1] * 4), batches, ForwardMode.DECODE)


@pytest.mark.gpu
def test_gpu_cuda_graph_fixed_size_extend_replay():
    """Two requests, 256 query tokens, split and prefixed differently per replay."""
    cfg = _v4_config()
    base = make_synthetic_batch(cfg, [3100, 2100], [256, 256], device="cuda", seed=8, k_std=0.1, k_mean=0.05,
                                evict_outside_window=False)
    batches = [([100, 2000], [128, 128]), ([0, 5], [1, 255]), ([3000, 0], [56, 200])]
    _capture_and_replay(cfg, base, ([3000, 0], [200, 56]), batches, ForwardMode.EXTEND)
