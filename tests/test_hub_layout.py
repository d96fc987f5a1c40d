"""Publishing the way the ecosystem reads it: every GGUF file on main, the Hub's quant-label
rule, memory columns, the quality gate, the recipe's collection and base_model.

Files are fabricated (random bytes named as the engines name them, FIXTURE quality numbers):
what is tested is the layout on the Hub and the gate, against the local Hub stand-in.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.register_assert_rewrite("_hub_fixtures")  # it is also the plugin named below

from quantkit import card  # noqa: E402
from quantkit.engines.gguf import hub_quant_label  # noqa: E402
from quantkit.errors import GateRefused  # noqa: E402
from quantkit.recipe import parse_recipe  # noqa: E402
from quantkit.records import QualityRecord  # noqa: E402
from quantkit.testing.fabricate import Build, carded_build, fabricate_build, publish_build  # noqa: E402
from quantkit.testing.hub_server import HubServer, summarize  # noqa: E402

pytest_plugins = ("_hub_fixtures",)

ROOT = Path(__file__).resolve().parent.parent
REPO = "quantkit-test/tiny_german-GGUF"

# TheBloke's GGUF ladder: four types with an importance matrix, one plain 2-bit file.
LADDER = """
[model]
source = "src"
name = "tiny_german"
license = "apache-2.0"
base_model = "quantkit-test/tiny-german-base"

[calibration]
samples = 8
seq_len = 256
{publish}
[[variants]]
format = "gguf"
quant = ["Q4_K_M", "Q5_K_M", "Q3_K_M", "Q2_K"]

[[variants]]
format = "gguf"
quant = "Q2_K"
imatrix = false
"""


def _ladder(tmp_path: Path, publish_table: str = "") -> Build:
    return carded_build(tmp_path, recipe_text=LADDER.format(publish=publish_table))


_publish = publish_build


def test_every_gguf_file_lies_on_main_and_on_its_own_branch(hub: HubServer, tmp_path: Path) -> None:
    b = _ladder(tmp_path)
    report = _publish(b)
    assert report.ok and report.commits == 5
    main = set(hub.files(REPO, "main"))
    ggufs = {f"tiny_german.{t}.gguf" for t in ("Q4_K_M", "Q5_K_M", "Q3_K_M", "Q2_K", "Q2_K-noimatrix")}
    assert main == ggufs | {"README.md", "quality.png", "tiny_german.imatrix", ".gitattributes"}
    for v in b.plan.variants:
        on_branch = set(hub.files(REPO, v.branch)) - {".gitattributes", "README.md"}
        assert f"tiny_german.{v.name.removeprefix('gguf-')}.gguf" in on_branch
    # content-addressed: each distinct file went up once although main and a branch hold it
    distinct = {f.sha256: f.size for r in b.manifest.variants.values() for f in r.files if f.path != "README.md"}
    picture = (b.folder(b.plan.variants[0].name) / "quality.png").stat().st_size  # the repo's own picture
    assert sum(r.bytes_in for r in hub.requests("PUT")) == sum(distinct.values()) + picture

    hub.reset_log()
    again = _publish(b)
    assert again.ok and again.commits == 0 and summarize(hub.log)["content_bytes"] == 0


def test_the_hub_label_rule_finds_every_type_the_card_names(hub: HubServer, tmp_path: Path) -> None:
    """huggingface.js parseGGUFQuantLabel (the last type label in the name) over main's files: each
    `REPO:TYPE` command of the cards resolves to that variant's own file."""
    b = _ladder(tmp_path)
    _publish(b)
    by_label: dict[str, list[str]] = {}
    for name in hub.files(REPO, "main"):
        if name.endswith(".gguf"):
            by_label.setdefault(hub_quant_label(name) or "", []).append(name)
    for v in b.plan.variants:
        text = hub.files(REPO, v.branch)["README.md"].decode()
        own = f"tiny_german.{v.name.removeprefix('gguf-')}.gguf"
        tags = set(re.findall(rf"llama-cli -hf {re.escape(REPO)}:(\S+)", text))
        tags |= set(re.findall(rf"ollama run hf.co/{re.escape(REPO)}:(\S+)", text))
        if len(by_label[v.params.quant]) == 1:  # the tag resolves to this variant's file alone
            assert tags == {v.params.quant} and by_label[v.params.quant] == [own]
        else:  # a plain and an imatrix Q2_K: the card names the file, never an ambiguous tag
            assert not tags and f"--hf-file {own}" in text and own in by_label[v.params.quant]
    assert sorted(by_label) == ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M"] and len(by_label["Q2_K"]) == 2
    assert hub_quant_label("x.Q2_K_S.gguf") == "Q2_K_S" and hub_quant_label("x.IQ4_XS.gguf") == "IQ4_XS"
    assert hub_quant_label("Llama-BF16-v2.Q8_0.gguf") == "Q8_0"  # the last match wins


def test_cards_say_what_running_each_file_takes(tmp_path: Path) -> None:
    b = _ladder(tmp_path)
    text = card.render_card(b.plan, b.manifest, "gguf-Q4_K_M")
    header = next(ln for ln in text.splitlines() if ln.startswith("| Name |"))
    assert header.startswith("| Name | Quant method | Bits | Size | Max RAM required | Use case | ΔPPL % | KLD |")
    # 2 layers x 4 kv heads x 64 x 4096 tokens x 2 (K, V) x 2 bytes = 8.39 MB of KV cache
    assert "16-bit KV cache (8.39 MB for this model)" in text
    assert "base_model: quantkit-test/tiny-german-base" in text and "base_model_relation: quantized" in text


