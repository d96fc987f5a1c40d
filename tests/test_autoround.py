"""AutoRound as a method of the GGUF and GPTQ formats: the recipe's settings and names, and the
whole path on the tiny model: AutoRound GGUF (its own packer) and GPTQ built beside a stock
llama.cpp type, loaded and scored as the stock files are, carded, published to the local Hub."""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from _hub_fixtures import hub  # noqa: F401 - the local Hub server fixture
from quantkit import toolchain as llamacpp
from quantkit.cli import app
from quantkit.engines import _autoround as ar
from quantkit.engines.gguf import hub_quant_label, read_header
from quantkit.engines.gguf.header import file_type_of
from quantkit.errors import EngineUnavailable
from quantkit.manifest import State, load_manifest
from quantkit.plan import make_plan
from quantkit.recipe import parse_recipe
from quantkit.testing.bad_inputs import recipe_error as _recipe_error
from quantkit.testing.crash import run_build, start_build
from quantkit.testing.hub_server import HubServer


def test_autoround_variants_are_named_by_their_method_and_refuse_what_it_cannot_write() -> None:
    r = parse_recipe('[model]\nsource = "x/y"\n[[variants]]\nformat = "gguf"\nquant = ["Q2_K_S", "Q4_K_M"]\n'
                     'method = "autoround"\nautoround = { preset = "best", iters = 20 }\n'
                     '[[variants]]\nformat = "gguf"\nquant = "Q4_K_M"\n'
                     '[[variants]]\nformat = "gptq"\nbits = [4, 2]\ngroup_size = 64\nmethod = "autoround"\n'
                     '[[variants]]\nformat = "gptq"\nbits = 4\ngroup_size = 64\n', check_source=False)
    plan = {v.name: v for v in make_plan(r, Path("out")).variants}
    assert sorted(plan) == ["gguf-Q2_K_S_autoround", "gguf-Q4_K_M", "gguf-Q4_K_M_autoround",
                            "gptq-2bit-64g-actorder_False-autoround", "gptq-4bit-64g-actorder_False-autoround",
                            "gptq-4bit-64g-actorder_True"]
    assert plan["gguf-Q2_K_S_autoround"].params.model_dump()["autoround"] == {"preset": "best", "iters": 20}
    # stock variants dump as before: their cache keys, manifests and cards are unchanged
    assert set(plan["gguf-Q4_K_M"].params.model_dump()) == {"quant", "imatrix", "split_max_size"}
    assert "method" not in plan["gptq-4bit-64g-actorder_True"].params.model_dump()
    # the Hub's label rule: a K_M file keeps its own tag; Q2_K_S reads as the stock type's (card names the file)
    assert hub_quant_label("m.Q4_K_M_autoround.gguf") == "Q4_K_M_AUTOROUND"
    assert "its 2-bit K type is Q2_K_S" in _recipe_error(
        '[[variants]]\nformat = "gguf"\nquant = "Q2_K"\nmethod = "autoround"\n')
    assert "not IQ4_XS" in _recipe_error('[[variants]]\nformat = "gguf"\nquant = "IQ4_XS"\nmethod = "autoround"\n')
    assert "drop mix" in _recipe_error(
        '[[variants]]\nformat = "gguf"\nmix = "tuned"\ntarget = "Q4_K_M"\nmethod = "autoround"\n')
    assert 'need method = "autoround"' in _recipe_error(
        '[[variants]]\nformat = "gguf"\nquant = "Q4_K_M"\nautoround = { iters = 5 }\n')
    assert "does not reorder columns" in _recipe_error(
        '[[variants]]\nformat = "gptq"\nact_order = true\nmethod = "autoround"\n')
    assert "preset" in _recipe_error(
        '[[variants]]\nformat = "gptq"\nmethod = "autoround"\nautoround = { preset = "fast" }\n')


def test_settings_resolve_against_the_calibration_windows() -> None:
    windows = np.zeros((16, 256), dtype=np.int32)
    t = ar.resolve(None, windows)
    assert (t.iters, t.lr, t.nsamples, t.seq_len, t.batch_size) == (50, 5e-3, 16, 256, 8)  # light, cut to 16
    t = ar.resolve(ar.AutoRoundSettings(preset="default", seq_len=4096, lr=1e-3), windows)
    assert (t.iters, t.lr, t.seq_len) == (200, 1e-3, 256)  # never longer than a window: AutoRound would skip it
    assert "200 iterations, lr 0.001; 16 x 256" in t.describe()


HEAD = """[model]
source = "{model}"
name = "tiny"
base_model = "quantkit/tiny-llama"
[calibration]
samples = 8
seq_len = 128
[evaluation]
tokens = 512
ctx = 128
qa_items = 0
"""
MIXED = HEAD + """[publish]
owner = "me"
[[variants]]
format = "gguf"
quant = "Q4_K_M"
[[variants]]
format = "gguf"
quant = ["Q2_K_S", "Q4_K_M"]
method = "autoround"
autoround = {{ iters = 2, nsamples = 4 }}
[[variants]]
format = "gptq"
bits = 4
group_size = 128
method = "autoround"
autoround = {{ iters = 2, nsamples = 4 }}
"""


