"""pipelines.common.plots: the 2x2 run overview draws every series, labelled, in the right views."""

import json
import math

import numpy as np
import pytest

from pipelines.common import plots


def run_records(steps: int = 200, every: int = 10, eval_every: int = 50) -> list[dict]:
    """A training history as train.py writes it: train records every `every` steps, eval
    records every `eval_every`, merged into one record where both fall on a step."""
    records = []
    for step in range(every, steps + 1, every):
        r = {"step": step, "train/loss": 6.0 * math.exp(-step / 80) + 1.5,
             "train/lr": 1e-3 * min(1.0, step / 50), "train/tokens": step * 4096}
        if step % eval_every == 0:
            r.update({"eval/loss": r["train/loss"] + 0.2, "eval/ppl": 1.0,
                      "eval/bpb": (r["train/loss"] + 0.2) / math.log(2) / 3.5})
        records.append(r)
    return records


def lines(ax) -> dict[str, object]:
    return {line.get_label(): line for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def test_overview_draws_the_four_series_in_the_four_views():
    records = run_records()
    fig = plots.metrics_figure(records)
    whole, zoom, tail, rates = fig.axes[:4]
    assert [a.get_title() for a in (whole, zoom, tail, rates)] == [
        "whole run (log-scale steps)", "last 90 % of steps", "last 30 % of steps, eval smoothed",
        "eval bits per byte and learning rate"]
    for ax in (whole, zoom, tail):
        assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss (nats/token)"
    assert whole.get_xscale() == "log" and zoom.get_xscale() == "linear"

    shown = lines(whole)
    assert set(shown) == {"train loss", "eval loss"}
    assert len(shown["train loss"].get_xdata()) == 20 and len(shown["eval loss"].get_xdata()) == 4

    # zoom: x from 10 % of the way, y fitted to what is shown there
    assert zoom.get_xlim()[0] == pytest.approx(10 + 0.1 * 190)
    assert zoom.get_ylim()[1] < records[0]["train/loss"]
    assert tail.get_xlim()[0] == pytest.approx(10 + 0.7 * 190)
    assert {"train loss", "eval loss", "eval loss (smoothed)"} <= set(lines(tail))
    assert list(lines(tail)["eval loss (smoothed)"].get_xdata()) == [150, 200]

    assert rates.get_ylabel() == "bits per byte"
    twins = [a for a in fig.axes if a is not rates and a.bbox.bounds == rates.bbox.bounds
             and a.get_ylabel() == "learning rate"]
    assert len(twins) == 1 and set(lines(twins[0])) == {"learning rate"}
    assert set(lines(rates)) == {"eval bits per byte"}
    assert len(lines(twins[0])["learning rate"].get_xdata()) == 20
    # tokens on a top axis of the whole-run and rates views
    tops = [a for a in (whole, zoom, tail, rates) if any(c.get_xlabel() == "tokens"
                                                        for c in a.child_axes)]
    assert tops == [whole, rates]


def test_smoothing_log_scale_and_saving(tmp_path):
    fig = plots.metrics_figure(run_records(), smooth=0.8, log_loss=True, title="my run")
    whole = fig.axes[0]
    assert "train loss (EMA 0.8)" in lines(whole) and whole.get_yscale() == "log"
    assert fig._suptitle.get_text() == "my run"
    out = plots.save_figure(fig, tmp_path / "sub" / "fig.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_series_leave_their_panels_labelled_not_broken():
    records = [{"step": s, "train/loss": 3.0 - s / 100} for s in range(1, 50)]
    fig = plots.metrics_figure(records)
    assert set(lines(fig.axes[0])) == {"train loss"}
    texts = [t.get_text() for t in fig.axes[3].texts]
    assert texts == ["no bits per byte or learning rate recorded"]


def test_centered_mean_does_not_lag_a_falling_curve():
    values = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    assert plots.centered_mean(values, 1).tolist() == [4.5, 4.0, 3.0, 2.0, 1.5]
    assert plots.centered_mean(values, 0).tolist() == values.tolist()


def test_ema_is_debiased_and_series_keep_the_last_value_of_a_step():
    values = np.array([4.0, 4.0, 4.0])
    assert plots.ema(values, 0.9) == pytest.approx(values)  # no pull towards 0 at the start
    assert plots.ema(values, 0.0) is values
    steps, values = plots.series([{"step": 2, "x": 1.0}, {"step": 1, "x": 5.0},
                                  {"step": 2, "x": 3.0}, {"step": 3}], "x")
    assert steps.tolist() == [1, 2] and values.tolist() == [5.0, 3.0]


def test_read_metrics_and_loss_curve_still_work(tmp_path):
    records = run_records(50, 10, 20)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plots.read_metrics(tmp_path) == records
    out = plots.loss_curve(records, tmp_path / "loss_curve.png")
    assert out.stat().st_size > 1000
