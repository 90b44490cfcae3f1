"""The package's floors (docs/user-guide/architecture.md): no module imports a higher floor (the import-linter
contract in ``.importlinter``, which ``scripts/test.sh`` also runs), and no import inside a function hides a cycle
between ``nemo_aligner`` modules."""

from __future__ import annotations

import ast
import shutil
import subprocess

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "nemo_aligner"


def test_layers_contract_is_kept_with_no_exceptions():
    config = (REPO / ".importlinter").read_text()
    assert "type = layers" in config and "ignore_imports" not in config
    if shutil.which("lint-imports") is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    proc = subprocess.run(["lint-imports", "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_no_function_level_import_of_the_package():
    """A module that needs another ``nemo_aligner`` module imports it at the top: a lower floor never needs a
    deferred import to dodge a cycle. (Third-party imports may stay lazy for a heavy optional dependency.)"""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for sub in ast.walk(node):
                names = [sub.module or ""] if isinstance(sub, ast.ImportFrom) else (
                    [a.name for a in sub.names] if isinstance(sub, ast.Import) else [])
                if any(n == "nemo_aligner" or n.startswith("nemo_aligner.") for n in names):
                    found.append(f"{path.relative_to(REPO)}:{sub.lineno}")
    assert found == [], found

