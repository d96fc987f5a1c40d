"""Tuned per-tensor GGUF mixes: the recipe's budget keys, llama.cpp's row quantizer called
in-process against llama-quantize's own bytes, the allocation under a budget, and the whole
path on the tiny model: built beside the stock types, rebuilt byte for byte from the published
rules by stock llama-quantize, published to the local Hub next to the ladder."""

from __future__ import annotations

import hashlib
import math
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from _hub_fixtures import hub  # noqa: F401 - the local Hub server fixture
from quantkit import toolchain as llamacpp
from quantkit.cli import app
from quantkit.engines.gguf import BASE, IMATRIX, SENSITIVITY, GGUFEngine, hub_quant_label, read_header
from quantkit.engines.gguf.ggml import quantize_rows, stored_type
from quantkit.engines.gguf.header import tensor
from quantkit.engines.gguf.mix import (CANDIDATES, Probe, Sensitivity, allocate, importance, probe_errors, probe_type,
                                       sample, summary, tunable)
from quantkit.errors import EngineError, EngineUnavailable
from quantkit.manifest import load_manifest
from quantkit.plan import make_plan
from quantkit.recipe import parse_recipe
from quantkit.testing.bad_inputs import recipe_error as _recipe_error
from quantkit.testing.hub_server import HubServer
from test_gguf import make_ctx, run_steps, variant


@pytest.fixture(scope="module")
def toolchain() -> llamacpp.Toolchain:
    try:
        return llamacpp.find_toolchain()
    except EngineUnavailable as e:
        pytest.skip(str(e))


def test_a_tuned_variant_names_its_budget_once() -> None:
    r = parse_recipe('[model]\nsource = "x/y"\n[[variants]]\nformat = "gguf"\nmix = "tuned"\n'
                     'target = ["Q4_K_M", "Q2_K"]\n[[variants]]\nformat = "gguf"\nmix = "tuned"\n'
                     'target_bpw = 3.5\n[[variants]]\nformat = "gguf"\nquant = "Q4_K_M"\n', check_source=False)
    dumps = {v.name: v.params.model_dump() for v in make_plan(r, Path("out")).variants}
    assert sorted(dumps) == ["gguf-Q2_K_tuned", "gguf-Q4_K_M", "gguf-Q4_K_M_tuned", "gguf-tuned-3.50bpw"]
    assert dumps["gguf-Q4_K_M_tuned"]["quant"] == "Q4_K_M" and dumps["gguf-Q4_K_M_tuned"]["mix"] == "tuned"
    # a stock variant dumps as before tuned mixes existed: its cache key is unchanged
    assert set(dumps["gguf-Q4_K_M"]) == {"quant", "imatrix", "split_max_size"}
    assert "target is the budget of a tuned mix" in _recipe_error(
        '[[variants]]\nformat = "gguf"\ntarget = "Q4_K_M"\n')
    assert "needs one budget" in _recipe_error('[[variants]]\nformat = "gguf"\nmix = "tuned"\n')
    assert "target is one of" in _recipe_error('[[variants]]\nformat = "gguf"\nmix = "tuned"\ntarget = "Q8_0"\n')
    assert "set imatrix = true" in _recipe_error(
        '[[variants]]\nformat = "gguf"\nmix = "tuned"\ntarget = "Q4_K_M"\nimatrix = false\n')
    assert "target_bpw must be between" in _recipe_error(
        '[[variants]]\nformat = "gguf"\nmix = "tuned"\ntarget_bpw = 1.5\n')


def test_rows_quantized_in_process_are_the_bytes_llama_quantize_writes(smollm2_2l: Path, tmp_path: Path,
                                                                         toolchain: llamacpp.Toolchain) -> None:
    """SmolLM2's 576-wide rows take no 256-block type: llama.cpp falls back, and so do we."""
    ctx, _, _ = make_ctx(smollm2_2l, tmp_path / "work")
    made = run_steps(GGUFEngine(), [variant("Q4_K_M")], ctx)
    base, im = made[BASE][0], made[IMATRIX][0]
    pure = tmp_path / "pure.gguf"
    subprocess.run([str(toolchain.quantize), "--pure", "--imatrix", im.name, str(base.resolve()), str(pure),
                    "Q3_K_M", "2"], cwd=im.parent, check=True, capture_output=True)
    imp = importance(im)
    ours = {i.name: i for i in read_header(base)["infos"]}
    theirs = {i.name: i for i in read_header(pure)["infos"]}
    seen = set()
    for name in ("blk.1.ffn_down.weight", "blk.1.attn_q.weight", "blk.0.ffn_up.weight"):
        b, q = ours[name], theirs[name]
        assert q.type == stored_type("Q3_K", b.dims[0])
        seen.add(q.type)
        rows = sample(b.dims[1])
        mine = quantize_rows(toolchain.quantize.parent, q.type, tensor(base, b, rows), imp[name])
        raw = np.memmap(pure, dtype=np.uint8, mode="r", offset=q.offset, shape=(q.nbytes,)).reshape(b.dims[1], -1)
        assert np.array_equal(mine, raw[rows]), name
    assert seen == {"Q3_K", "Q4_0"}  # ffn_down's 1536-wide rows take Q3_K; the rest fall back


