"""The project's own promises: CI runs the README's test command, verbatim; the layers point one way;
the README's methods table is generated."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert len(block) == 2, "the quick start is exactly two commands"
    assert "defectscope bench" in block[0]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert block[1] in ci, f".ci/run must run {block[1]!r} verbatim"


def _lint_imports(src: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()", "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_import_contracts_hold_and_catch_a_forbidden_arrow(tmp_path):
    """The layers of DESIGN.md point one way (import-linter contracts in pyproject.toml); a model
    that imported the engine (an arrow upwards, and a cycle) would break them."""
    pytest.importorskip("importlinter")
    ok = _lint_imports(ROOT / "src")
    assert ok.returncode == 0 and "0 broken" in ok.stdout, ok.stdout[-2000:]
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "defectscope", copy / "defectscope",
                    ignore=shutil.ignore_patterns("__pycache__"))
    base = copy / "defectscope" / "models" / "base.py"
    base.write_text(base.read_text() + "\nfrom ..engine import evaluate  # a forbidden arrow\n")
    broken = _lint_imports(copy)
    assert broken.returncode != 0 and "defectscope.models.base -> defectscope.engine" in broken.stdout.replace("\n", " ")


def test_readme_methods_table_is_generated_from_the_declarations():
    from defectscope.models.catalog import README_BEGIN, README_END, methods_markdown

    readme = (ROOT / "README.md").read_text()
    assert README_BEGIN in readme and README_END in readme, "the README's methods table has lost its markers"
    table = readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip()
    assert table == methods_markdown(), "README methods table is stale: run `python docs/methods_table.py`"
