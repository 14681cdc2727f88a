"""Plot a training run's metrics: train and eval loss, eval bits per byte, learning rate.

    gpt2 visualize --model_path runs/shakespeare/model              # -> figure.png
    gpt2 visualize --run_dir runs/shakespeare --output run.png      # the latest checkpoint's
    gpt2 visualize --run_id 3f2c… --smooth 0.8 --log_loss           # from MLflow
    gpt2 visualize --model_path runs/shakespeare/model --interactive  # a window, no file
    python pipelines/visualize.py --model_path runs/shakespeare/model

Sources: a model dir's metrics.jsonl (training writes the run's history there); a run dir
(<storage_path>/<name>: its latest checkpoint_*/model/metrics.jsonl, else model/metrics.jsonl);
or an MLflow run's metric history (MLFLOW_TRACKING_URI, else ./mlflow.db, or --tracking_uri).
The figure is pipelines.common.plots.metrics_figure: the whole run on a log-scale step axis, the
last 90 % of steps zoomed in, the last 30 % with a smoothed eval curve, and eval bits per byte
with the learning rate; tokens seen on a top axis.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # as a file (python, ray job submit): import pipelines by package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from gpt2core import storage
from gpt2core.errors import UserError
from pipelines.common.entry import stage_main
from pipelines.common.flags import option, parse
from pipelines.common.tracking import METRICS_FILE, RunError, open_run

DEFAULT_OUTPUT = "figure.png"  # the original project's default


@dataclass
class VisualizeConfig:
    model_path: str | None = option(None, "a model dir; its metrics.jsonl is plotted (this, "
                                    "--run_dir or --run_id is required)")
    run_dir: str | None = option(None, "a run dir (<storage_path>/<name>): its latest "
                                 "checkpoint's metrics")
    run_id: str | None = option(None, "an MLflow run id: its metric history")
    output: str | None = option(None, f"the PNG to write; without it {DEFAULT_OUTPUT}, or none "
                                "with --interactive", aliases=["--figure"])
    interactive: bool = option(False, "show the figure in a window")
    smooth: float = option(0.0, "EMA weight for the train loss, 0 (raw) to 0.99")
    log_loss: bool = option(False, "log-scale loss axes")
    tracking_uri: str | None = option(None, "MLflow store for --run_id; without it "
                                      "MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")

    def __post_init__(self) -> None:
        given = [n for n in ("model_path", "run_dir", "run_id") if getattr(self, n)]
        if len(given) != 1:
            raise UserError("pass exactly one of --model_path, --run_dir or --run_id "
                            f"(got {', '.join('--' + n for n in given) or 'none'}).")
        if not 0.0 <= self.smooth < 1.0:
            raise UserError(f"--smooth must be in [0, 1), got {self.smooth}.")


# --- sources --------------------------------------------------------------------------------

def metrics_file(model_path: str) -> str:
    """A model dir's metrics.jsonl (local or a URI); RunError when there is none."""
    if not storage.is_dir(model_path):
        raise RunError(f"model dir {model_path} does not exist; pass the dir training wrote.")
    if not storage.is_file(storage.join(model_path, METRICS_FILE)):
        raise RunError(f"{model_path} has no {METRICS_FILE}, so no training history; pass "
                       "--run_id with its MLflow run instead.")
    return storage.join(model_path, METRICS_FILE)


