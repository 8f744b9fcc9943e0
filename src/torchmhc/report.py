"""``torchmhc compare``: train residual variants side by side and write a report to read.

:func:`run_compare` trains one model per variant (same corpus, batches, seed and steps; the
weights outside the hyper-connections start identical), measures each trained model's
hyper-connections on a fixed validation batch, and :func:`write_report` turns it into::

    report/
      index.html           the page to open: findings, summary table, figures, config
      summary.md           the summary table in Markdown
      data.json            every number the page shows (per-step metrics, gains, heatmaps)
      loss.png             training and validation loss per step
      grad_norm.png        global gradient norm per step (before clipping)
      gains.png            Amax gain magnitude per sub-layer: single and composite, fwd and bwd
      gain_history.png     largest composite gain over training
      hres_<variant>.png   H_res of the first, middle and last sub-layer and their composite

Gains follow the mHC paper (Sec. 3.1, Fig. 3/7; docs/math.md §8): the forward gain of a matrix is its
largest absolute row sum, the backward gain its largest absolute column sum, averaged over the
tokens of the batch; composites are products of H_res over consecutive sub-layers.
"""

import html
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from torchmhc import analysis
from torchmhc.config import RunConfig, config_to_dict
from torchmhc.data import TokenData, load_data
from torchmhc.functional import amax_gain
from torchmhc.models import GPT, build_model
from torchmhc.residuals import get_residual
from torchmhc.train import NonFiniteLossError, RunResult, load_checkpoint, require, resolve_device, train

__all__ = ["VariantResult", "analyze_model", "format_gain", "run_compare", "write_report"]

GAIN_KEYS = ("single_forward", "single_backward", "composite_forward", "composite_backward")


# ----------------------------------------------------------------------------------------------
# Measuring a trained model
# ----------------------------------------------------------------------------------------------


def _h_res_stack(model: GPT, x: torch.Tensor) -> list[torch.Tensor] | None:
    """Each hyper-connection's H_res ``[B, T, n, n]`` fp32 for batch ``x``, or None for n = 1."""
    if model.num_streams == 1:
        return None
    return analysis.collect_h_res(model, x)


def gain_snapshot(model: GPT, x: torch.Tensor) -> dict[str, float]:
    """Headline stability numbers for one batch (used at every evaluation during training).

    Returns ``{}`` for one-stream models; else ``max_composite_gain`` and the smallest and
    largest token-averaged single-layer forward gain.
    """
    h_list = _h_res_stack(model, x)
    if h_list is None:
        return {}
    profile = analysis.gain_profile(h_list)
    return {
        "max_composite_gain": profile.max_composite(),
        "single_forward_min": float(profile.single_forward.min()),
        "single_forward_max": float(profile.single_forward.max()),
    }


