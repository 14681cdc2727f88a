"""The `gpt2` command: lists every stage, stays light, dispatches, and never pretends."""

import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import cli

COMMANDS = ("prepare", "train", "tune", "evaluate", "generate", "visualize", "serve")


def gpt2_script() -> str:
    """The installed console script: beside this Python first (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "gpt2"
    found = str(beside) if beside.is_file() else shutil.which("gpt2")
    if found is None:
        pytest.fail("the `gpt2` console script is not installed; run pip install -e '.[dev]'")
    return found


def run_gpt2(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([gpt2_script(), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60)


def test_stages_are_the_seven_commands():
    assert tuple(cli.STAGES) == COMMANDS


def test_help_lists_every_command_and_is_fast(tmp_path):
    start = time.perf_counter()
    out = run_gpt2("--help", cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    for name in COMMANDS:
        assert name in out.stdout
    # no torch or Ray import: a bare interpreter start, well under a second on any machine
    assert elapsed < 5, f"gpt2 --help took {elapsed:.1f} s"


def test_cli_imports_neither_torch_nor_ray(tmp_path):
    code = ("import sys, pipelines.cli as cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'ray', 'serve') if m in sys.modules]\n"
            "print(heavy); sys.exit(1 if heavy else 0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_stage_module_exists():
    assert all(importlib.util.find_spec(module) for module, _ in cli.STAGES.values())


def test_a_stage_that_cannot_import_names_what_it_lacks(monkeypatch, capsys):
    monkeypatch.setitem(cli.STAGES, "later", ("pipelines._no_such_stage", "built later"))
    assert cli.main(["later", "--flag"]) == 1
    err = capsys.readouterr().err
    assert "gpt2 later: cannot import 'pipelines._no_such_stage'" in err


@pytest.mark.parametrize("args", [("frobnicate",), ()])
def test_unknown_or_missing_command_exits_2(args, tmp_path):
    out = run_gpt2(*args, cwd=tmp_path)
    assert out.returncode == 2
    assert "usage: gpt2" in out.stderr


def test_stage_gets_the_rest_of_the_line_and_its_exit_code(tmp_path, monkeypatch, capsys):
    (tmp_path / "cli_stage_probe.py").write_text(
        "def main(argv=None):\n    print(repr(argv))\n    return 3 if '--fail' in argv else None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.STAGES, "probe", ("cli_stage_probe", "a probe stage"))

    assert cli.main(["probe", "--help", "--", "x y"]) == 0  # --help reaches the stage untouched
    assert capsys.readouterr().out.strip() == repr(["--help", "--", "x y"])
    assert cli.main(["probe", "--fail"]) == 3


def test_stage_missing_a_dependency_is_not_called_unbuilt(tmp_path, monkeypatch, capsys):
    (tmp_path / "cli_stage_needs_dep.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.STAGES, "needy", ("cli_stage_needs_dep", "needs a package"))

    assert cli.main(["needy"]) == 1
    err = capsys.readouterr().err
    assert "no_such_dependency_xyz" in err and "not built yet" not in err
