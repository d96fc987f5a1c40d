"""The newcomer's first hour: every recipe mistake at once, a plan that fits 120 columns,
library output kept off the terminal (in build.log), the size-against-quality picture in the
cards and report.html, and report.html rendered by a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.testing.fabricate import carded_build

SIX_MISTAKES = """
[model]
source = "jphme/em_german_13b_v01"
base_model = "not a hub id"

[calibration]
samples = -3

[evaluation]
ctx = 4

[publish]
max_kld = -1

[gptq]
damp = 2

[[variants]]
format = "gptq"
bits = 5

[[variants]]
format = "gguf"
quant = "Q9_K"

[[variants]]
format = "gguf"
quant = "Q4_K_M"
branch = "shared"

[[variants]]
format = "gguf"
quant = "Q8_0"
branch = "shared"
"""


def test_every_mistake_of_every_table_at_once(tmp_path: Path) -> None:
    """Model, calibration, evaluation, publish, a defaults table, two variants' settings and a
    plan-level collision: eight lines, one per mistake, with field path and line, exit 2."""
    r = tmp_path / "r.toml"
    r.write_text(SIX_MISTAKES)
    res = CliRunner().invoke(app, ["plan", str(r)])
    assert res.exit_code == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    where = [re.search(r": (\S+) \(line (\d+)\): ", ln).groups() for ln in lines]  # type: ignore[union-attr]
    assert [w for w, _ in where] == ["model.base_model", "calibration.samples", "evaluation.ctx", "publish.max_kld",
                                     "gptq.damp", "variants[0].bits", "variants[1].quant", "variants[3].branch"]
    assert [int(n) for _, n in where] == sorted(int(n) for _, n in where)  # in file order
    assert "calibration.samples (line 7): must be at least 1 (got -3)" in res.stderr
    assert "used by another variant (variants[2])" in lines[-1]


def test_plan_fits_120_columns_and_hints_at_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TheBloke's 13B ladder (GPTQ, AWQ, GGUF) on this machine: no line over 120 columns, one
    line per variant, defaults left out, and a hint for every variant that takes over a day."""
    from huggingface_hub import constants

    from test_resources import LLAMA2_13B, _seed_hub_cache

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _seed_hub_cache(tmp_path / "hub", "jphme/em_german_13b_v01", LLAMA2_13B)
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "em-german-13b.toml"
    res = CliRunner().invoke(app, ["plan", str(recipe)], env={"COLUMNS": "120"})
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert max(len(ln) for ln in lines) <= 120
    rows = [ln for ln in lines if re.match(r"\s*(gptq|awq|gguf)-", ln)]
    assert len(rows) == 12  # one line each: nothing wrapped
    assert not any("engine=" in ln or "split_max_size" in ln or "damp=" in ln for ln in lines)
    hints = [ln for ln in lines if ln.startswith("hint:") and "needs a GPU" in ln]
    assert len(hints) == 6 and all("H100" in h for h in hints)  # 5 GPTQ + AWQ; GGUF fits the CPU
    full = json.loads(CliRunner().invoke(app, ["plan", str(recipe), "--json"]).stdout)
    assert full["variants"][0]["params"]["engine"] == "gptqmodel"  # --json keeps every setting


def test_chart_in_every_card_and_folder_and_a_report(tmp_path: Path) -> None:
    b = carded_build(tmp_path)
    from quantkit.chart import CHART
    from quantkit.report import write_report

    png = (b.out / CHART).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) < 200_000
    per_repo: dict[str, set[bytes]] = {}
    for name, rec in b.manifest.variants.items():
        per_repo.setdefault(rec.repo, set()).add((b.out / name / CHART).read_bytes())
        assert f"]({CHART})" in (b.out / name / "README.md").read_text()
    # each variant folder: its repo's picture (what its card's table shows), one per repo
    assert all(len(pngs) == 1 for pngs in per_repo.values()) and len(per_repo) >= 2
    assert all(next(iter(pngs)).startswith(b"\x89PNG") and png not in pngs for pngs in per_repo.values())
    page = write_report(b.plan, b.manifest, b.out).read_text()
    assert "data:image/png;base64," in page and page.count("<table>") == 3  # GPTQ, GGUF, the plan
    assert "http" not in page.split("<body", 1)[1].split("<table>")[0]  # self-contained up to the tables


def _chromium() -> str | None:
    return next((c for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None)


@pytest.mark.browser
def test_report_renders_in_a_real_browser(tmp_path: Path) -> None:
    """Headless Chromium loads report.html: the picture decodes, the tables are there, and the
    screenshot shows them (not a blank page)."""
    from PIL import Image

    from quantkit.report import write_report

    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium here (`apt-get install chromium`; make test installs it where it can)")
    b = carded_build(tmp_path)
    page = write_report(b.plan, b.manifest, b.out)
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000"]
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'data-chart="loaded"' in dom, dom[:500]  # the image's onload ran: it decoded
    assert dom.count("<tr>") >= 1 + len(b.manifest.variants)
    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,1600", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    img = Image.open(shot).convert("L")
    dark = sum(img.histogram()[:128]) / (img.width * img.height)
    assert 0.01 < dark < 0.5, dark  # text, lines and points drawn; not blank, not black


OURS = ("• ", "▶ ", "✓ ", "= ", "✗ ", "warning:", "error:", "note:")


def test_the_terminal_gets_our_lines_and_build_log_the_rest(tiny_llama: Path, tmp_path: Path) -> None:
    """A real process (real file descriptors): GPTQ and GGUF on the tiny Llama print only our
    lines; torchao's and torch's warnings, GPTQModel's banner land in <out>/build.log."""
    import os
    import sys

    r = tmp_path / "r.toml"
    r.write_text(f'[model]\nsource = "{tiny_llama}"\nname = "tiny"\n[calibration]\nsamples = 8\nseq_len = 128\n'
                 '[evaluation]\ntokens = 1024\nctx = 128\nqa_items = 8\n[[variants]]\nformat = "gptq"\nbits = 4\ngroup_size = 32\n'
                 '[[variants]]\nformat = "gguf"\nquant = "Q4_K_M"\n')
    res = subprocess.run([sys.executable, "-m", "quantkit.cli", "build", str(r), "--out", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "GPTQMODEL_CPU_WORKERS": str(os.cpu_count() or 1)})
    assert res.returncode == 0, res.stderr
    foreign = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith(OURS)]
    assert foreign == []
    log = (tmp_path / "b" / "build.log").read_text()
    assert "quantkit: ✓ gptq-4bit-32g-actorder_True" in log and "quantkit: ✓ gguf-Q4_K_M" in log
    assert len([ln for ln in log.splitlines() if " quantkit: " not in ln]) > 0  # the libraries' own lines
    verbose = subprocess.run([sys.executable, "-m", "quantkit.cli", "eval", str(r), "--out", str(tmp_path / "b"),
                              "-v"], capture_output=True, text=True, timeout=900)
    assert verbose.returncode == 0, verbose.stderr
