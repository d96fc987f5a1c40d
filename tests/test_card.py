"""Model cards: golden EM German card, TheBloke's section order, metadata validation, tables.

FIXTURE NUMBERS: the manifests built here (`em_german_manifest`, `_manifest`) hold sizes and
quality values made up for layout, NOT measurements. The golden card says so in its build
notes. Real cards get these numbers from the build's manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

pytest.register_assert_rewrite("_hub_fixtures")  # it is also the plugin named below

from quantkit import card  # noqa: E402
from quantkit.manifest import Manifest, VariantRecord  # noqa: E402
from quantkit.plan import Plan, make_plan  # noqa: E402
from quantkit.recipe import load_recipe, parse_recipe  # noqa: E402
from quantkit.records import CalibrationRecord, FileEntry, PublishedRecord, QualityRecord, SourceRecord  # noqa: E402
from quantkit.testing.fabricate import SOURCE_CONFIG, fabricate_build  # noqa: E402
from quantkit.testing.hub_server import HubServer  # noqa: E402

pytest_plugins = ("_hub_fixtures",)  # the `hub` fixture

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden" / "em_german_13b_gptq_README.md"
FIXTURE_NOTE = "sizes and quality in this card are test-fixture values for layout, not measurements"

# TheBloke's GPTQ card, section by section, and ours (DESIGN §3). Sponsor/Discord parts dropped.
SECTIONS = [
    "# {title}",  # header: model creator and original model
    "## Description",
    "## Repositories available",
    "## Prompt template",
    "## Licence",  # TheBloke's "Licensing" (Llama 2 models)
    "## Provided files and {FORMAT} parameters",
    "### Measured quality",  # ours: the measured half of his table
    "### Calibration set",  # ours: dataset, format, hash
    "## How to download, including from branches",
    "## Using it in text-generation-webui",
    "## Serving it",  # his "Serving this model from TGI"
    "## Using it from Python",
    "## Compatibility",
    "## How these files were made",  # ours: quantkit and engine versions
    "# Original model card: {creator}'s {name}",
]

# Fixture values per branch: (size in bytes, ΔPPL %, KLD, top-1). Sizes are of the order of
# TheBloke's EM German 13B GPTQ files; quality values are invented for the layout.
EM_GERMAN = {
    "gptq-4bit-128g-actorder_True": (7_260_000_000, 2.11, 0.0213, 0.921),
    "gptq-4bit-32g-actorder_True": (8_000_000_000, 1.42, 0.0151, 0.934),
    "gptq-8bit--1g-actorder_True": (13_360_000_000, 0.06, 0.0011, 0.987),
    "gptq-8bit-128g-actorder_True": (13_650_000_000, 0.05, 0.0009, 0.989),
    "gptq-8bit-32g-actorder_True": (14_540_000_000, 0.04, 0.0008, 0.990),
}


def _invented_tails(kld: float, top1: float) -> dict[str, float | int]:
    """FIXTURE tails and answers in the proportions small models show, for the layout only."""
    flips = round((1 - top1) * 0.4, 3)
    return {"kld_median": round(kld * 0.3, 5), "kld_p99": round(kld * 14, 4), "kld_p999": round(kld * 45, 4),
            "rms_dp": round(kld ** 0.5 * 0.25, 4), "dp_p01": round(-kld ** 0.5 * 0.9, 4),
            "dp_p99": round(kld ** 0.5 * 0.6, 4), "qa_items": 200, "qa_ref_acc": 0.71,
            "qa_acc": round(0.71 - flips / 3, 3), "qa_flips": flips}


def em_german_plan() -> Plan:
    return make_plan(load_recipe(ROOT / "recipes" / "em-german-13b-gptq.toml", check_source=False),
                     Path("build/em_german_13b_v01"))


def em_german_manifest(plan: Plan) -> Manifest:
    """FIXTURE values (see EM_GERMAN), not measurements."""
    variants = {}
    for v in plan.variants:
        size, delta, kld, top1 = EM_GERMAN[v.name]
        files = (FileEntry("model.safetensors", size - 18_000, "0" * 64), FileEntry("config.json", 1_200, "1" * 64),
                 FileEntry("quantize_config.json", 300, "2" * 64), FileEntry("tokenizer.json", 16_500, "3" * 64))
        variants[v.name] = VariantRecord(
            format=v.format, branch=v.branch, repo=v.repo, state="evaluated", params=v.params_dict(), files=files,
            size_bytes=size, bits_per_weight=round(size * 8 / 13.0e9, 3),
            quality=QualityRecord(ppl=round(6.2 * (1 + delta / 100), 3), ref_ppl=6.2, delta_ppl_pct=delta, kld=kld,
                                  top1=top1, **_invented_tails(kld, top1)),
            seconds=3600.0, engine="gptqmodel", engine_version="7.6.0", notes={"fixture": FIXTURE_NOTE})
    calib = CalibrationRecord(source="deepset/germanquad (train)", samples=128, seq_len=4096, items=1312,
                              sha256=hashlib.sha256(b"quantkit golden fixture, not a calibration set").hexdigest())
    return Manifest("f" * 64, variants, calibration=calib,
                    source=SourceRecord(architecture="LlamaForCausalLM", quantkit_version="0.1.0"))


OFFLINE = card.OriginalCard(None, "jphme/em_german_13b_v01@main", "not fetched: this card was rendered offline")


# Llama-2-13B's published shape (EM German 13B is a fine-tune of it): the memory column needs it.
LLAMA2_13B_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 5120, "intermediate_size": 13824,
                     "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
                     "vocab_size": 32000, "torch_dtype": "float16"}


def test_golden_em_german_13b_gptq_card(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(card, "read_model_config", lambda recipe, local=None: LLAMA2_13B_CONFIG)
    plan = em_german_plan()
    text = card.render_card(plan, em_german_manifest(plan), "gptq-4bit-128g-actorder_True", original=OFFLINE)
    if os.environ.get("QUANTKIT_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text, encoding="utf-8")
    assert text == GOLDEN.read_text(encoding="utf-8"), "card changed: rerun with QUANTKIT_UPDATE_GOLDEN=1 and review"


def _headings(text: str) -> list[str]:
    """Headings of our sections, outside code blocks and before the original card's own."""
    body = text.split("\n---\n", 1)[1]
    ours, original = body.split("# Original model card", 1)
    lines = re.sub(r"```.*?```", "", ours, flags=re.S).splitlines()
    lines.append("# Original model card" + original.split("\n")[0])
    return [ln for ln in lines if re.match(r"#{1,2} ", ln) or ln in ("### Measured quality", "### Calibration set")]


