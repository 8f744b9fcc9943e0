"""Registers and spills of the backward's stream kernels, compiled offline (no GPU).

Triton compiles a kernel for sm_90a (H100) on the CPU; the ptxas bundled with it reports the
registers a thread uses and the bytes it spills to local memory, Triton's GPU IR the operations
in the kernel's token loop (layout changes, shared-memory buffers, reductions, tensor-core products,
stores: what a tile costs besides its loads), and the machine code (nvdisasm, bundled too) how many
instructions a thread issues in that loop: times the warps, what a multiprocessor's schedulers
issue for one tile, which bounds the kernel's time when latencies are hidden. Two kernels:

- ``--kernel dx`` (default): the coefficient backward's dx + dfn pass, with the tile and launch
  options of ``coefficients_bwd_x``. One line per configuration: the pass (plain: dx alone;
  chained: dx plus an added gradient and the pre-mix's h_pre ⊗ dy, as the chained sub-layer runs
  it), tokens and columns per tile, warps and stages.
- ``--kernel transition``: the transition backward's one stream pass
  (``transition_backward_op.transition_bwd_streams``), tokens by channels of every stream;
  ``--norm`` with the branch RMSNorm's backward.
- ``--kernel forward``: the fused transition's forward with the pre-mix and the branch RMSNorm
  (``post_res_coefficients_pre_mix_norm_fwd``), its normalized pre-mix in place or over whole rows.

``benchmarks/tune.py`` times the same options on a GPU.

    PYTHONPATH=src python benchmarks/registers.py [--kernel dx|transition|forward] [--norm] [--streams 4] [--channels 2048] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from torchmhc.kernels._common import next_pow2
from torchmhc.kernels.coefficients_op import _coef_bwd_x_kernel, _np, merged_width
from torchmhc.kernels.post_res_coefficients_op import _post_res_coef_fwd_kernel
from torchmhc.kernels.transition_backward_op import _transition_bwd_kernel

#: ptxas and nvdisasm, as bundled with Triton.
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

#: The other gradients each pass sums into dx (what the launcher's ``add`` and ``mix`` switch on).
PASSES = {"plain": (), "chained": ("add", "mix")}


@dataclass
class Compiled:
    """What ptxas and Triton's IR say about one compiled configuration."""

    registers: int  # a thread
    spilled: int  # bytes of spill stores, as ptxas counts them
    loop_ops: dict[str, int]  # operations in the body of the kernel's token loop, by kind (LOOP_OPS)
    loop_sass: collections.Counter[str]  # machine instructions of that loop a thread, by opcode


#: Operations of Triton's GPU IR counted in the token loop: layout changes (through shared memory
#: where the two layouts differ in more than registers), shared-memory buffers and their reads,
#: reductions, tensor-core products, global stores.
LOOP_OPS = {
    "layout changes": r"ttg\.convert_layout",
    "shared-memory buffers": r"ttg\.local_alloc",
    "shared-memory reads": r"ttg\.local_load",
    "reductions": r"\"tt\.reduce\"",
    "products": r"\btt\.dot\b|\bwarp_group_dot\b(?!_)",
    "stores": r"\btt\.store\b",
}


def compile_stats(
    n: int, c: int, dtype: str, summed: tuple[str, ...], block_t: int, block_k: int, num_warps: int, num_stages: int
) -> tuple[int, int]:
    """``(registers a thread, bytes spilled)`` of one configuration of the dx + dfn pass."""
    compiled = dx_kernel(n, c, dtype, summed, block_t, block_k, num_warps, num_stages)
    return compiled.registers, compiled.spilled


def transition_stats(
    n: int, c: int, dtype: str, block_t: int, block_c: int, num_warps: int, num_stages: int, late_prefetch: bool = True
) -> tuple[int, int]:
    """:func:`compile_stats` of the transition backward's stream pass, with the pre-mix's h_pre ⊗ dy."""
    compiled = transition_kernel(n, c, dtype, block_t, block_c, num_warps, num_stages, late_prefetch)
    return compiled.registers, compiled.spilled


