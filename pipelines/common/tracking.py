"""A training run's record: MLflow params/metrics/artifacts, and metrics.jsonl.

Who writes what (docs/design.md, "Tracking"): the Ray Train workers never talk to MLflow. Rank 0
keeps its records (`History`): all of them go to metrics.jsonl in each checkpoint's model dir
(`gpt2 visualize` and the loss-curve PNG need no MLflow), and those since its last report ride
with its `ray.train.report` (key RECORDS). MLflow is written from beside the driver: the run is
made on the driver (`train_run`, `RunLog`), then `RunWriter` logs the reports to it, inside the
Train controller (`train_run`'s callback) or the Tune driver (tune_report.trial_runs). So the
default local store (`tracking_uri`: MLFLOW_TRACKING_URI, else ./mlflow.db) works whatever node
the workers run on, and a new experiment in a local store keeps its artifacts beside the store
(`artifact_root`), never in the working dir of a Ray process (Ray's temp dir).

For the stages that read or add to a finished run: `open_run` (a client on the store that holds
a run id, RunError when there is none), `log_evaluation` (`gpt2 evaluate`'s results on a run).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from gpt2core.errors import UserError

METRICS_FILE = "metrics.jsonl"
RECORDS = "records"  # in rank 0's reports: its records since its previous report
RESTORED = "restored_records"  # in its first: the resumed checkpoint's history
MODEL_PARAMS = ("num_params", "world_size")  # in rank 0's reports; MLflow params, logged once
RAY_TEMP = ("/tmp/ray/", "/ray/session_")  # Ray's temp dirs: deleted with the session
PARAM_LIMIT = 6000  # MLflow's longest param value


class RunError(UserError):
    """A run (dir, id or MLflow store) that is missing or holds no metrics."""


def tracking_uri(uri: str | None = None) -> str:
    """`uri`, else MLFLOW_TRACKING_URI, else `mlflow.db` in the working directory (what a bare
    `mlflow ui` reads); a relative local store made absolute, so every process means one file."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:  # a directory: MLflow's file store
        return str(Path(uri).resolve())
    return uri


def local_store(uri: str) -> Path | None:
    """The file (sqlite) or directory (file store) of a local store; None for a server."""
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            return Path(uri[len(scheme):])
    return None if "://" in uri else Path(uri)


def artifact_root(uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: beside a local store, in
    <store's dir>/mlartifacts/<experiment> (else MLflow's default is relative to the working dir
    of whichever process makes the experiment); None for a server, whose
    --default-artifact-root / --artifacts-destination decides."""
    store = local_store(uri)
    return None if store is None else str(store.resolve().parent / "mlartifacts" / experiment)


def check_server(uri: str, timeout: float = 30.0) -> None:
    """An http(s) tracking server that does not answer fails here, on the driver, in one
    sentence; MLflow's client would retry it for minutes, then fail the run."""
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


def _check_usable(exp) -> None:
    """RunError for an experiment that cannot take runs whose artifacts last."""
    if exp.lifecycle_stage == "deleted":
        raise RunError(f"MLflow experiment {exp.name!r} is deleted; restore it (mlflow "
                       f"experiments restore --experiment-id {exp.experiment_id}) or pass "
                       "--experiment NEW_NAME.")
    if any(t in exp.artifact_location for t in RAY_TEMP):
        raise RunError(f"MLflow experiment {exp.name!r} keeps its artifacts in Ray's temp dir "
                       f"({exp.artifact_location}), which Ray deletes; pass --experiment "
                       f"NEW_NAME (a new experiment keeps them beside the store), or delete or "
                       f"rename {exp.name!r} in `mlflow ui`.")


