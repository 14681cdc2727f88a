"""Shared fixtures: a local Ray cluster on demand, an S3 server, the Shakespeare sample, and
the gpu skip."""

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, process: subprocess.Popen, what: str, timeout: float = 60) -> None:
    """Until something listens on 127.0.0.1:port; fails with the process's output if it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on port {port} in {timeout} s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """An S3-compatible server (moto's server mode) on 127.0.0.1, for the whole session.

    Its address goes into this process's environment (AWS_ENDPOINT_URL, which pyarrow, Ray and
    boto3 read) before any Ray cluster starts, so Ray's workers inherit it too.
    """
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                    "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port(port, process, "moto server")
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
                          AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh, empty bucket on the session's S3 server: its s3:// URI."""
    import pyarrow.fs as pafs

    name = f"test-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A 2-CPU local Ray cluster, started by the first test that asks, stopped at session end.
    It runs with the S3 server's address in its environment, so its workers reach it."""
    import ray  # here, so tests that never ask pay nothing

    # address="local": always a fresh cluster of our own, even when RAY_ADDRESS is set
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()


@pytest.fixture
def shakespeare_path() -> Path:
    """../shared/data/tinyshakespeare.txt beside the repo (about 1 MB of plays)."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent")
    return SHAKESPEARE


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch  # only when some collected test is marked gpu

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA; torch.cuda.is_available() is False")
        for item in gpu_items:
            item.add_marker(skip)
