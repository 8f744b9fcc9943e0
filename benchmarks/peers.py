"""torchmhc's kernels against the peers, in one process on one GPU (issue #4's acceptance run).

Peers (each skipped with a note if not installed): DeepSeek tile-kernels (``mhc_post_fwd``),
Liger-Kernel (``liger_mhc_coeffs`` / ``liger_mhc_pre`` / ``liger_mhc_post_res`` / ``LigerMHC``).
First a correctness check of every implementation against torchmhc's reference (fp32 math on the
same inputs), then median timings (``kernels.bench``: ``triton.testing.do_bench`` of a CUDA-graph
replay, so every implementation is timed on the GPU without its host launch cost) and achieved
TB/s against a device-to-device copy measured in the same run.

    PYTHONPATH=src python benchmarks/peers.py [--tokens 16384] [--dim 4096] [--streams 4] [--out FILE]

The peers travel to the GPU machine as wheels (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import importlib

import torch
from torchmhc.bench import bench, copy_rate, rel_err  # the same timing and error rules
from torch import nn

import torchmhc as mhc
from torchmhc import functional as ref
from torchmhc.kernels import mhc_coefficients, post_res, pre_mix, use_kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    T, C, n = args.tokens, args.dim, args.streams
    dev, bf16 = "cuda", torch.bfloat16
    torch.manual_seed(0)

    notes = []
    have_tile, have_liger = _importable("tile_kernels.mhc", notes), _importable("liger_kernel.transformers", notes)
    lines = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, T={T} C={C} n={n} bf16 streams"]

    copy_tbps = copy_rate()
    lines.append(f"device-to-device copy: {copy_tbps:.2f} TB/s")

    x = torch.randn(T, n, C, device=dev, dtype=bf16)
    f_out = torch.randn(T, C, device=dev, dtype=bf16)
    h_pre = torch.rand(T, n, device=dev)
    h_post = 2 * torch.rand(T, n, device=dev)
    h_res = mhc.sinkhorn_knopp(torch.randn(T, n, n, device=dev))
    fn = torch.randn(n * n + 2 * n, n * C, device=dev) / (n * C) ** 0.5
    scale = torch.full((3,), 0.5, device=dev)
    base = torch.randn(n * n + 2 * n, device=dev)

    # ---- correctness of every implementation on these inputs ------------------------------------
    expected_post = ref.post_res(x.float(), f_out.float(), h_post, h_res)
    expected_pre = ref.pre_mix(x.float(), h_pre)
    checks = []
    with use_kernels("triton"):
        checks.append(("torchmhc post_res", rel_err(post_res(x, f_out, h_post, h_res), expected_post)))
        checks.append(("torchmhc pre_mix", rel_err(pre_mix(x, h_pre), expected_pre)))
        ours = mhc_coefficients(x, fn, scale, base)
    theirs = ref.mhc_coefficients(x, fn, scale, base)
    checks.append(("torchmhc coefficients h_res", rel_err(ours.h_res, theirs.h_res)))
    if have_tile:
        from tile_kernels.mhc import mhc_post_fwd

        def tile_post():  # DeepSeek's comb orientation: comb[j, k] = H_res[k, j]
            return mhc_post_fwd(f_out[None], x[None], h_post[None, ..., None], comb[None])

        comb = h_res.transpose(-1, -2).contiguous()
        checks.append(("tile-kernels mhc_post_fwd", rel_err(tile_post()[0], expected_post)))
    if have_liger:
        from liger_kernel.transformers import LigerMHC
        from liger_kernel.transformers.functional import liger_mhc_coeffs, liger_mhc_post_res, liger_mhc_pre

        checks.append(("liger post_res", rel_err(liger_mhc_post_res(x, f_out, h_post, h_res), expected_post)))
        checks.append(("liger pre", rel_err(liger_mhc_pre(x, h_pre), expected_pre)))
        phi = (fn.T.contiguous()).to(bf16)  # Liger's recommended bf16 projection, [nC, M]
        alphas = [scale[i].clone() for i in range(3)]
        liger_res = liger_mhc_coeffs(x, phi, base, *alphas)[2]
        checks.append(("liger coefficients: max |row sum - 1|", (liger_res.float().sum(-1) - 1).abs().max().item()))
    lines.append("")
    lines.append("| correctness check (relative error vs fp32 reference) | value |")
    lines.append("| --- | ---: |")
    lines += [f"| {name} | {value:.2e} |" for name, value in checks]

    # ---- timings --------------------------------------------------------------------------------
    rows = []  # (operation, implementation, ms, bytes)
    post_bytes = x.numel() * 2 * 2 + f_out.numel() * 2 + T * (n + n * n) * 4
    pre_bytes = x.numel() * 2 + f_out.numel() * 2 + T * n * 4
    coef_bytes = x.numel() * 2 + T * (2 * n + n * n) * 4
    with use_kernels("triton"):
        rows.append(("post_res fwd", "torchmhc", bench(lambda: post_res(x, f_out, h_post, h_res)), post_bytes))
        rows.append(("pre_mix fwd", "torchmhc", bench(lambda: pre_mix(x, h_pre)), pre_bytes))
        rows.append(("coefficients fwd", "torchmhc", bench(lambda: mhc_coefficients(x, fn, scale, base)), coef_bytes))
    if have_tile:
        rows.append(("post_res fwd", "tile-kernels mhc_post_fwd", bench(tile_post), post_bytes))
    if have_liger:
        rows.append(("post_res fwd", "liger", bench(lambda: liger_mhc_post_res(x, f_out, h_post, h_res)), post_bytes))
        rows.append(("pre_mix fwd", "liger", bench(lambda: liger_mhc_pre(x, h_pre)), pre_bytes))
        rows.append(("coefficients fwd", "liger (bf16 phi)", bench(lambda: liger_mhc_coeffs(x, phi, base, *alphas)), coef_bytes))

    # one whole sub-layer, identity branch, forward + backward with every gradient
    grad = torch.randn_like(x)
    xg = x.clone().requires_grad_()

    def sublayer(module: nn.Module):
        params = list(module.parameters())
        return lambda: torch.autograd.grad(module(xg), [xg, *params], grad)

    ours_layer = mhc.HyperConnection(C, n, "mhc").to(dev)
    with use_kernels("triton"):
        rows.append(("sub-layer fwd+bwd", "torchmhc", bench(sublayer(_Wrapped(ours_layer))), 0))
    if have_liger:
        liger_layer = LigerMHC(nn.Identity(), hc=n, c=C, phi_dtype=bf16).to(dev)
        rows.append(("sub-layer fwd+bwd", "liger LigerMHC", bench(sublayer(liger_layer)), 0))

    lines.append("")
    lines.append("| operation | implementation | median µs | TB/s | % of copy |")
    lines.append("| --- | --- | ---: | ---: | ---: |")
    for op, impl, ms, nbytes in rows:
        tbps = nbytes / (ms * 1e-3) / 1e12 if nbytes else float("nan")
        share = f"{100 * tbps / copy_tbps:.0f}%" if nbytes else "—"
        lines.append(f"| {op} | {impl} | {1000 * ms:.0f} | {tbps:.2f} | {share} |" if nbytes else f"| {op} | {impl} | {1000 * ms:.0f} | — | — |")
    speedups = {op: {impl: ms for o, impl, ms, _ in rows if o == op} for op, *_ in rows}
    for op, impls in speedups.items():
        for impl, ms in impls.items():
            if impl != "torchmhc" and "torchmhc" in impls:
                lines.append(f"\n{op}: torchmhc is {ms / impls['torchmhc']:.2f}x {impl}")
    lines += [f"\n{note}" for note in notes]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


def _importable(module: str, notes: list[str]) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception as error:  # a peer that is missing or broken is skipped, with the reason
        notes.append(f"{module} skipped: {type(error).__name__}: {error}")
        return False


class _Wrapped(nn.Module):
    """HyperConnection around the identity branch, called like LigerMHC: ``module(x)``."""

    def __init__(self, hc: mhc.HyperConnection):
        super().__init__()
        self.hc = hc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hc(x, lambda h: h)


if __name__ == "__main__":
    main()