@pytest.mark.slow
def test_a_recipe_mixing_stock_and_autoround_builds_scores_and_publishes(tiny_llama: Path, tmp_path: Path,
                                                                          hub: HubServer) -> None:  # noqa: F811
    if importlib.util.find_spec("auto_round") is None:
        pytest.skip("auto-round is not installed: " + ar.EXTRA)
    try:
        llamacpp.find_toolchain()
    except EngineUnavailable as e:
        pytest.skip(str(e))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(MIXED.format(model=tiny_llama))
    out = tmp_path / "build"
    res = CliRunner().invoke(app, ["build", str(recipe), "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = load_manifest(out)
    assert m is not None
    for t in ("Q2_K_S", "Q4_K_M"):
        rec = m.variants[f"gguf-{t}_autoround"]
        path = out / f"gguf-{t}_autoround" / f"tiny.{t}_autoround.gguf"
        kv = read_header(path)["kv"]
        assert kv["general.file_type"] == file_type_of(t)  # the type it is named by
        assert (kv["general.name"], kv["general.quantized_by"]) == ("tiny", "me")  # our metadata, not AutoRound's
        # scored through llama.cpp, as the stock file is; made by AutoRound, as its notes say
        assert rec.quality is not None and rec.quality.kld is not None and rec.quality.kld > 0
        assert rec.notes["quantizer"].startswith("auto-round") and rec.notes["tuning"]["iters"] == 2
    gptq = m.variants["gptq-4bit-128g-actorder_False-autoround"]
    assert gptq.quality is not None and gptq.quality.kld is not None and gptq.notes["method"] == "autoround"
    res = CliRunner().invoke(app, ["publish", str(recipe), "--out", str(out)])
    assert res.exit_code == 0, res.output
    main = set(hub.files("me/tiny-GGUF", "main"))
    assert {"tiny.Q4_K_M.gguf", "tiny.Q2_K_S_autoround.gguf", "tiny.Q4_K_M_autoround.gguf"} <= main
    card = hub.files("me/tiny-GGUF", "Q4_K_M_autoround")["README.md"].decode()
    assert "### AutoRound files" in card and "AutoRound light (2 iterations, lr 0.005; 4 x 128" in card
    assert "llama-cli -hf me/tiny-GGUF:Q4_K_M_AUTOROUND" in card
    gcard = hub.files("me/tiny-GPTQ", "main")["README.md"].decode()
    assert "4-bit, AutoRound, group size 128" in gcard and "auto-round 0.16.1" in gcard


KILLED = HEAD + """[[variants]]
format = "gguf"
quant = "Q8_0"
[[variants]]
format = "gguf"
quant = "Q4_K_M"
method = "autoround"
autoround = {{ iters = 2, nsamples = 4 }}
"""


def _autoround_children(out: Path) -> list[int]:
    """PIDs of AutoRound child processes working for the build into `out`."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone meanwhile, or not a process
            continue
        if "quantkit.engines._autoround" in cmd and any(str(out) in a for a in cmd):
            pids.append(int(d.name))
    return pids


def _weights(folder: Path) -> dict[str, int]:
    """mtimes of a variant's files other than its card and picture (each build rewrites those:
    they list every variant)."""
    return {f.name: f.stat().st_mtime_ns for f in folder.iterdir() if f.suffix not in (".md", ".png")}


@pytest.mark.slow
def test_a_build_killed_while_autoround_tunes_leaves_no_child_and_resumes(tiny_llama: Path, tmp_path: Path) -> None:
    """`kill -9` of the build alone (as the OOM killer does) while AutoRound's child tunes: the
    child dies with it; the re-run keeps the finished stock file and builds the AutoRound one."""
    if importlib.util.find_spec("auto_round") is None:
        pytest.skip("auto-round is not installed: " + ar.EXTRA)
    recipe, out = tmp_path / "recipe.toml", tmp_path / "build"
    recipe.write_text(KILLED.format(model=tiny_llama))
    p = start_build(recipe, out, tmp_path / "killed.log")
    try:
        t0 = time.monotonic()
        while not (children := _autoround_children(out)):
            assert p.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() - t0 < 300
            time.sleep(0.1)
        stock = _weights(out / "gguf-Q8_0")
        p.send_signal(signal.SIGKILL)  # the build's own process only
        p.wait()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    t0 = time.monotonic()
    while any(Path(f"/proc/{c}").exists() for c in children):  # PR_SET_PDEATHSIG
        assert time.monotonic() - t0 < 10, "AutoRound's child outlived the killed build"
        time.sleep(0.1)
    assert run_build(recipe, out, tmp_path / "rerun.log") == 0, (tmp_path / "rerun.log").read_text()
    rerun = (tmp_path / "rerun.log").read_text()
    assert "▶ gguf-Q8_0 " not in rerun and "▶ gguf-Q4_K_M_autoround " in rerun
    assert _weights(out / "gguf-Q8_0") == stock and stock
    m = load_manifest(out)
    assert m is not None and m.variants["gguf-Q4_K_M_autoround"].at_least(State.EVALUATED)
    assert [f.name for f in out.iterdir() if f.name.endswith(".partial")] == []
