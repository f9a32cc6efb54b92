"""Compile the CUDA path's Triton kernels for Hopper (sm_90) without a GPU, and report their resources.

    python bench/triton_compile.py            # needs triton (the dev extras), no GPU

The Triton interpreter (the tests) checks what the kernels compute, not that they compile: this
script compiles each kernel of crossdiff/coder/sparse_triton.py at the block shapes the launchers pick for
the benchmark sizes, for compute capability 9.0, with the ptxas that triton ships, and prints the
registers per thread, spill stack, local and shared memory per kernel (cuobjdump's resource usage).
Registers bound occupancy: 65,536 per multiprocessor / (registers x 32 x warps) blocks at most.

Triton specialises on argument values at launch (e.g. strides divisible by 16 give 16-byte loads);
here they are plain i32, so the code is the general case, not exactly the one a launch compiles.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def resources(kernel, signature: dict, constexprs: dict, warps: int) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(
        fn=kernel, signature={**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs=constexprs
    )
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(compiled.asm["cubin"])
        fh.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        out = subprocess.run([tool, "--dump-resource-usage", fh.name], capture_output=True, text=True).stdout
    line = next((x.strip() for x in out.splitlines() if "REG:" in x), "?")
    return " ".join(f for f in line.split() if f.split(":")[0] in ("REG", "STACK", "SHARED", "LOCAL"))


def main() -> int:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default today; silences a warning
    import triton
    import triton.language as tl

    from crossdiff.coder import sparse_triton as st

    ints = dict.fromkeys(("D", "stride_t", "stride_o", "idx_lo", "idx_hi"), "i32")
    seg = {"idx_ptr": "*i64", "w_ptr": "*fp32", "off_ptr": "*i64", "table_ptr": "*fp32", "bias_ptr": "*fp32"}
    seg |= {"out_ptr": "*fp32", **ints}
    dots = {"rows_ptr": "*i64", "cols_ptr": "*i64", "a_ptr": "*fp32", "w_ptr": "*fp32", "out_ptr": "*fp32"}
    dots |= dict.fromkeys(("N", "D", "stride_a", "stride_w", "col_lo", "col_hi"), "i32")
    rsum = {"g_ptr": "*fp32", "w_ptr": "*fp32", "part_ptr": "*fp32", "J": "i32", "D": "i32"}
    rsum |= {"stride_w": "i32", "J_PER_PROG": "i32"}
    f32 = tl.float32
    cases = [  # (label, kernel, signature, constexprs, warps): the launchers' choices at d = 4096
        ("decode, k = 32 (BLOCK_N 32, BLOCK_D 256)", st._segment_sum_kernel, seg,
         dict(HAS_BIAS=True, ACC=f32, BLOCK_N=32, BLOCK_D=256), 4),
        ("dW, ~2 entries per latent (BLOCK_N 4, BLOCK_D 512)", st._segment_sum_kernel, seg,
         dict(HAS_BIAS=False, ACC=f32, BLOCK_N=4, BLOCK_D=512), 4),
        ("dW, ~10 entries per latent (BLOCK_N 16, BLOCK_D 512)", st._segment_sum_kernel, seg,
         dict(HAS_BIAS=False, ACC=f32, BLOCK_N=16, BLOCK_D=512), 4),
        ("row_dots (BLOCK_N 16, BLOCK_D 256)", st._row_dots_kernel, dots, dict(ACC=f32, BLOCK_N=16, BLOCK_D=256), 4),
        ("rowsum_nonzero (BLOCK_J 16, BLOCK_D 256)", st._rowsum_nonzero_kernel, rsum,
         dict(ACC=f32, BLOCK_J=16, BLOCK_D=256), 4),
    ]  # fmt: skip
    print(f"triton {triton.__version__}, target sm_90, fp32")
    for label, kernel, sig, consts, warps in cases:
        print(f"  {label:<54} {resources(kernel, sig, consts, warps)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
