"""Every format's FormatSpec is complete: a missing piece fails here in seconds, not after a build.

For each entry of the ENGINES table: its spec's settings model, names, card columns, runtimes,
metadata and template partial, and a card rendered for one variant of the format from a
fixture manifest (FIXTURE numbers, no build).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w

from quantkit import card
from quantkit.engines import ENGINES
from quantkit.formats import FormatSpec
from quantkit.manifest import Manifest, VariantRecord
from quantkit.plan import make_plan
from quantkit.recipe import parse_recipe, valid_branch
from quantkit.records import CalibrationRecord, FileEntry, QualityRecord, SourceRecord
from quantkit.testing.fabricate import SOURCE_CONFIG

SPECS = [pytest.param(e.spec, id=fmt) for fmt, e in ENGINES.items()]
PARTIAL_MACROS = ("columns_help", "webui_step", "serving", "python")  # download_command is optional


def test_table_keys_are_the_specs_names() -> None:
    for fmt, engine in ENGINES.items():
        assert isinstance(engine.spec, FormatSpec) and engine.spec.name == fmt
    assert len({e.spec.repo_suffix.lower() for e in ENGINES.values()}) == len(ENGINES)


@pytest.mark.parametrize("spec", SPECS)
def test_settings_model_refuses_unknown_keys_and_is_frozen(spec: FormatSpec) -> None:
    cfg = spec.params.model_config
    assert cfg.get("extra") == "forbid" and cfg.get("frozen") is True
    params = spec.params.model_validate(spec.example)
    with pytest.raises(ValueError, match="Extra inputs"):
        spec.params.model_validate({**spec.example, "no_such_setting": 1})
    assert set(spec.name_keys) <= set(spec.params.model_fields)
    assert valid_branch(spec.branch_name(params)) and valid_branch(spec.variant_name(params))


@pytest.mark.parametrize("spec", SPECS)
def test_partial_defines_the_sections_the_card_calls(spec: FormatSpec) -> None:
    env = card._env()
    module = env.get_template(spec.partial).make_module({"repo": "o/r", "variant": None})
    missing = [m for m in PARTIAL_MACROS if not callable(getattr(module, m, None))]
    assert not missing, f"{spec.partial} lacks macros {missing}"


@pytest.mark.parametrize("spec", SPECS)
def test_a_card_renders_for_one_variant_of_each_format(spec: FormatSpec, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(SOURCE_CONFIG))
    recipe = {"model": {"source": "src", "name": "tiny_german", "license": "apache-2.0"},
              "publish": {"owner": "acme"}, "variants": [{"format": spec.name, **spec.example}]}
    plan = make_plan(parse_recipe(tomli_w.dumps(recipe), base_dir=tmp_path), tmp_path / "build")
    (v,) = plan.variants
    # FIXTURE values for the layout, not measurements.
    rec = VariantRecord(v.format, v.branch, v.repo, "evaluated", params=v.params_dict(),
                        files=(FileEntry("weights.bin", 1_234_000, "a" * 64),), size_bytes=1_234_000,
                        bits_per_weight=4.5, quality=QualityRecord(21.0, 20.0, 5.0, 0.0512, 0.9),
                        engine="fixture", engine_version="fixture 1")
    m = Manifest("0" * 64, {v.name: rec}, CalibrationRecord("fixture", "b" * 64, 8, 256),
                 SourceRecord(architecture="LlamaForCausalLM"))
    text = card.render_card(plan, m, v.name)
    assert f"# tiny_german - {spec.repo_suffix}" in text
    header = "| " + " | ".join(c.title for c in spec.columns) + " |"
    assert header in text and "1.23 MB" in text and "0.0512" in text
    assert spec.describe(v.params_dict()) in text
    for rt in spec.runtimes:
        assert f"| {rt.name} |" in text
    for tag in spec.tags:
        assert f"- {tag}" in text
    assert (f"library_name: {spec.library_name}" in text) == bool(spec.library_name)
    assert "## Serving it\n\n" in text and "## Using it from Python\n\n" in text
