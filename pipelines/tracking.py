"""A training run's record, kept by rank 0: MLflow params/metrics/artifacts and metrics.jsonl.

MLflow goes where the driver said (`tracking_uri`: MLFLOW_TRACKING_URI, else a local store in
the driver's working directory, as an absolute URI so a worker on any node writes the same
store). The same records also go to the model dir's metrics.jsonl, so `gpt2 visualize` and the
loss-curve PNG need no MLflow.

For the stages that read or add to a finished run: `open_run` (a client on the store that holds
a run id, RunError when there is none), `log_evaluation` (`gpt2 evaluate`'s results on a run).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


class RunError(ValueError):
    """A run (dir, id or MLflow store) that is missing or holds no metrics."""


def tracking_uri(uri: str | None = None) -> str:
    """`uri`, else MLFLOW_TRACKING_URI, else `mlflow.db` in the working directory (what a bare
    `mlflow ui` reads); a relative local store made absolute, since workers run elsewhere."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:  # a directory: MLflow's file store
        return str(Path(uri).resolve())
    return uri


def check_server(uri: str, timeout: float = 5.0) -> None:
    """An http(s) tracking server that does not answer fails here, on the driver, in one
    sentence; inside a worker MLflow's client would retry it for minutes, then fail the run."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered (a proxy or a server without /health): reachable is all we ask
    except OSError as e:  # URLError, timeouts, refused connections
        raise RunError(f"the MLflow tracking server at {uri} does not answer "
                       f"({getattr(e, 'reason', e)}): start it (mlflow server --host 127.0.0.1 "
                       "--port 5000) or set --tracking_uri / MLFLOW_TRACKING_URI to one that "
                       "runs.") from None


def mlflow_params(config: dict) -> dict[str, str]:
    """A config as MLflow params: every field, None and lists written out."""
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in config.items()}


class RunLog:
    """Rank 0's MLflow run plus the history that becomes metrics.jsonl.

    `run_id` continues a run (a resumed checkpoint carries it); `history` is the record so far.
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, params: dict,
                 run_id: str | None = None, history: list[dict] | None = None,
                 tags: dict[str, str] | None = None):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        self.client = mlflow.MlflowClient(tracking_uri)
        self.history = list(history or [])
        if run_id and self._exists(run_id):
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        # tags: e.g. {"mlflow.parentRunId": sweep_run} nests this run under a Tune sweep's
        self.run_id = self.client.create_run(exp_id, run_name=run_name,
                                             tags=tags or {}).info.run_id
        params = mlflow_params(params)
        self.client.log_batch(self.run_id, params=[
            mlflow.entities.Param(k, v) for k, v in params.items()])

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # another store, or the run was deleted: start a new one
            return False

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One record at `step`: to MLflow and to the history."""
        import time

        now = int(time.time() * 1000)
        self.history.append({"step": step, **metrics})
        self.client.log_batch(self.run_id, metrics=[
            self.mlflow.entities.Metric(k, float(v), now, step) for k, v in metrics.items()])

    def write_history(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / METRICS_FILE
        path.write_text("".join(json.dumps(r) + "\n" for r in self.history), encoding="utf-8")
        return path

    def finish(self, model_dir: str | Path, plot: str | Path) -> None:
        """Upload the model dir and the loss-curve PNG as artifacts; mark the run finished."""
        self.client.log_artifacts(self.run_id, str(model_dir), artifact_path="model")
        self.client.log_artifact(self.run_id, str(plot))
        self.client.set_terminated(self.run_id, status="FINISHED")


def read_history(model_dir: str | Path, up_to_step: int) -> list[dict]:
    """A checkpoint's history, without records past its step (a restarted run redoes those)."""
    from gpt2core.plots import read_metrics

    path = Path(model_dir) / METRICS_FILE
    return [r for r in read_metrics(path) if r["step"] <= up_to_step] if path.is_file() else []


def open_run(run_id: str, uri: str | None = None):
    """An MlflowClient on the store (`uri`, resolved as `tracking_uri` does) that holds
    `run_id`; RunError when either does not exist."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(uri)
    local = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else \
        uri if "://" not in uri else None
    if local is not None and not Path(local).exists():
        # reading would create an empty store there as a side effect
        raise RunError(f"there is no MLflow store at {uri}; set MLFLOW_TRACKING_URI (or "
                       "--tracking_uri) to the store training logged to.")
    check_server(uri)
    client = MlflowClient(uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise RunError(f"MLflow run {run_id} does not exist in {uri}; check the id (`mlflow ui "
                       f"--backend-store-uri {uri}` lists runs) or the tracking URI.") from None
    return client


def log_evaluation(client, run_id: str, results: dict) -> None:
    """`gpt2 evaluate`'s results as evaluate/* metrics at the run's last step, the corpus as a
    tag."""
    import time

    import mlflow

    steps = [m.step for key in ("eval/loss", "train/loss")
             for m in client.get_metric_history(run_id, key)]
    step, now = max(steps, default=0), int(time.time() * 1000)
    names = {"loss": "loss", "perplexity": "ppl", "bits_per_byte": "bpb", "accuracy": "accuracy",
             "tokens": "tokens"}
    client.log_batch(run_id, metrics=[
        mlflow.entities.Metric(f"evaluate/{v}", float(results[k]), now, step)
        for k, v in names.items()])
    client.set_tag(run_id, "evaluate/corpus", ", ".join(results["eval_corpus"])[:5000])
