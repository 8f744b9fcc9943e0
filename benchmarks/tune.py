"""Launch-configuration sweep of the fused kernels (GPU): how the launchers' defaults were chosen.

For each kernel, every combination of its tile sizes and launch options in GRIDS runs at one shape;
each result is checked against the launcher's default configuration, then timed (median, L2
flushed). Compilation runs first in parallel worker processes (filling Triton's disk cache), so
the timing pass in this process only loads compiled kernels. Prints, per kernel, the default and
the fastest configurations with µs and % of a device-to-device copy measured in the same run.

    PYTHONPATH=src python benchmarks/tune.py [--shape 16384x4096] [--streams 4] [--dtype bf16] [--kernels ...]

``--grid KEY=V1,V2`` sweeps only those values of one option (``--grid num_warps=8,16 late_prefetch=true``).

``--ncu`` runs no sweep: each kernel's launcher defaults run once to compile, then once more between
``cudaProfilerStart``/``Stop``, for Nsight Compute to profile exactly those launches:

    ncu --profile-from-start off --clock-control none --set full -o REPORT \
        python benchmarks/tune.py --ncu --shape 8192x2048 --kernels transition_bwd coef_bwd_x_chained post_res_bwd
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import time
from collections.abc import Callable

import torch

KERNELS = (
    "coef_fwd", "coef_bwd_tokens", "coef_bwd_x", "coef_bwd_x_chained", "post_res_fwd", "post_res_bwd",
    "post_res_coef_fwd", "post_res_coef_mix_fwd", "post_res_coef_norm_fwd", "pre_mix_dh", "norm_dh", "transition_bwd",
    "transition_bwd_norm",
)  # fmt: skip

#: Keyword arguments of each launcher that the sweep varies, and their candidate values.
GRIDS: dict[str, dict[str, tuple]] = {
    "coef_fwd": {"block_t": (32, 64, 128), "block_k": (64, 128, 256), "num_warps": (4, 8), "num_stages": (3, 4)},
    "coef_bwd_tokens": {"block_t": (16, 32), "num_warps": (2, 4, 8)},
    "coef_bwd_x": {
        "block_t": (32, 64),
        "block_k": (64, 128),
        "num_warps": (4, 8),
        "num_stages": (2, 3, 4),
        "waves": (2, 3, 4),
    },
    # the dx + dfn step as the chained sub-layer runs it: also sums h_pre ⊗ dy and the post-res gradient
    "coef_bwd_x_chained": {
        "block_t": (32, 64),
        "block_k": (64, 128),
        "num_warps": (4, 8),
        "num_stages": (2, 3, 4),
        "waves": (2, 4),
    },
    "post_res_fwd": {"block_c": (256, 512, 1024, 2048), "num_warps": (2, 4, 8, 16)},
    "post_res_bwd": {"block_c": (32, 64, 128, 256), "num_warps": (1, 2, 4, 8), "num_stages": (2, 3, 4)},
    "post_res_coef_fwd": {"block_t": (32, 64), "block_c": (16, 32, 64), "num_warps": (4, 8), "num_stages": (2, 3, 4, 5)},
    # the same kernel with the next pre-mix (the transition as the models run it): the token tile sets
    # how much x_{l+1} the resident programs have written before reading it back from L2; fewer
    # stages let two programs share a multiprocessor, one streaming while the other runs its
    # epilogue (64 tokens do not fit in shared memory at 4 stages)
    "post_res_coef_mix_fwd": {"block_t": (16, 32), "block_c_mix": (128, 256), "num_warps": (4, 8), "num_stages": (2, 3, 4)},
    # the chained backward's dh_pre (one token a program): blocks past C are masked, so one step of
    # 2048 can stand in for five of 256 at C = 1280
    "pre_mix_dh": {"block_c": (128, 256, 512, 1024, 2048), "num_warps": (2, 4, 8)},
    # the same with the branch RMSNorm: y scaled in place after the pre-mix (from L2), or formed over
    # whole rows and never stored
    "post_res_coef_norm_fwd": {
        "block_t": (16, 32),
        "block_c_mix": (128, 256),
        "num_warps": (4, 8),
        "num_stages": (2, 3, 4),
        "whole_rows": (False, True),
    },
    # the dh pass through the branch norm: 2n + 1 sums a token instead of n
    "norm_dh": {"block_c": (256, 512, 1024, 2048), "num_warps": (2, 4, 8)},
    # the transition backward's one stream pass (with the pre-mix's h_pre ⊗ dy); tiles of all n
    # streams: 64 x 64 at 4 warps spills registers, and at 16 warps (at most 128 registers a
    # thread) only 32 x 32 with the late prefetch does not (benchmarks/registers.py)
    "transition_bwd": {
        "block_t": (16, 32, 64),
        "block_c": (16, 32, 64),
        "num_warps": (4, 8, 16),
        "late_prefetch": (False, True),
        "waves": (2, 4),
    },
    # the same with the branch norm's backward (dy formed from dz and the recomputed y)
    "transition_bwd_norm": {
        "block_t": (16, 32),
        "block_c": (16, 32, 64),
        "num_warps": (4, 8),
        "late_prefetch": (False, True),
        "waves": (2, 4),
    },
}


def configs(kernel: str, narrowed: dict[str, tuple] | None = None) -> list[dict]:
    """Every combination of ``kernel``'s candidate values in GRIDS, those of the options in
    ``narrowed`` (from ``--grid``) replaced."""
    grid = {**GRIDS[kernel], **{key: values for key, values in (narrowed or {}).items() if key in GRIDS[kernel]}}
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def parse_grid(items: list[str], kernels: list[str]) -> dict[str, tuple]:
    """``--grid`` arguments ``KEY=V1,V2`` -> ``{KEY: (V1, V2)}``; values are integers or true/false,
    and each key must be an option that one of ``kernels`` sweeps."""
    narrowed: dict[str, tuple] = {}
    known = sorted({key for kernel in kernels for key in GRIDS[kernel]})
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"--grid takes KEY=V1,V2,...; got {item!r}.")
        if key not in known:
            raise ValueError(f"--grid: {key!r} is not an option the chosen kernels sweep ({', '.join(known)}).")
        try:
            narrowed[key] = tuple(_grid_value(word) for word in values.split(","))
        except ValueError:
            raise ValueError(f"--grid: the values of {key!r} must be integers or true/false; got {values!r}.") from None
    return narrowed


def _grid_value(word: str) -> int | bool:
    lowered = word.lower()
    return lowered == "true" if lowered in ("true", "false") else int(word)


def make_case(
    kernel: str, t: int, c: int, n: int, dtype: str = "bf16", device: str = "cuda"
) -> tuple[Callable[..., object], int]:
    """``(run(**config) -> outputs, bytes the kernel must move)`` on fresh random inputs; ``dtype``
    of the streams: "bf16" or "fp32"."""
    from torchmhc.kernels.coefficients_op import (
        coefficients_bwd_tokens,
        coefficients_bwd_x,
        coefficients_fwd,
    )
    from torchmhc.kernels.post_res_coefficients_op import (
        post_res_coefficients_fwd,
        post_res_coefficients_pre_mix_fwd,
        post_res_coefficients_pre_mix_norm_fwd,
    )
    from torchmhc.kernels.post_res_op import post_res_bwd, post_res_fwd
    from torchmhc.kernels.pre_mix_op import pre_mix_dh
    from torchmhc.kernels.transition_backward_op import norm_dh, transition_bwd_streams

    torch.manual_seed(0)
    dev = device
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    x = torch.randn(t, n, c, device=dev, dtype=dt)
    rows = n * n + 2 * n
    fn = torch.randn(rows, n * c, device=dev) / (n * c) ** 0.5
    scale = torch.rand(3, device=dev) + 0.5
    base = torch.randn(rows, device=dev)
    stream_bytes = t * n * c * x.element_size()
    channel_bytes = t * c * x.element_size()
    small = t * (3 * n * n + 4 * n + 40) * 4
    if kernel == "coef_fwd":
        return (lambda **kw: coefficients_fwd(x, fn, scale, base, 20, 1e-6, 1e-6, 2.0, **kw)), stream_bytes + small
    saved = coefficients_fwd(x, fn, scale, base, 20, 1e-6, 1e-6, 2.0)[3:]
    d_h = (torch.randn(t, n, device=dev), torch.randn(t, n, device=dev), torch.randn(t, n, n, device=dev))
    if kernel == "coef_bwd_tokens":
        return (lambda **kw: coefficients_bwd_tokens(*saved, scale, base, *d_h, n * c, 20, 1e-6, 2.0, **kw)), small
    dm = coefficients_bwd_tokens(*saved, scale, base, *d_h, n * c, 20, 1e-6, 2.0)[:2]
    if kernel == "coef_bwd_x":
        return (lambda **kw: coefficients_bwd_x(x, fn, *dm, **kw)), 2 * stream_bytes + small
    f_out = torch.randn(t, c, device=dev, dtype=dt)
    if kernel == "pre_mix_dh":  # f_out stands in for the layer input's gradient
        return (lambda **kw: pre_mix_dh(f_out, x, **kw)), stream_bytes + channel_bytes + t * n * 4
    h_pre, weight, rnorm = torch.rand(t, n, device=dev), torch.rand(c, device=dev) + 0.5, torch.rand(t, device=dev)
    if kernel == "norm_dh":  # f_out stands in for the normalized layer input's gradient
        return (lambda **kw: norm_dh(f_out, x, h_pre, weight, rnorm, **kw)), stream_bytes + channel_bytes + t * (n + 3) * 4
    if kernel == "coef_bwd_x_chained":
        add, mix = torch.randn_like(x), (f_out, torch.rand(t, n, device=dev))
        return (lambda **kw: coefficients_bwd_x(x, fn, *dm, add=add, mix=mix, **kw)), 3 * stream_bytes + channel_bytes + small
    h_post = 2 * torch.rand(t, n, device=dev)
    h_res = torch.rand(t, n, n, device=dev)
    if kernel == "post_res_fwd":
        return (lambda **kw: post_res_fwd(x, f_out, h_post, h_res, **kw)), 2 * stream_bytes + channel_bytes
    transition = (x, f_out, h_post, h_res, fn, scale, base, 20, 1e-6, 1e-6, 2.0)
    if kernel == "post_res_coef_fwd":
        return (lambda **kw: post_res_coefficients_fwd(*transition, **kw)), 2 * stream_bytes + channel_bytes + small
    if kernel == "post_res_coef_mix_fwd":
        return (lambda **kw: post_res_coefficients_pre_mix_fwd(*transition, **kw)), 2 * stream_bytes + 2 * channel_bytes + small
    if kernel == "post_res_coef_norm_fwd":  # the bytes of the pass without the norm (y's rescale is meant to stay in L2)
        normed = (*transition[:7], weight, *transition[7:], 1e-6)
        return (lambda **kw: post_res_coefficients_pre_mix_norm_fwd(*normed, **kw)), 2 * stream_bytes + 2 * channel_bytes + small
    g = torch.randn_like(x)
    if kernel == "transition_bwd":  # x stands in for both x_l and x_{l+1}; g for x_{l+1}'s gradient
        mix = (f_out, torch.rand(t, n, device=dev))
        return (lambda **kw: transition_bwd_streams(x, f_out, h_post, h_res, fn, *dm, g, mix, **kw)), (
            2 * stream_bytes + 3 * channel_bytes + stream_bytes + small
        )
    if kernel == "transition_bwd_norm":  # as transition_bwd; f_out also stands in for dz
        mix, norm = (f_out, h_pre), (weight, rnorm, torch.rand(t, device=dev))
        return (lambda **kw: transition_bwd_streams(x, f_out, h_post, h_res, fn, *dm, g, mix, norm=norm, **kw)), (
            2 * stream_bytes + 3 * channel_bytes + stream_bytes + small
        )
    return (lambda **kw: post_res_bwd(g, x, f_out, h_post, h_res, **kw)), 3 * stream_bytes + 2 * channel_bytes


def _compile_worker(job: tuple[str, int, int, int, str, list[dict]]) -> list[str]:
    """Runs each configuration once (compiling it into Triton's disk cache); returns errors."""
    kernel, t, c, n, dtype, cfgs = job
    run, _ = make_case(kernel, t, c, n, dtype)
    errors = []
    for cfg in cfgs:
        try:
            run(**cfg)
        except Exception as e:  # out of shared memory or registers: reported, then skipped
            errors.append(f"{cfg}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    torch.cuda.synchronize()
    return errors


def precompile(kernel: str, t: int, c: int, n: int, dtype: str, workers: int, narrowed: dict[str, tuple]) -> None:
    cfgs = configs(kernel, narrowed)
    chunks = [cfgs[i::workers] for i in range(workers) if cfgs[i::workers]]
    with mp.get_context("spawn").Pool(len(chunks)) as pool:
        for errors in pool.map(_compile_worker, [(kernel, t, c, n, dtype, chunk) for chunk in chunks]):
            for e in errors:
                print(f"  compile failed {e}", flush=True)


def _tuple(out: object) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def sweep(kernel: str, t: int, c: int, n: int, dtype: str, copy_tbps: float, narrowed: dict[str, tuple]) -> None:
    from torchmhc.bench import bench  # GPU time of a CUDA-graph replay

    run, nbytes = make_case(kernel, t, c, n, dtype)
    reference = run()
    results = []
    for cfg in configs(kernel, narrowed):
        try:
            out = run(**cfg)
        except Exception:
            continue  # reported by the compile pass
        err = max(rel_err(a, b) for a, b in zip(_tuple(out), _tuple(reference)))
        ms = bench(lambda: run(**cfg))
        results.append((ms, cfg, err))
    default_ms = bench(run)

    def line(label: str, ms: float, cfg: object, err: float | None = None) -> str:
        pct = 100 * nbytes / (ms * 1e-3) / 1e12 / copy_tbps
        tail = "" if err is None else f"  rel. err vs default {err:.1e}"
        return f"  {label:8s} {ms * 1e3:8.1f} µs {pct:5.1f}% of copy  {cfg}{tail}"

    print(f"{kernel} [T={t} C={c} n={n} {dtype}] {len(results)} configurations", flush=True)
    print(line("default", default_ms, "launcher defaults"))
    for ms, cfg, err in sorted(results, key=lambda r: r[0])[:6]:
        print(line("", ms, cfg, err) + ("  <-- MISMATCH" if err > 2e-2 else ""), flush=True)


def profile_once(kernels: list[str], t: int, c: int, n: int, dtype: str) -> None:
    """One launch of each kernel's defaults inside the CUDA profiler's range (``--ncu``)."""
    runs = [make_case(kernel, t, c, n, dtype)[0] for kernel in kernels]
    for run in runs:  # compile and warm up outside the range
        run()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for run in runs:
        run()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="16384x4096", help="TxC")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="stream dtype")
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--ncu", action="store_true", help="no sweep: the defaults once, for Nsight Compute")
    parser.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                        help="sweep only these values of an option (e.g. num_warps=8,16 late_prefetch=true)")  # fmt: skip
    args = parser.parse_args()
    try:
        narrowed = parse_grid(args.grid, args.kernels)
    except ValueError as e:
        parser.error(str(e))
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/tune.py needs a CUDA device")
    t, c = (int(v) for v in args.shape.lower().split("x"))
    if args.ncu:
        profile_once(args.kernels, t, c, args.streams, args.dtype)
        return
    from torchmhc.bench import copy_rate

    copy_tbps = copy_rate()
    print(f"{torch.cuda.get_device_name()}: copy {copy_tbps:.2f} TB/s", flush=True)
    for kernel in args.kernels:
        t0 = time.time()
        precompile(kernel, t, c, args.streams, args.dtype, args.workers, narrowed)
        print(f"{kernel}: compiled {len(configs(kernel, narrowed))} configurations in {time.time() - t0:.0f} s", flush=True)
        sweep(kernel, t, c, args.streams, args.dtype, copy_tbps, narrowed)


if __name__ == "__main__":
    main()