def test_a_probes_predicted_error_is_that_of_the_low_file_it_scores(smollm2_2l: Path, tmp_path: Path,
                                                                    toolchain: llamacpp.Toolchain) -> None:
    """The probe file is quantized without the importance matrix, ffn_down at Q2_K and the rest at
    Q4_0; the predicted error is that very quantization's (same bytes), weighed by the importance
    matrix as the table's errors are."""
    from quantkit.engines.gguf import probes

    ctx, _, _ = make_ctx(smollm2_2l, tmp_path / "work")
    made = run_steps(GGUFEngine(), [variant("Q4_K_M")], ctx)
    base, im = made[BASE][0], made[IMATRIX][0]
    low = probes.low_file(toolchain, base, tmp_path / "low.gguf")
    names = ["blk.1.ffn_down.weight", "blk.1.attn_v.weight"]
    predicted = probe_errors(toolchain.quantize.parent, base, im, names)
    for name, want in zip(names, ("Q2_K", "Q4_0"), strict=True):
        b = next(i for i in read_header(base)["infos"] if i.name == name)
        q = next(i for i in read_header(low)["infos"] if i.name == name)
        assert q.type == want == probe_type(name)
        rows = sample(b.dims[1])
        w = tensor(base, b, rows)
        raw = np.memmap(low, dtype=np.uint8, mode="r", offset=q.offset, shape=(q.nbytes,)).reshape(b.dims[1], -1)
        assert np.array_equal(quantize_rows(toolchain.quantize.parent, q.type, w, None), raw[rows])
        expected = float((((tensor(low, q, rows) - w) ** 2) @ importance(im)[name]).sum()) * b.dims[1] / len(rows)
        assert predicted[name] == pytest.approx(expected, rel=1e-5)


def _table() -> Sensitivity:
    """Three tensors, each cheaper and worse at lower types; `b` cares most."""
    rows = {"a": {"Q2_K": (100, 8.0), "Q4_K": (200, 2.0), "Q6_K": (300, 0.5)},
            "b": {"Q2_K": (100, 80.0), "Q4_K": (200, 20.0), "Q6_K": (300, 5.0)},
            "c": {"Q2_K": (100, 1.0), "Q4_K": (200, 0.3), "Q6_K": (300, 0.1)}}
    return Sensitivity({f"blk.0.{k}.weight": v for k, v in rows.items()}, (), Path("-"))


def test_a_probes_scale_holds_at_its_layers_centre_and_runs_log_linear_between() -> None:
    """Three probes of attn_v over six layers (centres 0.5, 2.5, 4.5) at 1, 4 and 16 KLD per
    unit of error: flat outside the centres, geometric between them; another class is unscaled."""
    probes = tuple(Probe("attn_v", a, a + 1, 1.0, s) for a, s in ((0, 1.0), (2, 4.0), (4, 16.0)))
    sens = Sensitivity({}, probes, Path("-"))
    assert sens.scale("blk.0.attn_v.weight") == pytest.approx(1.0)
    assert sens.scale("blk.1.attn_v.weight") == pytest.approx(4 ** 0.25)
    assert sens.scale("blk.3.attn_v.weight") == pytest.approx(4 * 4 ** 0.25)
    assert sens.scale("blk.5.attn_v.weight") == pytest.approx(16.0)
    assert sens.scale("blk.3.ffn_up.weight") == 1.0


def test_allocation_keeps_the_budget_and_spends_it_where_the_error_is() -> None:
    sens = _table()
    stock = {n: ("Q4_K", 200) for n in sens.table} | {"token_embd.weight": ("Q6_K", 50)}
    mix = allocate(sens, stock, 650)
    assert mix.bytes <= 650 and mix.types["token_embd.weight"] == "Q6_K"  # outside the table: the stock type
    assert mix.types["blk.0.b.weight"] == "Q6_K" and mix.types["blk.0.c.weight"] == "Q2_K"
    assert mix.error < mix.stock_error
    assert summary(mix)["b"] == {"up": 1, "same": 0, "down": 0}
    assert allocate(sens, stock, 950).error < mix.error  # more bytes, less error
    with pytest.raises(EngineError, match="below the smallest mix"):
        allocate(sens, stock, 340)


