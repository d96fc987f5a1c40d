"""Big models under the Hub's file limits (issue 15): `split_max_size` for every format,
GGUF files split into llama.cpp's shards by llama-gguf-split, GPTQ weights as safetensors
shards with an index, the plan's per-variant file counts and warnings, publish's refusal of
a file over 50 GB, and the toolchain building llama-gguf-split into its existing build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from quantkit import formats as f
from quantkit.engines import gguf as g
from quantkit import toolchain as llamacpp
from quantkit.errors import EngineError, EngineUnavailable, PublishError, RecipeError
from quantkit.plan import Variant, make_plan
from quantkit.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parent.parent
PLAN_70B = ROOT / "recipes" / "llama2-70b-plan.toml"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ---------------------------------------------------------------- the setting


def test_split_max_size_is_a_setting_of_every_weight_format_and_keeps_names() -> None:
    text = ('[model]\nsource = "m"\n[gguf]\nsplit_max_size = "40 mb"\n[gptq]\nsplit_max_size = "1.5G"\n'
            '[[variants]]\nformat = "gguf"\nquant = ["Q8_0", "Q4_K_M"]\n'
            '[[variants]]\nformat = "gguf"\nquant = "F16"\nsplit_max_size = "2G"\n'
            '[[variants]]\nformat = "gptq"\nbits = 4\ngroup_size = 64\n'
            '[[variants]]\nformat = "awq"\n')
    plan = make_plan(parse_recipe(text, check_source=False))
    got = {v.name: v.params.split_max_size for v in plan.variants}
    assert got == {"gguf-Q8_0": "40M", "gguf-Q4_K_M": "40M", "gguf-F16": "2G",
                   "gptq-4bit-64g-actorder_True": "1.5G", "awq-4bit-128g": "20G"}
    assert f.parse_size("40M") == 40_000_000 and f.parse_size("20G") == 20 * 10**9
    assert f.parse_size("500k") == 500_000 and f.parse_size("1.5GB") == 1_500_000_000


@pytest.mark.parametrize("bad", ["20", "0G", "-1G", "20T", "big"])
def test_a_bad_size_is_a_recipe_error_naming_the_field(bad: str) -> None:
    text = f'[model]\nsource = "m"\n[[variants]]\nformat = "gguf"\nquant = "Q8_0"\nsplit_max_size = "{bad}"\n'
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, check_source=False)
    assert "split_max_size" in str(e.value) and "K, M or G" in str(e.value)


def test_shard_helpers_follow_llama_cpp_naming() -> None:
    parts = [g.shard_name("m.Q8_0", i, 3) for i in (3, 1, 2)]
    assert parts[1] == "m.Q8_0-00001-of-00003.gguf"
    assert g.shards([*parts, "README.md"]) == sorted(parts)
    assert g.first_shard(parts) == "m.Q8_0-00001-of-00003.gguf"
    assert g.include_pattern(parts) == "m.Q8_0-*-of-00003.gguf"
    assert g.shards(["m.Q4_K_M.gguf", "README.md"]) == ["m.Q4_K_M.gguf"] == [g.include_pattern(["m.Q4_K_M.gguf"])]
    assert g.missing_shards(parts[:2]) == ["m.Q8_0-00002-of-00003.gguf"]
    assert g.first_shard(["README.md"]) == ""


# ---------------------------------------------------------------- plan: 70B from config.json alone


def _plan_70b():
    from quantkit.resources import MACHINES, plan_resources

    return plan_resources(make_plan(load_recipe(PLAN_70B)), MACHINES["h100"])


def test_plan_counts_files_per_variant_for_a_70b_config() -> None:
    from quantkit.resources import file_warnings

    rp = _plan_70b()
    files = {n: e.files for n, e in rp.variants.items()}
    assert {n: x.count for n, x in files.items()} == {
        "gguf-Q4_K_M": 3, "gguf-F16": 7, "gguf-Q8_0": 4, "gguf-Q8_0-noimatrix": 2,
        "gptq-4bit-128g-actorder_True": 2, "awq-4bit-128g": 2}
    assert all(x.largest <= x.limit for x in files.values())
    assert 135e9 < files["gguf-F16"].unsplit < 140e9 and 72e9 < files["gguf-Q8_0"].unsplit < 75e9
    warn = file_warnings(rp)
    assert set(warn) == {"gguf-F16", "gguf-Q8_0", "gguf-Q8_0-noimatrix"}  # Q4_K_M: 41.6 GB, under 50
    assert "7 files" in warn["gguf-F16"] and "publish would refuse" in warn["gguf-Q8_0-noimatrix"]


def test_plan_command_shows_files_and_one_warning_line_per_variant() -> None:
    from quantkit.cli import app

    res = CliRunner().invoke(app, ["plan", str(PLAN_70B), "--machine", "h100"])
    assert res.exit_code == 0, res.output
    assert "files" in res.output and "7 (≤ 19.8 GB)" in res.output
    assert [line.split(":")[1].strip() for line in res.output.splitlines() if line.startswith("warning:")] == \
        ["gguf-F16", "gguf-Q8_0", "gguf-Q8_0-noimatrix"]
    res = CliRunner().invoke(app, ["plan", str(PLAN_70B), "--machine", "h100", "--json"])
    doc = json.loads(res.stdout)
    assert doc["variants"][0]["resources"]["files"]["count"] == 3 and len(doc["warnings"]) == 3


# ---------------------------------------------------------------- publish refuses a file over 50 GB


def test_publish_refuses_a_file_over_the_hub_limit_before_any_request(tmp_path: Path) -> None:
    from quantkit.testing.fabricate import fabricate_build

    from quantkit import publish

    b = fabricate_build(tmp_path)
    big = b.folder("gguf-Q8_0") / "tiny_german.Q8_0.gguf"
    os.truncate(big, f.HUB_FILE_LIMIT + 1)  # sparse: no disk used

    class NoHub:  # any Hub request fails the test
        token = "hf_not_used"

        def __getattr__(self, name: str):
            raise AssertionError(f"Hub request {name} before the size check")

    with pytest.raises(PublishError) as e:
        publish.publish(b.plan, b.manifest, b.out, api=NoHub())  # type: ignore[arg-type]
    assert "gguf-Q8_0/tiny_german.Q8_0.gguf (50.00 GB)" in e.value.reason
    assert "nothing was uploaded" in e.value.reason and "split_max_size" in e.value.reason
    # another variant selected alone publishes as before (not refused)
    publish.refuse_oversized(b.plan, b.manifest, [b.variant("gguf-Q4_K_M")])


# ---------------------------------------------------------------- toolchain: the split tool


def _fake_cache(tmp: Path, tools: tuple[str, ...]) -> Path:
    cache = tmp / "cache"
    bin_dir = llamacpp.build_dir(cache) / "bin"
    bin_dir.mkdir(parents=True)
    src = llamacpp.sdist_dir(cache) / "vendor" / "llama.cpp"
    (llamacpp.build_dir(cache) / "CMakeCache.txt").write_text(f"CMAKE_HOME_DIRECTORY:INTERNAL={src}\n")
    for t in tools:
        (bin_dir / t).write_text("#!/bin/sh\n")
        (bin_dir / t).chmod(0o755)
    llamacpp.wheel_dir(cache).mkdir(parents=True)
    (llamacpp.wheel_dir(cache) / f"{llamacpp.SDIST}-py3-none-linux_x86_64.whl").write_bytes(b"wheel")
    return cache


def _recording_run(cache: Path, calls: list[list[str]]):
    def run(cmd: list[str], **kw) -> None:
        calls.append(cmd)
        if "--target" in cmd:  # what ninja would link
            for t in cmd[cmd.index("--target") + 1:]:
                p = llamacpp.build_dir(cache) / "bin" / t
                p.write_text("#!/bin/sh\n")
                p.chmod(0o755)
    return run


def test_an_existing_cache_gets_only_the_split_tool_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No reconfigure, no rebuild of the others, the wheel packed from the libraries kept."""
    monkeypatch.delenv("QUANTKIT_LLAMA_PORTABLE", raising=False)
    monkeypatch.delenv("QUANTKIT_LLAMA_CUDA", raising=False)
    cache = _fake_cache(tmp_path, llamacpp.REQUIRED_TOOLS)
    tools = llamacpp._cached_tools(cache)
    assert tools is not None and llamacpp.SPLIT_TOOL not in tools
    calls: list[list[str]] = []
    monkeypatch.setattr(llamacpp, "_run", _recording_run(cache, calls))
    llamacpp.build_tools(cache, jobs=1)
    assert calls == [["cmake", "--build", str(llamacpp.build_dir(cache)), "--parallel", "1",
                      "--target", "llama-gguf-split"]]
    assert llamacpp.cached_wheel(cache) is not None
    assert llamacpp.SPLIT_TOOL in (llamacpp._cached_tools(cache) or {})
    llamacpp.build_tools(cache, jobs=1)  # everything there: nothing runs
    assert len(calls) == 1


