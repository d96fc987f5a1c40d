"""The build pipeline end to end on the tiny model: manifest, skip, resume after SIGKILL,
failure isolation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from typer.testing import CliRunner

from quantkit.cli import app
from _hub_fixtures import hub  # noqa: F401 - the local Hub server fixture

from quantkit.manifest import load_manifest

ROOT = Path(__file__).resolve().parent.parent
QUANTKIT = [sys.executable, "-m", "quantkit.cli"]


def _recipe(tmp_path: Path, model: Path, variants: str) -> Path:
    r = tmp_path / "recipe.toml"
    r.write_text(f'[model]\nsource = "{model}"\nname = "tiny"\n[calibration]\nsamples = 8\nseq_len = 128\n'
                 f'[evaluation]\ntokens = 1024\nctx = 128\nqa_items = 8\n[publish]\nowner = "me"\n{variants}')
    return r


TWO_GPTQ = '[[variants]]\nformat = "gptq"\nbits = [4, 8]\ngroup_size = 32\n'
THREE_GPTQ = ('[[variants]]\nformat = "gptq"\nbits = [4, 8, 3]\ngroup_size = 32\n')


def _env() -> dict[str, str]:
    return {**os.environ, "GPTQMODEL_CPU_WORKERS": str(os.cpu_count() or 1), "PYTHONUNBUFFERED": "1"}


def _build(recipe: Path, out: Path):
    return CliRunner().invoke(app, ["build", str(recipe), "--out", str(out)], env=_env())


def test_build_writes_manifest_and_skips_on_rerun(tiny_llama: Path, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, tiny_llama, TWO_GPTQ)
    out = tmp_path / "build"
    res = _build(recipe, out)
    assert res.exit_code == 0, res.output
    m = load_manifest(out)
    assert m is not None and set(m.variants) == {"gptq-4bit-32g-actorder_True", "gptq-8bit-32g-actorder_True"}
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["recipe_sha256"] and doc["calibration"]["sha256"]
    for name, rec in m.variants.items():
        assert rec.state in ("evaluated", "carded") and rec.quality is not None
        assert rec.size_bytes == sum(f.size for f in rec.files) > 0
        for f in rec.files:
            assert (out / name / f.path).stat().st_size == f.size
        assert (out / name / "quantize_config.json").is_file()
    q4, q8 = (m.variants[n].quality for n in ("gptq-4bit-32g-actorder_True", "gptq-8bit-32g-actorder_True"))
    assert q8.kld < q4.kld
    assert m.variants["gptq-8bit-32g-actorder_True"].bits_per_weight > m.variants["gptq-4bit-32g-actorder_True"].bits_per_weight
    before = {f: (out / n / f.path).stat().st_mtime_ns for n, r in m.variants.items() for f in r.files}
    again = _build(recipe, out)
    assert again.exit_code == 0, again.output
    assert again.stderr.count("up to date") == 2
    m2 = load_manifest(out)
    assert {f: (out / n / f.path).stat().st_mtime_ns for n, r in m2.variants.items() for f in r.files} == before


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 600) -> None:
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "build ended early"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def test_sigkill_during_second_variant_resumes_without_rebuilding_first(tiny_llama: Path, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, tiny_llama, THREE_GPTQ)
    out = tmp_path / "build"
    names = ["gptq-3bit-32g-actorder_True", "gptq-4bit-32g-actorder_True", "gptq-8bit-32g-actorder_True"]
    order = [json.loads(subprocess.run([*QUANTKIT, "plan", str(recipe), "--json"], capture_output=True, text=True,
                                       check=True, env=_env()).stdout)["variants"][i]["name"] for i in range(3)]
    assert sorted(order) == sorted(names)
    first, second = order[0], order[1]
    proc = subprocess.Popen([*QUANTKIT, "build", str(recipe), "--out", str(out)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def in_second() -> bool:
        m = out / "manifest.json"
        if not m.is_file() or not (out / f".{second}.partial").exists():
            return False
        st = json.loads(m.read_text())["variants"].get(first, {}).get("state")
        return st == "evaluated"

    try:
        _wait_for(in_second, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = json.loads((out / "manifest.json").read_text())["variants"]
    assert second not in state or state[second]["state"] != "evaluated"
    weights = next((out / first).glob("*.safetensors"))
    mtime = weights.stat().st_mtime_ns
    res = subprocess.run([*QUANTKIT, "build", str(recipe), "--out", str(out)], env=_env(),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{first} up to date" in res.stderr
    assert weights.stat().st_mtime_ns == mtime
    final = json.loads((out / "manifest.json").read_text())["variants"]
    assert all(final[n]["state"] in ("evaluated", "carded") for n in names)
    assert not list(out.glob(".*.partial"))


def test_failed_variant_is_recorded_and_others_kept(tiny_llama: Path, tmp_path: Path) -> None:
    """EXL2 needs CUDA: on a CPU machine that variant fails with a reason; GPTQ still lands."""
    recipe = _recipe(tmp_path, tiny_llama, '[[variants]]\nformat = "exl2"\nbpw = 4.0\n'
                     '[[variants]]\nformat = "gptq"\nbits = 4\ngroup_size = 32\n')
    out = tmp_path / "build"
    res = _build(recipe, out)
    m = load_manifest(out)
    assert m is not None
    if m.variants["exl2-4.0bpw"].state != "failed":  # a CUDA machine with exllamav2 built it
        return
    assert res.exit_code == 1
    assert "exl2-4.0bpw failed: exllamav2:" in res.stderr
    assert m.variants["exl2-4.0bpw"].error
    assert m.variants["gptq-4bit-32g-actorder_True"].state in ("evaluated", "carded")


def test_out_of_memory_marks_the_variant_failed_and_keeps_the_others(
        tiny_llama: Path, tmp_path: Path, monkeypatch) -> None:
    """GPTQModel running out of GPU memory in the 8-bit variant (raised where its quantize
    loop would raise it): that variant is failed with the reason, the 4-bit one lands, and
    a re-run builds only the failed one."""
    import torch
    from gptqmodel.models.base import BaseQModel

    real = BaseQModel.quantize

    def quantize(self, *a, **kw):
        if self.quantize_config.bits == 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *a, **kw)

    recipe = _recipe(tmp_path, tiny_llama, TWO_GPTQ)
    out = tmp_path / "build"
    with monkeypatch.context() as mp:
        mp.setattr(BaseQModel, "quantize", quantize)
        res = _build(recipe, out)
    assert res.exit_code == 1, res.output
    m = load_manifest(out)
    assert m is not None
    failed = m.variants["gptq-8bit-32g-actorder_True"]
    assert failed.state == "failed" and failed.error.startswith("out of memory: CUDA out of memory")
    assert "gptq-8bit-32g-actorder_True failed: out of memory" in res.stderr
    assert m.variants["gptq-4bit-32g-actorder_True"].state in ("evaluated", "carded")
    again = _build(recipe, out)  # "after freeing memory"
    assert again.exit_code == 0, again.output
    assert again.stderr.count("up to date") == 1
    assert load_manifest(out).variants["gptq-8bit-32g-actorder_True"].state in ("evaluated", "carded")


def test_only_selects_variants_and_rejects_unknown(tiny_llama: Path, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, tiny_llama, THREE_GPTQ)
    res = CliRunner().invoke(app, ["build", str(recipe), "--out", str(tmp_path / "b"), "--only", "nope"])
    assert res.exit_code == 2 and "--only: no variant named 'nope'" in res.stderr


def test_build_then_publish_then_republish_nothing(tiny_llama: Path, tmp_path: Path, hub) -> None:
    """The real pipeline's output goes to the (local) Hub; a re-run commits and uploads nothing."""
    recipe = _recipe(tmp_path, tiny_llama, TWO_GPTQ)
    out = tmp_path / "build"
    runner = CliRunner()
    assert _build(recipe, out).exit_code == 0
    dry = runner.invoke(app, ["publish", str(recipe), "--out", str(out), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "model.safetensors" in dry.stdout and not hub.requests("POST", "/commit/")
    first = runner.invoke(app, ["publish", str(recipe), "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert len(hub.requests("POST", "/commit/")) == 2
    m = load_manifest(out)
    assert all(r.state == "published" and r.published.commit for r in m.variants.values())
    n = len(hub.requests())
    again = runner.invoke(app, ["publish", str(recipe), "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert len(hub.requests("POST", "/commit/")) == 2  # no new commit
    assert len(hub.requests()) - n <= 3 * 2  # at most 3 requests per branch
    assert "unchanged" in again.stdout


def test_eval_and_card_commands_reuse_the_build(tiny_llama: Path, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, tiny_llama, '[[variants]]\nformat = "gptq"\nbits = 8\ngroup_size = 32\n')
    out = tmp_path / "build"
    runner = CliRunner()
    assert runner.invoke(app, ["card", str(recipe), "--out", str(out)]).exit_code == 1  # nothing built
    assert _build(recipe, out).exit_code == 0
    name = "gptq-8bit-32g-actorder_True"
    q = load_manifest(out).variants[name].quality
    (out / name / "README.md").unlink()
    res = runner.invoke(app, ["card", str(recipe), "--out", str(out)])
    assert res.exit_code == 0 and (out / name / "README.md").is_file()
    res = runner.invoke(app, ["eval", str(recipe), "--out", str(out)], env=_env())
    assert res.exit_code == 0, res.output
    assert load_manifest(out).variants[name].quality == q  # deterministic: same numbers again


def test_batch_goes_on_past_a_bad_recipe(tiny_llama: Path, tmp_path: Path) -> None:
    good = _recipe(tmp_path, tiny_llama, '[[variants]]\nformat = "gptq"\nbits = 8\ngroup_size = 32\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nsource = "a/b"\n[[variants]]\nformat = "gptq"\nbits = 5\n')
    res = CliRunner().invoke(app, ["batch", str(bad), str(good), "--out", str(tmp_path / "out")], env=_env())
    assert res.exit_code == 1
    assert "bad.toml" in res.stdout and "failed" in res.stdout and " ok " in res.stdout
    assert (tmp_path / "out" / "tiny" / "manifest.json").is_file()


def test_doctor_lists_engines() -> None:
    res = CliRunner().invoke(app, ["doctor"])
    assert res.exit_code == 0
    for part in ("torch", "engine gptq", "engine gguf", "engine exl2", "llama.cpp"):
        assert part in res.stdout


def test_a_batch_builds_the_next_recipes_gguf_after_a_failed_conversion(
        tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first recipe's conversion dies (the converter killed, as by the OOM killer); the second
    recipe — the same model, so the same build folder and 16-bit GGUF — converts again and builds
    its GGUF variants. Engines keep no state between builds: no failure outlives its build."""
    real, killed = subprocess.Popen, []

    def popen(cmd, *a, **kw):  # the first converter run dies; every other program runs as it is
        if not killed and any("convert_hf_to_gguf" in str(c) for c in cmd):
            killed.append(cmd)
            cmd = ["sh", "-c", "echo Killed >&2; exit 137"]
        return real(cmd, *a, **kw)

    monkeypatch.setattr(subprocess, "Popen", popen)
    recipes = []
    for i, variants in enumerate(('[[variants]]\nformat = "gguf"\nquant = "Q8_0"\n',
                                  '[[variants]]\nformat = "gguf"\nquant = "Q8_0"\n'
                                  '[[variants]]\nformat = "gguf"\nquant = "Q4_0"\nimatrix = false\n')):
        r = tmp_path / f"r{i}.toml"
        r.write_text(_recipe(tmp_path, tiny_llama, variants).read_text())
        recipes.append(r)
    res = CliRunner().invoke(app, ["batch", *map(str, recipes), "--out", str(tmp_path / "b")], env=_env())
    assert killed and res.exit_code == 1, res.output
    assert "r0.toml" in res.stdout and "r1.toml" in res.stdout and " ok " in res.stdout
    m = load_manifest(tmp_path / "b" / "tiny")
    assert m is not None and m.variants["gguf-Q4_0-noimatrix"].state == "carded"
    assert m.variants["gguf-Q8_0"].state == "carded"  # failed in r0, built by r1
    assert (tmp_path / "b" / "tiny" / "gguf-Q4_0-noimatrix" / "tiny.Q4_0-noimatrix.gguf").is_file()


def test_gguf_ladder_through_build(tiny_llama: Path, tmp_path: Path) -> None:
    """Shared steps once (convert, imatrix), then one folder per type; the 16-bit GGUF is
    removed after the last type that needs it, the imatrix kept."""
    recipe = _recipe(tmp_path, tiny_llama, '[[variants]]\nformat = "gguf"\nquant = ["Q8_0", "Q4_K_M", "Q2_K"]\n')
    out = tmp_path / "build"
    res = _build(recipe, out)
    assert res.exit_code == 0, res.output
    m = load_manifest(out)
    kld = {n: r.quality.kld for n, r in m.variants.items()}
    assert kld["gguf-Q8_0"] < kld["gguf-Q4_K_M"] < kld["gguf-Q2_K"]
    for name, rec in m.variants.items():
        quant = name.split("-", 1)[1]
        assert (out / name / f"tiny.{quant}.gguf").is_file()
        assert rec.notes["imatrix"] == (quant != "Q8_0") and rec.seconds > 0  # Q8_0 ignores an imatrix
    assert not list((out / ".work" / "gguf").glob("base-*")) and list((out / ".work" / "gguf").glob("imatrix-*"))