def test_em_german_card_has_thebloke_sections_in_order() -> None:
    plan = em_german_plan()
    text = card.render_card(plan, em_german_manifest(plan), "gptq-8bit--1g-actorder_True", original=OFFLINE)
    expected = [s.format(title="EM German 13B v01 - GPTQ", FORMAT="GPTQ", creator="Jan Philipp Harries",
                         name="EM German 13B v01") for s in SECTIONS]
    assert _headings(text) == expected


ALL_FORMATS = """
[model]
source = "src"
name = "tiny_german"
license = "apache-2.0"
[publish]
owner = "acme"
[[variants]]
format = "gptq"
bits = [4, 8]
group_size = 32
[[variants]]
format = "awq"
bits = 4
group_size = 128
[[variants]]
format = "gguf"
quant = ["Q4_K_M", "Q8_0"]
[[variants]]
format = "exl2"
bpw = [4.0, 6.0]
"""


def _plan(tmp_path: Path, text: str = ALL_FORMATS) -> Plan:
    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "src" / "config.json").write_text(json.dumps(SOURCE_CONFIG))
    return make_plan(parse_recipe(text, base_dir=tmp_path), tmp_path / "build")


def _manifest(plan: Plan, *, state: str = "evaluated") -> Manifest:
    """FIXTURE values, not measurements."""
    out = {}
    for i, v in enumerate(plan.variants):
        weights = f"tiny_german.{v.params.quant}.gguf" if v.format == "gguf" else "model.safetensors"
        size = 1_000_000 * (i + 1)
        out[v.name] = VariantRecord(v.format, v.branch, v.repo, state, params=v.params_dict(),
                                    files=(FileEntry(weights, size, "a" * 64),), size_bytes=size,
                                    bits_per_weight=4.5, quality=QualityRecord(21.0, 20.0, 5.0 + i, 0.05 + i / 100, 0.9),
                                    engine=v.format, engine_version=f"{v.format}-engine 1.0")
    return Manifest("0" * 64, out, calibration=CalibrationRecord(sha256="b" * 64))


