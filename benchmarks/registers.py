"""Registers and spills of the coefficient backward's dx + dfn kernel, compiled offline (no GPU).

Triton compiles the kernel for sm_90a (H100) on the CPU; the ptxas bundled with it reports the
registers a thread uses and the bytes it spills to local memory. The tile and launch options are
``coefficients_bwd_x``'s keywords (``benchmarks/tune.py`` times them on a GPU). One line per
configuration: the pass (plain: dx alone; chained: dx plus an added gradient and the pre-mix's
h_pre ⊗ dy, as the chained sub-layer runs it), tokens and channels per tile, warps and stages.

    PYTHONPATH=src python benchmarks/registers.py [--streams 4] [--channels 2048] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from torchmhc.kernels.coefficients_op import _coef_bwd_x_kernel, _np, merged_width

#: The other gradients each pass sums into dx (what the launcher's ``add`` and ``mix`` switch on).
PASSES = {"plain": (), "chained": ("add", "mix")}


def compile_stats(
    n: int, c: int, dtype: str, summed: tuple[str, ...], block_t: int, block_k: int, num_warps: int, num_stages: int
) -> tuple[int, int]:
    """``(registers a thread, bytes spilled)`` of one configuration (spill stores, as ptxas counts them)."""
    w = merged_width(n)
    signature = {
        "x_desc": f"tensordesc<{dtype}[{block_t}, {block_k}]>", "fn_ptr": "*fp32",
        "dm_desc": f"tensordesc<fp32[{block_t}, {w}]>", "cx_ptr": "*fp32",
        "dx_desc": f"tensordesc<{dtype}[{block_t}, {block_k}]>", "dfn_ptr": "*fp32", "T": "i32",
    }  # fmt: skip
    constants: dict[str, object] = dict(
        C=c, N=n, NP=_np(n), W=w, ROWS=n * n + 2 * n, MERGED=True, DY_ROWS=1, BT=block_t, BK=block_k, TILES=8,
        MODE=1 if dtype == "bf16" else 2, ADD="add" in summed, MIX="mix" in summed,
    )  # fmt: skip
    optional = {"add_ptr": (dtype, "add"), "dy_ptr": (dtype, "mix"), "hpre_ptr": ("fp32", "mix")}
    for name, (element, switch) in optional.items():
        if switch in summed:
            signature[name] = f"*{element}"
        else:
            constants[name] = None
    # as Triton's launcher specializes them for 16-byte aligned tensors and token counts: without
    # these hints the per-thread loads and stores would not be vectorized
    aligned = {(_coef_bwd_x_kernel.arg_names.index(name),): [["tt.divisibility", 16]]
               for name, kind in signature.items() if kind.startswith("*") or kind == "i32"}  # fmt: skip
    signature.update({name: "constexpr" for name in constants})
    kernel = triton.compile(
        ASTSource(_coef_bwd_x_kernel, signature, constants, aligned),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=num_warps, num_stages=num_stages),
    )
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(kernel.asm["ptx"])
        ptx.flush()
        report = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr  # fmt: skip
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spilled = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return registers, spilled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--channels", type=int, default=2048, help="C")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="stream dtype")
    parser.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    args = parser.parse_args()
    # the launcher's defaults first (coefficients_bwd_x), then the alternatives tune.py sweeps
    block_k = 128 if args.dtype == "bf16" and args.streams <= 4 else 64
    block_t = 64 if args.streams <= 4 else 32
    print(f"n={args.streams} C={args.channels} {args.dtype}, block_k={block_k}: registers a thread, bytes spilled")
    for name, (bt, warps) in itertools.product(args.passes, ((block_t, 4), (block_t, 8), (block_t // 2, 4))):
        regs, spilled = compile_stats(args.streams, args.channels, args.dtype, PASSES[name], bt, block_k, warps, 3)
        print(f"  {name:8s} block_t={bt:3d} num_warps={warps}: {regs:3d} registers, {spilled:5d} bytes spilled", flush=True)


if __name__ == "__main__":
    main()