def run_dir_metrics(run_dir: str) -> str:
    """The latest checkpoint's metrics.jsonl in a run dir (local or a URI), else its exported
    model's."""
    from pipelines.training.checkpoint import MODEL_DIR, PREFIX

    if not storage.is_dir(run_dir):
        raise RunError(f"run dir {run_dir} does not exist; pass <storage_path>/<name> of a "
                       "training run (runs/<name> by default).")
    present = storage.files(run_dir)
    found = sorted(f for f in present if f.startswith(PREFIX) and
                   f.endswith(f"/{MODEL_DIR}/{METRICS_FILE}") and f.count("/") == 2)
    if found:  # names are zero-padded steps: the last sorts last
        return storage.join(run_dir, found[-1])
    if f"{MODEL_DIR}/{METRICS_FILE}" in present:
        return storage.join(run_dir, MODEL_DIR, METRICS_FILE)
    raise RunError(f"run dir {run_dir} holds no {PREFIX}*/{MODEL_DIR}/{METRICS_FILE} nor "
                   f"{MODEL_DIR}/{METRICS_FILE}; has the run saved a checkpoint yet?")


def file_records(path: str) -> list[dict]:
    from pipelines.common.plots import read_metrics

    try:
        with storage.local_copy(path) as local:
            records = read_metrics(local)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is damaged ({e}); it is not a metrics.jsonl written by "
                       "training.") from e
    if not all(isinstance(r, dict) and "step" in r for r in records):
        raise RunError(f"{path} has records without a step; it is not a metrics.jsonl written "
                       "by training.")
    return records


def mlflow_records(run_id: str, tracking_uri: str | None = None) -> list[dict]:
    """The run's metric history as metrics.jsonl-style records, one per step."""
    client = open_run(run_id, tracking_uri)
    by_step: dict[int, dict] = {}
    for key in client.get_run(run_id).data.metrics:
        for m in client.get_metric_history(run_id, key):
            by_step.setdefault(m.step, {"step": m.step})[key] = m.value
    return [by_step[s] for s in sorted(by_step)]


def load_records(cfg: VisualizeConfig) -> tuple[list[dict], str]:
    """The chosen source's records and a title naming it."""
    if cfg.run_id:
        records, title = mlflow_records(cfg.run_id, cfg.tracking_uri), f"MLflow run {cfg.run_id}"
    else:
        path = metrics_file(cfg.model_path) if cfg.model_path else run_dir_metrics(cfg.run_dir)
        records, title = file_records(path), path.rsplit("/", 1)[0]
    if not any("train/loss" in r or "eval/loss" in r for r in records):
        raise RunError(f"{title} has no train/loss or eval/loss recorded yet; nothing to plot.")
    return records, title


# --- main -----------------------------------------------------------------------------------

@stage_main("gpt2 visualize")
def main(argv: list[str] | None = None) -> int:
    from pipelines.common.plots import metrics_figure, save_figure

    cfg = parse(VisualizeConfig, argv, prog="gpt2 visualize", description=__doc__)
    records, title = load_records(cfg)
    steps = max(r["step"] for r in records)
    if cfg.interactive and _show(records, title, cfg):
        if cfg.output:
            print(f"{len(records)} records to step {steps} -> {cfg.output}")
        return 0
    fig = metrics_figure(records, smooth=cfg.smooth, log_loss=cfg.log_loss, title=title)
    out = save_figure(fig, cfg.output or DEFAULT_OUTPUT)
    print(f"{len(records)} records to step {steps} -> {out}")
    return 0


def _show(records: list[dict], title: str, cfg: VisualizeConfig) -> bool:
    """A window through pyplot; False (after a note) when there is no display to show it on."""
    import matplotlib.pyplot as plt
    from matplotlib.backends import BackendFilter, backend_registry

    from pipelines.common.plots import metrics_figure, save_figure

    backend = plt.get_backend().lower()
    if backend not in backend_registry.list_builtin(BackendFilter.INTERACTIVE):
        print(f"gpt2 visualize: no display for --interactive (matplotlib backend {backend}); "
              "writing the PNG instead.", file=sys.stderr)
        return False
    fig = metrics_figure(records, smooth=cfg.smooth, log_loss=cfg.log_loss, title=title,
                         fig=plt.figure(figsize=(13, 8.5)))
    if cfg.output:
        save_figure(fig, cfg.output)
    plt.show()
    return True


if __name__ == "__main__":
    sys.exit(main())
