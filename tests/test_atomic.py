"""Atomic writes: the old file or the new one, never half; no temp file left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from quantkit import atomic


def test_write_replaces_and_cleans_temp_files_of_a_crashed_write(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "manifest.json"
    atomic.write_text(p, "old")
    (p.parent / ".manifest.json.k3j2.tmp").write_text("half of a write a crash cut short")
    atomic.write_text(p, "new")
    assert p.read_text() == "new" and sorted(x.name for x in p.parent.iterdir()) == ["manifest.json"]


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "README.md"
    atomic.write_text(p, "old card")

    def refuse(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        atomic.write_text(p, "new card")
    assert p.read_text() == "old card" and [x.name for x in tmp_path.iterdir()] == ["README.md"]