def test_a_fresh_build_makes_the_split_tool_with_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QUANTKIT_LLAMA_PORTABLE", raising=False)
    monkeypatch.delenv("QUANTKIT_LLAMA_CUDA", raising=False)
    cache = _fake_cache(tmp_path, ())
    calls: list[list[str]] = []
    monkeypatch.setattr(llamacpp, "_run", _recording_run(cache, calls))
    llamacpp.build_tools(cache, jobs=1)
    build = next(c for c in calls if "--target" in c)
    assert build[build.index("--target") + 1:] == list(llamacpp.TOOLS)
    assert "llama-gguf-split" in llamacpp.TOOLS


def test_a_toolchain_without_the_split_tool_says_how_to_get_it(tmp_path: Path) -> None:
    cache = _fake_cache(tmp_path, llamacpp.REQUIRED_TOOLS)
    tools = llamacpp._tools_in(llamacpp.build_dir(cache) / "bin")
    assert tools is not None and llamacpp.SPLIT_TOOL not in tools
    tc = llamacpp.Toolchain(Path("c.py"), Path("gguf-py"), *(tools[t] for t in llamacpp.REQUIRED_TOOLS), "x", "cache")
    with pytest.raises(EngineUnavailable, match="quantkit toolchain"):
        tc.splitter()


