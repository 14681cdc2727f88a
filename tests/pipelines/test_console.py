"""What a newcomer sees: `python pipelines/train.py` prints its own progress and result, and
none of Ray's logs, warnings or per-report dicts (those are one --verbose away); a step line
every ~10 % of the run, whatever --log_steps records in MLflow."""

import json
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
           "--log_steps", "2", "--total_steps", "40", "--eval_steps", "20",
           "--save_steps", "20", "--name", "quiet"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert not [line for line in lines if NOISE.search(line)], "\n".join(lines)
    assert len(lines) <= 40, "\n".join(lines)
    # the workers' own step lines still show, and the result with what to do next
    steps = [int(line.split()[1].split("/")[0]) for line in lines if line.startswith("step ")]
    assert steps == list(range(4, 41, 4)), "\n".join(lines)  # every 10 %, eval steps on it
    assert any(line.startswith("step 20/40") and "eval/loss" in line for line in lines)
    model = tmp_path / "runs" / "quiet" / "model"
    logged = [json.loads(r) for r in (model / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "train/loss" in r] == list(range(2, 41, 2))
    assert any(line.strip().startswith("gpt2 generate --model_path") for line in lines)
