"""`gpt2 serve` starts the app by import path, answers HTTP, and stops cleanly on Ctrl-C,
deleting its own application only, printing only its own lines; its flags come from the app's
args model."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pipelines import serve as cli_serve


def test_flags_are_the_app_args_fields_with_their_defaults():
    from serve.args import AppArgs

    parser = cli_serve.build_parser(AppArgs)
    defaults = vars(parser.parse_args(["--model_path", "m"]))
    for name, field in AppArgs.model_fields.items():
        if not field.is_required():
            assert defaults[name] == field.default, name
    assert defaults["model_dir"] == "m"  # --model_path is model_dir's older spelling
    assert parser.parse_args(["--model_dir", "m", "--gpus", "1"]).num_gpus == 1.0
    text = " ".join(parser.format_help().split("options:")[1].split())
    for flag in ("max_batch_size", "max_tokens_cap", "body_limit", "stuck_after_s"):
        help_line = text[text.index(f"--{flag} "):]
        help_line = help_line[:help_line.index("(default:") + 40].split(" --")[0]
        assert help_line.count("default") == 1, help_line  # once, by the formatter
    assert "(default: 16)" in text and "(default: 65536)" in text and "in bytes" in text
    with pytest.raises(SystemExit):
        parser.parse_args([])  # model_dir is required


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, f"{url} did not answer within {timeout} s"
        time.sleep(0.5)


@pytest.mark.slow
def test_gpt2_serve_runs_until_ctrl_c_and_deletes_only_its_app(server, model_dir, tmp_path):
    """Joins the tests' cluster, where the `default` app serves at /; Ctrl-C removes `cli`."""
    import ray
    from ray import serve

    gpt2 = Path(sys.executable).parent / "gpt2"
    port = re.search(r":(\d+)$", server).group(1)
    proc = subprocess.Popen([str(gpt2), "serve", "--model_path", str(model_dir), "--port", port,
                             "--num_cpus", "0.25", "--name", "cli", "--route_prefix", "/cli",
                             "--address", ray.get_runtime_context().gcs_address],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, env={**{k: v for k, v in os.environ.items()
                                                  if k != "GPT2_VERBOSE"},
                                               "RAY_DEDUP_LOGS": "0"})
    try:
        wait_for(f"{server}/cli/healthz", proc)
        r = httpx.post(f"{server}/cli/generate", timeout=60,
                       json={"prompt": "ROMEO:", "max_tokens": 5, "seed": 0})
        assert r.status_code == 200 and r.json()["tokens"] <= 5
        lines = []
        for line in proc.stdout:  # Ctrl-C is handled once the server says so
            lines.append(line)
            if "Ctrl-C stops" in line:
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        lines += proc.stdout.readlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # quiet as the other stages: its own two lines, none of Serve's INFO logs (-v has them)
    assert [ln.split(":")[0] for ln in lines] == ["gpt2 serve", "gpt2 serve"], "".join(lines)
    apps = serve.status().applications
    assert "cli" not in apps and {"default", "tight"} <= set(apps)
    assert httpx.get(f"{server}/healthz", timeout=30).status_code == 200
