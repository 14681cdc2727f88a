"""The architecture as import rules (DESIGN.md's layout), read from the source with ast, every
import counted, those inside functions too:

- gpt2core is the pure PyTorch library: no ray, mlflow, fastapi, pipelines or serve;
- serve imports no pipelines, and pipelines no serve (`gpt2 serve` loads the app by its import
  path, serve.app:app);
- a stage entry point (pipelines/<stage>.py) never imports another one, not even through the
  shared modules (pipelines/common, text, preparing, training, tuning), which import none.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gpt2core", "pipelines", "serve")
ENTRY_POINTS = sorted(p.stem for p in (ROOT / "pipelines").glob("*.py")
                      if p.stem not in ("__init__", "cli"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, absolute, as written (`from a.b import c` gives a.b and
    a.b.c: c may be a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


SOURCES = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
GRAPH = {m: {i for i in imports(p) if i in SOURCES} | {i.split(".")[0] for i in imports(p)}
         for m, p in SOURCES.items()}


def roots(module: str) -> set[str]:
    return {i.split(".")[0] for i in imports(SOURCES[module])}


@pytest.mark.parametrize("package, banned", [
    ("gpt2core", {"ray", "mlflow", "fastapi", "pipelines", "serve"}),
    ("serve", {"pipelines"}),
    ("pipelines", {"serve"}),
])
def test_packages_import_only_what_their_layer_may(package, banned):
    wrong = {m: sorted(roots(m) & banned) for m in SOURCES
             if m.split(".")[0] == package and roots(m) & banned}
    assert not wrong, f"{package} must not import {sorted(banned)}: {wrong}"


def reachable(start: str) -> set[str]:
    """Modules of this repo that `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for m in GRAPH[todo.pop()] & SOURCES.keys():
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_the_stage_entry_points_are_what_pipelines_holds_at_the_top():
    assert ENTRY_POINTS == ["evaluate", "generate", "prepare", "serve", "train", "tune",
                            "visualize"]


@pytest.mark.parametrize("stage", ENTRY_POINTS)
def test_no_entry_point_imports_another(stage):
    others = {f"pipelines.{s}" for s in ENTRY_POINTS} - {f"pipelines.{stage}"}
    assert not reachable(f"pipelines.{stage}") & others


def test_the_rule_sees_an_import_inside_a_function(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from pipelines.train import main\n")
    assert "pipelines.train" in imports(src)


def test_no_source_file_is_longer_than_about_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in SOURCES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 420}
    assert not long, f"split these: {long}"
