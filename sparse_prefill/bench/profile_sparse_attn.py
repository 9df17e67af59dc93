"""One launch of a sparse attention kernel on an ANCHORS shape, for ``ncu`` (CUDA only).

    python -m sparse_prefill.bench.profile_sparse_attn --kernel gluon|triton|flash_mla
        [--h-q 64 --topk 512 --s-kv 8192 --d-qk 512] [KEY=VAL ...]

Runs the kernel twice (the first compiles and warms up), so ``ncu --launch-skip 1
--launch-count 1 -k regex:NAME`` profiles the second launch. KEY=VAL are launcher overrides.
"""

from __future__ import annotations

import argparse
import sys

import torch

from sparse_prefill.bench.sparse_attn import S_Q, new_outputs, parse_config, random_bf16, unique_indices


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", choices=("gluon", "triton", "flash_mla"), required=True)
    ap.add_argument("--h-q", type=int, default=64)
    ap.add_argument("--topk", type=int, default=512)
    ap.add_argument("--s-kv", type=int, default=8192)
    ap.add_argument("--d-qk", type=int, default=512)
    ap.add_argument("tuning", nargs="*", type=parse_config)
    args = ap.parse_args()
    tuning = {k: v for t in args.tuning for k, v in t.items()}
    torch.manual_seed(0)
    q, kv = random_bf16(S_Q, args.h_q, args.d_qk), random_bf16(args.s_kv, args.d_qk)
    idx = unique_indices(S_Q, args.s_kv, args.topk)
    sink = torch.randn(args.h_q, device="cuda")
    outputs = new_outputs(S_Q, args.h_q)
    if args.kernel == "flash_mla":
        import flash_mla

        run = lambda: flash_mla.flash_mla_sparse_fwd(q, kv[:, None], idx[:, None], args.d_qk**-0.5, 512, sink)
    else:
        from sparse_prefill.ops.sparse_attn import gluon_kernel, kernel

        launch = gluon_kernel.sparse_attn_fwd_gluon if args.kernel == "gluon" else kernel.sparse_attn_fwd_triton
        run = lambda: launch(q, kv, idx, args.d_qk**-0.5, sink, None, *outputs, **tuning)
    for _ in range(2):
        run()
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