# ---------------------------------------------------------------- GGUF: real llama.cpp


@pytest.fixture(scope="module")
def toolchain():
    try:
        tc = llamacpp.find_toolchain()
    except EngineUnavailable as e:
        pytest.skip(str(e))
    if tc.split is None:
        pytest.skip(f"{llamacpp.SPLIT_TOOL} not built: run `{llamacpp.BUILD_COMMAND}`")
    if llamacpp.bindings_version() is None:
        pytest.skip("llama-cpp-python not installed")
    return tc


def _q8(limit: str) -> Variant:
    return Variant("gguf-Q8_0", "gguf", "{owner}/m-GGUF", "Q8_0", g.GGUFParams(quant="Q8_0", split_max_size=limit), 0)


@pytest.fixture(scope="module")
def tiny_q8(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory, toolchain):
    """tiny-llama Q8_0 (2.2 MB) built twice: split at 2M (1 MB of tensors a shard), and whole."""
    from test_gguf import build, make_ctx

    ctx, tok, _ = make_ctx(tiny_llama, tmp_path_factory.mktemp("work"), name="tiny-llama")
    out = tmp_path_factory.mktemp("out")
    eng = g.GGUFEngine()
    split = build(eng, _q8("2M"), ctx, out / "split").note_dict()
    whole = build(eng, _q8("20G"), ctx, out / "whole").note_dict()
    return eng, ctx, tok, out, split, whole


def test_gguf_above_the_limit_becomes_llama_cpp_shards(tiny_q8) -> None:
    eng, ctx, _, out, notes, whole = tiny_q8
    names = sorted(p.name for p in (out / "split").iterdir())
    assert names == [g.shard_name("tiny-llama.Q8_0", i, 3) for i in (1, 2, 3)]  # nothing else left
    assert notes["file"] == names[0] and notes["shards"] == 3 and notes["split_max_size"] == 2_000_000
    assert all((out / "split" / n).stat().st_size <= 2_000_000 for n in names)
    assert [p.name for p in (out / "whole").iterdir()] == ["tiny-llama.Q8_0.gguf"] and "shards" not in whole
    heads = [g.read_header(out / "split" / n) for n in names]
    assert [h["kv"]["split.no"] for h in heads] == [0, 1, 2] and heads[0]["kv"]["split.count"] == 3
    assert heads[0]["kv"]["general.file_type"] == g.file_type_of("Q8_0")
    whole_head = g.read_header(out / "whole" / "tiny-llama.Q8_0.gguf")
    assert [t[0] for h in heads for t in h["tensors"]] == [t[0] for t in whole_head["tensors"]]


def test_split_is_deterministic_and_loads_from_the_first_shard_with_the_same_logits(tiny_q8, toolchain,
                                                                                    tmp_path: Path) -> None:
    from test_gguf import _eval_ids

    eng, ctx, tok, out, _, _ = tiny_q8
    again = g.split_file(toolchain, out / "whole" / "tiny-llama.Q8_0.gguf", tmp_path / "tiny-llama.Q8_0", 2_000_000)
    assert [(p.name, _sha(p)) for p in again] == [(p.name, _sha(p)) for p in sorted((out / "split").iterdir())]
    ids = _eval_ids(tok, ctx, 96)
    with eng.open_model(out / "split", ctx) as split, eng.open_model(out / "whole", ctx) as whole:
        assert np.array_equal(split(ids), whole(ids))


def test_a_missing_shard_is_refused_at_evaluation(tiny_q8, tmp_path: Path) -> None:
    eng, ctx, _, out, _, _ = tiny_q8
    shutil.copytree(out / "split", tmp_path / "v")
    (tmp_path / "v" / g.shard_name("tiny-llama.Q8_0", 2, 3)).unlink()
    with pytest.raises(EngineError, match="00002-of-00003"), eng.open_model(tmp_path / "v", ctx):
        pass


