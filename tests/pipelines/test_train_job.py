"""`ray job submit -- python pipelines/train.py` against a real `ray start --head` cluster.

As the README has it: the cluster is started from the environment that has this project
installed, with RAY_AUTH_MODE=token (Ray 2.60 refuses job submission without the token), and
paths are absolute, since the job runs in a copy of the working dir.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path):
    """`ray start --head --block` on 127.0.0.1; SIGTERM to it stops what it started (a plain
    `ray stop` would also stop the tests' own local cluster)."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--port", str(free_port()),
         "--num-cpus", "2", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard), "--disable-usage-stats",
         # its own agent ports: the tests' local cluster may hold the defaults
         "--dashboard-agent-listen-port", str(free_port()),
         "--dashboard-agent-grpc-port", str(free_port()),
         "--runtime-env-agent-port", str(free_port()),
         "--metrics-export-port", str(free_port()),
         "--temp-dir", tempfile.mkdtemp(prefix="ray-", dir="/tmp")],  # short: socket paths
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        # ready when a job is accepted: the dashboard answers before its job agent is up
        probe = [str(bin_dir / "ray"), "job", "submit", "--address", address, "--no-wait",
                 "--", "true"]
        while (tried := subprocess.run(probe, env=env, capture_output=True, text=True)).returncode:
            assert head.poll() is None and time.time() < deadline, \
                "ray start --head failed:\n" + (tmp_path / "head.log").read_text()[-2000:] + \
                tried.stdout[-1000:] + tried.stderr[-2000:]
            time.sleep(1)
        yield address, env
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=10)
            except subprocess.TimeoutExpired:  # Ray's graceful stop can take half a minute
                os.killpg(head.pid, signal.SIGKILL)
                head.wait(timeout=30)
        log.close()


def test_ray_job_submit_trains_on_the_cluster(cluster, train_data, tmp_path):
    address, env = cluster
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
           "--working-dir", ".", "--", "python", "pipelines/train.py",
           "--data", str(train_data), "--storage_path", str(tmp_path / "runs"),
           "--tracking_uri", f"sqlite:///{tmp_path}/mlflow.db", "--name", "job",
           "--layers", "1", "--dims", "32", "--heads", "2", "--batch_train", "8",
           "--total_steps", "10", "--eval_steps", "10", "--save_steps", "10"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr
    assert "finished job: step 10" in done.stdout
    model = tmp_path / "runs" / "job" / "model"
    assert (model / "model.safetensors").is_file() and (model / "metrics.jsonl").is_file()
    assert (tmp_path / "mlflow.db").is_file()
