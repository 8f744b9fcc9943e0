"""Kernel benchmark (GPU): correctness against the reference first, then median timings.

For every shape: each fused kernel forward and backward, and one whole mHC sub-layer (coefficients,
pre-mix, identity branch, post-res) forward + backward, side by side with the reference in torch
eager and under torch.compile; then the same for the original HC's coefficients and sub-layer
("hc ..." rows). Bandwidth counts the bytes each operation must move (every input
read once, every output written once) and is compared with a device-to-device copy measured in the
same run. Times are GPU times: each operation is replayed from a CUDA graph (see :func:`bench`),
except the torch-eager reference, timed as launched.

    torchmhc bench [--shapes 16384x4096 ...] [--streams 4 2 8] [--no-compile] [--out FILE.md]

(``python -m torchmhc.bench`` is the same; needs a CUDA GPU and Triton.)
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton.testing
from torch import Tensor

from torchmhc import functional as ref
from torchmhc.kernels import hc_coefficients, hc_pre, mhc_coefficients, mhc_post_pre, mhc_pre, post_res, pre_mix, use_kernels
from torchmhc.kernels._common import channel_block
from torchmhc.kernels.coefficients_op import coefficients_bwd, coefficients_bwd_tokens, coefficients_bwd_x, coefficients_fwd
from torchmhc.kernels.hc_coefficients_op import WIDTH, hc_coefficients_bwd, hc_coefficients_fwd
from torchmhc.kernels.post_res_coefficients_op import post_res_coefficients_fwd, post_res_coefficients_pre_mix_fwd
from torchmhc.kernels.post_res_op import post_res_bwd, post_res_fwd
from torchmhc.kernels.pre_mix_op import pre_mix_bwd, pre_mix_dh, pre_mix_fwd
from torchmhc.kernels.transition_backward_op import transition_bwd_streams

DEFAULT_SHAPES = ["16384x4096", "8192x7168", "65536x1280"]


@dataclass
class Row:
    op: str
    shape: str
    impl: str
    ms: float
    nbytes: int

    def tbps(self) -> float:
        return self.nbytes / (self.ms * 1e-3) / 1e12


def bench(fn: Callable[[], object], *, graph: bool = True, label: str = "") -> float:
    """Median milliseconds of the GPU work of ``fn``: CUDA events around each run, L2 flushed
    between runs (``triton.testing.do_bench``). With ``graph`` (default), ``fn`` is captured once
    in a CUDA graph and the graph is replayed: the time is then the kernels' own, not that of the
    host's launch path, which for small kernels can exceed it and leave the GPU waiting (measured
    apart by ``benchmarks/overhead.py``). Work that cannot be captured is timed as launched (and
    ``label`` is printed with the reason)."""
    if graph:
        replay = _captured(fn, label)
        if replay is not None:
            fn = replay
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _captured(fn: Callable[[], object], label: str = "") -> Callable[[], object] | None:
    """``fn`` recorded in a CUDA graph (after warm-up runs on a side stream), or None if it cannot be."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            for _ in range(3):  # allocator, autotuning and lazy initialization settle before capture
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # noqa: BLE001 - report and time it as launched
        print(f"  ({label or 'operation'} not captured in a CUDA graph, timed as launched: {type(exc).__name__}: {exc})"[:240], flush=True)
        torch.cuda.synchronize()
        return None
    return graph.replay


def copy_rate() -> float:
    """Measured device-to-device copy rate in TB/s (bytes read + bytes written)."""
    src = torch.randn(2**28, device="cuda", dtype=torch.bfloat16)  # 512 MiB, far larger than L2
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), graph=False)  # one large copy: no launch cost to remove
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e12


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def sublayer(impl, x, fn, scale, base):
    """One mHC sub-layer with an identity branch: F(y) = y. ``impl.pre`` returns (layer input,
    streams for the post-res, coefficients), as ``torchmhc.kernels.mhc_pre`` does."""
    layer_input, x_for_post, (_h_pre, h_post, h_res) = impl.pre(x, fn, scale, base)
    return impl.post_res(x_for_post, layer_input, h_post, h_res)


