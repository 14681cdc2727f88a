"""Shared fixtures: a local Ray cluster on demand, an S3 server, the Shakespeare sample, and
the gpu skip."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
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


class LocalCluster:
    """A multi-node Ray cluster on this machine: `ray start --head` and more `ray start
    --address` nodes, each its own process group, with this process's environment (so the S3
    server's address reaches every node). Stopped by signals to those groups: a plain `ray stop`
    would also stop clusters this test did not start."""

    def __init__(self, root: Path):
        self.root, self.nodes = root, []
        bin_dir = Path(sys.executable).parent
        self.ray = str(bin_dir / "ray")
        self.env = {**os.environ, "RAY_AUTH_MODE": "token",
                    "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        self.env.pop("RAY_ADDRESS", None)
        self.port, self.dashboard = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"  # the GCS: what --address and drivers take
        self.jobs = f"http://127.0.0.1:{self.dashboard}"  # what `ray job submit` takes

    def _start(self, args: list[str], name: str, prefix: str = "") -> subprocess.Popen:
        ports = [a for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                "--runtime-env-agent-port", "--metrics-export-port",
                                "--node-manager-port", "--object-manager-port")
                 for a in (flag, str(free_port()))]
        # each node its own temp dir, as on separate machines: nodes sharing one would share
        # (and clean up) each other's runtime_resources, a running job's working dir included
        command = [self.ray, "start", "--block", "--node-ip-address", "127.0.0.1",
                   "--disable-usage-stats", "--temp-dir", tempfile.mkdtemp(prefix="ray-",
                                                                          dir="/tmp"),
                   *ports, *args]
        if prefix:  # e.g. a node in its own mount namespace, where a dir is hidden
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       f"{prefix} && exec \"$@\"", "node", *command]
        log = open(self.root / f"{name}.log", "w")
        node = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        node.name = name
        self.nodes.append(node)
        return node

    def start_head(self, num_cpus: int) -> None:
        self._start(["--head", "--port", str(self.port), "--num-cpus", str(num_cpus),
                     "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard)],
                    "head")
        self.wait(1)

    def add_node(self, num_cpus: int, name: str, hide: Path | None = None) -> subprocess.Popen:
        """A worker node; with `hide`, that directory is an empty tmpfs for this node only."""
        prefix = f"mount -t tmpfs none {hide}" if hide else ""
        node = self._start(["--address", self.address, "--num-cpus", str(num_cpus)], name,
                           prefix)
        self.wait(len([n for n in self.nodes if n.poll() is None]))
        return node

    def alive(self) -> int:
        """Nodes the GCS reports alive (`ray list nodes` needs the dashboard: ask the GCS)."""
        code = (f"import ray; ray.init(address={self.address!r}, logging_level='error', "
                "log_to_driver=False); print('ALIVE', sum(n['Alive'] for n in ray.nodes()))")
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True,
                             text=True, timeout=120)
        found = [w.split()[1] for w in out.stdout.splitlines() if w.startswith("ALIVE ")]
        return int(found[-1]) if found else -1

    def wait(self, nodes: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while self.alive() != nodes:
            dead = [n.name for n in self.nodes if n.poll() is not None and n.name == "head"]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"cluster did not reach {nodes} nodes:\n" + "\n".join(
                    (self.root / f"{n.name}.log").read_text()[-1500:] for n in self.nodes))
            time.sleep(1)

    def kill(self, node: subprocess.Popen) -> None:
        """SIGKILL the node's whole process group: raylet, object store, workers."""
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
        node.wait(timeout=30)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGTERM)
        for node in reversed(self.nodes):
            try:
                node.wait(timeout=5)
            except subprocess.TimeoutExpired:  # Ray's graceful stop can take half a minute
                os.killpg(node.pid, signal.SIGKILL)
                node.wait(timeout=30)


class CountingTokenizer:
    """A tokenizer that notes how many ids each decode is given (the rest is the tokenizer's)."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self.tok.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.fixture(scope="session")
def tools():
    """The helpers above, for test modules (conftest is not importable under importlib mode)."""
    from types import SimpleNamespace

    return SimpleNamespace(LocalCluster=LocalCluster, free_port=free_port, wait_port=wait_port,
                           CountingTokenizer=CountingTokenizer)