TUNED = """[model]
source = "{model}"
name = "tiny"
[calibration]
samples = 8
seq_len = 128
[evaluation]
tokens = 1024
ctx = 128
qa_items = 0
[build]
keep_intermediate = true
[publish]
owner = "me"
[[variants]]
format = "gguf"
quant = ["Q4_K_M", "Q2_K"]
[[variants]]
format = "gguf"
mix = "tuned"
target = ["Q4_K_M", "Q2_K"]
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_tuned_files_build_rebuild_and_publish_beside_the_ladder(tiny_llama: Path, tmp_path: Path,
                                                                   toolchain: llamacpp.Toolchain,
                                                                   hub: HubServer) -> None:  # noqa: F811
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(TUNED.format(model=tiny_llama))
    out = tmp_path / "build"
    res = CliRunner().invoke(app, ["build", str(recipe), "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = load_manifest(out)
    assert m is not None
    for t in ("Q4_K_M", "Q2_K"):
        stock, mine = m.variants[f"gguf-{t}"], m.variants[f"gguf-{t}_tuned"]
        folder = out / f"gguf-{t}_tuned"
        assert sorted(p.name for p in folder.iterdir() if p.suffix != ".png" and p.name != "README.md") == [
            f"tiny.{t}_tuned.gguf", f"tiny.{t}_tuned.tensor-types.txt", "tiny.imatrix"]
        assert mine.size_bytes <= 1.005 * stock.size_bytes
        notes = mine.notes
        assert notes["tensor_type_file"] == f"tiny.{t}_tuned.tensor-types.txt" and notes["mix_tensor_bytes"] <= \
            notes["mix_budget_bytes"]
        # every quantized tensor has its rule; the file holds exactly the chosen types
        rules = dict(line.split("=") for line in (folder / notes["tensor_type_file"]).read_text().split())
        written = {i.name: i.type for i in read_header(folder / f"tiny.{t}_tuned.gguf")["infos"]}
        assert {re.sub(r"\\(.)", r"\1", k.strip("^$")): v.upper() for k, v in rules.items()} == \
            {n: ty for n, ty in written.items() if ty != "F32"}
        _rebuilds_the_same_bytes(notes["rebuild"], folder, out, toolchain, tmp_path / f"re-{t}")
    _published_beside_the_ladder(recipe, out, hub)


def _rebuilds_the_same_bytes(command: str, folder: Path, out: Path, tc: llamacpp.Toolchain, where: Path) -> None:
    """The card's command, run by stock llama-quantize over the published files and the 16-bit GGUF."""
    argv = shlex.split(command)
    where.mkdir()
    base = next((out / ".work" / "gguf").glob(f"base-*/{argv[-3]}"))
    shutil.copy(base, where / base.name)
    for name in (argv[argv.index("--tensor-type-file") + 1], argv[argv.index("--imatrix") + 1]):
        shutil.copy(folder / name, where / name)
    subprocess.run([str(tc.quantize), *argv[1:]], cwd=where, check=True, capture_output=True)
    assert _sha(where / argv[-2]) == _sha(folder / argv[-2])


def _published_beside_the_ladder(recipe: Path, out: Path, hub: HubServer) -> None:  # noqa: F811
    res = CliRunner().invoke(app, ["publish", str(recipe), "--out", str(out)])
    assert res.exit_code == 0, res.output
    repo = "me/tiny-GGUF"
    main = set(hub.files(repo, "main"))
    ggufs = sorted(f for f in main if f.endswith(".gguf"))
    assert ggufs == ["tiny.Q2_K.gguf", "tiny.Q2_K_tuned.gguf", "tiny.Q4_K_M.gguf", "tiny.Q4_K_M_tuned.gguf"]
    assert {"tiny.Q2_K_tuned.tensor-types.txt", "tiny.Q4_K_M_tuned.tensor-types.txt", "tiny.imatrix"} <= main
    # the Hub's label rule gives each file its own tag: `-hf REPO:Q4_K_M_TUNED` picks the tuned file
    labels = [hub_quant_label(f) for f in ggufs]
    assert labels == ["Q2_K", "Q2_K_TUNED", "Q4_K_M", "Q4_K_M_TUNED"]
    card = hub.files(repo, "Q4_K_M_tuned")["README.md"].decode()
    assert f"llama-cli -hf {repo}:Q4_K_M_TUNED" in card and "### Tuned mixes" in card
    assert "tuned mix at Q4_K_M size, imatrix" in card  # its row in the provided-files table
    assert "llama-quantize --override-kv" in card and "--tensor-type-file tiny.Q4_K_M_tuned.tensor-types.txt" in card
    assert "[tiny.Q2_K.gguf]" in card and "[tiny.Q4_K_M_tuned.gguf]" in card


