"""Bad inputs get one error line, exit 2, and nothing written (cases in quantkit/testing/bad_inputs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.register_assert_rewrite("quantkit.testing.bad_inputs")
from quantkit.testing.bad_inputs import CASES, Case, run  # noqa: E402

from quantkit.calibration import load_items  # noqa: E402
from quantkit.errors import CalibrationError, ManifestError  # noqa: E402
from quantkit.manifest import load_manifest  # noqa: E402


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(tiny_llama: Path, tmp_path: Path, case: Case) -> None:
    got = run(tmp_path, tiny_llama, case)
    assert got.exit_code == case.exit_code, got.output
    assert len(got.errors) == 1 and case.expect in got.errors[0], got.output
    assert "Traceback" not in got.output
    assert got.written == ()


def test_damaged_manifest_message_says_how_to_rebuild(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"variants": ')
    with pytest.raises(ManifestError, match=r"move it away .* and run `quantkit build` again to rebuild"):
        load_manifest(tmp_path)
    rec = {"format": "gguf", "branch": "Q8_0", "repo": "r", "state": "half-done"}
    (tmp_path / "manifest.json").write_text(json.dumps({"recipe_sha256": "x", "variants": {"a": rec}}))
    with pytest.raises(ManifestError, match="not a quantkit manifest .*unknown state 'half-done'"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"recipe_sha256": "x", "variants": []}')
    with pytest.raises(ManifestError, match="not a quantkit manifest"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("name, data, message", [
    ("a.json", b"   \n", "is empty"),
    ("a.txt", b"", "is empty"),
    ("a.json", b'{"data": 5}', "is not SQuAD-style JSON"),
    ("a.json", b'{"data": [{"paragraphs": [{"context": 7}]}]}', "a context is int, not text"),
    ("a.json", b'[1, 2]', "a record is int"),
    ("a.jsonl", b'{"text": "ok"}\n{"text": ', "is not valid JSON (line 1, column 10"),
    ("a.txt", b"\xff\xfeG\x00r\x00", "is not UTF-8 text (byte 0xff at offset 0)"),
])
def test_calibration_files_of_the_wrong_shape(tmp_path: Path, name: str, data: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(data)
    with pytest.raises(CalibrationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_items(str(tmp_path / name), "train")


def test_a_missing_calibration_file_is_not_looked_up_on_the_hub(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="no such file"):
        load_items(str(tmp_path / "nope.jsonl"), "train")