@torch.no_grad()
def analyze_model(model: GPT, x: torch.Tensor) -> dict[str, Any] | None:
    """Everything the report shows about a model's hyper-connections, for batch ``x [B, T]``.

    Returns None for one-stream models, else a JSON-serializable dict with per-sub-layer lists
    (``GAIN_KEYS``, ``ds_error``, ``identity_distance``), ``single_forward_max_deviation`` (the
    largest |forward gain − 1| of any single token and layer), ``max_composite_gain`` and
    ``heatmaps`` (token-averaged H_res of the first, middle, last sub-layer and the composite).
    """
    was_training = model.training
    model.eval()
    h_list = _h_res_stack(model, x)
    model.train(was_training)
    if h_list is None:
        return None
    profile = analysis.gain_profile(h_list)
    num = len(h_list)
    composite = h_list[0]
    for h in h_list[1:]:
        composite = h @ composite  # H_{L-1} ⋯ H_0, per token
    picks = {"first (sub-layer 1)": 0, f"middle (sub-layer {num // 2 + 1})": num // 2, f"last (sub-layer {num})": num - 1}
    heatmaps = {label: h_list[i].flatten(0, -3).mean(0).tolist() for label, i in picks.items()}
    heatmaps[f"composite (sub-layers 1–{num})"] = composite.flatten(0, -3).mean(0).tolist()
    deviation = max(float((amax_gain(h)[0] - 1).abs().max()) for h in h_list)
    return {
        **{key: getattr(profile, key).tolist() for key in GAIN_KEYS},
        "max_composite_gain": profile.max_composite(),
        "single_forward_max_deviation": deviation,
        "ds_error": [float(analysis.doubly_stochastic_error(h).mean()) for h in h_list],
        "identity_distance": [float(analysis.distance_from_identity(h).mean()) for h in h_list],
        "heatmaps": heatmaps,
    }


# ----------------------------------------------------------------------------------------------
# Running the comparison
# ----------------------------------------------------------------------------------------------


@dataclass
class VariantResult:
    """One trained variant: its metrics, final numbers and hyper-connection analysis."""

    variant: str
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    analysis: dict[str, Any] | None
    out_dir: str = ""


def variant_config(cfg: RunConfig, variant: str) -> RunConfig:
    """``cfg`` with ``model.residual = variant`` and the run named ``<name>-<variant>``."""
    return replace(cfg, name=f"{cfg.name}-{variant}", model=replace(cfg.model, residual=variant))


def run_compare(
    cfg: RunConfig,
    *,
    progress: bool = True,
    command: str = "",
) -> Path:
    """Train every variant of ``cfg.compare.variants`` and write the report.

    A variant whose loss becomes non-finite is not fatal: its run stops (last good checkpoint
    kept), the report marks it diverged and still analyzes its last good weights.

    Returns:
        Path of the report's ``index.html``.
    """
    require("matplotlib", "plots")  # before training, not after it
    report_dir = Path(cfg.compare.report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    data: TokenData = load_data(cfg.data, progress=progress)
    device = resolve_device(cfg.train.device)
    # The fixed batch every variant is measured on: the first validation batch.
    probe, _ = data.get_batch("val", 0, batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len, seed=0)
    probe = probe.to(device)

    results: list[VariantResult] = []
    started = time.perf_counter()
    variants = cfg.compare.variants
    for i, variant in enumerate(variants):
        vcfg = variant_config(cfg, variant)
        desc = f"[{i + 1}/{len(variants)}] {variant}"
        try:
            run: RunResult = train(vcfg, progress=progress, desc=desc, data=data,
                                   eval_hook=lambda m: gain_snapshot(m, probe))
            model, summary, history, evals = run.model, run.summary, run.history, run.evals
        except NonFiniteLossError as exc:
            if exc.checkpoint is None:  # no finite weights to analyse: the comparison cannot go on
                raise
            if progress:
                print(f"{desc}: stopped: {exc}")
            summary, history, evals, model = _reload_stopped(vcfg, exc, device)
        results.append(VariantResult(variant, summary, history, evals, analyze_model(model, probe),
                                     out_dir=str(vcfg.out_dir)))
    wall = time.perf_counter() - started
    return write_report(report_dir, cfg, results, command=command, wall_time_s=wall, corpus=data.source,
                        device=str(device))


def _reload_stopped(
    cfg: RunConfig, exc: NonFiniteLossError, device: torch.device
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]], GPT]:
    """Metrics and last good weights of a run that stopped on a non-finite loss."""
    out = cfg.out_dir
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((out / "summary.json").read_text())
    model = build_model(cfg.model).to(device)
    load_checkpoint(exc.checkpoint, model)
    return (summary, [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "eval"], model)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def _smooth(values: list[float]) -> list[float]:
    """Centered moving average (no lag, unlike an EMA) over ~5% of the run, for readable curves."""
    half = max(1, len(values) // 40)
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((sums[hi] - sums[lo]) / (hi - lo))
    return out


def _log_y(ax) -> None:
    """Log-scale y axis with plain-number labels (``1.5``, not ``1.5×10⁰``)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    low, high = ax.get_ylim()
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    # Within one decade the major ticks alone would leave the axis unlabeled.
    ax.yaxis.set_minor_formatter(plain if high / low < 20 else NullFormatter())


def _label(variant: str) -> str:
    return get_residual(variant).label


def _color(variant: str) -> str:
    return get_residual(variant).color


def _is_baseline(variant: str) -> bool:
    """The plain residual: what the other variants are compared with."""
    return get_residual(variant).form == "residual"


def _plot_loss(results: list[VariantResult], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.2))
    tail, val_tail = [], []
    for r in results:
        steps = [h["step"] for h in r.history]
        loss = [h["loss"] for h in r.history]
        if not steps:
            continue
        ax_train.plot(steps, loss, color=_color(r.variant), alpha=0.2, linewidth=0.8)
        ax_train.plot(steps, _smooth(loss), color=_color(r.variant), label=_label(r.variant), linewidth=1.6)
        ev = [e for e in r.evals if math.isfinite(e["val_loss"])]
        ax_val.plot([e["step"] for e in ev], [e["val_loss"] for e in ev], "o-", color=_color(r.variant),
                    label=_label(r.variant), markersize=4)
        tail += [v for v in loss[len(loss) // 10:] if math.isfinite(v)]
        val_tail += [e["val_loss"] for e in ev if e["step"] > 0]
    # The first steps (loss near ln 256 = 5.5) would flatten the part worth seeing.
    for ax, values in ((ax_train, tail), (ax_val, val_tail)):
        if len(values) > 1:
            low, high = min(values), sorted(values)[int(0.98 * (len(values) - 1))]
            pad = max(high - low, 1e-3)
            ax.set_ylim(low - 0.05 * pad, high + 0.1 * pad)
    ax_train.set(title="Training loss (moving average; raw faint)", xlabel="step", ylabel="cross-entropy (nats/token)")
    ax_val.set(title="Validation loss (from the first evaluation after step 0)", xlabel="step", ylabel="cross-entropy (nats/token)")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_grad_norm(results: list[VariantResult], path: Path, clip: float) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        pts = [(h["step"], h["grad_norm"]) for h in r.history if math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0]
        if pts:
            ax.plot(*zip(*pts), color=_color(r.variant), label=_label(r.variant), linewidth=1.0, alpha=0.85)
    if clip > 0:
        ax.axhline(clip, color="black", linestyle=":", linewidth=1, label=f"clip threshold {clip:g}")
    _log_y(ax)
    ax.set(title="Global gradient norm (before clipping)", xlabel="step", ylabel="‖g‖₂")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_gains(results: list[VariantResult], path: Path) -> None:
    import matplotlib.pyplot as plt

    titles = {
        "single_forward": "Single layer, forward (max row sum of H_res)",
        "single_backward": "Single layer, backward (max column sum of H_res)",
        "composite_forward": "Composite, forward (H_l ⋯ H_1)",
        "composite_backward": "Composite, backward (H_L ⋯ H_l)",
    }
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True)
    for ax, key in zip(axes.flat, GAIN_KEYS):
        for r in results:
            if r.analysis is None:
                continue
            values = r.analysis[key]
            ax.plot(range(1, len(values) + 1), values, "o-", color=_color(r.variant),
                    label=_label(r.variant), markersize=3.5)
        ax.axhline(1.0, color="black", linestyle=":", linewidth=1)
        _log_y(ax)
        ax.set(title=titles[key], ylabel="Amax gain magnitude")
        ax.grid(alpha=0.3, which="both")
    for ax in axes[1]:
        ax.set_xlabel("sub-layer (attention and FFN each count as one)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_gain_history(results: list[VariantResult], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        pts = [(e["step"], e["max_composite_gain"]) for e in r.evals
               if "max_composite_gain" in e and math.isfinite(e["max_composite_gain"])]
        if pts:
            ax.plot(*zip(*pts), "o-", color=_color(r.variant), label=_label(r.variant), markersize=4)
    ax.axhline(1.0, color="black", linestyle=":", linewidth=1)
    _log_y(ax)
    ax.set(title="Largest composite gain during training", xlabel="step", ylabel="max composite Amax gain")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _span(values: list[float]) -> str:
    """``"0.998–1.002"`` or, for large values, ``"3,009–5,629"``."""
    if max(abs(v) for v in values) < 100:
        return f"{min(values):.3f}–{max(values):.3f}"
    return f"{min(values):,.0f}–{max(values):,.0f}"


def _plot_heatmaps(result: VariantResult, path: Path) -> None:
    import matplotlib.pyplot as plt

    maps = result.analysis["heatmaps"]
    fig, axes = plt.subplots(1, len(maps), figsize=(3.6 * len(maps), 4.4), layout="constrained")
    for ax, (title, matrix) in zip(axes, maps.items()):
        n = len(matrix)
        # One symmetric scale per panel (a composite can be 1000x a single layer); blue = negative.
        limit = max(1.0, max(abs(v) for row in matrix for v in row))
        ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit)
        for i in range(n):
            for j in range(n):
                v = matrix[i][j]
                ax.text(j, i, f"{v:.2f}" if abs(v) < 100 else f"{v:,.0f}", ha="center", va="center",
                        fontsize=9, color="white" if abs(v) > 0.6 * limit else "black")
        rows = [sum(row) for row in matrix]
        cols = [sum(matrix[i][j] for i in range(n)) for j in range(n)]
        ax.set_title(f"{title}\nrow sums {_span(rows)}\ncolumn sums {_span(cols)}", fontsize=9)
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xlabel("source stream j")
    axes[0].set_ylabel("destination stream i")
    fig.suptitle(f"{_label(result.variant)}: H_res (token average; color scale per panel)", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Tables and the page
# ----------------------------------------------------------------------------------------------


def format_gain(value: float) -> str:
    """Gains as the report prints them: ``1.029``, ``8.447``, ``5,649``."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.4g}"


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, spec)


