"""The package's architecture as pyproject.toml declares it: layers, and no import cycle.

import-linter reads every import statement in the package, function-local ones included, so an
import that goes up a layer or closes a loop fails here rather than in a reviewer's head.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter is a test dependency (pip install -e '.[test]')")

ROOT = Path(__file__).resolve().parents[2]


def lint_imports(config: Path, package_parent: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run(
        [sys.executable, "-c", script, "--config", str(config), "--no-cache"],
        capture_output=True,
        text=True,
        env=env,
        cwd=config.parent,
        timeout=120,
    )


def test_the_package_keeps_its_declared_layers_and_has_no_import_cycle():
    proc = lint_imports(ROOT / "pyproject.toml", ROOT / "src")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # the shared ground reaching up into the loop: a layer broken
        (
            "core/errors.py",
            "from lmdistill.training import trainer",
            "lmdistill.core is not allowed to import lmdistill.training",
        ),
        # two data modules importing each other (a function-local import counts)
        ("data/chat.py", "def _late():\n    from lmdistill.data import store", "any package BROKEN"),
    ],
)
def test_an_import_against_the_architecture_is_caught(tmp_path, module, line, broken):
    shutil.copytree(ROOT / "src" / "lmdistill", tmp_path / "src" / "lmdistill")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "src" / "lmdistill" / module
    target.write_text(target.read_text() + "\n\n" + line + "\n")
    proc = lint_imports(tmp_path / "pyproject.toml", tmp_path / "src")
    assert proc.returncode != 0
    assert broken in proc.stdout, proc.stdout[-3000:]


def _function_lengths():
    """(lines without the docstring, where) of every function in the package."""
    import ast

    for path in sorted((ROOT / "src" / "lmdistill").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = node.body[0]
                has_doc = isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant)
                start = first.end_lineno + 1 if has_doc and len(node.body) > 1 else first.lineno
                yield node.end_lineno - start + 1, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"


def test_no_function_is_longer_than_60_lines():
    long = sorted((n, where) for n, where in _function_lengths() if n > 60)
    assert not long, f"functions over 60 lines (docstrings not counted): {long}"


def test_the_trainer_stays_small():
    import ast

    tree = ast.parse((ROOT / "src" / "lmdistill" / "training" / "trainer.py").read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    assert trainer.end_lineno - trainer.lineno + 1 < 350
    attributes = {
        n.attr
        for n in ast.walk(trainer)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Name)
        and n.value.id == "self"
        and isinstance(n.ctx, ast.Store)
    }
    assert len(attributes) <= 20, sorted(attributes)
