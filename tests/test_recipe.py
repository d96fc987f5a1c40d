"""Recipe validation and planning: every bad input names its field, line, and exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.errors import RecipeError
from quantkit.plan import make_plan
from quantkit.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()

HEAD = '''[model]
source = "jphme/em_german_13b_v01"
'''


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.toml"
    p.write_text(text, encoding="utf-8")
    return p


def _plan_cli(path: Path, *args: str):
    return runner.invoke(app, ["plan", str(path), *args])


def test_em_german_plan_prints_thebloke_branches() -> None:
    res = _plan_cli(ROOT / "recipes" / "em-german-13b-gptq.toml", "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["variants"]
    assert [r["branch"] for r in rows] == [
        "main", "gptq-4bit-32g-actorder_True", "gptq-8bit--1g-actorder_True",
        "gptq-8bit-128g-actorder_True", "gptq-8bit-32g-actorder_True"]
    assert {r["repo"] for r in rows} == {"TheBloke/em_german_13b_v01-GPTQ"}
    assert set(rows[0]) == {"name", "format", "repo", "branch", "params"}
    assert rows[0]["params"]["damp"] == 0.1 and rows[0]["params"]["act_order"] is True


def test_plan_table_lists_every_variant() -> None:
    res = _plan_cli(ROOT / "recipes" / "em-german-13b-gptq.toml")
    assert res.exit_code == 0
    for name in ("gptq-4bit-128g-actorder_True", "gptq-8bit--1g-actorder_True"):
        assert name in res.stdout


# (case, recipe body after [model], expected path in the message, expected line or None)
BAD = [
    ("unknown model key", 'colour = "red"\n[[variants]]\nformat = "gptq"\n', "model.colour", 3),
    ("unknown variant key", '[[variants]]\nformat = "gptq"\nbitz = 4\n', "variants[0].bitz", 5),
    ("unknown key in defaults", '[gptq]\nfoo = 1\n[[variants]]\nformat = "gptq"\n', "gptq.foo", 4),
    ("gptq bits", '[[variants]]\nformat = "gptq"\nbits = 5\n', "variants[0].bits", 5),
    ("gptq bits in list", '[[variants]]\nformat = "gptq"\nbits = [4, 6]\n', "variants[0].bits", 5),
    ("awq bits", '[[variants]]\nformat = "awq"\nbits = 8\n', "variants[0].bits", 5),
    ("group size", '[[variants]]\nformat = "gptq"\ngroup_size = 100\n', "variants[0].group_size", 5),
    ("unknown gguf type", '[[variants]]\nformat = "gguf"\nquant = "Q4_K_X"\n', "variants[0].quant", 5),
    ("IQ type without imatrix", '[[variants]]\nformat = "gguf"\nquant = "IQ3_M"\nimatrix = false\n',
     "variants[0]", 3),
    ("damp zero", '[[variants]]\nformat = "gptq"\ndamp = 0\n', "variants[0].damp", 5),
    ("damp one", '[[variants]]\nformat = "gptq"\ndamp = 1.0\n', "variants[0].damp", 5),
    ("damp in defaults", '[gptq]\ndamp = 1.5\n[[variants]]\nformat = "gptq"\n', "gptq.damp", 4),
    ("unknown format", '[[variants]]\nformat = "onnx"\n', "variants[0].format", 4),
    ("no variants", '[calibration]\nsamples = 4\n', "variants", None),
    ("same repo and branch", '[[variants]]\nformat = "gptq"\nbits = 4\nbranch = "x"\n'
     '[[variants]]\nformat = "gptq"\nbits = 8\nbranch = "x"\n', "variants[1].branch", 7),
    ("two mains", '[[variants]]\nformat = "gptq"\nbits = 4\nbranch = "main"\n'
     '[[variants]]\nformat = "gptq"\nbits = 8\nbranch = "main"\n', "variants[1].branch", 7),
    ("duplicate variant", '[[variants]]\nformat = "gptq"\n[[variants]]\nformat = "gptq"\n', "variants[1]", 5),
    ("branch with space", '[[variants]]\nformat = "gptq"\nbranch = "my branch"\n', "variants[0].branch", 5),
    ("branch with ..", '[[variants]]\nformat = "gptq"\nbranch = "a..b"\n', "variants[0].branch", 5),
    ("branch on a list", '[[variants]]\nformat = "gptq"\nbits = [4, 8]\nbranch = "x"\n',
     "variants[0].branch", 6),
    ("exl2 bpw", '[[variants]]\nformat = "exl2"\nbpw = 9.5\n', "variants[0].bpw", 5),
    ("samples type", '[calibration]\nsamples = "many"\n[[variants]]\nformat = "gptq"\n',
     "calibration.samples", 4),
    ("calibration template", '[calibration]\ntemplate = "no placeholders"\n[[variants]]\nformat = "gptq"\n',
     "calibration.template", 4),
]


@pytest.mark.parametrize("case,body,path,line", BAD, ids=[b[0] for b in BAD])
def test_bad_recipe_names_field_and_exits_2(tmp_path: Path, case: str, body: str, path: str,
                                            line: int | None) -> None:
    res = _plan_cli(_write(tmp_path, HEAD + body))
    assert res.exit_code == 2, res.output
    msg = res.stderr
    assert f": {path}" in msg, msg
    if line:
        assert f"(line {line})" in msg, msg
    assert "Traceback" not in res.output


def test_bad_source_neither_hub_id_nor_folder(tmp_path: Path) -> None:
    res = _plan_cli(_write(tmp_path, '[model]\nsource = "./no/such/folder"\n[[variants]]\nformat = "gptq"\n'))
    assert res.exit_code == 2
    assert "model.source (line 2)" in res.stderr and "neither an existing folder" in res.stderr


def test_toml_syntax_error(tmp_path: Path) -> None:
    res = _plan_cli(_write(tmp_path, HEAD + "[[variants]\n"))
    assert res.exit_code == 2 and "<toml> (line 3)" in res.stderr


def test_missing_file_exits_2(tmp_path: Path) -> None:
    res = _plan_cli(tmp_path / "nope.toml")
    assert res.exit_code == 2 and "nope.toml" in res.stderr


def _local_model(tmp_path: Path, hidden: int, inter: int, heads: int = 9) -> Path:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": inter,
        "num_attention_heads": heads, "num_key_value_heads": 3}))
    return d


def test_group_size_must_divide_layer_widths(tmp_path: Path) -> None:
    """SmolLM2's width 576 is no multiple of 128: the CPU int4 kernel would refuse it later."""
    model = _local_model(tmp_path, 576, 1536)
    body = f'[model]\nsource = "{model}"\n[[variants]]\nformat = "gptq"\ngroup_size = [64, 128]\n'
    res = _plan_cli(_write(tmp_path, body))
    assert res.exit_code == 2
    err = res.stderr
    assert "variants[0].group_size (line 5)" in err
    assert "128 does not divide the input width 576" in err and "hidden_size" in err
    assert "-1, 32, 64" in err  # the sizes that work
    assert "64 does not divide" not in err


