"""Bad inputs a user can hand quantkit, each set up in its own folder: the harness behind
tests/test_bad_inputs.py and benchmarks/faults.py. Each must give one error line and exit 2
(a damaged manifest: exit 1 and how to rebuild), and write nothing."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

from quantkit.cli import app

RECIPE = """[model]
source = "src"
name = "tiny"
[calibration]
samples = 8
seq_len = 128
{calibration}
[evaluation]
tokens = 1024
ctx = 128
[[variants]]
format = "gptq"
bits = 4
group_size = 32
"""


@dataclass(frozen=True)
class Case:
    name: str  # what is wrong, in the words of the issue
    setup: Callable[[Path], Path]  # prepares root (which holds src/), returns the recipe path
    exit_code: int = 2
    expect: str = ""  # part of the message


def _recipe(root: Path, calibration: str = "") -> Path:
    p = root / "recipe.toml"
    p.write_text(RECIPE.format(calibration=calibration), encoding="utf-8")
    return p


def _own_copy(root: Path, name: str) -> Path:
    """src/NAME as a file of its own (the rest of src/ links to the cached model)."""
    f = root / "src" / name
    data = f.read_bytes()
    f.unlink()
    f.write_bytes(data)
    return f


def _truncated_weights(root: Path) -> Path:
    f = _own_copy(root, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    return _recipe(root)


def _config_not_json(root: Path) -> Path:
    (root / "src" / "config.json").unlink()
    (root / "src" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 256,\n')
    return _recipe(root)


def _no_tokenizer(root: Path) -> Path:
    for f in (root / "src").glob("tokenizer*"):
        f.unlink()
    return _recipe(root)


def _calibration_file(name: str, data: bytes) -> Callable[[Path], Path]:
    def setup(root: Path) -> Path:
        (root / name).write_bytes(data)
        return _recipe(root, f'dataset = "{name}"')
    return setup


def _recipe_folder(root: Path) -> Path:
    (root / "recipe.toml").mkdir()
    return root / "recipe.toml"


def _huge_recipe(root: Path) -> Path:
    """A valid recipe followed by 100 MB of comment lines."""
    p = _recipe(root)
    line = b"# " + b"x" * 97 + b"\n"
    with open(p, "ab") as f:
        for _ in range(100):
            f.write(line * 10_000)
    return p


def _damaged_manifest(root: Path) -> Path:
    out = root / "build"
    out.mkdir()
    (out / "manifest.json").write_text('{"recipe_sha256": "ab12", "variants": {"gptq-4bit-32g-actorder_True": {')
    return _recipe(root)


SQUAD_WITHOUT_CONTEXT = json.dumps({"data": [{"paragraphs": [{"text": "Ein Absatz ohne context-Feld."}]}]})
LATIN1 = "Die Größe der Übung ist überschaubar.\n\nÄrger über Fußgänger.\n".encode("latin-1")

CASES = [
    Case("source: truncated safetensors file", _truncated_weights, expect="model.safetensors is truncated"),
    Case("source: config.json is not JSON", _config_not_json, expect="config.json is not valid JSON"),
    Case("source: no tokenizer", _no_tokenizer, expect="no tokenizer in"),
    Case("calibration: empty file", _calibration_file("calib.json", b""), expect="calib.json: is empty"),
    Case("calibration: wrong schema (SQuAD without context)",
         _calibration_file("calib.json", SQUAD_WITHOUT_CONTEXT.encode()), expect="is not SQuAD-style JSON"),
    Case("calibration: wrong schema (JSONL records)", _calibration_file("calib.jsonl", b'{"prompt": "Hallo"}\n'),
         expect="neither 'context' nor 'text'"),
    Case("calibration: text not UTF-8 (Latin-1)", _calibration_file("calib.txt", LATIN1), expect="is not UTF-8 text"),
    Case("recipe path is a folder", _recipe_folder, expect="is a folder, not a recipe file"),
    Case("recipe of 100 MB", _huge_recipe, expect="a recipe is a small TOML file"),
    Case("manifest.json edited into invalid JSON", _damaged_manifest, exit_code=1,
         expect="not valid JSON (line 1, column"),
]


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    errors: tuple[str, ...]  # stderr lines starting with "error:"
    output: str  # everything the command printed
    written: tuple[str, ...]  # files created, changed or removed under root


def prepare(root: Path, model: Path, case: Case) -> Path:
    """root/src links to `model`'s files; then the case spoils what it spoils."""
    (root / "src").mkdir(parents=True)
    for f in model.iterdir():
        os.symlink(f, root / "src" / f.name)
    return case.setup(root)


def run(root: Path, model: Path, case: Case) -> Outcome:
    recipe = prepare(root, model, case)
    before = _snapshot(root)
    res = CliRunner().invoke(app, ["build", str(recipe), "--out", str(root / "build")])
    after = _snapshot(root)
    written = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    errors = tuple(ln for ln in res.stderr.splitlines() if ln.startswith("error:"))
    return Outcome(res.exit_code, errors, res.output, tuple(written))


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Files by size and mtime; folders by existence (a lock file come and gone touches their mtime)."""
    return {str(p.relative_to(root)): (0, 0) if p.is_dir() and not p.is_symlink() else
            (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


def recipe_error(variants: str) -> str:
    """The one-line error a recipe with just these `[[variants]]` tables gets (the source is
    not looked at); AssertionError when it parses."""
    from quantkit.errors import RecipeError
    from quantkit.recipe import parse_recipe

    try:
        parse_recipe(f'[model]\nsource = "x/y"\n{variants}', check_source=False)
    except RecipeError as e:
        return str(e)
    raise AssertionError(f"the recipe parsed: {variants!r}")
