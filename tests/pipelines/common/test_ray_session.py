"""The code travels with the job, and a worker that cannot start ends the command in one
sentence: stages run from a checkout in a venv where the project is not installed (as on a
cluster whose nodes have the dependencies but not this repo), and with shipping turned off
they end within 60 s, exit 2, naming the missing module and the fix."""

import json
import os
import site
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.common import ray_session

ROOT = Path(__file__).resolve().parents[3]
TINY = ["--layers", "1", "--heads", "2", "--dims", "32", "--batch_train", "4",
        "--batch_eval", "8", "--eval_batches", "2"]


def test_code_env_ships_the_three_packages_unless_the_job_carries_code(monkeypatch):
    monkeypatch.delenv(ray_session.SHIP_CODE, raising=False)
    monkeypatch.delenv(ray_session.JOB_CONFIG, raising=False)
    shipped = ray_session.code_env()["py_modules"]
    assert [Path(p) for p in shipped] == [ROOT / p for p in ("gpt2core", "pipelines", "serve")]
    monkeypatch.setenv(ray_session.JOB_CONFIG, json.dumps(
        {"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip", "env_vars": {"A": "1"}}}))
    assert ray_session.code_env() == {}  # `ray job submit --working-dir .` carries it
    monkeypatch.setenv(ray_session.JOB_CONFIG, json.dumps({"runtime_env": {"pip": ["x"]}}))
    assert ray_session.code_env() == {"py_modules": shipped}  # merged with the job's pip
    monkeypatch.setenv(ray_session.SHIP_CODE, "0")
    assert ray_session.code_env() == {}


def test_cause_is_the_innermost_error_line():
    text = ("Failed to execute the setup hook method, m.f from ``ray.init(...)``.\n"
            "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
            "ModuleNotFoundError: No module named 'pipelines'\n")
    assert ray_session.cause(RuntimeError("worker died"), text) == \
        "ModuleNotFoundError: No module named 'pipelines'"
    assert ray_session.cause(RuntimeError("worker died")) == "worker died"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> tuple[Path, Path]:
    """(a copy of the repository's files, the python of a venv that has every dependency but
    not the project): the venv reads this venv's site-packages through a path file, which
    Python adds to sys.path without running the project's editable-install hook in it."""
    root = tmp_path_factory.mktemp("uninstalled")
    copy, venv = root / "repo", root / "venv"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            (copy / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    target = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    Path(target, "deps.pth").write_text(site.getsitepackages()[0] + "\n")
    found = subprocess.run([str(python), "-c", "import ray, torch, pipelines"], cwd=root,
                           capture_output=True, text=True)
    assert "No module named 'pipelines'" in found.stderr, found.stderr  # truly not installed
    return copy, python


def stage(python: Path, cwd: Path, *args, env: dict | None = None, timeout: float = 600):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RAY_ADDRESS", "PYTHONPATH", "GPT2_VERBOSE")}
    return subprocess.run([str(python), *map(str, args)], cwd=cwd, env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_train_and_evaluate_from_a_checkout_that_is_not_installed(checkout, train_data,
                                                                  tmp_path):
    copy, python = checkout
    runs = tmp_path / "runs"
    done = stage(python, copy, "pipelines/train.py", "--data", train_data, "--storage_path",
                 runs, "--tracking_uri", f"sqlite:///{tmp_path}/mlflow.db", "--name", "cp",
                 *TINY, "--total_steps", "6", "--eval_steps", "3", "--save_steps", "3")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "finished cp: step 6" in done.stdout
    model = runs / "cp" / "model"
    assert {"config.json", "model.safetensors"} <= {p.name for p in model.iterdir()}
    args = ["pipelines/evaluate.py", "--model_path", model, "--eval_corpus", train_data,
            "--json"]
    there = stage(python, copy, *args)
    here = stage(Path(sys.executable), ROOT, *args)  # the installed project, same model
    assert there.returncode == 0 and here.returncode == 0, there.stderr[-3000:] + here.stderr
    scored = [json.loads(out.stdout) for out in (there, here)]  # stdout: the one document
    assert scored[0]["tokens"] == scored[1]["tokens"] > 0
    # the same float32 code on the same CPU; 1e-5 is float32's tolerance for such sums
    assert scored[0]["loss"] == pytest.approx(scored[1]["loss"], rel=1e-5)


@pytest.mark.slow
def test_workers_that_cannot_import_the_project_end_it_in_one_sentence(checkout, train_data,
                                                                       tmp_path):
    copy, python = checkout
    began = time.monotonic()
    done = stage(python, copy, "pipelines/train.py", "--data", train_data, "--storage_path",
                 tmp_path / "runs", "--tracking_uri", f"sqlite:///{tmp_path}/mlflow.db",
                 *TINY, "--total_steps", "6", env={ray_session.SHIP_CODE: "0"}, timeout=120)
    seconds = time.monotonic() - began
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert seconds < 60
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("gpt2 train: error: Ray workers cannot import this project "
                           "(ModuleNotFoundError: No module named 'pipelines'); install"), last
    assert "GPT2_SHIP_CODE" in last and "--working-dir" in last
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
