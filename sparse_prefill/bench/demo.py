"""``sparse-prefill demo``: one synthetic DeepSeek-V4 prefill through the backend, checked.

A batch of requests, each a chunk of new tokens after a cached prefix, goes through a small
layer stack of compress ratios 0, 1, 2, 4 and 128 (every DeepSeek-V4.1 layer kind) with
:class:`SparsePrefillBackend` as an engine would run it (``path="auto"``: the routing rule picks
a path per ratio), and each layer again through the other path, forced. Every output is compared with ``naive_layer_forward`` (the
float32 reference of DESIGN.md's attention table) under FlashMLA's tolerances.

On a CUDA GPU the ops are the Triton kernels, on real DeepSeek-V4 head shapes; on CPU they are
the PyTorch reference implementations of the ops, on small shapes (``sparse-prefill check``
runs the Triton kernels on CPU, under Triton's interpreter).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparse_prefill import value_checks
from sparse_prefill.backend import ModelConfig, SparsePrefillBackend, SyntheticBatch, make_synthetic_batch
from sparse_prefill.backend import naive_layer_forward, routing
from sparse_prefill.bench.accuracy import OUT_TOL, TOLERANCE_TEXT, compare

STACK = (0, 4, 128, 1, 2, 4, 128, 0)
OTHER = {routing.SPARSE: routing.REGULAR, routing.REGULAR: routing.SPARSE}


@dataclass(frozen=True)
class DemoShape:
    num_heads: int
    topk: int
    prefix_lens: tuple[int, ...]
    extend_lens: tuple[int, ...]


# GPU: DeepSeek-V4's h_q 64 / topk 512 shape, a long chunk, a chunk after a 16K prefix, a short one.
GPU_SHAPE = DemoShape(num_heads=64, topk=512, prefix_lens=(0, 3000, 16384), extend_lens=(4096, 1024, 512))
# CPU: small enough for the PyTorch references to take seconds; prefixes past ratio-128 entries.
CPU_SHAPE = DemoShape(num_heads=8, topk=64, prefix_lens=(0, 700, 2000), extend_lens=(128, 64, 32))


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float]:
    """``fn()`` and its wall time in ms (device work included)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) * 1e3


def _forward(
    backend: SparsePrefillBackend, batch: SyntheticBatch, layers: list[int], device: torch.device
) -> dict[int, tuple[torch.Tensor, float]]:
    """One forward over ``layers``: layer -> (output, ms). The first layer of a path also builds
    the forward's shared index state (chunk cache, index rows), as in an engine."""
    backend.begin_forward(batch.metadata)
    return {layer: _timed(lambda: backend.forward(*batch.layer_inputs(layer)), device) for layer in layers}


def _routing_lines(backend: SparsePrefillBackend, batch: SyntheticBatch) -> list[str]:
    cfg, md = batch.config, batch.metadata
    if backend.path_setting != "auto":
        return [f"routing: forced to {backend.path_setting} by ${routing.ENV_VAR}"]
    lines = ["routing (auto; the cost model's estimate of a layer on the GPU):"]
    for ratio in sorted(set(cfg.compress_ratios)):
        work = routing.layer_work(cfg, md, ratio)
        est = {p: routing.estimate_us(p, work, backend.costs) for p in (routing.SPARSE, routing.REGULAR)}
        lines.append(f"  ratio {ratio:>3} layers -> {backend.path_for(ratio, md):7} "
                     f"(estimated sparse {est['sparse']:.0f} us, regular {est['regular']:.0f} us)")
    return lines


