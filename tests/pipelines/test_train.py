"""pipelines/train.py on a local 2-CPU Ray cluster: DDP, MLflow, checkpoints, resume, faults."""

import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from pipelines.train import main, train
from pipelines.training.config import TrainConfig

pytestmark = pytest.mark.slow

METRICS = ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu",
           "eval/loss", "eval/ppl", "eval/bpb"]


@pytest.fixture(scope="module")
def data_dir(train_data) -> Path:
    return train_data


def config(tmp: Path, data: Path, **overrides) -> TrainConfig:
    """A 2-layer, 64-wide model that trains in seconds; runs and MLflow under `tmp`."""
    base = dict(data=str(data), storage_path=str(tmp / "runs"), name="run",
                tracking_uri=f"sqlite:///{tmp}/mlflow.db", layers=2, heads=2, dims=64,
                batch_train=8, batch_eval=16, warmup_steps=5, base_lr=3e-3, log_steps=5,
                total_steps=40, eval_steps=20, save_steps=20, seed=1)
    return TrainConfig(**{**base, **overrides})


def records(model_dir) -> list[dict]:
    return [json.loads(line) for line in Path(model_dir, "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("two_workers")
    cfg = config(tmp, data_dir, num_workers=2)
    return cfg, train(cfg)


def test_two_workers_train_and_the_loss_falls(two_workers):
    cfg, out = two_workers
    evals = [r["eval/loss"] for r in records(out["model_dir"]) if "eval/loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0] < math.log(300)  # below uniform guessing
    steps = [r["step"] for r in records(out["model_dir"]) if "train/loss" in r]
    assert steps == list(range(5, 41, 5))
    assert out["metrics"]["step"] == 40 and out["metrics"]["eval/loss"] == evals[1]
    model_dir = Path(out["model_dir"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl",
                 "loss_curve.png"):
        assert (model_dir / name).is_file(), name
    kept = sorted(p.name for p in Path(out["run_dir"]).glob("checkpoint_*") if p.is_dir())
    assert kept == ["checkpoint_0000020", "checkpoint_0000040"]


def test_mlflow_has_the_whole_config_metrics_and_artifacts(two_workers):
    """Logged by the Train controller from rank 0's reports (the workers import no MLflow:
    test_tracking.py); the artifacts lie beside the store, not in Ray's temp dir."""
    import mlflow

    cfg, out = two_workers
    client = mlflow.MlflowClient(out["tracking_uri"])
    run = client.get_run(out["metrics"]["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    for field, value in asdict(cfg).items():
        assert field in run.data.params, field
    assert run.data.params["num_workers"] == "2" and run.data.params["base_lr"] == "0.003"
    assert run.data.params["world_size"] == "2" and int(run.data.params["num_params"]) > 0
    assert set(METRICS) <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [20, 40]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(5, 41, 5))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/config.json", "model/model.safetensors", "model/loss_curve.png"} <= artifacts
    location = client.get_experiment(run.info.experiment_id).artifact_location
    store_dir = Path(out["tracking_uri"][len("sqlite:///"):]).parent
    assert location == str(store_dir / "mlartifacts" / cfg.experiment)
    assert "/tmp/ray/" not in location and "/ray/session_" not in location
    on_disk = Path(location, run.info.run_id, "artifacts")
    for name in ("model/config.json", "model/model.safetensors", "model/metrics.jsonl",
                 "model/loss_curve.png", "loss_curve.png"):
        assert (on_disk / name).is_file(), name


def test_exported_model_dir_loads_in_transformers(two_workers):
    import torch
    from transformers import GPT2LMHeadModel

    from gpt2core import GPT2

    model_dir = two_workers[1]["model_dir"]
    ours, theirs = GPT2.from_pretrained(model_dir).eval(), GPT2LMHeadModel.from_pretrained(
        model_dir).eval()
    ids = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4)


def test_from_checkpoint_reaches_the_same_loss_as_an_uninterrupted_run(tmp_path, data_dir):
    # dropout on and a shuffle buffer: resuming must restore the data position and RNG too;
    # resumed from Ray's object store (cached) and from the files (streamed): the same rows
    common = dict(dropout=0.1, total_steps=30, save_steps=10, eval_steps=30)
    whole = train(config(tmp_path, data_dir, name="whole", keep_checkpoints=3, **common))
    a = records(whole["model_dir"])
    for cache_train_mb in (1024, 0):
        resumed = train(config(tmp_path, data_dir, name=f"resumed-{cache_train_mb}",
                               cache_train_mb=cache_train_mb, **common,
                               from_checkpoint=f"{whole['run_dir']}/checkpoint_0000010"))
        b = records(resumed["model_dir"])
        assert [r["step"] for r in b] == [r["step"] for r in a]  # history carried over
        for ra, rb in zip(a, b):
            if ra["step"] > 10:  # the steps run again after resuming: same losses (1e-4)
                assert rb["train/loss"] == pytest.approx(ra["train/loss"], abs=1e-4), \
                    (cache_train_mb, ra["step"])
        assert b[-1]["eval/loss"] == pytest.approx(a[-1]["eval/loss"], abs=1e-4)
        assert resumed["metrics"]["mlflow_run_id"] == whole["metrics"]["mlflow_run_id"]


def _train_worker_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_a_killed_worker_is_replaced_and_the_run_continues(tmp_path, data_dir):
    import mlflow

    cfg = config(tmp_path, data_dir, name="faulty", total_steps=160, save_steps=10,
                 eval_steps=160, max_failures=2)
    killed = []

    def kill_after_first_checkpoint():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if (tmp_path / "runs" / "faulty" / "checkpoint_0000010").is_dir():
                for pid in _train_worker_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    out = train(cfg)
    killer.join()
    assert killed, "no training worker was found to kill"
    assert out["metrics"]["step"] == 160
    steps = [r["step"] for r in records(out["model_dir"]) if "train/loss" in r]
    assert steps == list(range(5, 161, 5))  # continuous: nothing lost, nothing twice
    # the same in MLflow: the steps the new workers redid are not logged again
    history = mlflow.MlflowClient(out["tracking_uri"]).get_metric_history(
        out["metrics"]["mlflow_run_id"], "train/loss")
    assert [m.step for m in history] == list(range(5, 161, 5))


def test_mlflow_tracking_server(tmp_path, data_dir, mlflow_server):
    import mlflow

    out = train(config(tmp_path, data_dir, tracking_uri=mlflow_server, total_steps=10,
                       eval_steps=10, save_steps=10))
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(out["metrics"]["mlflow_run_id"])
    assert run.data.params["total_steps"] == "10" and set(METRICS) <= set(run.data.metrics)
    names = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert "model/model.safetensors" in names


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 with its own store; stopped after the test."""
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no 8 consumers
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, "mlflow server exited"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/missing"], "dataset {tmp}/missing does not exist"),
    (["--seq_len", "24"], "does not fit the dataset's rows of 32"),
    (["--batch_train", "100000"], "batch is larger than the data"),
    (["--preset", "gpt3"], "unknown preset 'gpt3'"),
    (["--gpus", "1"], "--gpus 1 asks for more GPUs than the cluster has (0)"),
    (["--from_pretrained", "{tmp}/nomodel"], "model dir {tmp}/nomodel does not exist"),
    (["--from_checkpoint", "{tmp}"], "holds no complete checkpoint_"),
    (["--tracking_uri", "http://127.0.0.1:9"],
     "the MLflow tracking server at http://127.0.0.1:9 does not answer"),
])
def test_bad_input_is_one_sentence_and_exit_2(tmp_path, data_dir, capsys, monkeypatch, args,
                                              message):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")  # not ./
    args = [a.format(tmp=tmp_path) for a in args]
    argv = ["--data", str(data_dir), "--storage_path", str(tmp_path / "runs"), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpt2 train: error: ") and message.format(tmp=tmp_path) in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written
    assert not (tmp_path / "mlflow.db").exists()


def test_fsdp_from_a_ddp_checkpoint_is_one_sentence_before_ray(tmp_path, data_dir, capsys,
                                                              monkeypatch, make_checkpoint):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    ckpt = make_checkpoint(tmp_path / "old", 10)  # its optimizer state whole: ddp's
    argv = ["--data", str(data_dir), "--storage_path", str(tmp_path / "runs"),
            "--strategy", "fsdp", "--from_checkpoint", ckpt]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"gpt2 train: error: {ckpt} was saved by --strategy ddp (its optimizer "
                   "state whole, keyed by parameter order); resume it with --strategy ddp.")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, message", [
    (["--data", "s3://no-such-bucket-x/data"],
     "--data s3://no-such-bucket-x/data: bucket 'no-such-bucket-x' does not exist"),
    (["--data", "{bucket}/nothing"], "dataset {bucket}/nothing does not exist"),
    (["--data", "{bucket}/partial"], "dataset {bucket}/partial has no manifest.json"),
    (["--from_checkpoint", "{bucket}/partial"], "holds no complete checkpoint_"),
    (["--from_pretrained", "{bucket}/partial"], "{bucket}/partial has no config.json"),
    (["--storage_path", "s3://no-such-bucket-x/runs"], "bucket 'no-such-bucket-x' does not"),
    (["--endpoint"], "--data {bucket}/data: the storage endpoint does not answer"),
])
def test_bad_object_storage_is_one_sentence_before_ray(tmp_path, data_dir, bucket, capsys,
                                                       monkeypatch, args, message):
    """Missing buckets, prefixes without their marker, an endpoint that does not answer: one
    sentence, exit 2, before any worker starts; nothing written to the bucket."""
    from gpt2core import storage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    storage.upload(data_dir, f"{bucket}/data", last=["manifest.json"])
    storage.write_text(f"{bucket}/partial/train/00000.parquet", "half a dataset")
    before = storage.files(bucket)
    if args == ["--endpoint"]:
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        args = []
    argv = ["--data", f"{bucket}/data", "--storage_path", f"{bucket}/runs",
            *[a.format(bucket=bucket) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpt2 train: error: ") and message.format(bucket=bucket) in err
    assert len(err.splitlines()) == 1
    monkeypatch.undo()
    assert storage.files(bucket) == before


def test_vocab_mismatch_with_a_pretrained_model(tmp_path, data_dir, capsys):
    from gpt2core import GPT2, GPT2Config

    GPT2(GPT2Config(vocab_size=500, n_positions=32, n_embd=32, n_layer=1, n_head=2)) \
        .save_pretrained(tmp_path / "m")
    assert main(["--data", str(data_dir), "--from_pretrained", str(tmp_path / "m")]) == 2
    assert "vocabulary of 500 tokens but the dataset's has 300" in capsys.readouterr().err