def test_the_gate_refuses_a_bad_variant_and_the_others_publish(hub: HubServer, tmp_path: Path) -> None:
    b = _ladder(tmp_path, "[publish.gguf]\nmax_kld = 0.5\n")
    bad = "gguf-Q2_K-noimatrix"
    m = b.manifest
    b.manifest = m.with_variant(bad, replace(m.variants[bad], quality=QualityRecord(40.0, 20.0, 100.0, 0.93, 0.41)))
    report = _publish(b)
    assert not report.ok and report.gated == ((bad, "KLD 0.9300 over the limit 0.5 (max_kld)"),)
    assert report.commits == 4 and "Q2_K-noimatrix" not in hub.repo(REPO).branches
    assert "tiny_german.Q2_K-noimatrix.gguf" not in hub.files(REPO, "main")  # nor on main
    with pytest.raises(GateRefused):
        report.raise_for_errors()
    forced = _publish(b, force=True)
    assert forced.ok and "tiny_german.Q2_K-noimatrix.gguf" in hub.files(REPO, "main")


def test_gate_limits_per_format_override_the_global_ones() -> None:
    r = parse_recipe('[model]\nsource = "a/b"\n[publish]\nmax_kld = 0.1\nmax_delta_ppl_pct = 30\n'
                     '[publish.gguf]\nmax_kld = 0.2\n[[variants]]\nformat = "gguf"\nquant = "Q4_K_M"\n',
                     check_source=False)
    gate = r.publish.gate("gguf")
    assert (gate.max_kld, gate.max_delta_ppl_pct) == (0.2, 30) and r.publish.gate("gptq").max_kld == 0.1
    assert gate.failures(None) == ["never evaluated"]
    with pytest.raises(Exception, match="unknown key"):
        parse_recipe('[model]\nsource = "a/b"\n[publish.gguf]\nmax_kl = 0.2\n[[variants]]\nformat = "gguf"\n'
                     'quant = "Q4_K_M"\n', check_source=False)
    with pytest.raises(Exception, match="not a Hub model id"):
        parse_recipe('[model]\nsource = "a/b"\nbase_model = "no id"\n[[variants]]\nformat = "gguf"\n'
                     'quant = "Q4_K_M"\n', check_source=False)


def test_one_collection_per_recipe_kept_on_reruns(hub: HubServer, tmp_path: Path) -> None:
    b = _ladder(tmp_path)
    first = _publish(b)
    again = _publish(b)
    assert first.collection and again.collection == first.collection and again.collection_error is None
    (col,) = hub.collections.values()
    assert col["title"] == "tiny_german quantized" and [i["id"] for i in col["items"]] == [REPO]


def test_publish_warns_when_the_card_has_no_base_model(hub: HubServer, tmp_path: Path) -> None:
    b = fabricate_build(tmp_path)  # a local source without [model] base_model
    b.manifest = card.write_cards(b.plan, b.manifest, b.out)
    report = _publish(b, dry_run=True)
    assert any("no base_model" in n and "[model] base_model" in n for n in report.notes)


def test_cli_exits_1_on_a_gated_variant(hub: HubServer, tmp_path: Path) -> None:
    b = _ladder(tmp_path, "[publish]\nmax_delta_ppl_pct = 1\n")  # every fixture variant is over it
    from quantkit.manifest import save_manifest

    save_manifest(b.out, b.manifest)
    env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HUB_DISABLE_XET": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "quantkit.cli", "publish", str(tmp_path / "recipe.toml"),
                          "--out", str(b.out)], capture_output=True, text=True, env={**_base_env(), **env},
                         timeout=300)
    assert res.returncode == 1, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "not published" in ln]
    assert len(lines) == 5 and all("over the limit 1 %" in ln and "--force" in ln for ln in lines)


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("HF_")}


def test_a_split_file_is_listed_with_its_parts_and_one_download_pattern(tmp_path: Path) -> None:
    b = _ladder(tmp_path)
    name = "gguf-Q5_K_M"
    folder = b.folder(name)
    (folder / "tiny_german.Q5_K_M.gguf").unlink()
    parts = [f"tiny_german.Q5_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    for p in parts:
        (folder / p).write_bytes(b"GGUF" + p.encode())
    from quantkit.records import file_entries

    rec = b.manifest.variants[name]
    b.manifest = b.manifest.with_variant(name, replace(rec, files=file_entries(folder)))
    text = card.render_card(b.plan, b.manifest, name)
    repo = "{owner}/tiny_german-GGUF"  # not published yet: the owner is not known
    assert f'hf download {repo} --include "tiny_german.Q5_K_M-*-of-00003.gguf" --local-dir .\n```' in text
    assert ", ".join(parts) in text and f"[{parts[0]}](" in text  # the table names the first part
    assert {hub_quant_label(p) for p in parts} == {"Q5_K_M"}  # each part still reads as its type
    assert f"llama-cli -hf {repo}:Q5_K_M" in text
