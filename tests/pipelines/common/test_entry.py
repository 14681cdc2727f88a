"""What every stage's main() shares: one_document keeps stdout to the one JSON document while
Ray forwards its workers' lines; Failure ends in one line with exit status 1, a UserError
in one line with 2, any other error with its traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.common.entry import Failure, one_document, stage_main

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = """
import json, sys, time
import ray
from pipelines.common.entry import one_document

ray.init(num_cpus=1, include_dashboard=False)

@ray.remote
def noisy(i):
    print(f"worker line {i}")  # Ray forwards it to the driver's stdout
    return i

with one_document() as out:
    print("driver line")
    assert ray.get([noisy.remote(i) for i in range(4)]) == [0, 1, 2, 3]
    time.sleep(2)  # Ray's log thread delivers the workers' lines
    print(json.dumps({"answer": 42}), file=out)
print("after the document")
time.sleep(1)
"""


@pytest.mark.slow
def test_stdout_holds_only_the_document_while_ray_workers_print():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == {"answer": 42}, done.stdout
    assert "worker line 3" in done.stderr and "driver line" in done.stderr
    assert "after the document" in done.stderr


def test_captured_stdout_is_redirected_and_restored(capsys):
    with one_document() as out:
        print("noise")
        print('{"a": 1}', file=out)
    print("later")
    captured = capsys.readouterr()
    assert captured.out == '{"a": 1}\nlater\n' and captured.err == "noise\n"


def test_failure_is_one_line_and_exit_1(capsys):
    @stage_main("gpt2 x")
    def main(argv=None):
        raise Failure("the setup hook failed (KeyError: 'x'); this is a bug")

    assert main([]) == 1
    assert capsys.readouterr().err == \
        "gpt2 x: error: the setup hook failed (KeyError: 'x'); this is a bug\n"


INTERNAL = """
import sys
from pipelines.common import plots

def broken(*args, **kwargs):  # a bug inside a library: numpy's own ValueError
    raise ValueError("operands could not be broadcast together with shapes (3,) (4,)")

plots.metrics_figure = broken
from pipelines.visualize import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_user_error_is_one_line_and_exit_2_and_an_internal_value_error_keeps_its_traceback(
        tmp_path, capsys):
    """On one stage, gpt2 visualize: bad input (a UserError) is one sentence and exit status 2;
    a ValueError from inside a library is not the user's: its traceback, exit status 1."""
    from pipelines.visualize import main

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/lr": 0.001}\n')
    assert main(["--model_path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2 visualize: error: ") and err.endswith(
        "has no train/loss or eval/loss recorded yet; nothing to plot.\n") and err.count("\n") == 1
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 5.0}\n')
    done = subprocess.run([sys.executable, "-c", INTERNAL, "--model_path", str(tmp_path),
                           "--output", str(tmp_path / "fig.png")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" in done.stderr and "in broken" in done.stderr
    assert done.stderr.rstrip().endswith("ValueError: operands could not be broadcast together "
                                         "with shapes (3,) (4,)")
    assert not (tmp_path / "fig.png").exists()