def run_demo(device: torch.device, *, seed: int = 0, say: Callable[[str], None] = print) -> bool:
    """Run the demo on ``device`` (its shapes: ``GPU_SHAPE`` on CUDA, else ``CPU_SHAPE``), print
    through ``say``; return True when every layer of every path matches the reference."""
    shape = GPU_SHAPE if device.type == "cuda" else CPU_SHAPE
    cfg = ModelConfig(num_heads=shape.num_heads, compress_ratios=STACK, topk=shape.topk)
    # Logits spread about 1 on FlashMLA's test data (K ~ randn / 10 plus an offset).
    batch = make_synthetic_batch(cfg, shape.prefix_lens, shape.extend_lens, device=device, seed=seed,
                                 q_std=10.0, k_std=0.1, k_mean=0.05)
    md = batch.metadata
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        ops = f"the GPU kernels (Triton; the regular path's Gluon kernel on Hopper) on {name}"
    else:
        ops = "the ops' PyTorch reference implementations on CPU (no CUDA GPU; `sparse-prefill check` runs the kernels)"
    say("sparse-prefill demo: a DeepSeek-V4 prefill through SparsePrefillBackend")
    say(f"ops:   {ops}")
    say(f"model: {cfg.num_layers} layers of compress ratios {STACK}, h_q {cfg.num_heads}, d_qk = d_v = "
        f"{cfg.head_dim}, topk {cfg.topk}, window {cfg.window_size}, FP8 V4 caches, page size {cfg.swa_page_size}")
    say(f"batch: {md.num_requests} requests, cached prefixes {shape.prefix_lens}, new tokens "
        f"{shape.extend_lens}: {md.num_tokens} query tokens")
    auto = SparsePrefillBackend(cfg)
    for line in _routing_lines(auto, batch):
        say(line)
    picks = [auto.path_for(ratio, md) for ratio in STACK]
    forced = {p: SparsePrefillBackend(cfg, p) for p in OTHER}
    other_layers = {p: [layer for layer, pick in enumerate(picks) if OTHER[pick] == p] for p in OTHER}

    def runs():
        return (_forward(auto, batch, list(range(len(STACK))), device),
                {p: _forward(b, batch, other_layers[p], device) for p, b in forced.items()})

    if device.type == "cuda":
        runs()  # compile every kernel (and validate every input) before timing
    with value_checks(False):  # as in an engine's hot loop: no host syncs for value checks
        auto_runs, other_runs = runs()

    say(f"check: each layer against naive_layer_forward (float32 reference), FlashMLA tolerance ({TOLERANCE_TEXT})")
    say("")
    say(f"{'layer':>5} {'ratio':>5} | {'auto picks':10} {'ms':>9} {'max |err|':>9} | "
        f"{'other path':10} {'ms':>9} {'max |err|':>9} | check")
    ok, totals = True, [0.0, 0.0]
    for layer, (ratio, pick) in enumerate(zip(STACK, picks)):
        ref = naive_layer_forward(cfg, md, *batch.layer_inputs(layer))
        (out, ms), (other_out, other_ms) = auto_runs[layer], other_runs[OTHER[pick]][layer]
        cmp = {pick: compare(out, ref, **OUT_TOL), OTHER[pick]: compare(other_out, ref, **OUT_TOL)}
        layer_ok = all(c.ok for c in cmp.values())
        ok &= layer_ok
        totals = [totals[0] + ms, totals[1] + other_ms]
        verdict = "ok" if layer_ok else "FAIL: " + "; ".join(f"{p}: {c.why}" for p, c in cmp.items() if not c.ok)
        say(f"{layer:>5} {ratio:>5} | {pick:10} {ms:9.2f} {cmp[pick].max_abs:9.2e} | "
            f"{OTHER[pick]:10} {other_ms:9.2f} {cmp[OTHER[pick]].max_abs:9.2e} | {verdict}")
    say(f"{'stack':>5} {'':>5} | {'':10} {totals[0]:9.2f} {'':9} | {'':10} {totals[1]:9.2f} {'':9} |")
    say("")
    say("(ms: one forward per layer, wall clock including device work, value checks off; a path's first "
        "layer also builds the forward's shared index state)")
    if device.type != "cuda":
        say("(auto routes by costs measured on an H200 GPU; the CPU references cost differently)")
    say("PASS: every layer of both paths matches the reference" if ok else "FAIL: see the layers marked FAIL")
    return ok