def dx_kernel(
    n: int, c: int, dtype: str, summed: tuple[str, ...], block_t: int, block_k: int, num_warps: int, num_stages: int
) -> Compiled:
    """The dx + dfn pass (``coefficients_bwd_x``) compiled in one configuration."""
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
    return _compile(_coef_bwd_x_kernel, signature, constants, num_warps, num_stages)


def transition_kernel(
    n: int, c: int, dtype: str, block_t: int, block_c: int, num_warps: int, num_stages: int, late_prefetch: bool = True,
    norm: bool = False,
) -> Compiled:
    """The transition backward's stream pass (``transition_bwd_streams``, with the pre-mix's
    h_pre ⊗ dy, and with ``norm`` the branch norm's backward) compiled in one configuration."""
    w, ns = merged_width(n), next_pow2(n)
    streams = ("x_ptr", "f_ptr", "dnext_ptr", "dy_ptr", "dx_ptr", "df_ptr")
    pointers = _transition_bwd_kernel.arg_names[: _transition_bwd_kernel.arg_names.index("T")]
    signature = {**{name: f"*{dtype}" if name in streams else "*fp32" for name in pointers}, "T": "i32"}
    constants: dict[str, object] = dict(
        C=c, N=n, NS=ns, NP=_np(n), NH=next_pow2(n + n * n), W=w, ROWS=n * n + 2 * n, BT=block_t, BC=block_c, TILES=8,
        MODE=1 if dtype == "bf16" else 2, MIX=True, NORM=norm, LATE_PREFETCH=late_prefetch,
    )  # fmt: skip
    return _compile(_transition_bwd_kernel, signature, constants, num_warps, num_stages)


