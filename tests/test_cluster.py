"""The cluster promise, end to end, with real parts on 127.0.0.1: an S3 server (moto), an
`mlflow server` whose artifacts go to that S3, and a Ray cluster of several nodes (`ray start
--head` + `ray start --address`, 1 CPU each, so 2 training workers sit on 2 raylets).

The flow, as README "On a cluster" has it: text on s3:// is prepared into s3://; `ray job
submit` trains 2 workers on 2 nodes from and to s3:// while one worker node is killed mid-run
(the run goes on from its last checkpoint, on a node that joins later); a 2-trial sweep; then
evaluate and `gpt2 serve` straight from s3://, and the MLflow server holds the metrics and the
model. Also: a local --storage_path that one node cannot see is refused before training.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
TINY = ["--layers", "1", "--dims", "32", "--heads", "2", "--batch_train", "8"]


@pytest.fixture(scope="module")
def cluster(s3_server, tools, tmp_path_factory):
    """Head (1 CPU) + two 1-CPU worker nodes, and the env to reach them."""
    c = tools.LocalCluster(tmp_path_factory.mktemp("cluster"))
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"  # for the job client in this process
    try:
        c.start_head(num_cpus=1)
        c.add_node(1, "a")
        c.add_node(1, "b")
        yield c
    finally:
        c.stop()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE")
        else:
            os.environ["RAY_AUTH_MODE"] = saved


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tools, tmp_path_factory):
    """`mlflow server` with a sqlite store and its artifacts on S3 (proxied: clients need no S3)."""
    root, port = tmp_path_factory.mktemp("mlflow"), tools.free_port()
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True).create_dir("mlf")
    log = open(root / "mlflow.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", "s3://mlf/artifacts", "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # no job runner: its eight queue consumers would take the 2 CPUs' share of the cluster
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        tools.wait_port(port, server, "mlflow server", timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def run(cluster, *args, timeout=600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=cluster.env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def s3_data(cluster, tmp_path_factory):
    """150 kB of Shakespeare on s3://, prepared by Ray Data into a dataset on s3://."""
    from gpt2core import storage

    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent")
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"],
                      allow_bucket_creation=True).create_dir("corpus")
    storage.write_text("s3://corpus/text/plays.txt", SHAKESPEARE.read_text()[:150_000])
    run(cluster, "pipelines/prepare.py", "--corpus", "s3://corpus/text/", "--out",
        "s3://corpus/data", "--seq_len", "32", "--vocab_size", "300", "--val_fraction", "0.05",
        "--max_doc_bytes", "8192", "--address", cluster.address)
    return "s3://corpus/data"


def job_ended(cluster, job_id: str) -> str:
    """The job's final status (SUCCEEDED, FAILED, STOPPED), or "" while it runs."""
    status = jobs(cluster).get_job_status(job_id)
    return status.value if status.is_terminal() else ""


def job_logs(cluster, job_id: str) -> str:
    return jobs(cluster).get_job_logs(job_id)