def test_a_limit_below_the_largest_tensor_fails_cleanly(tiny_q8, tmp_path: Path) -> None:
    from test_gguf import build

    eng, ctx, *_ = tiny_q8
    with pytest.raises(EngineError, match="split_max_size 1 MB is too small"):
        build(eng, _q8("1M"), ctx, tmp_path / "v")
    assert list((tmp_path / "v").iterdir()) == []


def test_a_build_of_a_split_variant_lands_every_shard(tiny_llama: Path, tmp_path: Path, toolchain) -> None:
    """The pipeline's path (`quantkit build`): the variant folder holds every shard, the
    manifest lists them, and the file the card names is the first."""
    import json

    from typer.testing import CliRunner

    from quantkit.cli import app

    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\nsource = "{tiny_llama}"\nname = "tiny-llama"\n[calibration]\nsamples = 4\n'
                      'seq_len = 128\n[evaluation]\ntokens = 512\nctx = 128\nqa_items = 8\n[[variants]]\nformat = "gguf"\n'
                      'quant = "Q8_0"\nsplit_max_size = "2M"\n')
    res = CliRunner().invoke(app, ["build", str(recipe), "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    shards = [g.shard_name("tiny-llama.Q8_0", i, 3) for i in (1, 2, 3)]
    assert sorted(p.name for p in (tmp_path / "b" / "gguf-Q8_0").glob("*.gguf")) == shards
    rec = json.loads((tmp_path / "b" / "manifest.json").read_text())["variants"]["gguf-Q8_0"]
    assert [f["path"] for f in rec["files"] if f["path"].endswith(".gguf")] == shards
    assert rec["notes"]["file"] == shards[0] and rec["state"] == "carded"


@pytest.mark.slow
def test_smollm2_q8_0_split_at_40m(smollm2: Path, tmp_path: Path, toolchain) -> None:
    """The issue's check: SmolLM2-135M Q8_0 (145 MB) at split_max_size 40M: 4 shards, each
    under 40 MB, the same logits as the unsplit file."""
    from test_gguf import _eval_ids, build, make_ctx

    ctx, tok, _ = make_ctx(smollm2, tmp_path / "work", name="SmolLM2-135M-Instruct")
    eng = g.GGUFEngine()
    split = build(eng, _q8("40M"), ctx, tmp_path / "split").note_dict()
    build(eng, _q8("20G"), ctx, tmp_path / "whole")
    parts = sorted((tmp_path / "split").iterdir())
    assert split["shards"] == len(parts) == 4 and all(p.stat().st_size <= 40_000_000 for p in parts)
    ids = _eval_ids(tok, ctx, 256)
    with eng.open_model(tmp_path / "split", ctx) as a, eng.open_model(tmp_path / "whole", ctx) as b:
        assert np.array_equal(a(ids), b(ids))


# ---------------------------------------------------------------- GPTQ: safetensors shards


@pytest.mark.skipif(not __import__("quantkit.engines._gptqmodel", fromlist=["x"]).is_installed("gptqmodel"),
                    reason="needs the [gptq] extra")
def test_gptq_shards_with_an_index_reload_with_the_same_logits(tiny_llama: Path, tmp_path: Path) -> None:
    """GPTQ 4-bit of tiny-llama at split_max_size 1M: transformers' shard layout, each file
    within the limit; reloaded through transformers it gives exactly the logits of the same
    tensors in one model.safetensors."""
    from quantkit.testing.engine_bench import build, make_bench, variant_of
    from safetensors.torch import load_file, save_file

    from quantkit.engines import ENGINES
    from quantkit.engines import _gptqmodel as gm

    bench = make_bench(tiny_llama, tmp_path / "work", samples=4, seq_len=128)
    v = variant_of(tiny_llama, 'format = "gptq"\nbits = 4\ngroup_size = 64\nsplit_max_size = "1M"')
    out = tmp_path / "sharded"
    build(ENGINES["gptq"], v, bench, out)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 2 and [p.name for p in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                                             for i in range(1, len(shards) + 1)]
    assert all(p.stat().st_size <= 1_000_000 for p in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {k: p.name for p in shards for k in load_file(p)}
    assert index["weight_map"] == tensors
    one = tmp_path / "single"
    shutil.copytree(out, one, ignore=shutil.ignore_patterns("model-*", "*.index.json"))
    save_file({k: t for p in shards for k, t in load_file(p).items()}, one / "model.safetensors",
              metadata={"format": "pt"})
    ids = np.asarray(bench.eval_set.chunks[0], dtype=np.int64)
    with gm.open_quantized(out, "cpu") as a, gm.open_quantized(one, "cpu") as b:
        assert np.array_equal(a(ids), b(ids))
