"""What a Tune sweep (pipelines/tune.py) leaves behind: its trials as a table (printed and
results.csv), their validation curves (curves.png), the best trial's checkpoint, and the MLflow
parent run that every trial's run is nested under (logged by `trial_runs` on the Tune driver)."""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, replace
from pathlib import Path

from pipelines.training import checkpoint
from pipelines.training.config import TrainConfig


def summarise(grid, space: dict, metric: str, total_steps: int):
    """(rows, curves) of a Tune ResultGrid: a row per trial, with its parameters, best (lowest)
    metric, steps run and status; a curve per trial: [(step, metric), ...]."""
    rows, curves = [], {}
    for r in sorted(grid, key=lambda r: Path(r.path).name):
        trial, df, config = Path(r.path).name, r.metrics_dataframe, (r.config or {})
        curve = {}
        if df is not None and metric in df and "step" in df:
            curve = {int(s): float(v) for s, v in zip(df["step"], df[metric])
                     if s == s and v == v}  # a resumed trial's repeated steps: the last
        curves[trial] = sorted(curve.items())
        steps = max(curve, default=0)
        done = bool(r.metrics and r.metrics.get("done"))
        stopped = done and steps < config.get("total_steps", total_steps)
        status = ("error" if r.error else "stopped early" if stopped
                  else "finished" if done else "unfinished")
        rows.append({"trial": trial, **{k: config.get(k) for k in space},
                     f"best {metric}": min(curve.values(), default=math.nan),
                     "steps": steps, "stopped early": status == "stopped early",
                     "status": status,
                     "mlflow_run_id": (r.metrics or {}).get("mlflow_run_id", ""),
                     "error": str(r.error).strip().splitlines()[-1] if r.error else ""})
    return rows, curves


def best_row(rows: list[dict], metric: str) -> dict | None:
    key = f"best {metric}"
    return min((r for r in rows if not math.isnan(r[key])), key=lambda r: r[key], default=None)


def cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_table(rows: list[dict], space: dict, metric: str) -> None:
    cols = ["trial", *space, f"best {metric}", "steps", "status"]
    widths = [max([len(c), *(len(cell(r[c])) for r in rows)]) for c in cols]
    print("\n" + "  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(cell(r[c]).ljust(w) for c, w in zip(cols, widths)))


def write_csv(rows: list[dict], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    return out


def plot_curves(curves: dict[str, list], metric: str, out: Path, stopped=(), labels=None,
                title: str = "") -> Path:
    """Every trial's metric by step, a line each; x marks where ASHA stopped a trial. A trial
    that diverged (best value over twice the median trial's) is left off the scale and named
    so in the legend: its values would flatten every other curve."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    best = {t: min(v for _, v in p) for t, p in curves.items() if p}
    median = sorted(best.values())[len(best) // 2] if best else 0.0
    off = {t for t, b in best.items() if median > 0 and not b <= 2 * median}
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for trial, points in curves.items():
        label = (labels or {}).get(trial, trial)
        if trial in off:
            ax.plot([], [], "x", label=f"{label} (off scale: {best[trial]:.3g})")
        elif points:
            (line,) = ax.plot(*zip(*points), "o-", markersize=3, label=label)
            if trial in stopped:
                ax.plot(*points[-1], "x", color=line.get_color(), markersize=10)
    ax.set(xlabel="step", ylabel=metric, title=title or metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def best_checkpoint(run_dir: str, metric: str):
    """The trial's checkpoint to export: of its Train run's complete checkpoints (local path or
    URI), the one with the lowest `metric` at its step; one cut off mid-upload never is."""
    import ray.train

    return ray.train.Checkpoint(checkpoint.best(run_dir, metric))


def start_parent_run(tracking_uri: str, experiment: str, name: str, params: dict) -> str:
    """The sweep's MLflow run; each trial's run is tagged mlflow.parentRunId with its id."""
    from pipelines.common.tracking import RunLog

    return RunLog(tracking_uri, experiment, name, params, tags={"sweep": name}).run_id


def trial_runs(tracking_uri: str, experiment: str, sweep: dict, base: TrainConfig, name_of):
    """A ray.tune.Callback that keeps each trial's MLflow run, nested under the sweep's
    (`sweep`: tune.py's info; `base`: the trials' base TrainConfig; `name_of(trial)`: its name).

    A trial's TorchTrainer is built inside the trial's actor, so its Train controller may be on
    any node, where a local store (the default) is not. Tune calls its callbacks on the Tune
    driver: trial runs are made here when a trial starts (found again after --resume), fed by
    the results its EvalReport sends Tune (rank 0's records ride in them), marked FINISHED
    with the model at the last step, KILLED when the trial is stopped early, FAILED on an error.
    """
    import ray.train
    from ray import tune

    from pipelines.common.tracking import RECORDS, RESTORED, RunLog, RunWriter

    parent = sweep["parent_run_id"]

    class TrialRuns(tune.Callback):
        def __init__(self):
            self.writers: dict[str, RunWriter] = {}  # by trial id

        def _writer(self, trial) -> RunWriter:
            if trial.trial_id not in self.writers:
                cfg, name = replace(base, **trial.config), name_of(trial)
                run = RunLog(tracking_uri, experiment, name, asdict(cfg),
                             run_id=self._find(name),
                             tags={"mlflow.parentRunId": parent, "sweep": sweep["name"]})
                self.writers[trial.trial_id] = RunWriter(tracking_uri, run.run_id,
                                                         cfg.total_steps)
            return self.writers[trial.trial_id]

        def _find(self, name: str) -> str | None:
            """The trial's run from before a --resume."""
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri)
            runs = client.search_runs(
                [client.get_run(parent).info.experiment_id],
                f"tags.mlflow.parentRunId = '{parent}' and attributes.run_name = '{name}'",
                max_results=1)
            return runs[0].info.run_id if runs else None

        def on_trial_start(self, iteration, trials, trial, **info):
            self.writers.pop(trial.trial_id, None)  # a restarted trial's run: RUNNING again
            self._writer(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            writer, final = self._writer(trial), None
            if result.get("step") == writer.total_steps:
                # the model: from the trial's run dir, since the last result may be run_trial's
                # own (after --resume), which names no checkpoint
                final = ray.train.Checkpoint(checkpoint.find(
                    f"{sweep['train_storage']}/{name_of(trial)}"))
            writer.report(result, final)
            # Tune lets a callback edit a result (its loggers come after this callback): the
            # records were MLflow's; the run id is the trial's, which its workers do not know
            result.pop(RECORDS, None)
            result.pop(RESTORED, None)
            result["mlflow_run_id"] = writer.run_id

        def on_trial_complete(self, iteration, trials, trial, **info):
            writer = self.writers.get(trial.trial_id)
            if writer is not None and not writer.finished:  # stopped early (ASHA)
                writer.end("KILLED")

        def on_trial_error(self, iteration, trials, trial, **info):
            if trial.trial_id in self.writers:
                self.writers[trial.trial_id].end("FAILED")

    return TrialRuns()


def finish_parent_run(tracking_uri: str, parent: str, best: dict | None, metric: str,
                      complete: bool, artifacts: list[Path]) -> None:
    """Table and curves as artifacts, the best trial as tags; FINISHED once every trial is."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    for path in artifacts:
        client.log_artifact(parent, str(path))
    if best is not None:
        client.log_metric(parent, f"best/{metric}", best[f"best {metric}"])
        client.set_tag(parent, "best_trial", best["trial"])
        client.set_tag(parent, "best_run_id", best["mlflow_run_id"])
    if complete:  # a trial ASHA stopped never ended its run
        exp = client.get_run(parent).info.experiment_id
        for run in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}' and "
                                             "attributes.status = 'RUNNING'"):
            client.set_terminated(run.info.run_id, status="KILLED")
    client.set_terminated(parent, status="FINISHED" if complete else "KILLED")
