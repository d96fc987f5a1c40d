"""The resource plan: estimates from config.json alone, the plan table, the early refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantkit import resources
from quantkit.cli import app
from quantkit.errors import ResourceError
from quantkit.plan import make_plan
from quantkit.recipe import load_recipe, parse_recipe
from quantkit.resources import GB, Machine, ModelShape, check_fits, plan_resources

ROOT = Path(__file__).resolve().parent.parent
# The published shapes of Llama-2-13B (EM German 13B's base) and Llama-2-70B.
LLAMA2_13B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 5120,
              "intermediate_size": 13824, "num_attention_heads": 40, "num_hidden_layers": 40,
              "num_key_value_heads": 40, "vocab_size": 32000, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "torch_dtype": "float16", "tie_word_embeddings": False}
LLAMA2_70B = {**LLAMA2_13B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
              "num_hidden_layers": 80, "num_key_value_heads": 8}
CPU_BOX = Machine("a 24 GB box", 2, 24 * GB)


def test_parameter_counts_from_config_alone():
    assert ModelShape.from_config(LLAMA2_13B).params == pytest.approx(13.016e9, rel=1e-3)
    assert ModelShape.from_config(LLAMA2_70B).params == pytest.approx(68.98e9, rel=1e-3)


def test_the_smollm2_shape_matches_its_checkpoint(smollm2_2l):
    from quantkit.pipeline import count_params

    cfg = json.loads((smollm2_2l / "config.json").read_text())
    assert ModelShape.from_config(cfg).params == count_params(smollm2_2l)


def _ladder(source: str = "org/model") -> str:
    return (f'[model]\nsource = "{source}"\n[calibration]\nsamples = 128\nseq_len = 4096\n'
            '[[variants]]\nformat = "gguf"\nquant = ["Q2_K", "Q4_K_M", "Q8_0"]\n'
            '[[variants]]\nformat = "gptq"\nbits = 4\ngroup_size = 128\n')


def test_13b_estimates_stay_within_the_memory_bounds():
    rp = plan_resources(make_plan(parse_recipe(_ladder(), check_source=False)), CPU_BOX, LLAMA2_13B)
    gguf = [e for n, e in rp.variants.items() if n.startswith("gguf")]
    gptq = rp.variants["gptq-4bit-128g-actorder_True"]
    assert all(e.ram < 0.25 * rp.shape.bf16_bytes + 2 * GB for e in gguf)  # issue 9's bounds
    assert max(e.ram for e in gguf) < gptq.ram < 1.25 * rp.shape.bf16_bytes + 2 * GB
    assert rp.build.ram == gptq.ram and rp.build.stage == gptq.stage
    assert rp.build.disk > sum(e.disk for e in rp.variants.values())  # + the 16-bit GGUF, the reference
    assert rp.build.seconds > sum(e.seconds for e in rp.variants.values())


def test_a_refusal_names_what_would_fit(tmp_path):
    plan = make_plan(parse_recipe(_ladder(), check_source=False))
    rp = plan_resources(plan, Machine("a 12 GB box", 2, 12 * GB), LLAMA2_13B)
    with pytest.raises(ResourceError) as e:
        check_fits(rp, tmp_path, free=1000 * GB)
    msg = str(e.value)
    assert "GB RAM at its peak" in msg and "12.0 GB available" in msg
    assert "--only gguf-Q4_K_M" in msg and "gptq" not in msg.split("what fits:")[1]
    check_fits(plan_resources(plan, Machine("big", 2, 512 * GB), LLAMA2_13B), tmp_path, free=1000 * GB)
    with pytest.raises(ResourceError, match=r"GB of disk in .*, 50.0 GB free; what fits: --only gguf-Q2_K"):
        check_fits(plan_resources(plan, Machine("big", 2, 512 * GB), LLAMA2_13B), tmp_path, free=50 * GB)


def _seed_hub_cache(cache: Path, repo: str, config: dict) -> None:
    """config.json as `hf_hub_download` leaves it in the cache: what `plan` reads offline."""
    d = cache / f"models--{repo.replace('/', '--')}"
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text("a" * 40)
    snap = d / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config))


def test_plan_shows_resources_for_em_german_13b_from_its_config_alone(tmp_path, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub fixes its cache folder at import: point it at this test's own
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _seed_hub_cache(tmp_path / "hub", "jphme/em_german_13b_v01", LLAMA2_13B)
    res = CliRunner().invoke(app, ["plan", str(ROOT / "recipes" / "em-german-13b-gptq.toml"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["resources"]["params"] == pytest.approx(13.016e9, rel=1e-3)
    for v in doc["variants"]:
        r = v["resources"]
        assert r["ram"] > 0 and r["disk"] > 0 and r["seconds"] > 0, v["name"]
    h100 = CliRunner().invoke(app, ["plan", str(ROOT / "recipes" / "em-german-13b-gptq.toml"),
                                    "--machine", "h100"])
    assert h100.exit_code == 0 and "one H100" in h100.output and "GPU mem" in h100.output


def test_plan_without_a_readable_config_still_lists_the_variants(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    recipe = tmp_path / "r.toml"
    recipe.write_text(_ladder("nobody/not-cached"))
    res = CliRunner().invoke(app, ["plan", str(recipe)])
    assert res.exit_code == 0, res.output
    assert "gguf-Q4_K_M" in res.output and "not estimated" in res.output


def test_build_refuses_early_when_the_machine_is_too_small(tiny_llama, tmp_path, monkeypatch):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\nsource = "{tiny_llama}"\n[calibration]\nsamples = 4\nseq_len = 64\n'
                      '[[variants]]\nformat = "gguf"\nquant = "Q8_0"\n')
    monkeypatch.setattr(resources, "this_machine", lambda: Machine("tiny", 2, int(0.1 * GB)))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["build", str(recipe), "--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "0.1 GB available" in lines[0] and "no variant fits alone" in lines[0]
    assert not (out / "manifest.json").exists()


def test_estimates_cover_every_format():
    from quantkit.engines import ENGINES

    import tomli_w

    # one variant of each format in the table: a new format is covered without editing this test
    text = tomli_w.dumps({"model": {"source": "org/m"},
                          "variants": [{"format": fmt, **e.spec.example} for fmt, e in ENGINES.items()]})
    plan = make_plan(parse_recipe(text, check_source=False))
    assert {v.format for v in plan.variants} == set(ENGINES)
    rp = plan_resources(plan, resources.MACHINES["h100"], LLAMA2_13B)
    assert all(e.ram > 0 and e.disk > 0 for e in rp.variants.values())
    gpu = {v.name for v in plan.variants if ENGINES[v.format].spec.run_device == "VRAM"}  # runs on a GPU: needs one to build
    assert gpu and all(rp.variants[n].vram > 0 for n in gpu)
    assert all(rp.run[v.name][1].total > 0 for v in plan.variants)


def test_demo_recipe_estimate_is_small(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "demo-smollm2.toml", check_source=False)
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
           "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30, "vocab_size": 49152,
           "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    rp = plan_resources(make_plan(recipe), CPU_BOX, cfg)
    assert rp.build.ram < 3 * GB and rp.build.disk < 2 * GB