def check_experiment(uri: str, experiment: str) -> None:
    """Before Ray starts: the server answers, and an existing `experiment` can keep artifacts.
    Only reads: a local store that does not exist yet is not created here."""
    store = local_store(uri)
    if store is not None and any(t in str(store.resolve()) for t in RAY_TEMP):
        raise RunError(f"the MLflow store {uri} is inside Ray's temporary dir (under `ray job "
                       "submit` a relative path lands in the job's copy of the working dir), "
                       "which Ray deletes; pass --tracking_uri sqlite:////ABSOLUTE/PATH/mlflow.db "
                       "or a tracking server (http://HOST:5000).")
    if store is not None and not store.exists():
        return
    check_server(uri)
    from mlflow import MlflowClient

    exp = MlflowClient(uri).get_experiment_by_name(experiment)
    if exp is not None:
        _check_usable(exp)


def experiment_id(client, uri: str, experiment: str) -> str:
    """The id of `experiment`, made (with `artifact_root`) when it does not exist."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return client.create_experiment(experiment,
                                        artifact_location=artifact_root(uri, experiment))
    _check_usable(exp)
    return exp.experiment_id


def run_page(uri: str, run_id: str) -> str:
    """The run's metric charts in MLflow's UI: on the tracking server `uri`, or on the
    `mlflow ui --backend-store-uri URI` that a local store needs (its default address)."""
    from mlflow import MlflowClient

    experiment = MlflowClient(uri).get_run(run_id).info.experiment_id
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment}/runs/{run_id}/model-metrics"


def mlflow_params(config: dict) -> dict[str, str]:
    """A config as MLflow params: every field, None and lists written out."""
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in config.items()}


# --- beside the driver: making runs and logging to them -------------------------------------

class RunLog:
    """An MLflow run made (or continued: `run_id`, when the store has it) by the driver, with
    `params`; `tags` e.g. {"mlflow.parentRunId": sweep_run} nests it under a Tune sweep's."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, params: dict,
                 run_id: str | None = None, tags: dict[str, str] | None = None):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri)
        found = self._find(run_id) if run_id else None
        if found is not None:  # its experiment, too, must keep artifacts
            _check_usable(self.client.get_experiment(found.info.experiment_id))
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        exp_id = experiment_id(self.client, tracking_uri, experiment)
        self.run_id = self.client.create_run(exp_id, run_name=run_name,
                                             tags=tags or {}).info.run_id
        self.client.log_batch(self.run_id, params=[
            Param(k, v[:PARAM_LIMIT]) for k, v in mlflow_params(params).items()])

    def _find(self, run_id: str):
        try:
            return self.client.get_run(run_id)
        except Exception:  # another store, or the run was deleted: start a new one
            return None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One record at `step`."""
        log_records(self.client, self.run_id, [{"step": step, **metrics}])


def log_records(client, run_id: str, records: list[dict]) -> None:
    """Records ({"step": n, name: value, ...}) as MLflow metrics at their steps."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, r["step"]) for r in records
               for k, v in r.items() if k != "step"]
    for i in range(0, len(metrics), 1000):  # MLflow's most metrics per batch
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


class RunWriter:
    """Logs rank 0's reports to MLflow run `run_id`: its records, its model's params once, and
    at the report of step `total_steps` the checkpoint's model dir and loss curve, then
    FINISHED. Made on the driver and pickled to where it runs; the client is made there."""

    def __init__(self, uri: str, run_id: str, total_steps: int):
        self.uri, self.run_id, self.total_steps = uri, run_id, total_steps
        self.logged = 0  # the last step logged: a restarted worker group redoes steps
        self.has_params = self.finished = False
        self._client = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}  # a client holds connections

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    def report(self, metrics: dict, checkpoint=None) -> None:
        """One report of rank 0 (its metrics dict) and the checkpoint persisted with it."""
        from mlflow.entities import Param

        if not self.has_params:  # a continued run keeps the params it has
            have = self.client.get_run(self.run_id).data.params
            self.client.log_batch(self.run_id, params=[
                Param(k, str(metrics[k])) for k in MODEL_PARAMS
                if k in metrics and k not in have])
            self.has_params = True
        new = [r for r in metrics.get(RECORDS) or [] if r["step"] > self.logged]
        restored = metrics.get(RESTORED) or []
        if restored:  # what the run may lack: a Tune result lost when a sweep was interrupted
            last = max(self.logged, self._last_step())
            new = [r for r in restored if r["step"] > last] + new
        if new:
            log_records(self.client, self.run_id, new)
            self.logged = new[-1]["step"]
        if checkpoint is not None and metrics.get("step") == self.total_steps:
            with checkpoint.as_directory() as d:
                model_dir = Path(d) / "model"  # checkpoint.MODEL_DIR
                self.client.log_artifacts(self.run_id, str(model_dir), artifact_path="model")
                if (model_dir / "loss_curve.png").is_file():
                    self.client.log_artifact(self.run_id, str(model_dir / "loss_curve.png"))
            self.end("FINISHED")

    def _last_step(self) -> int:
        """The run's last step with a train or eval loss (0: none)."""
        return max((m.step for key in ("train/loss", "eval/loss")
                    for m in self.client.get_metric_history(self.run_id, key)), default=0)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)
        self.finished = True


