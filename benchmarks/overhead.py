"""Host (CPU) time per call of each fused op's entry point, beside its GPU time (GPU).

A launch path whose host time exceeds the kernel's GPU time makes the GPU wait; this shows where
the host time goes for the coefficient op (dispatch -> custom op -> launcher -> Triton launch) and
for the backward's dx step, whose tiles move by TMA (a host-built descriptor per tensor).

    PYTHONPATH=src python benchmarks/overhead.py
"""

import cProfile
import pstats
import time

import torch
import triton.testing

from torchmhc.kernels import mhc_coefficients, use_kernels
from torchmhc.kernels.coefficients_op import coefficients_bwd_tokens, coefficients_bwd_x, coefficients_fwd, coefficients_op


def host_us(fn, calls: int = 50) -> float:
    # few calls: their launches must fit the launch queue, else host time is GPU time
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    return host * 1e6


def main() -> None:
    t, n, c = 16384, 4, 4096
    x = torch.randn(t, n, c, device="cuda", dtype=torch.bfloat16)
    rows = n * n + 2 * n
    fn = torch.randn(rows, n * c, device="cuda") / (n * c) ** 0.5
    scale, base = torch.rand(3, device="cuda") + 0.5, torch.randn(rows, device="cuda")
    saved = coefficients_fwd(x, fn, scale, base, 20, 1e-6, 1e-6, 2.0)[3:]
    d_h = (torch.randn(t, n, device="cuda"), torch.randn(t, n, device="cuda"), torch.randn(t, n, n, device="cuda"))
    dm, cx, _, _ = coefficients_bwd_tokens(*saved, scale, base, *d_h, n * c, 20, 1e-6, 2.0)
    add, mix = torch.randn_like(x), (torch.randn(t, c, device="cuda", dtype=x.dtype), torch.rand(t, n, device="cuda"))
    cases = {
        "launcher coefficients_fwd": lambda: coefficients_fwd(x, fn, scale, base, 20, 1e-6, 1e-6, 2.0),
        "custom op coefficients_op": lambda: coefficients_op(x, fn, scale, base, 20, 1e-6, 1e-6, 2.0),
        "dispatch mhc_coefficients": lambda: mhc_coefficients(x, fn, scale, base),
        "dx step (3 descriptors)": lambda: coefficients_bwd_x(x, fn, dm, cx),
        "dx step, mix + add (3)": lambda: coefficients_bwd_x(x, fn, dm, cx, add=add, mix=mix),
    }
    with use_kernels("triton"):
        for name, f in cases.items():
            gpu = triton.testing.do_bench(f, warmup=10, rep=50, return_mode="median") * 1e3
            print(f"{name:28s} host {host_us(f):7.1f} µs/call   do_bench {gpu:7.1f} µs", flush=True)
        for name in ("dispatch mhc_coefficients", "dx step, mix + add (3)"):
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(100):
                cases[name]()
            prof.disable()
            torch.cuda.synchronize()
            print(f"\n{name}: the host's 12 costliest functions")
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
