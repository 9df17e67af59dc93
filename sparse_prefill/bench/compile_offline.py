"""Compile the Gluon kernels for sm_90a without a GPU and print ptxas' resource report.

    python -m sparse_prefill.bench.compile_offline [--kernel wide|few|fp8] [--d-qk 512|576]
        [--h-q N] [--sass FILE] [KEY=VAL ...]

``wide``: the 64-head kernel of ``sparse_attn_fwd`` (``ops/sparse_attn/gluon_kernel.py``);
``few``: its few-head kernel (``gluon_few_heads.py``) for ``--h-q`` heads; ``fp8``: the kernel of
``paged_fp8_sparse_attn_fwd`` (``ops/fp8_sparse_attn/gluon_kernel.py``, V4 layout, with the extra
scope and both lengths).

Needs the Triton the device runs (3.6, whose wheel carries ptxas) and torch; it uses no GPU, so
registers, spills, shared memory and ptxas' warnings (serialized wgmma, ignored setmaxnreg) are
read here before any device time is spent. KEY=VAL overrides the kernel's tuning constants.
``--sass FILE`` writes the whole SASS: a change meant to leave a kernel as it was (a helper
moved, say) can be checked to give the same machine code.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

from triton.backends.compiler import GPUTarget
from triton.compiler import compile as triton_compile
from triton.experimental.gluon._runtime import GluonASTSource

from sparse_prefill.ops.fp8_sparse_attn import gluon_kernel as fp8_gluon_kernel
from sparse_prefill.ops.sparse_attn import gluon_few_heads, gluon_kernel


def specialized(fn, sig: dict[str, str], consts: dict[str, int]) -> GluonASTSource:
    """``fn``'s source for signature ``sig`` and constants ``consts``, with what the JIT's
    specialization sees on real inputs: 16-byte aligned pointers and strides divisible by 16
    (arguments listed in do_not_specialize, and the float scale, get none)."""
    sig = {**sig, **{k: "constexpr" for k in consts}}
    skip = set(fn.do_not_specialize) | {"qk_scale_log2"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items())
             if t != "constexpr" and n not in skip}
    return GluonASTSource(fn, sig, constexprs=consts, attrs=attrs)


def fp8_source(h_q: int, tuning: dict[str, int]) -> GluonASTSource:
    """The FP8 kernel's source with its launcher's signature (``fp8_sparse_attn.kernel.launch_args``)."""
    sig = {"q_ptr": "*bf16", "cache_ptr": "*u8", "idx_ptr": "*i32", "xcache_ptr": "*u8", "xidx_ptr": "*i32",
           "out_ptr": "*bf16", "max_ptr": "*fp32", "lse_ptr": "*fp32", "sink_ptr": "*fp32", "topk_len_ptr": "*i32",
           "xtopk_len_ptr": "*i32"}
    for n in ("h_q", "topk", "xtopk", "capacity", "xcapacity", "page_size", "page_bytes", "xpage_size",
              "xpage_bytes"):
        sig[n] = "i32"
    sig["qk_scale_log2"] = "fp32"
    for n in ("stride_q_s", "stride_q_h", "stride_i_s", "stride_xi_s", "stride_o_s", "stride_o_h", "stride_ml_s",
              "n_items"):
        sig[n] = "i32"
    consts = {"NUM_HEAD_BLOCKS": -(-h_q // 64), "HAS_EXTRA": True, "HAS_SINK": True, "HAS_TOPK_LEN": True,
              "HAS_XTOPK_LEN": True, **fp8_gluon_kernel.DEFAULT_TUNING, **tuning}
    return specialized(fp8_gluon_kernel._paged_fp8_attn_ws_kernel, sig, consts)


def sparse_source(kernel: str, d_qk: int, h_q: int, tuning: dict[str, int]) -> GluonASTSource:
    """The kernel's source with the signature both kernels share (the launchers' ``launch_args``)
    and the constants a launch for ``d_qk`` / ``h_q`` gives it."""
    sig = {n: "*bf16" for n in ("q_ptr", "kv_ptr")}
    sig.update({"idx_ptr": "*i32", "out_ptr": "*bf16", "max_ptr": "*fp32", "lse_ptr": "*fp32",
                "sink_ptr": "*fp32", "topk_len_ptr": "*i32"})
    for n in ("s_kv", "h_q", "topk"):
        sig[n] = "i32"
    sig["qk_scale_log2"] = "fp32"
    for n in ("stride_q_s", "stride_q_h", "stride_kv_s", "stride_i_s", "stride_o_s", "stride_o_h",
              "stride_ml_s"):
        sig[n] = "i32"
    consts = {"D_TAIL": d_qk - 512, "HAS_SINK": True, "HAS_TOPK_LEN": True}
    if kernel == "few":
        fn, tail_arg = gluon_few_heads._sparse_attn_few_heads_kernel, "s_q"
        consts = {"HN": gluon_few_heads.heads_tile(h_q), **consts, **gluon_few_heads.tuning_for(d_qk, tuning)}
    else:
        fn, tail_arg = gluon_kernel._sparse_attn_ws_kernel, "n_items"
        consts = {"NUM_HEAD_BLOCKS": -(-h_q // 64), **consts, **gluon_kernel.DEFAULT_TUNING, **tuning}
    sig[tail_arg] = "i32"
    return specialized(fn, sig, consts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", default="wide", choices=("wide", "few", "fp8"))
    parser.add_argument("--d-qk", type=int, default=512, choices=(512, 576))
    parser.add_argument("--h-q", type=int, default=128)
    parser.add_argument("--sass", metavar="FILE", help="write the whole SASS there")
    parser.add_argument("tuning", nargs="*", help="KEY=VAL overrides")
    args = parser.parse_args()
    tuning = {k: int(v) for k, v in (t.split("=") for t in args.tuning)}
    if args.kernel == "fp8":
        src = fp8_source(args.h_q, tuning)
    else:
        src = sparse_source(args.kernel, args.d_qk, args.h_q, tuning)
    compiled = triton_compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = compiled.asm["ptx"]
    print("shared bytes:", compiled.metadata.shared)
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        tmp = os.environ.get("KEEP_DIR", tmp)
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
        print(res.stdout + res.stderr)
        sass = subprocess.run([os.path.join(os.path.dirname(get_ptxas(90).path), "cuobjdump"), "--dump-sass",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True).stdout
    if args.sass:
        with open(args.sass, "w") as f:
            f.write(sass)
    ops = re.findall(r"\b(HGMMA|LDGSTS|USETMAXREG|LDL|STL|SYNCS)\S*", sass)
    print({op: ops.count(op) for op in sorted(set(ops))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
