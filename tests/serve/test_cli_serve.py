"""`gpt2 serve` starts the app by import path, answers HTTP, and stops cleanly on Ctrl-C."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow


def test_gpt2_serve_runs_until_ctrl_c(model_dir, tmp_path):
    gpt2 = Path(sys.executable).parent / "gpt2"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # --address local: a cluster of its own, apart from the tests' ray_local
    proc = subprocess.Popen([str(gpt2), "serve", "--model_path", str(model_dir), "--port",
                             str(port), "--num_cpus", "0.5", "--address", "local"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "gpt2 serve did not answer within 120 s"
            time.sleep(0.5)
        r = httpx.post(f"http://127.0.0.1:{port}/generate", timeout=60,
                       json={"prompt": "ROMEO:", "max_tokens": 5, "seed": 0})
        assert r.status_code == 200 and r.json()["tokens"] <= 5
        for line in proc.stdout:  # Ctrl-C is handled once the server says so
            if "Ctrl-C stops" in line:
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