def test_group_size_check_for_awq_and_down_proj(tmp_path: Path) -> None:
    model = _local_model(tmp_path, 1024, 2816, heads=8)  # 2816 = 11 x 256: 1024 does not divide it
    body = f'[model]\nsource = "{model}"\n[[variants]]\nformat = "awq"\ngroup_size = 1024\n'
    with pytest.raises(RecipeError) as e:
        parse_recipe(body)
    assert e.value.problems[0].path == "variants[0].group_size"
    assert "mlp.down_proj" in e.value.problems[0].message


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    body = HEAD + '[[variants]]\nformat = "gptq"\nbits = 5\ndamp = 2\n'
    res = _plan_cli(_write(tmp_path, body))
    assert res.exit_code == 2
    assert "variants[0].bits" in res.stderr and "variants[0].damp" in res.stderr


def test_lists_expand_to_product_and_defaults_apply() -> None:
    r = parse_recipe(HEAD + '[gptq]\ndamp = 0.05\nact_order = false\n'
                     '[[variants]]\nformat = "gptq"\nbits = [4, 8]\ngroup_size = [32, 128]\n')
    p = make_plan(r)
    assert len(p.variants) == 4
    assert all(v.params.damp == 0.05 and not v.params.act_order for v in p.variants)
    assert p.variants[0].branch == "main"
    assert {v.name for v in p.variants} == {f"gptq-{b}bit-{g}g-actorder_False" for b in (4, 8) for g in (32, 128)}


def test_names_for_every_format() -> None:
    r = parse_recipe(HEAD + '[[variants]]\nformat = "awq"\n[[variants]]\nformat = "gguf"\n'
                     'quant = ["q4_k_m", "Q8_0"]\n[[variants]]\nformat = "exl2"\nbpw = [4.0, 6.5]\n')
    p = make_plan(r)
    got = {(v.name, v.branch, v.repo) for v in p.variants}
    assert ("awq-4bit-128g", "main", "{owner}/em_german_13b_v01-AWQ") in got
    assert ("gguf-Q4_K_M", "main", "{owner}/em_german_13b_v01-GGUF") in got
    assert ("gguf-Q8_0", "Q8_0", "{owner}/em_german_13b_v01-GGUF") in got
    assert ("exl2-4.0bpw", "main", "{owner}/em_german_13b_v01-exl2") in got
    assert ("exl2-6.5bpw", "6.5bpw", "{owner}/em_german_13b_v01-exl2") in got


def test_init_writes_a_recipe_that_plans(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    res = runner.invoke(app, ["init", "jphme/em_german_13b_v01", "-o", str(path)])
    assert res.exit_code == 0, res.output
    p = make_plan(load_recipe(path))
    names = [v.name for v in p.variants]
    assert "gptq-8bit--1g-actorder_True" in names and "gguf-Q4_K_M" in names and "awq-4bit-128g" in names
    again = runner.invoke(app, ["init", "jphme/em_german_13b_v01", "-o", str(path)])
    assert again.exit_code == 1 and "--force" in again.stderr


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_plan(recipe: Path) -> None:
    make_plan(load_recipe(recipe, check_source=False))
