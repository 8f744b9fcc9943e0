"""End-to-end training step time: residual vs HC vs mHC in the same language model.

    python benchmarks/e2e.py                         # gpu-small preset on the GPU
    python benchmarks/e2e.py --preset tiny --device cpu --steps 5 --warmup 2
    python benchmarks/e2e.py --set model.arch=moe --set data.batch_size=16

For each variant: build the model (same seed), run ``--warmup`` untimed steps, then time
``--steps`` full training steps (forward, backward, clip, AdamW) on a fixed random batch.
Reports median ms/step, tokens/s, peak memory (CUDA allocator), the overhead against the
residual baseline — the quantity the mHC paper puts at 6.7% for n = 4 with fused kernels — and
model FLOP utilization (MFU) against a bf16 matrix product timed in the same run, so that a slow
baseline (which would make the overhead look small) shows.
Prints a markdown table; ``--out FILE`` also writes it (results belong in
``benchmarks/results/<device>.md``, one file per device).
"""

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from torchmhc.config import load_config
from torchmhc.models import build_model
from torchmhc.train import autocast_context, build_optimizer, resolve_device, train_step

def matmul_tflops(device: torch.device) -> float:
    """Measured dense bf16 matmul rate (TFLOP/s) of an 8192³ product, median of 20."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times[5:]) / 1e12


def flops_per_token(model: torch.nn.Module, cfg) -> float:
    """Training FLOPs per token: 6 × parameters a token touches (routed experts at top_k/E) plus
    causal attention's 6·L·C·T (QKᵀ and AV, half the square, forward and backward)."""
    params = sum(p.numel() for p in model.parameters())
    params -= model.tok_emb.weight.numel() * (not cfg.model.tie_embeddings)  # a lookup, not a product
    m = cfg.model
    if m.arch == "moe":
        routed = sum(p.numel() for name, p in model.named_parameters() if name.endswith(("ffn.w_gate_up", "ffn.w_down")))
        params -= routed * (1 - m.top_k / m.num_experts)
    return 6 * params + 6 * m.num_layers * m.dim * cfg.data.seq_len


def time_variant(cfg, device: torch.device, *, steps: int, warmup: int) -> dict:
    """Median wall time of one training step of ``cfg``'s model, and peak memory."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    autocast = autocast_context(device, cfg.train.dtype)
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    x = torch.randint(0, cfg.model.vocab_size, shape, device=device)
    y = torch.randint(0, cfg.model.vocab_size, shape, device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        train_step(model, optimizer, (x, y), lr=cfg.optim.lr, grad_clip=cfg.optim.grad_clip,
                   on_nonfinite="skip", autocast=autocast, step=i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    return {
        "ms_per_step": ms,
        "ms_min": min(times) * 1e3,
        "tokens_per_s": shape[0] * shape[1] / (ms / 1e3),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "num_params": model.num_params(),
        "flops_per_token": flops_per_token(model, cfg),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpu-small")
    parser.add_argument("--variants", default="residual,hc,mhc")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = parser.parse_args()

    base = load_config(args.preset, [f"train.device={args.device}", *args.overrides])
    device = resolve_device(base.train.device)
    if base.train.num_threads:
        torch.set_num_threads(base.train.num_threads)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
    peak = matmul_tflops(device) if device.type == "cuda" else None
    rows = {}
    for variant in args.variants.split(","):
        cfg = replace(base, model=replace(base.model, residual=variant))
        rows[variant] = time_variant(cfg, device, steps=args.steps, warmup=args.warmup)
        print(variant, json.dumps(rows[variant]), flush=True)

    m, d = base.model, base.data
    lines = [
        f"# End-to-end training step, {name}",
        "",
        f"Preset `{args.preset}` ({m.arch}, {m.num_layers} blocks, dim {m.dim}, n = {m.num_streams}, "
        f"batch {d.batch_size} x {d.seq_len} tokens, dtype {base.train.dtype}); torch {torch.__version__}; "
        f"median of {args.steps} steps after {args.warmup} warm-up steps."
        + (f" Measured bf16 matmul rate: {peak:.0f} TFLOP/s." if peak else ""),
        "",
        "| variant | ms/step | tokens/s | overhead vs residual | peak memory (GiB) | params | model TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base_ms = rows.get("residual", {}).get("ms_per_step")
    for variant, r in rows.items():
        overhead = f"{100 * (r['ms_per_step'] / base_ms - 1):+.1f}%" if base_ms else "–"
        memory = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "–"
        tflops = r["tokens_per_s"] * r["flops_per_token"] / 1e12
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "–"
        lines.append(f"| {variant} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {overhead} | {memory} | "
                     f"{r['num_params'] / 1e6:.1f} M | {tflops:.0f} | {mfu} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
