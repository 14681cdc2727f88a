"""Plots of a run's metrics (the records of a model dir's metrics.jsonl), with matplotlib."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


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