def test_the_sensitivity_step_is_keyed_calibrated_and_found_again(tiny_llama: Path, tmp_path: Path,
                                                                    toolchain: llamacpp.Toolchain) -> None:
    from quantkit.engines.gguf.params import GGUFParams
    from quantkit.variant import Variant

    ctx, _, events = make_ctx(tiny_llama, tmp_path / "work")
    v = Variant("gguf-Q4_K_M_tuned", "gguf", "{owner}/m-GGUF", "Q4_K_M_tuned",
                GGUFParams.model_validate({"mix": "tuned", "target": "Q4_K_M"}), 0)
    eng = GGUFEngine()
    assert [s.key for s in eng.shared_steps([v])] == [BASE, IMATRIX, SENSITIVITY]
    first = run_steps(eng, [v], ctx)[SENSITIVITY]
    n = len(events)
    again = run_steps(eng, [v], ctx)[SENSITIVITY]
    assert again.path == first.path and again.proxy == first.proxy and again.probes == first.probes
    assert not [e for e in events[n:] if e[0] in ("tensor sensitivity", "calibration probes")]  # read back
    layers = [i for i in read_header(run_steps(eng, [v], ctx)[BASE][0])["infos"] if tunable(i)]
    assert set(first.proxy) == {i.name for i in layers} and len(layers) == 14
    assert all(set(row) == set(CANDIDATES) for row in first.proxy.values())  # 256-wide rows: no fallbacks
    # one probe per class and third of the layers (2 layers: layer 0, layer 1), each really scored
    assert sorted((p.cls, p.first, p.last) for p in first.probes) == sorted(
        (c, k, k) for c in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
        for k in (0, 1))
    assert all(p.predicted > 0 and math.isfinite(p.measured) for p in first.probes)
    assert any(p.measured > 0 for p in first.probes)
    # the calibrated table is the proxy scaled by each tensor's probe (at a probe's own layer)
    p = next(p for p in first.probes if p.cls == "ffn_down" and p.first == 1)
    assert first.table["blk.1.ffn_down.weight"]["Q4_K"][1] == pytest.approx(
        first.proxy["blk.1.ffn_down.weight"]["Q4_K"][1] * p.scale)
    assert not list(first.path.parent.glob("*.gguf"))  # the probe files are gone


def test_a_probe_of_linked_shards_scores_as_the_file_llama_quantize_writes_from_the_same_rules(
        tiny_llama: Path, tmp_path: Path, toolchain: llamacpp.Toolchain) -> None:
    """A probe is a folder of links to shards of the base and one pure low file, no copy of the
    weights: llama.cpp loads it as one model, and it scores the same KLD, to the digit, as the one
    file `llama-quantize --pure --tensor-type-file` makes with the same types; with no group low it
    is the reference (KLD 0: no floor to subtract)."""
    from quantkit.engines.gguf import probes

    ctx, _, _ = make_ctx(tiny_llama, tmp_path / "work")
    made = run_steps(GGUFEngine(), [variant("Q4_K_M")], ctx)
    base = made[BASE][0]
    low = probes.low_file(toolchain, base, tmp_path / "low.gguf")
    lows = {i.name: i.type for i in read_header(low)["infos"]}
    groups = [["blk.0.attn_v.weight", "blk.0.attn_q.weight"], ["blk.1.ffn_down.weight"]]
    sh = probes.shards(tmp_path / "shards", base, low, groups)
    text = ctx.calib.write_text(tmp_path / "calibration.txt")
    scorer = probes.Scorer(base, text, probes.probe_ctx(int(ctx.calib.windows.size)))
    first = sh.probe(frozenset({1}))
    assert all(f.is_symlink() for f in first.parent.iterdir()) and len(list(first.parent.iterdir())) == 3
    rules = tmp_path / "rules.txt"
    infos = [i for i in read_header(base)["infos"] if len(i.dims) == 2]  # a rule each, as the base has it
    rules.write_text("".join(f"^{re.escape(i.name)}$={(lows[i.name] if i.name in groups[1] else i.type).lower()}\n"
                             for i in infos))
    subprocess.run([str(toolchain.quantize), "--pure", "--tensor-type-file", str(rules), str(base),
                    str(tmp_path / "ref.gguf"), "Q8_0", "2"], check=True, capture_output=True)
    got, ref = scorer.kld(first), scorer.kld(tmp_path / "ref.gguf")
    assert got == ref > scorer.kld(sh.probe()) == 0.0
