"""The import layers of pyproject.toml's [tool.importlinter] hold, and no module imports in a circle: the same
check `make lint` runs, here so that a plain pytest run catches a new upward import too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("lint-imports")  # a dev dependency of the project venv
    env = {**os.environ, "PYTHONPATH": str(cwd / "src")}
    return subprocess.run([str(exe), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_layers_and_the_no_circle_rule_hold() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_an_upward_import_breaks_the_layers(tmp_path: Path) -> None:
    """Training importing inference (a layer beside it) is refused, naming the import."""
    copy = tmp_path / "repo"
    (copy / "src").mkdir(parents=True)
    (copy / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    shutil.copytree(REPO / "src" / "lesionstack", copy / "src" / "lesionstack",
                    ignore=shutil.ignore_patterns("__pycache__"))
    loop = copy / "src" / "lesionstack" / "train" / "loop.py"
    loop.write_text(loop.read_text() + "\nfrom lesionstack.inference import predictor  # noqa: E402,F401\n")
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "lesionstack.train.loop -> lesionstack.inference.predictor" in result.stdout


def test_every_import_of_a_package_name_resolves() -> None:
    """Function-level imports (the CLI's, the stages' lazy ones) run only when their command does: a name
    moved to another module must still be found, without running every command."""
    import ast
    import importlib

    missing = []
    for path in sorted((REPO / "src" / "lesionstack").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lesionstack")):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.module}.{alias.name}")
    assert not missing, missing
