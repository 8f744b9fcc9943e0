"""Host (CPU) time of the fused ops' eager launch paths, beside their GPU time (GPU).

Without CUDA graphs every kernel launch costs host time: when a sub-layer's host time exceeds its
GPU time, the GPU waits. This measures, at one shape, the host time per call of each layer of the
launch path (a bare Triton launch, the launchers, the custom ops, the dispatch, a whole
``HyperConnection`` sub-layer forward + backward), calibrates the machine's host speed with two
plain torch calls, and prints the costliest Python functions of the sub-layer (cProfile).

    PYTHONPATH=src python benchmarks/overhead.py [--shape 8192x1280] [--streams 4]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
import triton.testing

import torchmhc
import torchmhc.functional
from torchmhc.kernels import mhc_coefficients, use_kernels
from torchmhc.kernels._precision import split_bf16
from torchmhc.kernels.coefficients_op import coefficients_bwd_tokens, coefficients_bwd_x, coefficients_fwd, coefficients_op
from torchmhc.kernels.post_res_op import post_res_fwd
from torchmhc.kernels.pre_mix_op import pre_mix_fwd


def host_us(fn, calls: int = 50) -> float:
    """Host time per call: ``calls`` calls without waiting for the GPU (few enough that their
    launches fit the launch queue, else the host would wait for the GPU and measure its time)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    return host * 1e6


def wall_us(fn, calls: int = 50) -> float:
    """Wall time per call including the GPU's: the larger of host and GPU time when they overlap."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8192x1280", help="TOKENSxCHANNELS")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--profile-top", type=int, default=30)
    args = parser.parse_args()
    t, c = (int(v) for v in args.shape.split("x"))
    n = args.streams
    dev = "cuda"
    x = torch.randn(t, n, c, device=dev, dtype=torch.bfloat16)
    rows = n * n + 2 * n
    fn = torch.randn(rows, n * c, device=dev) / (n * c) ** 0.5
    scale, base = torch.rand(3, device=dev) + 0.5, torch.randn(rows, device=dev)
    outs = coefficients_fwd(x, fn, scale, base, 20, 1e-6, 1e-6, 2.0)
    h_pre, h_post, h_res, *saved = outs
    d_h = (torch.randn(t, n, device=dev), torch.randn(t, n, device=dev), torch.randn(t, n, n, device=dev))
    dm, cx, _, _ = coefficients_bwd_tokens(*saved, scale, base, *d_h, n * c, 20, 1e-6, 2.0)
    f_out = torch.randn(t, c, device=dev, dtype=x.dtype)
    small = torch.randn(1024, device=dev)

    hc = torchmhc.HyperConnection(c, n, "mhc").to(dev)
    xs = x.view(2, t // 2, n, c).clone().requires_grad_(True)
    w = torch.randn(c, device=dev, dtype=x.dtype)
    grad = torch.randn_like(xs)

    def sublayer() -> None:
        out = hc(xs, lambda u: u * w)
        out.backward(grad)

    cases = {
        "calibration: torch.empty (1 MiB)": lambda: torch.empty(2**18, device=dev),
        "calibration: small.add_(1)": lambda: small.add_(1),
        "bare Triton launch (split_bf16 of 1024)": lambda: split_bf16(small),
        "launcher pre_mix_fwd": lambda: pre_mix_fwd(x, h_pre),
        "launcher post_res_fwd": lambda: post_res_fwd(x, f_out, h_post, h_res),
        "launcher coefficients_fwd": lambda: coefficients_fwd(x, fn, scale, base, 20, 1e-6, 1e-6, 2.0),
        "custom op coefficients_op": lambda: coefficients_op(x, fn, scale, base, 20, 1e-6, 1e-6, 2.0),
        "dispatch mhc_coefficients": lambda: mhc_coefficients(x, fn, scale, base),
        "launcher coefficients_bwd_tokens": lambda: coefficients_bwd_tokens(*saved, scale, base, *d_h, n * c, 20, 1e-6, 2.0),
        "launcher coefficients_bwd_x": lambda: coefficients_bwd_x(x, fn, dm, cx),
        "sub-layer fwd+bwd (HyperConnection, eager)": sublayer,
        # what a user calling the public API gets: fused on CUDA, the reference in torchmhc.functional
        "torchmhc.post_res (top level)": lambda: torchmhc.post_res(x, f_out, h_post, h_res),
        "torchmhc.functional.post_res (reference)": lambda: torchmhc.functional.post_res(x, f_out, h_post, h_res),
        "torchmhc.pre_mix (top level)": lambda: torchmhc.pre_mix(x, h_pre),
        "torchmhc.functional.pre_mix (reference)": lambda: torchmhc.functional.pre_mix(x, h_pre),
        "torchmhc.mhc_coefficients (top level)": lambda: torchmhc.mhc_coefficients(x, fn, scale, base),
        "torchmhc.functional.mhc_coefficients (reference)": lambda: torchmhc.functional.mhc_coefficients(x, fn, scale, base),
    }
    print(f"T={t} C={c} n={n} bf16 on {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}")
    print("| entry point | host µs per call | wall µs per call | GPU µs (do_bench) |\n| --- | ---: | ---: | ---: |")
    with use_kernels("auto"):
        for name, f in cases.items():
            calls = 20 if name.startswith("sub-layer") else 50
            gpu = triton.testing.do_bench(f, warmup=10, rep=50, return_mode="median") * 1e3
            print(f"| {name} | {host_us(f, calls):.1f} | {wall_us(f, calls):.1f} | {gpu:.1f} |", flush=True)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            sublayer()
        prof.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.profile_top)
        print(f"\nsub-layer fwd+bwd x 50: the host's {args.profile_top} costliest functions (tottime)\n{out.getvalue()}")
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(args.profile_top)
        print(f"\nsame, by cumulative time\n{out.getvalue()}")


if __name__ == "__main__":
    main()