def report_callback(writer: RunWriter):
    """A ray.train.UserCallback that hands rank 0's reports (metrics[0]) to `writer`.

    Ray Train calls it in the Train controller, which Ray 2.60 places on the node that called
    fit() (ray/train/v2/api/data_parallel_trainer.py, _initialize_and_run_controller:
    label_selector={RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()}); for
    `gpt2 train` that is the driver's node, where the store's path was resolved.
    """
    from ray.train import UserCallback

    class MlflowReport(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            writer.report(metrics[0], checkpoint)

    return MlflowReport()


@dataclass
class TrainRun:
    run_id: str
    callback: object  # a ray.train.UserCallback for the TorchTrainer's RunConfig


@contextmanager
def train_run(uri: str, cfg, name: str, run_id: str | None) -> Iterator[TrainRun]:
    """The MLflow run of `gpt2 train`'s config `cfg` (new, or `run_id`: the one the checkpoint
    that Ray Train resumes from belongs to) and the Train callback that logs to it. A fit that
    raises marks the run FAILED (KILLED on Ctrl-C); the callback marks it FINISHED at the last
    step."""

    run = RunLog(uri, cfg.experiment, name, asdict(cfg), run_id=run_id)
    print(f"MLflow run {run.run_id} in {uri}")
    writer = RunWriter(uri, run.run_id, cfg.total_steps)
    try:
        yield TrainRun(run.run_id, report_callback(writer))
    except BaseException as e:
        try:
            writer.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        except Exception:  # the store is gone too: the fit's error is the one to show
            pass
        raise


# --- rank 0 ---------------------------------------------------------------------------------

class History:
    """Rank 0's records: all of them (metrics.jsonl) and those not reported yet (for MLflow).

    `records`: the resumed checkpoint's history; `params`: MODEL_PARAMS' values.
    """

    def __init__(self, records: list[dict], **params):
        self.records, self.params = list(records), params
        self.unreported, self.restored = [], list(records)

    def add(self, step: int, metrics: dict[str, float]) -> None:
        self.records.append({"step": step, **metrics})
        self.unreported.append(self.records[-1])

    def report(self) -> dict:
        """What rank 0 adds to its next ray.train.report: the records since the last one (and
        in the first, the checkpoint's history: RunWriter logs what the run lacks of it)."""
        out = {RECORDS: self.unreported, **({RESTORED: self.restored} if self.restored else {}),
               **self.params}
        self.unreported, self.restored = [], []
        return out

    def write(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / METRICS_FILE
        path.write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8")
        return path


def read_history(model_dir: str | Path, up_to_step: int) -> list[dict]:
    """A checkpoint's history, without records past its step (a restarted run redoes those)."""
    from pipelines.common.plots import read_metrics

    path = Path(model_dir) / METRICS_FILE
    return [r for r in read_metrics(path) if r["step"] <= up_to_step] if path.is_file() else []


# --- after training -------------------------------------------------------------------------

def open_run(run_id: str, uri: str | None = None):
    """An MlflowClient on the store (`uri`, resolved as `tracking_uri` does) that holds
    `run_id`; RunError when either does not exist."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(uri)
    local = local_store(uri)
    if local is not None and not local.exists():
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
