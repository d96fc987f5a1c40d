"""The stage order of DESIGN §2, product code kept off quantkit.testing (import-linter's
contracts in pyproject.toml), and the type checker's clean run."""

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
    assert "2 kept, 0 broken" in res.stdout


def _copy_with(tmp_path: Path, module: str, line: str) -> Path:
    """The package and pyproject.toml copied to tmp_path, `line` appended to `module`."""
    shutil.copytree(ROOT / "quantkit", tmp_path / "quantkit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    f = tmp_path / module
    f.write_text(f.read_text() + f"\n{line}  # deliberately wrong\n")
    return tmp_path


def test_a_format_module_importing_a_stage_breaks_the_contract(tmp_path: Path) -> None:
    """A wrong import (the GGUF engine reaching up into evaluation) fails the check."""
    res = _lint(_copy_with(tmp_path, "quantkit/engines/gguf/engine.py", "from ...evaluate import score"))
    assert res.returncode != 0
    assert "BROKEN" in res.stdout and "quantkit.engines.gguf.engine -> quantkit.evaluate" in res.stdout, res.stdout


def test_a_type_checking_import_counts_too(tmp_path: Path) -> None:
    """A cycle hidden behind `if TYPE_CHECKING` (the old Variant-above-the-engines one) fails too."""
    res = _lint(_copy_with(tmp_path, "quantkit/engines/gptq.py",
                           "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..plan import Plan"))
    assert res.returncode != 0 and "quantkit.engines.gptq -> quantkit.plan" in res.stdout, res.stdout


def test_product_code_importing_the_testing_harnesses_breaks_the_contract(tmp_path: Path) -> None:
    """quantkit.testing ships in the wheel, but no product module may lean on it."""
    res = _lint(_copy_with(tmp_path, "quantkit/publish.py", "from quantkit.testing.hub_server import HubServer"))
    assert res.returncode != 0
    assert "product code never imports quantkit.testing BROKEN" in res.stdout, res.stdout
    assert "quantkit.publish -> quantkit.testing.hub_server" in res.stdout, res.stdout


def test_the_type_checker_finds_nothing() -> None:
    """mypy over every module of the package ([tool.mypy] in pyproject.toml): no errors."""
    res = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("Success: no issues found"), res.stdout
