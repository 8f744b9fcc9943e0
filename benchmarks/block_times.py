"""Per-block forward and backward times of a model shape: the input of ``pipeline_model.py``.

    python benchmarks/block_times.py --out benchmarks/results/block_times_h100.json     # on a GPU
    python benchmarks/block_times.py --shape gpu-moe-3b --device cpu --tokens 64 --set model.dim=64  # smoke

For each shape and each variant (``residual``, ``mhc``), one transformer block and the head (stream
head, final norm, LM head, loss) are timed on one microbatch of ``--tokens`` tokens (a sequence of
that length, or the shape's sequence length): the forward, the backward for the input gradient
(``torch.autograd.grad`` w.r.t. the input streams only: what a zero-bubble schedule's I step runs)
and for the weight gradient (the rest), bf16 under autocast on CUDA. Medians of ``--repeats``
after ``--warmup``. The blocks run eager unless ``--compile`` (torch.compile, default mode, as
the end-to-end presets compile them block by block). Eager times are upper bounds: on an H200 the
mHC block of gpu-moe-3b took 0.80 ms more forward than the residual one, where its kernels' bytes
take about 0.1 ms — the rest is host time of eager mode. A compiled backward computes the input and
weight gradients in one graph, so with ``--compile`` the input-gradient time holds the whole
backward and the weight-gradient time is about zero (schedules that split the two, ZBV, see
them as one).

Shapes: ``gpu-moe-3b`` (the preset: 12 blocks, C = 1280, seq 4096) and ``dsv3-27b``, a
DeepSeek-V3-like 27B MoE of our choosing (the mHC paper trains a 27B MoE but does not list its
width): 64 blocks, C = 2048, 16 heads, 64 routed experts (top 6) + 2 shared of 1024, vocabulary
129280, seq 4096 — 27.7 B parameters in the blocks.

The JSON: ``{"source", "device", "shapes": {name: {"seq_len", "num_layers", "dim", "vocab_size",
"tokens", "variants": {variant: {"block": {"forward_ms", "backward_input_ms", "backward_weight_ms"},
"head": {...}}}}}}``; times are for ``tokens`` tokens and scale linearly with the microbatch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from torchmhc.config import load_config
from torchmhc.distributed.pipeline import token_cross_entropy
from torchmhc.models.gpt import GPT, Block, streams_to_logits
from torchmhc.train import autocast_context

#: Shapes: a preset and overrides.
SHAPES = {
    "gpu-moe-3b": ("gpu-moe-3b", []),
    "dsv3-27b": (
        "gpu-moe-3b",
        ["model.num_layers=64", "model.dim=2048", "model.num_heads=16", "model.num_experts=64",
         "model.top_k=6", "model.num_shared_experts=2", "model.expert_hidden=1024", "model.vocab_size=129280"],
    ),  # fmt: skip
}


def shape_config(name: str, overrides: list[str] = ()):
    """The run config of shape ``name`` (see ``SHAPES``) with extra overrides."""
    preset, base = SHAPES[name]
    return load_config(preset, [*base, "train.compile=false", *overrides])


def _median_ms(fn, *, device: torch.device, warmup: int, repeats: int) -> float:
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _time_parts(run, params, x, *, device, warmup, repeats, autocast) -> dict[str, float]:
    """Forward, input-gradient and weight-gradient times of ``run(x) -> scalar or tensor``."""

    def forward():
        with autocast:
            return run(x)

    def backward_input():
        out = forward()
        grad = torch.ones_like(out) if out.dim() else None
        torch.autograd.grad(out, [x], grad, retain_graph=False)

    def backward_both():
        out = forward()
        grad = torch.ones_like(out) if out.dim() else None
        torch.autograd.grad(out, [x, *params], grad)

    with torch.no_grad():
        forward_ms = _median_ms(forward, device=device, warmup=warmup, repeats=repeats)
    fi = _median_ms(backward_input, device=device, warmup=warmup, repeats=repeats)
    fiw = _median_ms(backward_both, device=device, warmup=warmup, repeats=repeats)
    return {
        "forward_ms": forward_ms,
        "backward_input_ms": max(fi - forward_ms, 0.0),
        "backward_weight_ms": max(fiw - fi, 0.0),
    }


def measure(
    name: str, overrides: list[str], *, device: torch.device, tokens: int, warmup: int, repeats: int,
    compiled: bool = False,
) -> dict:
    """Times of one block and of the head of shape ``name`` for both variants (``compiled``: the
    block and the head's modules under torch.compile's default mode)."""
    cfg = shape_config(name, overrides)
    seq = min(tokens, cfg.data.seq_len)
    batch = max(tokens // seq, 1)
    out = {"seq_len": cfg.data.seq_len, "num_layers": cfg.model.num_layers, "dim": cfg.model.dim,
           "vocab_size": cfg.model.vocab_size, "tokens": batch * seq, "variants": {}}  # fmt: skip
    autocast = autocast_context(device, cfg.train.dtype if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for residual in ("residual", "mhc"):
        model_cfg = dataclasses.replace(cfg.model, residual=residual, num_layers=1)
        torch.manual_seed(0)
        with torch.device(device):
            block = Block(model_cfg, 0)
            head_model = GPT(model_cfg)  # for its stream head, norm and LM head
        n = model_cfg.effective_num_streams
        x = torch.randn(batch, seq, n, model_cfg.dim, device=device, dtype=dtype, requires_grad=True)
        targets = torch.randint(0, model_cfg.vocab_size, (batch, seq), device=device)
        head_params = [p for m in (head_model.stream_head, head_model.norm, head_model.lm_head) if m is not None
                       for p in m.parameters()]  # fmt: skip
        if compiled:
            block.compile()
            if head_model.stream_head is not None:
                head_model.stream_head.compile()  # as torchmhc.train.apply_compile does

        def run_head(streams):
            logits = streams_to_logits(head_model.stream_head, head_model.norm, head_model.lm_head, streams)
            return token_cross_entropy(logits, targets)

        timing = dict(device=device, warmup=warmup, repeats=repeats, autocast=autocast)
        out["variants"][residual] = {
            "block": _time_parts(block, list(block.parameters()), x, **timing),
            "head": _time_parts(run_head, head_params, x, **timing),
        }
        print(f"  {name} {residual}: {json.dumps(out['variants'][residual])}", flush=True)
        del block, head_model, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), help="default: all shapes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per microbatch")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    parser.add_argument("--compile", action="store_true", help="torch.compile the block (default mode)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    mode = "compiled" if args.compile else "eager"
    result = {"source": f"measured by benchmarks/block_times.py on {name}, {mode}, torch {torch.__version__}",
              "device": name, "shapes": {}}  # fmt: skip
    for shape in args.shape or sorted(SHAPES):
        result["shapes"][shape] = measure(
            shape, args.overrides, device=device, tokens=args.tokens, warmup=args.warmup, repeats=args.repeats,
            compiled=args.compile,
        )
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
