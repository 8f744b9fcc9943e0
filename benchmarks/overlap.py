"""Can mHC's memory-bound kernels run under the branch's compute-bound GEMMs? (two CUDA streams)

    PYTHONPATH=src python3 benchmarks/overlap.py                      # the two e2e presets' shapes
    PYTHONPATH=src python3 benchmarks/overlap.py --shapes 8192x2048x5504 --out overlap.md
    PYTHONPATH=src python3 benchmarks/overlap.py --carveouts 8,16,32   # GEMMs leave that many SMs free

The GEMMs of a transformer's branches leave most of the HBM bandwidth idle, and mHC's kernels
leave the tensor cores idle; run side by side on two streams they could share the GPU instead of
taking turns. This measures how much of the mHC work such an overlap would hide, before the model
is restructured for it (two microbatches interleaved, one's mHC kernels beside the other's GEMMs).

Per shape ``T x C x F`` (tokens, stream width, SwiGLU hidden), n = 4, bf16:

- GEMMs: the FFN's forward GEMMs (``[T, C] @ [C, 2F]``, ``[T, F] @ [F, C]``) three times, about the
  FLOPs of the FFN's forward and backward;
- mHC: one sub-layer's kernels: coefficients, pre-mix and post-res forward, pre-mix and post-res
  backward (the launchers of ``torchmhc.kernels``).

Each arrangement is captured in one CUDA graph and replayed (no host launch cost; median of
``triton.testing.do_bench``): GEMMs alone, mHC alone, both on one stream, both on two streams, and
both on two streams with the mHC stream at high priority. "hidden" is the share of the mHC time
that the two-stream arrangement saves against one stream.

A GEMM's tiles fill every multiprocessor, so the other stream's kernels can only run between them.
``--carveouts K,...`` also partitions the GPU: cuBLAS is told to leave K multiprocessors free
(``torch._C._set_sm_carveout_experimental``, set while the arrangement is captured), the mHC
kernels take those, and the row reports the GEMMs alone on the rest and both on two streams.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from torchmhc.bench import bench
from torchmhc.kernels.coefficients_op import coefficients_fwd
from torchmhc.kernels.post_res_op import post_res_bwd, post_res_fwd
from torchmhc.kernels.pre_mix_op import pre_mix_bwd, pre_mix_fwd

N = 4
SHAPES = {"gpu-dense-1b": (8192, 2048, 5472), "gpu-moe-3b": (8192, 1280, 3424)}


def workloads(t: int, c: int, f: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """(gemms, mhc): the two pieces of work, on fresh random inputs of one shape."""
    dev, bf16 = "cuda", torch.bfloat16
    h = torch.randn(t, c, device=dev, dtype=bf16)
    w13 = torch.randn(c, 2 * f, device=dev, dtype=bf16) / c**0.5
    w2 = torch.randn(f, c, device=dev, dtype=bf16) / f**0.5

    def gemms() -> None:
        for _ in range(3):
            a = h @ w13
            a[:, :f] @ w2

    x = torch.randn(t, N, c, device=dev, dtype=bf16)
    fn = torch.randn(N * N + 2 * N, N * c, device=dev) * 0.02
    scale = torch.full((3,), 0.01, device=dev)
    base = torch.zeros(N * N + 2 * N, device=dev)
    f_out = torch.randn(t, c, device=dev, dtype=bf16)
    grad_x = torch.randn_like(x)

    def mhc() -> None:
        h_pre, h_post, h_res, *_ = coefficients_fwd(x, fn, scale, base, 20, 1e-6, 1e-6, 2.0)
        pre_mix_fwd(x, h_pre)
        post_res_fwd(x, f_out, h_post, h_res)
        post_res_bwd(grad_x, x, f_out, h_post, h_res)
        pre_mix_bwd(f_out, x, h_pre)

    return gemms, mhc


def side_by_side(first: Callable[[], None], second: Callable[[], None], priority: int) -> Callable[[], None]:
    """``first`` on the current stream and ``second`` on a side stream of ``priority``, joined."""
    side = torch.cuda.Stream(priority=priority)

    def run() -> None:
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            second()
        first()
        main.wait_stream(side)

    return run


def carved(fn: Callable[[], None], sms: int) -> Callable[[], None]:
    """``fn`` with cuBLAS leaving ``sms`` multiprocessors free (read when a GEMM is launched or captured)."""

    def run() -> None:
        torch._C._set_sm_carveout_experimental(sms)
        try:
            fn()
        finally:
            torch._C._set_sm_carveout_experimental(None)

    return run


def measure(t: int, c: int, f: int, carveouts: list[int]) -> dict[str, float]:
    gemms, mhc = workloads(t, c, f)
    high = torch.cuda.Stream.priority_range()[1]  # numerically lowest = highest priority
    times = {
        "gemms": bench(gemms, label="gemms"),
        "mhc": bench(mhc, label="mhc"),
        "one stream": bench(lambda: (gemms(), mhc()), label="one stream"),
        "two streams": bench(side_by_side(gemms, mhc, 0), label="two streams"),
        "two streams, mHC high priority": bench(side_by_side(gemms, mhc, high), label="priority"),
    }
    for k in carveouts:
        times[f"gemms, {k} SMs free"] = bench(carved(gemms, k), label=f"gemms carveout {k}")
        times[f"two streams, {k} SMs free"] = bench(side_by_side(carved(gemms, k), mhc, 0), label=f"carveout {k}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(f"{t}x{c}x{f}" for t, c, f in SHAPES.values()),
                        help="comma-separated TxCxF (tokens x stream width x SwiGLU hidden)")  # fmt: skip
    parser.add_argument("--carveouts", default="", help="comma-separated numbers of SMs the GEMMs leave free")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()
    carveouts = [int(k) for k in args.carveouts.split(",") if k]
    lines = [
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, n = {N}, bf16; median µs of CUDA-graph replays",
        "",
        "| T x C x F | GEMMs | mHC | one stream | two streams | hidden | mHC high priority | hidden |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    carve = ["| T x C x F | K | GEMMs | two streams | hidden |", "| --- | ---: | ---: | ---: | ---: |"]
    for spec in args.shapes.split(","):
        t, c, f = (int(v) for v in spec.split("x"))
        r = {k: v * 1e3 for k, v in measure(t, c, f, carveouts).items()}
        hidden = [(r["one stream"] - r[k]) / r["mhc"] for k in ("two streams", "two streams, mHC high priority")]
        lines.append(
            f"| {spec} | {r['gemms']:.0f} | {r['mhc']:.0f} | {r['one stream']:.0f} | {r['two streams']:.0f} | "
            f"{hidden[0]:.0%} | {r['two streams, mHC high priority']:.0f} | {hidden[1]:.0%} |"
        )
        print(lines[-1], flush=True)
        for k in carveouts:
            carve.append(
                f"| {spec} | {k} | {r[f'gemms, {k} SMs free']:.0f} ({r[f'gemms, {k} SMs free'] / r['gemms'] - 1:+.0%}) | "
                f"{r[f'two streams, {k} SMs free']:.0f} | {(r['one stream'] - r[f'two streams, {k} SMs free']) / r['mhc']:.0%} |"
            )
            print(carve[-1], flush=True)
    if carveouts:
        lines += ["", "With the GEMMs leaving K multiprocessors to the mHC stream (hidden: against one stream, no carveout):", ""]
        lines += carve
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
