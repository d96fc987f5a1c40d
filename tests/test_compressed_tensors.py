"""compressed-tensors engine: real llm-compressor runs on the tiny Llama (GPTQ W4A16 on the German
windows, FP8_DYNAMIC and NVFP4A16 data-free), checked by compressed-tensors itself and read back
through transformers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from quantkit.engines import ENGINES
from quantkit.engines import _gptqmodel as gm
from quantkit.engines import compressed_tensors as ct
from quantkit.errors import EngineError, EngineUnavailable
from quantkit.recipe import parse_recipe
from quantkit.testing.engine_bench import Bench, build, make_bench, quality, recipe_text, variant_of
from _hub_fixtures import hub  # noqa: F401 - the local Hub server fixture

pytestmark = pytest.mark.skipif(not gm.is_installed("llmcompressor"), reason="needs the [ct] extra")

CT = ENGINES["compressed-tensors"]
SIDE_FILES = {"generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"}
BODIES = {"W4A16": 'scheme = "W4A16"\ngroup_size = 128', "W8A8-FP8": 'scheme = "W8A8-FP8"',
          "NVFP4A16": 'scheme = "NVFP4A16"', "NVFP4": 'scheme = "NVFP4"'}


@pytest.fixture(scope="module")
def bench(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Bench:
    return make_bench(tiny_llama, tmp_path_factory.mktemp("ct-work"))


@pytest.fixture(scope="module")
def built(bench: Bench, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict, list]]:
    """One variant per scheme, built once for the tests below."""
    out = {}
    for scheme, body in BODIES.items():
        folder = tmp_path_factory.mktemp(f"ct-{scheme}") / "out"
        notes = build(CT, variant_of(bench.source, f'format = "compressed-tensors"\n{body}'), bench, folder)
        out[scheme] = (folder, notes, list(bench.events))
    return out


@pytest.mark.parametrize("scheme", list(BODIES))
def test_writes_what_vllm_loads(scheme: str, built: dict, bench: Bench) -> None:
    folder, notes, events = built[scheme]
    assert {p.name for p in folder.iterdir()} == {"config.json", "recipe.yaml", "model.safetensors", *SIDE_FILES}
    cfg = json.loads((folder / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) \
        == ("compressed-tensors", ct.FORMATS[scheme], "compressed")
    assert qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"]  # transformers-4 readers
    for f in SIDE_FILES:  # the source's own, not transformers' re-save
        assert (folder / f).read_bytes() == (bench.source / f).read_bytes(), f
    assert notes["quantizer"].startswith("llmcompressor 0.14") and "compressed-tensors 0.20" in notes["quantizer"]
    assert notes["scheme"] == scheme and notes["device"] == "cpu"
    assert [t for t, *_ in events] == ["load source", "quantize", "save"]
    assert (bench.work / f"{folder.name}.llmcompressor.log").parent.is_dir()


def test_w4a16_is_german_calibrated_gptq(built: dict, bench: Bench) -> None:
    folder, notes, _ = built["W4A16"]
    w = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["type"], w["strategy"], w["group_size"], w["actorder"], w["symmetric"]) \
        == (4, "int", "group", 128, "weight", True)
    assert notes["calibration_samples"] == 8 and notes["calibration_seq_len"] == 256
    assert "GPTQModifier" in (folder / "recipe.yaml").read_text()
    assert packed_dtypes(folder / "model.safetensors") >= {"I32"}  # 8 int4 weights per int32


def test_fp8_and_nvfp4_are_data_free(built: dict) -> None:
    for scheme in ("W8A8-FP8", "NVFP4A16"):
        folder, notes, _ = built[scheme]
        assert notes["calibration_samples"] == 0, scheme
    fp8 = json.loads((built["W8A8-FP8"][0] / "config.json").read_text())["quantization_config"]
    acts = fp8["config_groups"]["group_0"]["input_activations"]
    assert (acts["num_bits"], acts["type"], acts["strategy"], acts["dynamic"]) == (8, "float", "token", True)
    assert "F8_E4M3" in packed_dtypes(built["W8A8-FP8"][0] / "model.safetensors")


def test_nvfp4_calibrates_activation_scales(built: dict) -> None:
    folder, notes, _ = built["NVFP4"]
    assert notes["calibration_samples"] == 8
    acts = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
        "input_activations"]
    assert (acts["num_bits"], acts["type"], acts["strategy"], acts["group_size"]) == (4, "float", "tensor_group", 16)
    scales = tensors(folder / "model.safetensors", "input_global_scale")
    assert len(scales) == 14 and all(float(t.min()) > 0 for t in scales)  # one per Linear, from the windows


def tensors(path: Path, suffix: str) -> list:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return [f.get_tensor(k) for k in f.keys() if k.endswith(suffix)]


def packed_dtypes(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def test_quality_through_transformers(built: dict, bench: Bench) -> None:
    q = {s: quality(CT, built[s][0], bench) for s in BODIES}
    # the random model predicts nearly flat distributions (PPL ~1000): top-1 flips on small changes
    assert q["W8A8-FP8"].kld < 0.002 and q["W8A8-FP8"].top1 > 0.8
    assert q["W4A16"].kld < 0.02 and q["NVFP4A16"].kld < 0.02 and q["NVFP4"].kld < 0.02
    assert q["W4A16"].kld > 2 * q["W8A8-FP8"].kld  # 4 bits cost more than 8: the scores see the weights


def test_check_rejects_a_config_that_is_not_the_scheme(built: dict, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(built["W4A16"][0], folder)
    fp8 = variant_of(folder, 'format = "compressed-tensors"\nscheme = "W8A8-FP8"').params
    with pytest.raises(EngineError, match="float-quantized"):
        ct.check_output(folder, fp8, 10**9)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "no-such-strategy"
    (folder / "config.json").write_text(json.dumps(cfg))
    w4 = variant_of(folder, 'format = "compressed-tensors"\nscheme = "W4A16"\ngroup_size = 128').params
    with pytest.raises(EngineError, match="strategy"):
        ct.check_output(folder, w4, 10**9)


def test_shards_under_split_max_size(bench: Bench, tmp_path: Path) -> None:
    v = variant_of(bench.source, 'format = "compressed-tensors"\nscheme = "W8A8-FP8"\nsplit_max_size = "1M"')
    build(CT, v, bench, tmp_path / "out")
    shards = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 1 and all(p.stat().st_size <= 10**6 for p in shards)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    with CT.open_model(tmp_path / "out", bench.context()) as fn:
        assert np.isfinite(fn(bench.eval_set.chunks[0][:16])).all()


@pytest.mark.parametrize("body, message", [
    ('scheme = "W8A8-FP8"\ngroup_size = 64', "apply only to scheme"),
    ('scheme = "NVFP4"\nact_order = false', "apply only to scheme"),
    ('scheme = "W4A16"\ngroup_size = 100', "must be one of"),
    ('scheme = "INT8"', "W4A16"),
])
def test_recipe_refuses_settings_the_scheme_lacks(body: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(Exception, match=message):
        parse_recipe(recipe_text(tmp_path, f'format = "compressed-tensors"\n{body}', samples=1, seq_len=16),
                     check_source=False)


def test_variant_names() -> None:
    names = {s: CT.spec.variant_name(CT.spec.params.model_validate({"scheme": s})) for s in ct.SCHEMES}
    assert names == {"W4A16": "w4a16-128g-actorder", "W8A8-FP8": "fp8-dynamic", "NVFP4A16": "nvfp4a16",
                     "NVFP4": "nvfp4"}


def test_version_without_llmcompressor_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    ct.ct_version.cache_clear()
    monkeypatch.setitem(sys.modules, "llmcompressor", None)
    try:
        with pytest.raises(EngineUnavailable, match=r"quantkit-workbench\[ct\].*--no-deps llmcompressor"):
            CT.version()
    finally:
        monkeypatch.undo()
        ct.ct_version.cache_clear()


# ---------------------------------------------------------------- build, card, publish


def test_build_card_and_publish_a_branch_per_scheme(tiny_llama: Path, tmp_path: Path, hub) -> None:  # noqa: F811
    """The real pipeline builds one variant per scheme, cards them, and pushes each to its own
    branch of one repo on the local Hub; every branch's card tells how vLLM and SGLang serve it."""
    from typer.testing import CliRunner

    from quantkit.cli import app
    from quantkit.manifest import load_manifest

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[model]\nsource = "{tiny_llama}"\nname = "tiny"\n[calibration]\nsamples = 8\nseq_len = 128\n'
                      '[evaluation]\ntokens = 1024\nctx = 128\nqa_items = 0\n[publish]\nowner = "me"\n'
                      '[[variants]]\nformat = "compressed-tensors"\nscheme = "W4A16"\ngroup_size = 64\n'
                      '[[variants]]\nformat = "compressed-tensors"\nscheme = ["W8A8-FP8", "NVFP4A16"]\n')
    out, runner = tmp_path / "build", CliRunner()
    res = runner.invoke(app, ["build", str(recipe), "--out", str(out)])
    assert res.exit_code == 0, res.output
    pub = runner.invoke(app, ["publish", str(recipe), "--out", str(out)])
    assert pub.exit_code == 0, pub.output
    repo = "me/tiny-compressed-tensors"  # the first variant is the repo's main, as TheBloke's were
    branches = {"w4a16-64g-actorder": "main", "fp8-dynamic": "fp8-dynamic", "nvfp4a16": "nvfp4a16"}
    m = load_manifest(out)
    assert m is not None and sorted(m.variants) == sorted(branches)
    assert {r.published.branch for r in m.variants.values()} == set(branches.values())
    for name, br in branches.items():
        files = hub.files(repo, br)
        assert {"config.json", "model.safetensors", "recipe.yaml", "tokenizer.json", "README.md"} <= set(files)
        assert json.loads(files["config.json"])["quantization_config"]["quant_method"] == "compressed-tensors"
        readme = files["README.md"].decode()
        assert f"vllm serve {repo} --revision {br}" in readme
        assert f"python -m sglang.launch_server --model-path {repo} --revision {br}" in readme
        assert "| Max VRAM required |" in readme and "| Scheme |" in readme
        q = m.variants[name].quality
        assert q is not None and f"{q.kld:.4f}" in readme
