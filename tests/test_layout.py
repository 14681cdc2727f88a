"""The architecture as import rules (docs/design.md, "The parts and who may import whom"), read
from the source with ast, every import counted, those inside functions too:

- gpt2core is the pure PyTorch library: no ray, mlflow, fastapi, matplotlib, pipelines or serve;
- serve imports no pipelines, and pipelines no serve (`gpt2 serve` loads the app by its import
  path, serve.app:app);
- a stage entry point (pipelines/<stage>.py) never imports another one, not even through the
  shared modules (pipelines/common, text, preparing, training, tuning), which import none;
- no two modules import each other, directly or round a longer circle (an import under
  `if TYPE_CHECKING:` is for annotations only and does not count);
- every repository path a Python file, the README or docs/ name exists.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gpt2core", "pipelines", "serve")
ENTRY_POINTS = sorted(p.stem for p in (ROOT / "pipelines").glob("*.py")
                      if p.stem not in ("__init__", "cli"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, type_only_too: bool = True) -> set[str]:
    """Every module `path` imports, absolute, as written (`from a.b import c` gives a.b and
    a.b.c: c may be a module); with type_only_too=False, not those under `if TYPE_CHECKING:`."""
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = set() if type_only_too else {
        id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
        and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
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
    ("gpt2core", {"ray", "mlflow", "fastapi", "matplotlib", "pipelines", "serve"}),
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


@pytest.mark.parametrize("stage", ENTRY_POINTS)
def test_an_entry_point_run_as_a_file_fixes_sys_path_before_importing_the_project(stage):
    """`python pipelines/<stage>.py` (and `ray job submit -- python ...`) from a checkout that
    is not installed: the project imports only after the stage puts the repo root on sys.path."""
    tree = ast.parse((ROOT / "pipelines" / f"{stage}.py").read_text(encoding="utf-8"))
    fix = next(i for i, n in enumerate(tree.body) if isinstance(n, ast.If)
               and "sys.path[0]" in ast.unparse(n))
    early = [ast.unparse(n) for n in tree.body[:fix] if isinstance(n, (ast.Import, ast.ImportFrom))
             and (roots_of(n) & set(PACKAGES))]
    assert not early, f"imported before sys.path is fixed: {early}"


def roots_of(node: ast.Import | ast.ImportFrom) -> set[str]:
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
    return {n.split(".")[0] for n in names}


def test_the_rule_sees_an_import_inside_a_function(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from pipelines.train import main\n")
    assert "pipelines.train" in imports(src)


def test_no_source_file_is_longer_than_about_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in SOURCES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 420}
    assert not long, f"split these: {long}"


def circles() -> list[list[str]]:
    """The import circles among this repo's modules (type-only imports left out): every strongly
    connected part of the graph with more than one module (Tarjan's algorithm)."""
    graph = {m: {i for i in imports(p, type_only_too=False) if i in SOURCES and i != m}
             for m, p in SOURCES.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        for n in graph[m]:
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            part = []
            while True:
                n = stack.pop()
                part.append(n)
                if n == m:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return found


def test_no_two_modules_import_each_other():
    assert circles() == [], "break these import circles"


def test_the_circle_rule_sees_a_circle_and_skips_type_only_imports(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    import a\n")
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                   "    import a\n")
    monkeypatch.setitem(globals(), "SOURCES", {m: tmp_path / f"{m}.py" for m in "abc"})
    assert circles() == [["a", "b"]]


# a path into this repository as a Python file writes it: from a folder of this repository
# (pipelines/training/worker.py, or from a package's own folder: training/worker.py) to a file,
# or a Markdown file by name (README.md)
FOLDERS = {p.name for p in ROOT.rglob("*") if p.is_dir() and not any(
    part.startswith(".") or part.endswith(".egg-info") or part == "__pycache__"
    for part in p.relative_to(ROOT).parts)}
PATH = re.compile(r"(?<![\w./-])((?:[A-Za-z_][\w-]*/)+[\w-]+\.(?:py|md|yaml|sh|toml|html))\b"
                  r"|(?<![\w./-])([A-Z][\w-]*\.md)\b")
BASES = [ROOT, *(ROOT / d for d in ("pipelines", "gpt2core", "serve", "tests", "bench", "docs"))]


def named_paths(text: str) -> set[str]:
    """The repository paths `text` names (a path from another project's folders is not one)."""
    found = {a or b for a, b in PATH.findall(text)}
    return {p for p in found if "/" not in p or p.split("/")[0] in FOLDERS}


def test_every_repository_path_a_python_file_or_the_docs_name_exists():
    files = [*SOURCES.values(), *(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").glob("*.py"),
             ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    missing = {}
    for f in files:
        if f == Path(__file__).resolve():  # its own examples
            continue
        gone = sorted(p for p in named_paths(f.read_text(encoding="utf-8"))
                      if not any((base / p).exists() for base in BASES))
        if gone:
            missing[str(f.relative_to(ROOT))] = gone
    assert not missing, f"these files name paths that are not in the repository: {missing}"


def test_the_path_rule_finds_paths_and_markdown_names():
    text = ("see pipelines/training/job.py, training/worker.py and DESIGN.md; not a.b, x/y or "
            "transformers' models/gpt2/modeling_gpt2.py")
    assert named_paths(text) == {"pipelines/training/job.py", "training/worker.py", "DESIGN.md"}
