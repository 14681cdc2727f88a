"""The README's examples run as written: the shell lines of "Evaluating, generating,
visualizing" and "Serving" and its Python client, against a model trained here, so the README
cannot drift from the commands.

The examples name their model dir `runs/NAME/model` (a training run's) and `runs/my-model`; the
test trains a small model and puts it at both paths in a scratch working dir, with a `val.txt`
beside them. Two substitutions, both said here: `gpt2 serve` gets a free `--port` and the
requests go there instead of 8000 (another test may hold 8000); `serve run` and `serve deploy`
are not run (they hold the terminal or need a cluster; serve/config.yaml is checked by
tests/serve/test_config.py).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(section: str, language: str) -> list[str]:
    """The ```language blocks of a README section (from its heading to the next '## ')."""
    start = README.index(f"\n## {section}\n")
    end = README.find("\n## ", start + 1)
    return re.findall(rf"```{language}\n(.*?)```", README[start:end], flags=re.S)


def commands(section: str) -> list[str]:
    """A section's shell commands, continuation lines joined."""
    text = "\n".join(blocks(section, "bash")).replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, train_data) -> Path:
    """A scratch working dir: a trained model at runs/NAME/model and runs/my-model, val.txt."""
    from pipelines.train import train
    from pipelines.training.config import TrainConfig

    work = tmp_path_factory.mktemp("readme")
    out = train(TrainConfig(data=str(train_data), storage_path=str(work / "runs"), name="NAME",
                            tracking_uri=f"sqlite:///{work}/mlflow.db", layers=2, heads=2,
                            dims=64, batch_train=8, total_steps=20, eval_steps=20,
                            save_steps=20, log_steps=10))
    shutil.copytree(out["model_dir"], work / "runs" / "my-model")
    text = (ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    (work / "val.txt").write_text(text.read_text(encoding="utf-8")[-20_000:] if text.is_file()
                                  else "ROMEO: What light through yonder window breaks?\n" * 50)
    return work


def run(line: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, **kw)


def test_evaluate_generate_visualize_lines_run(workdir):
    lines = commands("Evaluating, generating, visualizing")
    assert [line.split()[1] for line in lines] == ["evaluate", "generate", "visualize"]
    for line in lines:
        # generate without --prompt is interactive: one prompt, then end of input
        done = run(line, workdir, input="ROMEO:\n" if " generate " in line else None)
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        if " evaluate " in line:
            assert "perplexity" in done.stdout and "bits/byte" in done.stdout
    assert (workdir / "fig.png").stat().st_size > 1000


def test_serving_lines_and_the_python_client_run(workdir, tools):
    import httpx

    lines = commands("Serving")
    serve_line = next(line for line in lines if line.startswith("gpt2 serve "))
    curls = [line for line in lines if line.startswith("curl ")]
    assert len(curls) == 4 and sum(line.startswith("serve ") for line in lines) == 2
    port = tools.free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    server = subprocess.Popen(["bash", "-c", f"exec {serve_line} --port {port}"], cwd=workdir,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert server.poll() is None, "gpt2 serve exited"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        for line in curls:
            done = run(line.replace(":8000", f":{port}"), workdir)
            assert done.returncode == 0 and done.stdout, f"{line}\n{done.stderr[-2000:]}"
            assert "data: [DONE]" in done.stdout if '"stream": true' in line \
                else done.stdout.lstrip().startswith("{") and '"error"' not in done.stdout
        client = next(b for b in blocks("Serving", "python") if "OpenAI(" in b)
        done = subprocess.run([sys.executable, "-c", client.replace("8000", str(port))],
                              cwd=workdir, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C: it deletes its app and stops
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
