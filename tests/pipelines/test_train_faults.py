"""What `gpt2 train` survives beyond a dead worker (test_train.py): a driver killed outright,
resumed by running the same command again with --resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.training import checkpoint

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def records(model_dir) -> list[dict]:
    return [json.loads(line) for line in Path(model_dir, "metrics.jsonl").read_text().splitlines()]


def test_a_killed_driver_resumes_when_the_same_command_runs_again(tmp_path, train_data):
    import mlflow

    runs, uri = tmp_path / "runs", f"sqlite:///{tmp_path}/mlflow.db"
    command = [sys.executable, "pipelines/train.py", "--resume", "--data", str(train_data),
               "--storage_path", str(runs), "--tracking_uri", uri, "--layers", "2", "--heads",
               "2", "--dims", "64", "--batch_train", "8", "--total_steps", "60", "--log_steps",
               "5", "--eval_steps", "60", "--save_steps", "10", "--seed", "1"]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    saved, deadline = None, time.time() + 300
    while saved is None and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
        for run in runs.glob("gpt2-*"):
            try:
                saved = checkpoint.find(str(run))  # a complete one
            except ValueError:
                pass
    assert saved is not None, first.stdout.read() if first.poll() is not None else "no ckpt"
    time.sleep(1)
    os.kill(first.pid, signal.SIGKILL)  # the driver only: Ray stops the workers it owned
    first.wait(timeout=60)
    first.stdout.close()
    (run_dir,) = runs.glob("gpt2-*")
    killed_at = checkpoint.Position.of(checkpoint.load_state(checkpoint.find(str(run_dir))))
    assert 0 < killed_at.step < 60, "the first run got too far before the kill"

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming {run_dir.name} from " in again.stdout
    assert [p.name for p in runs.glob("gpt2-*")] == [run_dir.name]  # no second run
    steps = [r["step"] for r in records(run_dir / "model") if "train/loss" in r]
    assert steps == list(range(5, 61, 5))  # continuous: nothing lost, nothing twice
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("gpt2").experiment_id])
    # the same run continued
    assert run.info.run_id == checkpoint.run_id(checkpoint.find(str(run_dir)))
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name


def _add_node(cluster, name: str):
    """A 2-CPU worker node; tried again when it misses Ray's fixed 30 s start-up limit (a
    loaded machine can)."""
    for attempt in range(3):
        node = cluster.add_node(2, f"{name}{attempt}")
        if node.poll() is None:
            return node
    raise AssertionError(f"node {name} did not start:\n" + (cluster.root / f"{name}2.log")
                         .read_text()[-2000:])


def _newest(run_dir: Path, after: int = 0) -> tuple[int, checkpoint.Position | None]:
    """(step, position) of the run's newest complete checkpoint past step `after`."""
    try:
        path = checkpoint.find(str(run_dir))
    except ValueError:
        return 0, None
    pos = checkpoint.Position.of(checkpoint.load_state(path))
    return (pos.step, pos) if pos.step > after else (0, None)


def test_elastic_training_shrinks_with_a_lost_node_and_grows_back(tmp_path, train_data, tools):
    """--num_workers 2 --min_workers 1, 2 CPUs per worker, on a 1-CPU head (no worker fits
    there) and two 2-CPU worker nodes: the node of one worker is killed -> the run goes on with
    1 worker (2 micro-batches a step: the same global batch); a node joins again -> back to 2
    workers. Read from the run's checkpoints."""
    cluster = tools.LocalCluster(tmp_path)
    run_dir = tmp_path / "runs" / "elastic"
    driver = None
    try:
        cluster.start_head(num_cpus=1)  # Ray Data's reads
        nodes = [_add_node(cluster, "a"), _add_node(cluster, "b")]
        command = [sys.executable, "pipelines/train.py", "--data", str(train_data),
                   "--storage_path", str(tmp_path / "runs"), "--name", "elastic",
                   "--tracking_uri", f"sqlite:///{tmp_path}/mlflow.db", "--layers", "1",
                   "--heads", "2", "--dims", "32", "--batch_train", "8", "--num_workers", "2",
                   "--min_workers", "1", "--cpus_per_worker", "2", "--total_steps", "100000",
                   "--save_steps", "10", "--log_steps", "10", "--eval_steps", "100000",
                   "--max_failures", "5", "--keep_checkpoints", "1000"]  # all kept: read after
        driver = subprocess.Popen(command, cwd=ROOT, start_new_session=True,
                                  env={**cluster.env, "RAY_ADDRESS": cluster.address,
                                       "GPT2_RESIZE_S": "5",
                                       # the restart with 2 workers after the kill waits this
                                       # long for the lost one before it shrinks (Ray: 60 s)
                                       "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30"},
                                  stdout=open(tmp_path / "driver.log", "w"),
                                  stderr=subprocess.STDOUT)

        def wait_for(world: int, after: int) -> int:
            deadline = time.time() + 400
            while time.time() < deadline:
                assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
                step, pos = _newest(run_dir, after)
                if pos is not None and pos.world == world:
                    return step
                time.sleep(1)
            raise AssertionError(f"no checkpoint with {world} worker(s) after step {after}:\n"
                                 + (tmp_path / "driver.log").read_text()[-3000:])

        first = wait_for(2, 0)
        cluster.kill(nodes[0])  # a worker's node: each holds one (the head has room for none)
        shrunk = wait_for(1, first)
        _add_node(cluster, "c")
        grown = wait_for(2, shrunk)
    finally:
        if driver is not None and driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        cluster.stop()
    history = records(run_dir / checkpoint.dir_name(grown) / checkpoint.MODEL_DIR)
    logged = [r for r in history if "train/loss" in r]
    steps = [r["step"] for r in logged]
    assert steps == sorted(set(steps)) and steps[-1] == grown  # none twice, in order
    workers = [r["train/workers"] for r in logged]
    # 2, then 1, then 2 again. The run may begin with 1: Ray Train's elastic policy starts
    # with the workers its autoscaling coordinator sees room for, and on a loaded machine it
    # can see one node before the other; it grows to 2 within GPT2_RESIZE_S then.
    two = workers.index(2)
    assert 1 in workers[two:] and 2 in workers[workers.index(1, two):], workers
    per_step = {(b["train/tokens"] - a["train/tokens"]) / (b["step"] - a["step"])
                for a, b in zip(logged, logged[1:])}
    assert len(per_step) == 1  # the global batch: the same on 2 workers and on 1
