"""Plots of a run's metrics (the records of a model dir's metrics.jsonl), with matplotlib.

A record is {"step": N, "train/loss": …, "train/lr": …, "train/tokens": …, "eval/loss": …,
"eval/bpb": …}, any key but "step" optional. `loss_curve` draws the one-panel PNG that training
leaves in each model dir; `metrics_figure` the 2x2 overview of `gpt2 visualize`, after the
original project's: the whole run on a log-scale step axis, the last 90 % zoomed in, the last
30 % with a smoothed eval curve, and eval bits per byte with the learning rate.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# metric -> line label; the labels are what tests and readers look for
LABELS = {"train/loss": "train loss", "eval/loss": "eval loss", "eval/bpb": "eval bits per byte",
          "train/lr": "learning rate"}
# the last-30 % panel smooths eval loss over 2h+1 points, h = this share of them (at least 1)
EVAL_HALF_WINDOW = 0.05


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file (or of the one inside a model dir)."""
    path = Path(path)
    path = path / "metrics.jsonl" if path.is_dir() else path
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def loss_curve(records: Iterable[dict], out: str | Path, title: str = "") -> Path:
    """Train and eval loss by step (and eval bits per byte on a second axis) -> a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a training node
    import matplotlib.pyplot as plt

    records = list(records)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for key, style in (("train/loss", "-"), ("eval/loss", "o-")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), style, label=key, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    bpb = [(r["step"], r["eval/bpb"]) for r in records if "eval/bpb" in r]
    if bpb:
        right = ax.twinx()
        right.plot(*zip(*bpb), "s--", color="tab:green", label="eval/bpb", markersize=4)
        right.set_ylabel("bits per byte")
        right.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    ax.set_title(title or "loss")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


# --- the 2x2 overview -----------------------------------------------------------------------

def series(records: Iterable[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric, by step; a step logged twice keeps its last value."""
    points = {int(r["step"]): float(r[key]) for r in records if key in r and r[key] is not None}
    steps = np.array(sorted(points), dtype=np.int64)
    return steps, np.array([points[s] for s in steps], dtype=np.float64)


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average, debiased so the first points are not pulled towards 0
    (TensorBoard's smoothing): s_t = w s_{t-1} + (1 - w) x_t, divided by 1 - w^t."""
    if weight <= 0 or len(values) == 0:
        return values
    out, acc = np.empty_like(values), 0.0
    for t, x in enumerate(values, start=1):
        acc = weight * acc + (1 - weight) * x
        out[t - 1] = acc / (1 - weight ** t)
    return out


def centered_mean(values: np.ndarray, half: int) -> np.ndarray:
    """Mean of each point and `half` neighbours each side (fewer at the ends). Centred, so a
    falling curve is not drawn late, as an EMA of a few sparse eval points would be."""
    csum = np.concatenate([[0.0], np.cumsum(values)])
    i = np.arange(len(values))
    lo, hi = np.maximum(i - half, 0), np.minimum(i + half + 1, len(values))
    return (csum[hi] - csum[lo]) / (hi - lo)


def metrics_figure(records: Iterable[dict], *, smooth: float = 0.0, log_loss: bool = False,
                   title: str = "", fig: Figure | None = None) -> Figure:
    """The 2x2 overview of a run (see the module docstring), on `fig` or a new headless Figure.

    smooth: EMA weight in [0, 1) for the train loss (0 = raw); log_loss: log-scale loss axes.
    A new Figure needs no display or backend: save it with `save_figure`.
    """
    from matplotlib.figure import Figure

    records = list(records)
    fig = fig or Figure(figsize=(13, 8.5), dpi=100)
    axes = fig.subplots(2, 2)
    train, evals = series(records, "train/loss"), series(records, "eval/loss")
    last = max((int(s[-1]) for s, _ in (train, evals) if len(s)), default=0)
    first = min((int(s[0]) for s, _ in (train, evals) if len(s)), default=0)
    tokens = _tokens_per_step(records)

    ax = axes[0, 0]
    _losses(ax, train, evals, smooth, from_step=None)
    ax.set_xscale("log")
    ax.set_title("whole run (log-scale steps)")
    _tokens_axis(ax, tokens)

    ax = axes[0, 1]
    start = first + 0.1 * (last - first)
    _losses(ax, train, evals, smooth, from_step=start)
    ax.set_title("last 90 % of steps")

    ax = axes[1, 0]
    start = first + 0.7 * (last - first)
    _losses(ax, train, evals, smooth, from_step=start, eval_style="o", faint=True)
    steps, values = evals
    keep = steps >= start
    if keep.any():
        half = max(1, round(EVAL_HALF_WINDOW * len(values)))
        smoothed = centered_mean(values, half)[keep]  # neighbours before the range count too
        ax.plot(steps[keep], smoothed, "-", color="tab:orange", linewidth=2,
                label=f"{LABELS['eval/loss']} (smoothed)")
        ax.legend(loc="best")
    ax.set_title("last 30 % of steps, eval smoothed")

    ax = axes[1, 1]
    _bpb_and_lr(ax, records)
    _tokens_axis(ax, tokens)
    if log_loss:
        for a in (axes[0, 0], axes[0, 1], axes[1, 0]):
            a.set_yscale("log")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _losses(ax: Axes, train, evals, smooth: float, from_step: float | None,
            eval_style: str = "o-", faint: bool = False) -> None:
    """Train and eval loss from `from_step` on (all when None), y-limits fitted to that range."""
    shown = []
    for (steps, values), key in ((train, "train/loss"), (evals, "eval/loss")):
        keep = steps >= from_step if from_step is not None else np.ones(len(steps), bool)
        if not keep.any():
            continue
        label = LABELS[key]
        if key == "train/loss" and smooth > 0:
            ax.plot(steps[keep], values[keep], "-", color="tab:blue", alpha=0.25)
            values, label = ema(values, smooth), f"{label} (EMA {smooth:g})"
        style = eval_style if key == "eval/loss" else "-"
        color = "tab:orange" if key == "eval/loss" else "tab:blue"
        ax.plot(steps[keep], values[keep], style, color=color, markersize=3, label=label,
                alpha=0.45 if faint else 1.0)
        shown.append(values[keep])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if not shown:
        ax.text(0.5, 0.5, "no loss recorded", ha="center", va="center", transform=ax.transAxes)
        return
    ax.legend(loc="best")
    if from_step is not None:  # zoom: the range's own y-limits, not the first steps' spike
        low, high = min(v.min() for v in shown), max(v.max() for v in shown)
        pad = 0.05 * (high - low) or 0.05 * abs(high) or 0.1
        ax.set_ylim(low - pad, high + pad)
        ax.set_xlim(left=from_step)


def _bpb_and_lr(ax: Axes, records: list[dict]) -> None:
    """Eval bits per byte (left axis) and the learning rate (right axis) by step."""
    from matplotlib import ticker

    steps, values = series(records, "eval/bpb")
    handles = []
    if len(steps):
        handles += ax.plot(steps, values, "s-", color="tab:green", markersize=3,
                           label=LABELS["eval/bpb"])
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    steps, values = series(records, "train/lr")
    if len(steps):
        right = ax.twinx()
        handles += right.plot(steps, values, "-", color="tab:purple", label=LABELS["train/lr"])
        right.set_ylabel("learning rate")
        # per-tick exponents: an axis offset ("1e-3") would sit on the tokens axis' labels
        right.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.1e"))
    if handles:
        ax.legend(handles=handles, loc="center right")
    else:
        ax.text(0.5, 0.5, "no bits per byte or learning rate recorded", ha="center",
                va="center", transform=ax.transAxes)
    ax.set_title("eval bits per byte and learning rate")


def _tokens_per_step(records: list[dict]) -> float | None:
    steps, tokens = series(records, "train/tokens")
    ok = steps > 0
    return float(np.median(tokens[ok] / steps[ok])) if ok.any() else None


def _tokens_axis(ax: Axes, per_step: float | None) -> None:
    """Tokens seen, on a top axis: a fixed number per step, so a linear map of the steps."""
    from matplotlib import ticker

    if per_step:
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step,
                                                   lambda t: t / per_step))
        top.set_xlabel("tokens")
        top.xaxis.set_major_formatter(ticker.EngFormatter())  # 2M, not 2e6 as an offset
        top.xaxis.set_minor_formatter(ticker.NullFormatter())  # log scale: majors only


def save_figure(fig: Figure, out: str | Path) -> Path:
    """Write the figure as a PNG (or any format matplotlib knows by the suffix)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