def forward_kernel(n: int, c: int, whole_rows: bool, block_t: int = 32, block_c: int = 64, num_warps: int = 4,
                   num_stages: int = 4) -> Compiled:  # fmt: skip
    """The fused transition's forward with the pre-mix and the branch RMSNorm
    (``post_res_coefficients_pre_mix_norm_fwd``, bf16 streams, n <= 4; its launcher's defaults),
    the normalized pre-mix in place or over whole rows (``whole_rows``)."""
    names = _post_res_coef_fwd_kernel.arg_names
    signature = {name: "*fp32" for name in names[: names.index("T")]}
    signature.update({
        "x_desc": f"tensordesc<bf16[{block_t}, {next_pow2(n)}, {block_c}]>", "f_desc": f"tensordesc<bf16[{block_t}, {block_c}]>",
        "fnp_desc": f"tensordesc<bf16[64, {next_pow2(n) * block_c}]>", "out_ptr": "*bf16", "y_ptr": "*bf16",
        "T": "i32", "eps": "fp32", "rms_eps": "fp32", "post_scale": "fp32", "norm_eps": "fp32",
    })  # fmt: skip
    constants: dict[str, object] = dict(
        C=c, N=n, NS=next_pow2(n), NP=_np(n), M=64, ITERS=20, BT=block_t, BC=block_c, BCM=min(128, c), MODE=1, MIX=True,
        NORM=True, ROWS=whole_rows, CP=next_pow2(c), BTN=min(block_t, max(1, 4096 // next_pow2(c))),
    )  # fmt: skip
    return _compile(_post_res_coef_fwd_kernel, signature, constants, num_warps, num_stages)


def _compile(fn: object, signature: dict, constants: dict, num_warps: int, num_stages: int) -> Compiled:
    """Compiles ``fn`` for sm_90a, reads ptxas's report and counts the token loop's operations."""
    # as Triton's launcher specializes them for 16-byte aligned tensors and token counts: without
    # these hints the per-thread loads and stores would not be vectorized
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
               for name, kind in signature.items() if kind.startswith("*") or kind == "i32"}  # fmt: skip
    signature = {**signature, **{name: "constexpr" for name in constants}}
    kernel = triton.compile(
        ASTSource(fn, signature, constants, aligned),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=num_warps, num_stages=num_stages),
    )
    ptxas = os.path.join(TOOLS, "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(kernel.asm["ptx"])
        ptx.flush()
        report = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr  # fmt: skip
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spilled = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    ir = kernel.asm["ttgir"]
    loop = ir[ir.index("scf.for") :]  # the kernels' one loop runs to the end of the function
    ops = {kind: len(re.findall(op, loop)) for kind, op in LOOP_OPS.items()}
    return Compiled(registers, spilled, ops, loop_instructions(kernel.asm["cubin"]))


def loop_instructions(cubin: bytes) -> collections.Counter[str]:
    """The machine instructions, by opcode (``FFMA``, ``SHFL``, ...), of the longest loop in a
    compiled kernel (the span from a branch's target back to the branch): the token loop, in these
    kernels, which have one."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([os.path.join(TOOLS, "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    labels: dict[str, int] = {}
    pending: list[str] = []
    code: list[tuple[int, str]] = []  # (address, instruction)
    for line in sass.splitlines():
        if label := re.match(r"\s*(\.L_x_\d+):", line):
            pending.append(label.group(1))
        elif instruction := re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line):
            address = int(instruction.group(1), 16)
            labels.update((name, address) for name in pending)
            pending = []
            code.append((address, instruction.group(2)))
    start, end = 0, -1
    for address, text in code:
        target = re.search(r"\bBRA\b.*?(\.L_x_\d+)", text)
        if target and labels.get(target.group(1), address) < address and address - labels[target.group(1)] > end - start:
            start, end = labels[target.group(1)], address
    # the opcode without its predicate (@P0, @!PT) and modifiers (.FTZ, .E.128)
    opcodes = (re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0] for a, text in code if start <= a <= end)
    return collections.Counter(opcodes)


def _ops(compiled: Compiled, num_warps: int) -> str:
    issued = sum(compiled.loop_sass.values())
    return (", ".join(f"{count} {kind}" for kind, count in compiled.loop_ops.items())
            + f"; {issued} instructions a thread ({issued * num_warps} for the tile's warps)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", default="dx", choices=("dx", "transition", "forward"))
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--channels", type=int, default=2048, help="C")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="stream dtype")
    parser.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    parser.add_argument("--norm", action="store_true", help="transition: with the branch RMSNorm's backward")
    args = parser.parse_args()
    if args.kernel == "forward":
        print(f"n={args.streams} C={args.channels} bf16, with the branch norm: registers a thread, bytes spilled")
        for whole_rows in (False, True):
            k = forward_kernel(args.streams, args.channels, whole_rows)
            print(f"  whole_rows={whole_rows:d}: {k.registers:3d} registers, {k.spilled:5d} bytes spilled", flush=True)
        return
    if args.kernel == "transition":
        # the launcher's defaults first (transition_bwd_streams), then what tune.py sweeps
        norm = " with the branch norm" if args.norm else ""
        print(f"n={args.streams} C={args.channels} {args.dtype}{norm}: registers a thread, bytes spilled")
        tiles = ((32, 32, 4), (32, 32, 8), (16, 32, 4), (64, 32, 8), (32, 64, 8), (64, 16, 8), (32, 32, 16))
        for (bt, bc, warps), late in itertools.product(tiles, (True, False)):
            k = transition_kernel(args.streams, args.channels, args.dtype, bt, bc, warps, 2, late, args.norm)
            print(f"  block_t={bt:3d} block_c={bc:3d} num_warps={warps:2d} late_prefetch={late:d}: "
                  f"{k.registers:3d} registers, "
                  f"{k.spilled:5d} bytes spilled; token loop: {_ops(k, warps)}", flush=True)  # fmt: skip
        return
    # the launcher's defaults first (coefficients_bwd_x), then the alternatives tune.py sweeps
    block_k = 128 if args.dtype == "bf16" and args.streams <= 4 else 64
    block_t = 64 if args.streams <= 4 else 32
    print(f"n={args.streams} C={args.channels} {args.dtype}, block_k={block_k}: registers a thread, bytes spilled")
    for name, (bt, warps) in itertools.product(args.passes, ((block_t, 4), (block_t, 8), (block_t // 2, 4))):
        k = dx_kernel(args.streams, args.channels, args.dtype, PASSES[name], bt, block_k, warps, 3)
        print(f"  {name:8s} block_t={bt:3d} num_warps={warps}: {k.registers:3d} registers, {k.spilled:5d} bytes spilled; "
              f"token loop: {_ops(k, warps)}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