def test_every_format_renders_the_same_sections(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    m = _manifest(plan)
    cards = card.render_cards(plan, m)
    assert set(cards) == {v.name for v in plan.variants}
    for v in plan.variants:
        suffix = {"gptq": "GPTQ", "awq": "AWQ", "gguf": "GGUF", "exl2": "exl2"}[v.format]
        expected = [s.format(title=f"tiny_german - {suffix}", FORMAT=suffix, creator="", name="tiny_german")
                    .replace("'s ", "").replace(": '", ": ") for s in SECTIONS]
        expected[-1] = "# Original model card: tiny_german"
        assert _headings(cards[v.name]) == expected, v.name


def test_front_matter_passes_modelcard_validation(hub: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    cards = [card.render_card(em_german_plan(), em_german_manifest(em_german_plan()), "gptq-4bit-32g-actorder_True",
                              original=OFFLINE)]
    plan = _plan(tmp_path)
    cards += list(card.render_cards(plan, _manifest(plan)).values())
    for text in cards:
        mc = ModelCard(text)
        mc.validate()  # POST /api/validate-yaml, as push_to_hub does
        data = mc.data.to_dict()
        assert data["pipeline_tag"] == "text-generation" and data["license"]
        assert "quantkit" in data["tags"] and data["model_name"]
    em = ModelCard(cards[0]).data.to_dict()
    assert em["base_model"] == "jphme/em_german_13b_v01" and em["base_model_relation"] == "quantized"
    assert em["language"] == ["de"] and em["datasets"] == ["deepset/germanquad"]
    assert em["quantized_by"] == "TheBloke" and em["model_creator"] == "Jan Philipp Harries"
    assert em["prompt_template"] == "Du bist ein hilfreicher Assistent. USER: {prompt} ASSISTANT:"
    with pytest.raises(ValueError, match="license"):  # the validator does check
        ModelCard(cards[0].replace("license: llama2", "license: llama-two")).validate()


def test_table_lists_its_repo_and_marks_this_branch(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    text = card.render_card(plan, _manifest(plan), "gguf-Q8_0")
    rows = [ln for ln in text.split("## Provided files", 1)[1].split("<details>")[0].splitlines()
            if ln.startswith("| [")]
    # TheBloke's GGUF table: the file on main first, its own branch last
    assert [re.search(r"\[([^\]]+)\]", r).group(1) for r in rows] == ["tiny_german.Q4_K_M.gguf",
                                                                         "tiny_german.Q8_0.gguf"]
    assert rows[1].startswith("| [tiny_german.Q8_0.gguf](https://huggingface.co/acme/tiny_german-GGUF/blob/main/"
                              "tiny_german.Q8_0.gguf) | Q8_0 | 4.50 |")
    assert rows[1].endswith("| **[Q8_0](https://huggingface.co/acme/tiny_german-GGUF/tree/Q8_0)** (this branch) |")
    assert "| Max RAM required |" in text and "gptq" not in "".join(rows)
    assert "hf download acme/tiny_german-GGUF tiny_german.Q8_0.gguf --local-dir ." in text
    assert "llama-cli -hf acme/tiny_german-GGUF:Q8_0" in text and "ollama run hf.co/acme/tiny_german-GGUF:Q8_0" in text
    siblings = text.split("## Repositories available", 1)[1].split("##", 1)[0]
    for repo in ("acme/tiny_german-GPTQ", "acme/tiny_german-AWQ", "acme/tiny_german-GGUF", "acme/tiny_german-exl2"):
        assert f"[{repo}](https://huggingface.co/{repo})" in siblings


def test_sizes_and_quality_come_from_the_manifest(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    m = _manifest(plan)
    name = "gptq-8bit-32g-actorder_True"
    rec = m.variants[name]
    m = m.with_variant(name, replace(rec, files=(FileEntry("model.safetensors", 13_650_000_000, "a" * 64),
                                                 FileEntry("README.md", 999, "c" * 64)),
                                     quality=QualityRecord(20.01, 20.0, 0.05, 0.00091, None)))  # type: ignore[arg-type]
    text = card.render_card(plan, m, name)
    row = next(ln for ln in text.splitlines() if ln.startswith(f"| **[{name}]"))
    assert "| 13.65 GB |" in row and "| +0.05 | 0.0009 |" in row  # README bytes are not the variant's size
    assert f"| {name} | 20.010 | +0.05 | 0.0009 | n/a |" in text


def test_runtime_compatibility_is_a_table(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    text = card.render_card(plan, _manifest(plan), "gptq-4bit-32g-actorder_True")
    compat = text.split("## Compatibility", 1)[1].split("\n## ", 1)[0]
    assert "| ExLlama (v1/v2 kernels) | Yes | No |" in compat  # 4-bit yes, 8-bit no (Llama source)
    assert "| vLLM | Yes | Yes |" in compat and "llama.cpp" not in compat
    gguf = card.render_card(plan, _manifest(plan), "gguf-Q4_K_M").split("## Compatibility", 1)[1]
    assert "| llama.cpp | Yes | Yes |" in gguf and "ExLlama (v1" not in gguf
    (tmp_path / "src" / "config.json").unlink()  # architecture unknown
    assert "| ExLlama (v1/v2 kernels) | Unknown | No |" in card.render_card(plan, _manifest(plan),
                                                                          "gptq-4bit-32g-actorder_True")


def test_calibration_hash_and_versions_are_on_the_card(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    text = card.render_card(plan, _manifest(plan), "awq-4bit-128g")
    assert f"| sha256 | `{'b' * 64}` |" in text
    assert "| main | awq | awq-engine 1.0 |" in text
    from quantkit import __version__

    assert f"quantkit {__version__} ran the recipe" in text


def test_original_card_from_the_source_folder(tmp_path: Path) -> None:
    b = fabricate_build(tmp_path)
    original = card.load_original_card(b.plan.recipe)
    assert original.text is not None and original.text.startswith("# Tiny German") and "license:" not in original.text
    text = card.render_card(b.plan, b.manifest, "gguf-Q8_0", original=original)
    tail = text.split("# Original model card: Quantkit Tests's Tiny German", 1)[1]
    assert "It speaks no German worth the name." in tail
    assert text.count("\n---\n") == 1  # the original's front matter is not carried over
    (tmp_path / "src" / "README.md").unlink()
    absent = card.load_original_card(b.plan.recipe)
    assert absent.text is None
    assert "could not be included" in card.render_card(b.plan, b.manifest, "gguf-Q8_0", original=absent)


def test_original_card_read_from_the_hub_once(hub: HubServer, tmp_path: Path) -> None:
    hub.seed("jphme/em_german_13b_v01", {"README.md": "---\nlicense: llama2\n---\n# EM German\n\nDas Original.\n"})
    plan = em_german_plan()
    out = tmp_path / "build"
    first = card.load_original_card(plan.recipe, out_dir=out)
    assert first.text == "# EM German\n\nDas Original." and first.origin == "jphme/em_german_13b_v01@main"
    hub.reset_log()
    assert card.load_original_card(plan.recipe, out_dir=out) == first and not hub.log  # from the build folder
    other = plan.recipe.model_copy(update={"model": plan.recipe.model.model_copy(update={"source": "nobody/none"})})
    missing = card.load_original_card(other, out_dir=tmp_path / "other")
    assert missing.text is None and "could not read it from the Hub" in (missing.reason or "")


def test_write_cards_moves_states(tmp_path: Path) -> None:
    b = fabricate_build(tmp_path)
    names = [v.name for v in b.plan.variants]
    m = b.manifest.with_variant(names[1], replace(b.manifest.variants[names[1]], state="built"))
    m = card.write_cards(b.plan, m, b.out)
    assert m.variants[names[0]].state == "carded" and m.variants[names[1]].state == "built"
    assert (b.folder(names[0]) / "README.md").is_file() and not (b.folder(names[1]) / "README.md").exists()
    published = m.with_variant(names[0], replace(m.variants[names[0]], state="published", published=PublishedRecord(
        "quantkit-test/tiny_german-GPTQ", "main", "c" * 40)))
    # the owner an earlier publish resolved is reused: the README names the real repo
    again = card.write_cards(b.plan, published, b.out)
    assert again.variants[names[0]].state == "carded"  # its README changed ({owner} -> quantkit-test)
    assert "quantkit-test/tiny_german-GPTQ" in (b.folder(names[0]) / "README.md").read_text()
    same = card.write_cards(b.plan, replace(again, variants={**again.variants, names[0]: published.variants[names[0]]}),
                            b.out)
    assert same.variants[names[0]].state == "published"  # nothing changed: still what the branch holds


def test_minimal_recipe_card(tmp_path: Path) -> None:
    plan = _plan(tmp_path, '[model]\nsource = "src"\n[[variants]]\nformat = "gguf"\nquant = "Q8_0"\n')
    text = card.render_card(plan, _manifest(plan), "gguf-Q8_0")
    assert "license:" not in text.split("\n---\n")[0] and "base_model" not in text.split("\n---\n")[0]
    assert "The recipe sets no prompt template" in text and "The recipe names no licence" in text
    assert "{owner}/src-GGUF" in text  # no owner yet: publish fills it in
    assert "language:\n- de" in text  # the shipped German calibration sample
    assert "smallest download" not in text  # one branch: no comparisons