def correct(label: str, errs: dict[str, float]) -> bool:
    """Prints the relative errors against the reference; False (timings skipped) if one is >= 2e-2."""
    print(f"{label} rel. errors vs reference: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()), flush=True)
    bad = [k for k, v in errs.items() if not v < 2e-2]
    if bad:
        print(f"{label} CORRECTNESS FAILED for {bad}; skipping timings", flush=True)
    return not bad


def time_sublayers(
    rows: list[Row],
    op: str,
    shape: str,
    fused: list[tuple[str, object]],
    reference: object,
    inputs: tuple[Tensor, ...],
    grad: Tensor,
    nbytes: int,
    compile_ref: bool,
) -> None:
    """One row each for :func:`sublayer` forward + backward with every ``(name, impl)`` in ``fused``
    (kernels), the ``reference`` in torch eager (timed as launched: its coefficient backward breaks
    a CUDA-graph capture) and, with ``compile_ref``, the reference under torch.compile.
    ``inputs``: ``(x, fn, scale, base)``; ``grad``: the gradient of the output streams."""
    runs = [(name, impl, lambda f: f) for name, impl in fused] + [("torch eager", reference, lambda f: f)]
    if compile_ref:
        runs.append(("torch.compile", reference, lambda f: torch.compile(f, dynamic=False)))
    for impl_name, impl, wrap in runs:
        xr, *params = (t.detach().requires_grad_() for t in inputs)
        f = wrap(lambda x_, *p, impl=impl: sublayer(impl, x_, *p))

        def step(f=f, xr=xr, params=params):
            torch.autograd.grad(f(xr, *params), [xr, *params], grad)

        with use_kernels("reference" if impl is reference else "triton"):
            timed = bench(step, graph=impl_name != "torch eager", label=f"{impl_name} {op}")
            rows.append(Row(op, shape, impl_name, timed, nbytes))


class _Fused:
    """torchmhc's kernels as HyperConnection runs them: coefficients + pre-mix with chained x-gradients."""

    pre = staticmethod(mhc_pre)
    post_res = staticmethod(post_res)


class _FusedUnchained:
    """The same kernels, x's three gradients summed by autograd (two extra passes over dx)."""

    @staticmethod
    def pre(x, fn, scale, base):
        coefficients = mhc_coefficients(x, fn, scale, base)
        return pre_mix(x, coefficients.h_pre), x, coefficients

    post_res = staticmethod(post_res)


class _Reference:
    """The plain-PyTorch reference ops."""

    @staticmethod
    def pre(x, fn, scale, base):
        coefficients = ref.mhc_coefficients(x, fn, scale, base)
        return ref.pre_mix(x, coefficients.h_pre), x, coefficients

    post_res = staticmethod(ref.post_res)


def check(x, fn, scale, base) -> dict[str, float]:
    """Relative errors of the fused sub-layer (outputs and all gradients) against the fp32 reference."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, fn, scale, base)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, fn, scale, base)]
    with use_kernels("triton"):
        out = sublayer(_Fused, *leaves)
        coef = mhc_coefficients(*leaves)
    ref_out = sublayer(_Reference, *ref_leaves)
    ref_coef = ref.mhc_coefficients(*ref_leaves)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, g)
    errs = {"out": rel_err(out, ref_out)}
    errs.update({k: rel_err(a, b) for k, a, b in zip(("h_pre", "h_post", "h_res"), coef, ref_coef)})
    errs.update({f"d{k}": rel_err(a, b) for k, a, b in zip(("x", "fn", "scale", "base"), grads, ref_grads)})
    return errs


def run_shape(t: int, c: int, n: int, compile_ref: bool, rows: list[Row]) -> None:
    shape = f"T={t} C={c} n={n}"
    dev = "cuda"
    torch.manual_seed(0)
    x = torch.randn(t, n, c, device=dev, dtype=torch.bfloat16)
    nr = n * n + 2 * n
    fn = torch.randn(nr, n * c, device=dev) / (n * c) ** 0.5
    scale = torch.rand(3, device=dev) + 0.5
    base = torch.randn(nr, device=dev)
    errs = check(x, fn, scale, base)
    if not correct(f"[{shape}]", errs):
        return

    e = 2  # bytes per bf16 element
    tok = t * n * c * e  # one read or write of the streams
    ch = t * c * e  # one read or write of a [T, C] tensor
    small = t * (3 * n * n + 4 * n + 40) * 4  # coefficient-sized fp32 traffic (order of magnitude)
    h_pre = torch.rand(t, n, device=dev)
    h_post = 2 * torch.rand(t, n, device=dev)
    h_res = torch.rand(t, n, n, device=dev)
    f_out = torch.randn(t, c, device=dev, dtype=torch.bfloat16)
    g_c = torch.randn(t, c, device=dev, dtype=torch.bfloat16)
    g_nc = torch.randn_like(x)

    fw = coefficients_fwd(x, fn, scale, base, 20, 1e-6, 1e-6, 2.0)
    d_h = (torch.randn(t, n, device=dev), torch.randn(t, n, device=dev), torch.randn(t, n, n, device=dev))

    ops: list[tuple[str, int, Callable[[], object]]] = [
        ("coefficients fwd", tok + small, lambda: coefficients_fwd(x, fn, scale, base, 20, 1e-6, 1e-6, 2.0)),
        ("coefficients bwd", 2 * tok + small, lambda: coefficients_bwd(x, fn, scale, base, *fw[3:], *d_h, 20, 1e-6, 2.0)),
        ("pre_mix fwd", tok + ch, lambda: pre_mix_fwd(x, h_pre)),
        ("pre_mix bwd", 2 * tok + ch, lambda: pre_mix_bwd(g_c, x, h_pre)),
        ("post_res fwd", 2 * tok + ch, lambda: post_res_fwd(x, f_out, h_post, h_res)),
        ("post_res bwd", 3 * tok + 2 * ch, lambda: post_res_bwd(g_nc, x, f_out, h_post, h_res)),
        # as the chained sub-layer's backward runs them (mhc_pre): dh_pre alone, then one dx pass
        # that sums the coefficients', the pre-mix's (h_pre ⊗ dy) and the post-res gradient of x
        ("pre_mix dh (chained bwd)", tok + ch + small, lambda: pre_mix_dh(g_c, x)),
        (
            "coefficients bwd + pre-mix dx + add (chained bwd)",
            3 * tok + ch + small,
            lambda: coefficients_bwd(x, fn, scale, base, *fw[3:], *d_h, 20, 1e-6, 2.0, add=g_nc, mix=(g_c, h_pre)),
        ),
    ]
    # the two steps of the coefficient backward on their own
    def bwd_tokens():
        return coefficients_bwd_tokens(*fw[3:], scale, base, *d_h, n * c, 20, 1e-6, 2.0)

    steps = bwd_tokens()
    ops += [
        ("  coefficients bwd: σ'+Sinkhorn step", small, bwd_tokens),
        ("  coefficients bwd: dx+dfn step", 2 * tok, lambda: coefficients_bwd_x(x, fn, *steps[:2])),
    ]
    # cross-sub-layer fusion: post-res of sub-layer l + coefficients of l+1 (same parameters here)
    transition = (x, f_out, h_post, h_res, fn, scale, base, 20, 1e-6, 1e-6, 2.0)

    def transition_then_pre_mix():
        x_next, h_pre2, *_ = post_res_coefficients_fwd(*transition)
        return pre_mix_fwd(x_next, h_pre2)

    ops += [
        ("post_res + next coefficients fwd (fused)", 2 * tok + ch + small, lambda: post_res_coefficients_fwd(*transition)),
        # the transition as mhc_post_pre runs it: with the next pre-mix in the same kernel (reading
        # back x_{l+1} from L2), and the previous form, the fused pass then the pre-mix kernel
        ("post_res + next coefficients + pre-mix fwd (fused)", 2 * tok + 2 * ch + small,
         lambda: post_res_coefficients_pre_mix_fwd(*transition)),
        ("post_res + next coefficients fwd (fused), then pre_mix fwd", 3 * tok + 2 * ch + small, transition_then_pre_mix),
    ]  # fmt: skip
    # the transition backward's stream work after the steps both forms share (the pre-mix's dh and the
    # σ/Sinkhorn step): the coefficient dx pass (x_{l+1}'s gradient written) and then the post-res
    # backward, or one pass (transition_backward_op: that gradient kept on-chip, x_{l+1} recomputed;
    # its per-channel-block partial sums of dh_post and dh_res counted as traffic). x stands in for
    # both x_l and x_{l+1}
    partials = 2 * (c // channel_block(c, 32)) * t * (n + n * n) * 4

    def transition_bwd_two_passes():
        d_total, _ = coefficients_bwd_x(x, fn, *steps[:2], add=g_nc, mix=(g_c, h_pre))
        return post_res_bwd(d_total, x, f_out, h_post, h_res)

    ops += [
        ("transition bwd streams: dx pass, then post_res bwd", 6 * tok + 3 * ch + small, transition_bwd_two_passes),
        ("transition bwd streams: one pass", 3 * tok + 3 * ch + small + partials,
         lambda: transition_bwd_streams(x, f_out, h_post, h_res, fn, *steps[:2], g_nc, (g_c, h_pre))),
    ]  # fmt: skip
    for name, nbytes, fn_ in ops:
        rows.append(Row(name, shape, "torchmhc triton", bench(fn_, label=name), nbytes))

    # reference: eager and compiled, forward and backward of each operation
    def ref_coef(x_):
        return ref.mhc_coefficients(x_, fn, scale, base)

    def ref_pre(x_):
        return ref.pre_mix(x_, h_pre)

    def ref_post(x_):
        return ref.post_res(x_, f_out, h_post, h_res)

    impls: list[tuple[str, Callable]] = [("torch eager", lambda f: f)]
    if compile_ref:
        impls.append(("torch.compile", lambda f: torch.compile(f, dynamic=False)))
    for impl_name, wrap in impls:
        # torch eager's coefficient backward breaks a CUDA-graph capture, and a failed capture kept
        # its memory pool (the next shapes ran out of memory): the eager reference is timed as launched
        eager_graph = impl_name != "torch eager"
        for name, nbytes_f, nbytes_b, f in (
            ("coefficients", tok + small, 2 * tok + small, ref_coef),
            ("pre_mix", tok + ch, 2 * tok + ch, ref_pre),
            ("post_res", 2 * tok + ch, 3 * tok + 2 * ch, ref_post),
        ):
            wf = wrap(f)
            xr = x.detach().requires_grad_()
            rows.append(Row(f"{name} fwd", shape, impl_name, bench(lambda: wf(xr), graph=eager_graph, label=f"{impl_name} {name} fwd"), nbytes_f))
            out = wf(xr)
            outs = list(out) if isinstance(out, tuple) else [out]
            grads = [torch.randn_like(o) for o in outs]
            rows.append(
                Row(f"{name} bwd", shape, impl_name,
                    bench(lambda: torch.autograd.grad(outs, xr, grads, retain_graph=True), graph=eager_graph,
                          label=f"{impl_name} {name} bwd"), nbytes_b)
            )  # fmt: skip

    # whole sub-layer, identity branch, forward + backward
    sub_bytes = (5 * n + 2) * ch + (13 * n + 3) * ch  # the unfused decomposition's traffic (reference only)
    # (the unchained kernels only show what the gradient chaining saves)
    impls = [("torchmhc triton", _Fused), ("torchmhc triton, unchained", _FusedUnchained)]
    time_sublayers(rows, "sub-layer fwd+bwd", shape, impls, _Reference, (x, fn, scale, base), g_nc, sub_bytes, compile_ref)

    # two sub-layers (identity branches): the first one's post-res fused with the second one's
    # coefficients and pre-mix (mhc_post_pre, as the models run it; or with the pre-mix as a kernel
    # of its own) against the two one by one
    def two_sublayers(fused: bool, fused_pre_mix: bool = True, one_pass: bool | None = None) -> Callable[[], None]:
        params = [p.detach().requires_grad_() for p in (fn, scale, base)]
        xr = x.detach().requires_grad_()

        def step():
            u, x_pass, (_, hp, hr) = mhc_pre(xr, *params)
            if fused:
                u2, x2, (_, hp2, hr2) = mhc_post_pre(
                    x_pass, u, hp, hr, *params, fused_pre_mix=fused_pre_mix, one_pass_backward=one_pass
                )
            else:
                u2, x2, (_, hp2, hr2) = mhc_pre(post_res(x_pass, u, hp, hr), *params)
            torch.autograd.grad(post_res(x2, u2, hp2, hr2), [xr, *params], g_nc)

        return step

    with use_kernels("triton"):
        for impl_name, variant in (
            ("torchmhc triton, fused transition", (True,)),
            ("torchmhc triton, fused transition, two-pass backward", (True, True, False)),
            ("torchmhc triton, fused transition, separate pre-mix", (True, False)),
            ("torchmhc triton", (False,)),
        ):
            rows.append(Row("two sub-layers fwd+bwd", shape, impl_name, bench(two_sublayers(*variant), label=f"{impl_name} two sub-layers"), 2 * sub_bytes))


def run_hc_shape(t: int, c: int, n: int, compile_ref: bool, rows: list[Row]) -> None:
    """The original HC's coefficients (``hc_coefficients_op.py``), forward and backward, fused and as
    the reference, and a whole HC sub-layer as ``HyperConnection(residual="hc")`` runs it (chained
    coefficients + pre-mix, post-res, identity branch) against the reference ops."""
    shape = f"T={t} C={c} n={n}"
    dev = "cuda"
    torch.manual_seed(0)
    x = torch.randn(t, n, c, device=dev, dtype=torch.bfloat16)
    fn = 1.5 * torch.randn(n + 2, c, device=dev) / c**0.5  # projections of std 1.5: tanh's curved range
    scale = torch.rand(3, device=dev) + 0.5
    base = torch.randn(n * n + 2 * n, device=dev)
    leaves = [t_.detach().clone().requires_grad_() for t_ in (x, fn, scale, base)]
    with use_kernels("triton"):
        coef = hc_coefficients(*leaves)
    ref_coef = ref.hc_coefficients(*leaves)
    g = [torch.randn_like(h) for h in coef]
    errs = {k: rel_err(a, b) for k, a, b in zip(("h_pre", "h_post", "h_res"), coef, ref_coef)}
    grads, ref_grads = torch.autograd.grad(coef, leaves, g), torch.autograd.grad(ref_coef, leaves, g)
    errs.update({f"d{k}": rel_err(a, b) for k, a, b in zip(("x", "fn", "scale", "base"), grads, ref_grads)})
    if not correct(f"[{shape}] HC", errs):
        return

    e = 2  # bytes per bf16 element
    tok = t * n * c * e
    ch = t * c * e
    # fp32 per token: coefficients (n² + 2n) read or written twice, saved m and rinv (and dm, cx) per stream
    small = t * (2 * (n * n + 2 * n) + 2 * n * (WIDTH + 1)) * 4
    fw = hc_coefficients_fwd(x, fn, scale, base, 1e-6)
    d_h = [torch.randn_like(h) for h in fw[:3]]
    h_pre = torch.rand(t, n, device=dev)
    g_c = torch.randn(t, c, device=dev, dtype=torch.bfloat16)
    g_nc = torch.randn_like(x)
    for name, nbytes, fn_ in (
        ("hc coefficients fwd", tok + small, lambda: hc_coefficients_fwd(x, fn, scale, base, 1e-6)),
        ("hc coefficients bwd", 2 * tok + small, lambda: hc_coefficients_bwd(x, fn, scale, *fw[3:], *d_h)),
        (
            "hc coefficients bwd + pre-mix dx + add (chained bwd)", 3 * tok + ch + small,
            lambda: hc_coefficients_bwd(x, fn, scale, *fw[3:], *d_h, add=g_nc, mix=(g_c, h_pre)),
        ),
    ):  # fmt: skip
        rows.append(Row(name, shape, "torchmhc triton", bench(fn_, label=name), nbytes))

    impls: list[tuple[str, Callable]] = [("torch eager", lambda f: f)]
    if compile_ref:
        impls.append(("torch.compile", lambda f: torch.compile(f, dynamic=False)))
    for impl_name, wrap in impls:
        wf = wrap(lambda x_: ref.hc_coefficients(x_, fn, scale, base))
        xr = x.detach().requires_grad_()
        eager_graph = impl_name != "torch eager"  # as for the mHC reference above
        timed = bench(lambda: wf(xr), graph=eager_graph, label=f"{impl_name} hc fwd")
        rows.append(Row("hc coefficients fwd", shape, impl_name, timed, tok + small))
        outs = list(wf(xr))
        rows.append(
            Row("hc coefficients bwd", shape, impl_name,
                bench(lambda: torch.autograd.grad(outs, xr, d_h, retain_graph=True), graph=eager_graph,
                      label=f"{impl_name} hc bwd"), 2 * tok + small)
        )  # fmt: skip

    class _FusedHC:
        pre = staticmethod(hc_pre)
        post_res = staticmethod(post_res)

    class _ReferenceHC:
        @staticmethod
        def pre(x_, *p):
            coefficients = ref.hc_coefficients(x_, *p)
            return ref.pre_mix(x_, coefficients.h_pre), x_, coefficients

        post_res = staticmethod(ref.post_res)

    sub_bytes = (5 * n + 2) * ch + (13 * n + 3) * ch  # as the mHC sub-layer row: the unfused traffic
    time_sublayers(
        rows, "hc sub-layer fwd+bwd", shape, [("torchmhc triton", _FusedHC)], _ReferenceHC, (x, fn, scale, base), g_nc,
        sub_bytes, compile_ref,
    )  # fmt: skip


def to_markdown(rows: list[Row], device: str, copy_tbps: float, command: str) -> str:
    lines = [
        f"# Kernel benchmark: {device}",
        "",
        f"Command: `{command}`",
        "",
        f"Measured device-to-device copy: **{copy_tbps:.2f} TB/s** (bytes read + written). bf16 streams.",
        "TB/s counts the bytes each operation must move (inputs read once, outputs written once); the",
        "sub-layer row counts the traffic of the unfused reference decomposition, for comparison only.",
        "",
        "| operation | shape | implementation | median µs | TB/s | % of copy |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.op} | {r.shape} | {r.impl} | {r.ms * 1e3:.1f} | {r.tbps():.2f} | {100 * r.tbps() / copy_tbps:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="torchmhc bench", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="TxC token count x channels")
    p.add_argument("--streams", nargs="+", type=int, default=[4], help="values of n")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    p.add_argument("--compile-first-only", action="store_true", help="torch.compile only for the first shape")
    p.add_argument("--out", default=None, help="markdown file for the table")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("torchmhc bench: needs a CUDA device (the kernels it times run on the GPU)")
    device = torch.cuda.get_device_name()
    copy_tbps = copy_rate()
    print(f"{device}: copy {copy_tbps:.2f} TB/s", flush=True)
    rows: list[Row] = []
    first = True
    for n in args.streams:
        for s in args.shapes:
            t, c = (int(v) for v in s.lower().split("x"))
            t0 = time.time()
            compile_ref = not args.no_compile and (first or not args.compile_first_only)
            run_shape(t, c, n, compile_ref, rows)
            run_hc_shape(t, c, n, compile_ref, rows)
            # free this shape's CUDA-graph pools and cached blocks: the next shape's tensors would not fit
            gc.collect()
            torch.cuda.empty_cache()
            first = False
            print(f"[T={t} C={c} n={n}] done in {time.time() - t0:.0f} s", flush=True)
    table = to_markdown(rows, device, copy_tbps, "torchmhc bench " + " ".join(argv))
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
