"""What a newcomer sees: `python pipelines/train.py` prints its own progress and result, and
none of Ray's logs, warnings or per-report dicts (those are one --verbose away)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NOISE = re.compile(r"WARNING|ERROR|Deprecation|Traceback")


def test_train_console_is_quiet_and_fits_on_a_screen(train_data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "GPT2_VERBOSE")}
    cmd = [sys.executable, "pipelines/train.py", "--data", str(train_data),
           "--storage_path", str(tmp_path / "runs"),
           "--tracking_uri", f"sqlite:///{tmp_path}/mlflow.db", "--layers", "2", "--heads", "2",
           "--dims", "64", "--batch_train", "8", "--batch_eval", "16", "--warmup_steps", "5",
           "--log_steps", "10", "--total_steps", "40", "--eval_steps", "20",
           "--save_steps", "20"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert not [line for line in lines if NOISE.search(line)], "\n".join(lines)
    assert len(lines) <= 40, "\n".join(lines)
    # the workers' own step lines still show, and the result with what to do next
    assert any(line.startswith("step 40/40") for line in lines), "\n".join(lines)
    assert any(line.strip().startswith("gpt2 generate --model_path") for line in lines)
