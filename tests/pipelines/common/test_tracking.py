"""pipelines/common/tracking.py without a Ray cluster: where a new experiment keeps its
artifacts, the refusal of one that keeps them in Ray's temp dir, what RunWriter logs from
rank 0's reports, which run a resumed fit continues, and that a worker's modules import no
MLflow."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.common import tracking
from pipelines.training import checkpoint
from pipelines.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[3]


def store(tmp: Path) -> str:
    return f"sqlite:///{tmp / 'mlflow.db'}"


def fake_checkpoint(path: Path, run_id: str | None = None) -> Path:
    """A checkpoint dir as checkpoint.save writes one (files present, contents minimal)."""
    import torch

    (path / "model").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "loss_curve.png"):
        (path / "model" / name).write_text("{}")
    torch.save({"step": 20, "run_id": run_id}, path / "train_state.pt")
    return path


def test_artifact_root_is_beside_a_local_store_and_the_servers_own_otherwise(tmp_path):
    assert tracking.artifact_root(store(tmp_path), "gpt2") == str(tmp_path / "mlartifacts/gpt2")
    assert tracking.artifact_root(str(tmp_path / "mlruns"), "e") == str(tmp_path / "mlartifacts/e")
    assert tracking.artifact_root("http://127.0.0.1:5000", "gpt2") is None


def test_writer_logs_records_once_and_the_final_model_beside_the_store(tmp_path):
    import mlflow
    import ray.train

    uri = store(tmp_path)
    run = tracking.RunLog(uri, "exp", "run", {"layers": 2, "corpus": ["a.txt"]})
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("exp")
    assert exp.artifact_location == str(tmp_path / "mlartifacts" / "exp")

    writer = tracking.RunWriter(uri, run.run_id, total_steps=20)
    history = tracking.History([], num_params=1234, world_size=2)
    for step in (5, 10):
        history.add(step, {"train/loss": 6.0 - step / 10})
    writer.report({"step": 10, **history.report()})
    # a restarted worker group redoes steps 10 and 15; only what is new is logged
    history = tracking.History([], num_params=1234, world_size=2)
    for step in (10, 15, 20):
        history.add(step, {"train/loss": 5.0 - step / 10})
    history.records[-1]["eval/loss"] = 4.5
    ckpt = ray.train.Checkpoint.from_directory(str(fake_checkpoint(tmp_path / "ckpt")))
    writer.report({"step": 20, **history.report()}, ckpt)

    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and writer.finished
    assert got.data.params["num_params"] == "1234" and got.data.params["world_size"] == "2"
    assert got.data.params["corpus"] == '["a.txt"]'
    losses = client.get_metric_history(run.run_id, "train/loss")
    assert [(m.step, m.value) for m in losses] == [(5, 5.5), (10, 5.0), (15, 3.5), (20, 3.0)]
    assert [m.step for m in client.get_metric_history(run.run_id, "eval/loss")] == [20]
    on_disk = tmp_path / "mlartifacts" / "exp" / run.run_id / "artifacts"
    for name in ("model/config.json", "model/model.safetensors", "model/loss_curve.png",
                 "loss_curve.png"):
        assert (on_disk / name).is_file(), name


def test_a_resumed_fit_fills_in_only_what_its_run_lacks(tmp_path):
    """A sweep interrupted after a trial's checkpoint, before Tune passed on its result: the
    resumed trial's first report carries the checkpoint's history, and the steps MLflow lacks
    are logged from it; those it has are not logged twice."""
    import mlflow

    uri = store(tmp_path)
    run = tracking.RunLog(uri, "exp", "trial", {})
    run.log(5, {"train/loss": 6.0})
    writer = tracking.RunWriter(uri, run.run_id, total_steps=30)
    writer.report({"step": 20, tracking.RECORDS: [{"step": 20, "train/loss": 4.0}],
                   tracking.RESTORED: [{"step": 5, "train/loss": 6.0},
                                       {"step": 10, "train/loss": 5.0}]})
    history = mlflow.MlflowClient(uri).get_metric_history(run.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(5, 6.0), (10, 5.0), (20, 4.0)]


def test_an_experiment_in_rays_temp_dir_is_refused_in_one_sentence(tmp_path):
    import mlflow

    uri = store(tmp_path)
    mlflow.MlflowClient(uri).create_experiment(
        "gpt2", artifact_location="/tmp/ray/session_2026_01_01/artifacts/run/mlruns/1")
    with pytest.raises(tracking.RunError) as e:
        tracking.check_experiment(uri, "gpt2")
    message = str(e.value)
    assert "Ray's temp dir" in message and "--experiment NEW_NAME" in message
    assert message.count(". ") == 0 and "\n" not in message
    with pytest.raises(tracking.RunError, match="Ray's temp dir"):
        tracking.RunLog(uri, "gpt2", "run", {})
    tracking.check_experiment(uri, "other")  # a new name is fine


def test_train_and_tune_refuse_it_before_ray_starts(tmp_path, refused, capsys):
    import mlflow

    from pipelines import train, tune

    uri = store(tmp_path)
    mlflow.MlflowClient(uri).create_experiment(  # Ray started with --temp-dir /scratch/ray
        "gpt2", artifact_location="/scratch/ray/session_latest/artifacts/run/mlruns/1")
    capsys.readouterr()  # MLflow's lines about making the store
    for main in (train.main, tune.main):  # the --data given is missing: no demo if not refused
        err = refused(main, "--tracking_uri", uri, "--storage_path", tmp_path / "runs",
                      "--data", tmp_path / "missing")
        assert "keeps its artifacts in Ray's temp dir" in err
    assert not (tmp_path / "runs").exists()


def test_a_store_in_rays_temp_dir_is_refused(tmp_path):
    """Under `ray job submit` without --tracking_uri, ./mlflow.db is in the job's working-dir
    copy, which Ray deletes with its session."""
    uri = f"sqlite:///{tmp_path}/ray/session_2026-11-29_05-00-00/runtime_resources/mlflow.db"
    with pytest.raises(tracking.RunError, match="inside Ray's temporary dir.*--tracking_uri"):
        tracking.check_experiment(uri, "gpt2")


def test_checking_a_store_that_does_not_exist_creates_none(tmp_path):
    tracking.check_experiment(store(tmp_path), "gpt2")
    assert not (tmp_path / "mlflow.db").exists()


def test_a_resumed_fit_continues_the_run_its_checkpoint_belongs_to(tmp_path, make_checkpoint):
    run_dir = tmp_path / "runs" / "run"
    elsewhere = make_checkpoint(tmp_path / "copied", 20, run_id="aaa")
    assert checkpoint.resumed(str(run_dir), None) is None  # a new run
    assert checkpoint.run_id(checkpoint.resumed(str(run_dir), elsewhere)) == "aaa"
    make_checkpoint(run_dir, 20, run_id="bbb")  # a reused --name: its own, not the flag's
    assert checkpoint.run_id(checkpoint.resumed(str(run_dir), elsewhere)) == "bbb"

    uri = store(tmp_path)
    first = tracking.RunLog(uri, "exp", "run", {"a": 1})
    cfg = TrainConfig(experiment="exp",  # as plan_job resolved it
                      from_checkpoint=make_checkpoint(tmp_path / "second", 20,
                                                      run_id=first.run_id))
    resumed = checkpoint.run_id(checkpoint.resumed(str(tmp_path / "runs" / "again"),
                                                   cfg.from_checkpoint))
    with tracking.train_run(uri, cfg, "again", resumed) as run:
        assert run.run_id == first.run_id


def test_train_run_records_the_config_and_a_failed_fit(tmp_path):
    import mlflow

    uri, cfg = store(tmp_path), TrainConfig(experiment="exp", total_steps=7)
    with pytest.raises(RuntimeError):
        with tracking.train_run(uri, cfg, "run", None) as run:
            raise RuntimeError("a worker died too often")
    got = mlflow.MlflowClient(uri).get_run(run.run_id)
    assert got.info.status == "FAILED" and got.info.run_name == "run"
    assert set(TrainConfig.__dataclass_fields__) <= set(got.data.params)
    assert got.data.params["total_steps"] == "7"


def test_history_writes_everything_and_reports_what_is_new(tmp_path):
    history = tracking.History([{"step": 5, "train/loss": 6.0}], num_params=10, world_size=1)
    history.add(10, {"train/loss": 5.0})
    assert history.report() == {tracking.RECORDS: [{"step": 10, "train/loss": 5.0}],
                                tracking.RESTORED: [{"step": 5, "train/loss": 6.0}],
                                "num_params": 10, "world_size": 1}
    assert history.report() == {tracking.RECORDS: [], "num_params": 10, "world_size": 1}
    history.write(tmp_path)
    assert tracking.read_history(tmp_path, 10) == history.records
    assert tracking.read_history(tmp_path, 7) == history.records[:1]


def test_a_workers_modules_import_no_mlflow():
    """What train_loop_per_worker imports (pipelines.training.worker and what it calls) leaves
    MLflow out: a worker may run on a node without the store."""
    code = ("import sys, ray.train, ray.train.torch, pipelines.training.worker, "
            "pipelines.training.driver, gpt2core.training, pipelines.common.plots; "
            "print('mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_run_page_links_to_the_runs_metric_charts(tmp_path):
    uri = store(tmp_path)
    run = tracking.RunLog(uri, "exp", "run", {"a": 1})
    from mlflow import MlflowClient

    exp = MlflowClient(uri).get_run(run.run_id).info.experiment_id
    assert tracking.run_page(uri, run.run_id) == \
        f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{run.run_id}/model-metrics"
