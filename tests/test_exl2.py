"""EXL2: the bpw variants of one build share exllamav2's measurement pass.

exllamav2 runs only with CUDA, so its converter is stood in for by a script that answers the
same command line the way the real one does (measurement.json in the job folder after a
measuring run, weights in the -cf folder) and logs how it was called."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from quantkit.calibration import CalibrationSet
from quantkit.records import BuildContext, SourceModel
from quantkit.engines.exl2 import EXL2Engine
from quantkit.testing.engine_bench import variant_of

FAKE_CONVERTER = '''
import argparse, json, os, sys
ap = argparse.ArgumentParser()
for opt in ("-i", "-o", "-cf", "-b", "-hb", "-c", "-l", "-ml", "-r", "-m"):
    ap.add_argument(opt)
ap.add_argument("-nr", action="store_true")
a = ap.parse_args()
with open(os.environ["FAKE_EXL2_LOG"], "a") as log:
    log.write(json.dumps({"bpw": a.b, "measurement": a.m}) + "\\n")
os.makedirs(a.o, exist_ok=True)
if a.m is None:
    with open(os.path.join(a.o, "measurement.json"), "w") as f:
        json.dump({"measurement": {}, "last_module_idx": 0}, f)
open(os.path.join(a.cf, "output.safetensors"), "wb").write(b"weights")
'''


@pytest.fixture
def fake_exllamav2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pkg = tmp_path / "fake" / "exllamav2" / "conversion"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "convert_exl2.py").write_text(FAKE_CONVERTER)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    monkeypatch.setenv("FAKE_EXL2_LOG", str(log))
    return log


def _context(work: Path, calib_sha: str) -> BuildContext:
    calib = CalibrationSet(np.zeros((2, 16), dtype=np.int32), ("eins", "zwei"), (), calib_sha, "test", 2, 2, 32)
    source = SourceModel("src", work / "src", "local", "fingerprint", 0, "LlamaForCausalLM")
    return BuildContext(source, calib, work, "cuda", lambda *a: None)


def _build(bpw: float, ctx: BuildContext, out: Path) -> None:
    out.mkdir(parents=True)
    EXL2Engine().build(variant_of(out, f'format = "exl2"\nbpw = {bpw}'), ctx, out, {})


def test_bpw_variants_share_one_measurement(fake_exllamav2: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    ctx = _context(work, "a" * 64)
    for bpw in (4.0, 6.0):
        _build(bpw, ctx, tmp_path / f"out-{bpw}")
    calls = [json.loads(line) for line in fake_exllamav2.read_text().splitlines()]
    shared = sorted(work.glob("exl2-measurement-*.json"))
    assert len(shared) == 1 and json.loads(shared[0].read_text())["last_module_idx"] == 0
    assert calls == [{"bpw": "4.0", "measurement": None}, {"bpw": "6.0", "measurement": str(shared[0])}]

    _build(4.0, _context(work, "b" * 64), tmp_path / "out-other-calibration")  # another set: measure again
    assert json.loads(fake_exllamav2.read_text().splitlines()[-1])["measurement"] is None
    assert len(list(work.glob("exl2-measurement-*.json"))) == 2

