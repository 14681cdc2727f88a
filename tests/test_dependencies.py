"""pyproject.toml: every third-party module the packages import at run time is a dependency.

`pip install .` (what cluster.yaml runs) installs [project.dependencies] only, so a module that
gpt2core/, pipelines/ or serve/ imports, even inside a function, must be named there and not
only in the dev extra (tiktoken once was: `gpt2 prepare` failed on the cluster).
"""

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gpt2core", "pipelines", "serve")


def normalise(name: str) -> str:
    """PEP 503: `PyYAML`, `pyyaml` and `py_yaml` are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    """Normalised names in [project.dependencies]; `ray[data,train]==2.60.0` counts as `ray`."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {normalise(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", d)[1]) for d in deps}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(tree: ast.AST) -> list[tuple[str, int]]:
    """(top-level module, line) of every absolute import, at module level or in functions;
    the body of `if TYPE_CHECKING:` never runs, so it is left out (its `else:` is not)."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno))
        todo.extend(ast.iter_child_nodes(node))
    return sorted(found, key=lambda f: f[1])


def third_party_imports() -> dict[str, list[str]]:
    """Top-level module -> the places ("pipelines/text/encoding.py:83") that import it."""
    where: dict[str, list[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for module, line in runtime_imports(tree):
                if module in sys.stdlib_module_names or module in PACKAGES:
                    continue
                where.setdefault(module, []).append(f"{path.relative_to(ROOT)}:{line}")
    return where


def test_the_scan_sees_imports_inside_functions_and_skips_type_checking_ones():
    tree = ast.parse("import os, numpy.linalg\nfrom . import x\nif TYPE_CHECKING:\n"
                     "    import pandas\nelse:\n    import scipy\n"
                     "def f():\n    from tiktoken import Encoding\n")
    assert sorted(m for m, _ in runtime_imports(tree)) == ["numpy", "os", "scipy", "tiktoken"]
    assert {"torch", "tiktoken", "ray"} <= set(third_party_imports())


def test_every_runtime_import_is_a_declared_dependency():
    deps, dists = declared(), packages_distributions()
    missing = []
    for module, places in sorted(third_party_imports().items()):
        # a module can come from several distributions (mlflow from mlflow, mlflow-skinny and
        # mlflow-tracing): naming any one of them installs it. One not installed here is
        # looked up by its own name, which is right for most (numpy, torch, tiktoken).
        candidates = {normalise(d) for d in dists.get(module, [module])}
        if not candidates & deps:
            missing.append(f"{module} (distribution {' or '.join(sorted(candidates))}; "
                           f"imported at {', '.join(places[:3])})")
    assert not missing, ("imported at run time but not in [project.dependencies] of "
                         "pyproject.toml:\n  " + "\n  ".join(missing))