def jobs(cluster):
    """Ray's job client for the cluster (the token from ~/.ray/auth_token, as the CLI's: the
    cluster fixture sets RAY_AUTH_MODE=token in this process while it runs)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.jobs)


def training_worker_nodes(cluster) -> set[str]:
    """Names of the nodes whose process groups hold a Ray Train worker process."""
    sessions = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                sessions[os.getsid(int(pid))] = pid
        except (OSError, ProcessLookupError):
            continue
    return {n.name for n in cluster.nodes if n.pid in sessions and n.poll() is None}


def test_prepare_train_through_a_node_failure_evaluate_serve_all_on_s3(
        cluster, s3_data, mlflow_server, tools):
    from mlflow import MlflowClient

    from gpt2core import storage
    from pipelines.common import dataset

    manifest = dataset.load_manifest(s3_data)
    assert manifest.splits["train"].rows > 0 and manifest.splits["val"].rows > 0
    # --- train: ray job submit, 2 workers on 2 raylets, data and runs on S3, MLflow server
    job_id = f"train-{os.getpid()}-{time.time_ns()}"
    job = subprocess.run(
        [cluster.ray, "job", "submit", "--address", cluster.jobs, "--no-wait",
         "--submission-id", job_id, "--working-dir", ".", "--", "python", "pipelines/train.py",
         "--data", s3_data,
         "--storage_path", "s3://corpus/runs", "--tracking_uri", mlflow_server,
         "--name", "cl", "--num_workers", "2", *TINY, "--total_steps", "60",
         "--eval_steps", "20", "--save_steps", "10", "--log_steps", "10"],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stderr[-2000:]
    deadline = time.monotonic() + 600
    while not [c for c in storage.listdir("s3://corpus/runs/cl") if c.startswith("checkpoint_")]:
        assert time.monotonic() < deadline, "no checkpoint reached S3"
        assert not job_ended(cluster, job_id), job_logs(cluster, job_id)[-4000:]
        time.sleep(2)
    hosts = training_worker_nodes(cluster) - {"head"}
    assert hosts, "no training worker on a worker node"
    victim = next(n for n in cluster.nodes if n.name == sorted(hosts)[0])
    cluster.kill(victim)  # its raylet, object store and training worker, at once
    cluster.add_node(1, "c")  # a node joins: the restarted group gets its 2 CPUs back
    while not (status := job_ended(cluster, job_id)):
        assert time.monotonic() < deadline + 600, "the job did not end"
        time.sleep(5)
    logs = job_logs(cluster, job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "finished cl: step 60" in logs
    model = "s3://corpus/runs/cl/model"  # where the README says, on the storage given
    assert {"config.json", "model.safetensors", "metrics.jsonl", "tokenizer.json"} <= \
        storage.files(model)
    steps = [json.loads(line)["step"] for line in
             storage.read_text(storage.join(model, "metrics.jsonl")).splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # one record per step, resumed

    # --- MLflow: the server has the run's metrics and the model, stored on S3
    client = MlflowClient(mlflow_server)
    run_id = next(line.split()[2] for line in logs.splitlines() if line.startswith("MLflow run:"))
    history = client.get_metric_history(run_id, "eval/loss")
    assert [m.step for m in history][-1] == 60
    assert {"model.safetensors", "config.json"} <= \
        {Path(a.path).name for a in client.list_artifacts(run_id, "model")}
    assert any(f.endswith("model/model.safetensors") for f in storage.files("s3://mlf/artifacts"))

    # --- evaluate straight from S3, on the cluster
    out = run(cluster, "pipelines/evaluate.py", "--model_path", model, "--eval_corpus",
              s3_data, "--json", "--address", cluster.address)
    result = json.loads(out.stdout)  # all of stdout: Ray's lines go to stderr
    assert result["loss"] == pytest.approx(history[-1].value, rel=0.02)

    # --- serve straight from S3
    port = tools.free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "serve", "--model_path", model, "--port",
         str(port), "--address", cluster.address], cwd=REPO, env=cluster.env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        body = json.dumps({"prompt": "\n", "max_tokens": 8, "seed": 1}).encode()
        reply = None
        for _ in range(180):
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                                 body, {"content-type": "application/json"})
                reply = json.loads(urllib.request.urlopen(request, timeout=30).read())
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()[-3000:]
                time.sleep(1)
        assert reply is not None and reply["usage"]["completion_tokens"] == 8
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=60)


def test_a_two_trial_sweep_on_s3(cluster, s3_data, mlflow_server):
    from gpt2core import storage

    out = run(cluster, "pipelines/tune.py", "--data", s3_data, "--storage_path",
              "s3://corpus/sweeps", "--tracking_uri", mlflow_server, "--name", "sw",
              "--num_samples", "2", "--scheduler", "fifo", *TINY, "--total_steps", "20",
              "--eval_steps", "10", "--save_steps", "10", "--address", cluster.address,
              timeout=900)
    assert "finished" in out.stdout
    files = storage.files("s3://corpus/sweeps/sw")
    assert {"results.csv", "curves.png", "best_model/config.json",
            "best_model/model.safetensors"} <= files


def test_a_local_storage_path_a_node_cannot_see_is_refused(cluster, s3_data, tmp_path):
    hidden = tmp_path / "runs"
    hidden.mkdir()
    node = cluster.add_node(1, "blind", hide=hidden)  # on this node, runs/ is an empty tmpfs
    try:
        done = subprocess.run(
            [sys.executable, "pipelines/train.py", "--data", s3_data, "--storage_path",
             str(hidden), "--address", cluster.address, *TINY, "--total_steps", "2"],
            cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=300)
    finally:
        cluster.kill(node)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "is a local path that 1 of the cluster's" in done.stderr
    assert "--storage_path s3://" in done.stderr
    assert not [p for p in hidden.iterdir()]  # nothing written, not even the probe
