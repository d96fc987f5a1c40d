"""The stage order of DESIGN §2, enforced by import-linter's contract in pyproject.toml."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())"]


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root), "NO_COLOR": "1"}
    return subprocess.run(LINT, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_package_keeps_the_stage_order() -> None:
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 kept, 0 broken" in res.stdout


def test_a_format_module_importing_a_stage_breaks_the_contract(tmp_path: Path) -> None:
    """A wrong import (the GGUF module reaching up into evaluation) fails the check."""
    shutil.copytree(ROOT / "quantkit", tmp_path / "quantkit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    gguf = tmp_path / "quantkit" / "engines" / "gguf" / "engine.py"
    gguf.write_text(gguf.read_text() + "\nfrom ...evaluate import score  # deliberately wrong\n")
    res = _lint(tmp_path)
    assert res.returncode != 0
    assert "BROKEN" in res.stdout and "quantkit.engines.gguf.engine -> quantkit.evaluate" in res.stdout, res.stdout


def test_a_type_checking_import_counts_too(tmp_path: Path) -> None:
    """A cycle hidden behind `if TYPE_CHECKING` (the old Variant-above-the-engines one) fails too."""
    shutil.copytree(ROOT / "quantkit", tmp_path / "quantkit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    gptq = tmp_path / "quantkit" / "engines" / "gptq.py"
    gptq.write_text(gptq.read_text() + "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                    "    from ..plan import Plan  # deliberately wrong\n")
    res = _lint(tmp_path)
    assert res.returncode != 0 and "quantkit.engines.gptq -> quantkit.plan" in res.stdout, res.stdout


def test_the_type_checker_finds_nothing() -> None:
    """mypy over every module of the package ([tool.mypy] in pyproject.toml): no errors."""
    res = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("Success: no issues found"), res.stdout