def summary_rows(results: list[VariantResult]) -> list[dict[str, str]]:
    """The summary table, one dict of formatted cells per variant (same text in HTML and Markdown)."""
    baseline = next((r.summary["val_loss"] for r in results if _is_baseline(r.variant)), None)
    rows = []
    for r in results:
        s, a = r.summary, r.analysis
        delta = s["val_loss"] - baseline if baseline is not None and not _is_baseline(r.variant) else None
        memory = s["peak_memory_bytes"] / 2**20
        rows.append({
            "Variant": _label(r.variant),
            "Streams": str(s["num_streams"]),
            "Params": f"{s['num_params'] / 1e6:.2f} M",
            "Train loss": _fmt(s["train_loss"], ".4f"),
            "Val loss": _fmt(s["val_loss"], ".4f"),
            "Δ val vs residual": _fmt(delta, "+.4f") if delta is not None else "–",
            "Val bits/byte": _fmt(s["val_bpb"], ".4f"),
            "Tokens/s": _fmt(s["tokens_per_s"], ",.0f"),
            "Peak memory": f"{memory:,.0f} MiB" + (" (est.)" if s["peak_memory_kind"] == "estimate" else ""),
            "Max composite gain": format_gain(a["max_composite_gain"]) if a else "1 (no mixing)",
            "Status": "ok" if not s["stopped"] else f"stopped at step {s['steps']} (non-finite)",
        })
    return rows


def _markdown_table(rows: list[dict[str, str]]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r[h] for h in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def findings(results: list[VariantResult]) -> list[str]:
    """Plain-language sentences about what the measurements show (each backed by a number)."""
    out = []
    base = next((r for r in results if _is_baseline(r.variant)), None)
    for r in results:
        a, s = r.analysis, r.summary
        if not _is_baseline(r.variant) and base is not None and math.isfinite(s["val_loss"]):
            delta = s["val_loss"] - base.summary["val_loss"]
            word = "lower (better)" if delta < 0 else "higher (worse)"
            out.append(f"{_label(r.variant)} ends with validation loss {s['val_loss']:.4f}, "
                       f"{abs(delta):.4f} nats {word} than the residual baseline ({base.summary['val_loss']:.4f}).")
        if s["stopped"]:
            out.append(f"{_label(r.variant)} stopped at step {s['steps']}: its loss or gradient became non-finite.")
        if a is None:
            continue
        dev = a["single_forward_max_deviation"]
        if get_residual(r.variant).doubly_stochastic:
            ok = dev <= 1e-3 and a["max_composite_gain"] < 2
            out.append(
                f"{_label(r.variant)}: every single-layer forward gain is within 1 ± {dev:.1e} "
                f"(for every token and sub-layer), H_res is doubly stochastic to within "
                f"{max(a['ds_error']):.1e} (largest row/column-sum error, token mean), and the largest composite gain is "
                f"{format_gain(a['max_composite_gain'])} — {'as' if ok else 'NOT as'} the doubly-stochastic "
                f"constraint promises (forward gain 1 ± 1e-3, composite < 2)."
            )
        else:
            out.append(
                f"{_label(r.variant)}: single-layer forward gains range "
                f"{min(a['single_forward']):.4g}–{max(a['single_forward']):.4g} (H_res is as far as "
                f"{max(a['ds_error']):.2g} from doubly stochastic); the largest composite "
                f"gain is {format_gain(a['max_composite_gain'])}"
                + (" — signals can grow or shrink by that factor across the stack." if a["max_composite_gain"] > 2 else ".")
            )
    if base is not None and len(results) > 1:
        out.append("These losses come from one seed: differences of a few hundredths of a nat can be seed "
                   "noise (run again with --set train.seed=1, 2, ... before concluding).")
    return out


_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; max-width: 1180px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.1em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.93em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; } .muted { color: #666; font-size: 0.92em; }
code, pre { background: #f6f6f6; padding: 0.1em 0.3em; } pre { padding: 0.8em; overflow-x: auto; }
li { margin: 0.25em 0; }
"""


def write_report(
    report_dir: Path,
    cfg: RunConfig,
    results: list[VariantResult],
    *,
    command: str = "",
    wall_time_s: float = math.nan,
    corpus: str = "",
    device: str = "",
) -> Path:
    """Write figures, ``summary.md``, ``data.json`` and ``index.html`` into ``report_dir``."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    _plot_loss(results, report_dir / "loss.png")
    _plot_grad_norm(results, report_dir / "grad_norm.png", cfg.optim.grad_clip)
    figures = [
        ("loss.png", "Loss", "Training loss per step (centered moving average over 5% of the run, raw values faint) and validation loss at "
         "each evaluation. All variants saw the same batches in the same order."),
        ("grad_norm.png", "Gradient norm", "Global gradient norm before clipping, log scale. Spikes "
         "mark unstable steps."),
    ]
    mixed = [r for r in results if r.analysis is not None]
    if mixed:
        _plot_gains(results, report_dir / "gains.png")
        _plot_gain_history(results, report_dir / "gain_history.png")
        figures += [
            ("gains.png", "Amax gain magnitude per sub-layer (paper Fig. 3/7)",
             "How much H_res can amplify a signal going forward (max absolute row sum) or a gradient "
             "going backward (max absolute column sum): top row for one sub-layer, bottom row for the "
             "product of all sub-layers up to (forward) or down to (backward) that sub-layer. 1 (dotted) "
             "means no amplification. Token averages on one validation batch, log scale."),
            ("gain_history.png", "Largest composite gain during training",
             "The maximum of the composite gains (forward and backward) at each evaluation."),
        ]
        for r in mixed:
            name = f"hres_{r.variant}.png"
            _plot_heatmaps(r, report_dir / name)
            figures.append((name, f"H_res of {_label(r.variant)} (paper Fig. 8)",
                            "Token-averaged mixing matrices (row i = destination stream, column j = source). "
                            "Doubly stochastic matrices have every row and column summing to 1."))

    rows = summary_rows(results)
    (report_dir / "summary.md").write_text(_markdown_table(rows))
    data = {
        "config": config_to_dict(cfg),
        "command": command,
        "wall_time_s": wall_time_s,
        "corpus": corpus,
        "device": device,
        "torch": torch.__version__,
        "variants": {
            r.variant: {"summary": r.summary, "analysis": r.analysis, "history": r.history,
                        "evals": r.evals, "run_dir": r.out_dir}
            for r in results
        },
    }
    (report_dir / "data.json").write_text(json.dumps(data, indent=1))

    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>torchmhc compare: {e(cfg.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(' vs '.join(_label(r.variant) for r in results))} — preset <code>{e(cfg.name)}</code></h1>",
        f"<p class='muted'>{e(cfg.description)}</p>",
        "<p>Each variant is the same decoder-only language model (same data, batch order, seed and "
        "steps; weights outside the hyper-connections start identical). Only the connection around "
        "each sub-layer differs:</p><ul>",
        *[f"<li><b>{e(_label(r.variant))}</b>: {e(get_residual(r.variant).description)}</li>" for r in results],
        "</ul>",
        "<h2>Findings</h2><ul>",
        *[f"<li>{e(s)}</li>" for s in findings(results)],
        "</ul>",
        "<h2>Summary</h2><table><tr>",
        *[f"<th>{e(h)}</th>" for h in rows[0]],
        "</tr>",
        *["<tr>" + "".join(f"<td>{e(v)}</td>" for v in row.values()) + "</tr>" for row in rows],
        "</table>",
        "<p class='muted'>Train loss: mean of the last 10 logged steps. Validation loss: mean cross-entropy "
        f"over {cfg.train.eval_batches} fixed validation batches after the last step; bits/byte = loss / ln 2 "
        "per byte of text. Tokens/s: training steps only. Peak memory: CUDA allocator peak on a GPU; on the "
        "CPU an estimate (weights, gradients and AdamW state + activations saved for backward). Max composite "
        "gain: largest composite Amax gain of the trained model (1 for the single-stream residual).</p>",
    ]
    for name, title, caption in figures:
        parts += [f"<h2>{e(title)}</h2>", f"<p>{e(caption)}</p>", f"<img src='{e(name)}' alt='{e(title)}'>"]
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    parts += [
        "<h2>Setup</h2><ul>",
        f"<li>Model: {m.arch}, {m.num_layers} blocks ({2 * m.num_layers} sub-layers), dim {m.dim}, "
        f"{m.num_heads} heads, n = {m.num_streams} streams for HC/mHC, vocab {m.vocab_size}</li>",
        f"<li>Data: {e(corpus)}; sequences of {d.seq_len} tokens, batch {d.batch_size}</li>",
        f"<li>Training: {t.steps} steps, AdamW lr {o.lr:g} ({o.schedule} schedule, {o.warmup_steps} warm-up "
        f"steps), weight decay {o.weight_decay:g}, grad clip {o.grad_clip:g}, seed {t.seed}</li>",
        f"<li>Device: {e(device)}; torch {e(torch.__version__)}; wall time {_fmt(wall_time_s, '.0f')} s</li>",
        f"<li>Reproduce: <code>{e(command or 'torchmhc compare')}</code></li>",
        "</ul>",
        "<details><summary>Full configuration</summary><pre>",
        e(json.dumps(config_to_dict(cfg), indent=2)),
        "</pre></details>",
        "<p class='muted'>Files: <a href='summary.md'>summary.md</a>, <a href='data.json'>data.json</a> "
        "(every number on this page).</p>",
        "</body></html>",
    ]
    index = report_dir / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    return index
