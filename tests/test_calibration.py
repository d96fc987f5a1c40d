"""Calibration: loading every supported source, dedup, held-out split, token windows."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from quantkit.calibration import (build_calibration, dedup_contexts, load_items, template_for)
from quantkit.cli import app
from quantkit.errors import CalibrationError
from quantkit.recipe import parse_recipe
from quantkit.testing.squad import squad_doc

ROOT = Path(__file__).resolve().parent.parent


def _recipe(source: Path, extra: str = "", calib: str = "samples = 8\nseq_len = 128\n"):
    text = (f'[model]\nsource = "{source}"\n[calibration]\n{calib}{extra}\n'
            '[[variants]]\nformat = "gguf"\nquant = "Q8_0"\n')
    return parse_recipe(text, check_source=False)


def _tok(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_shipped_sample_counts_and_manifest() -> None:
    items, label = load_items(None, "train")
    assert "calibration/" in label
    contexts = dedup_contexts(items)
    assert len(items) >= 200 and len(contexts) >= 50
    manifest = (ROOT / "calibration" / "MANIFEST").read_text()
    for f in sorted((ROOT / "calibration").glob("*.json")):
        assert f"{f.name}  {hashlib.sha256(f.read_bytes()).hexdigest()}" in manifest
    for it in items:  # every answer is a span of its context, as in GermanQuAD
        assert it.answer and it.answer in it.context


def test_shipped_answers_start_where_they_say() -> None:
    for f in sorted((ROOT / "calibration").glob("*.json")):
        for art in json.loads(f.read_text(encoding="utf-8"))["data"]:
            for para in art["paragraphs"]:
                for qa in para["qas"]:
                    a = qa["answers"][0]
                    assert para["context"][a["answer_start"]:a["answer_start"] + len(a["text"])] == a["text"]


def test_calibration_never_contains_evaluation_contexts(tiny_llama: Path) -> None:
    c = build_calibration(_recipe(tiny_llama), _tok(tiny_llama))
    assert c.eval_texts and c.n_contexts >= 40
    for ctx in c.eval_texts:
        assert not any(ctx in t for t in c.texts)
    assert c.n_contexts + len(c.eval_texts) == len(dedup_contexts(load_items(None, "train")[0]))


def test_explicit_evaluation_data_is_removed_from_calibration(tiny_llama: Path, tmp_path: Path) -> None:
    calib = squad_doc(40, 3)
    evald = {"data": calib["data"][:5]}  # overlapping on purpose
    (tmp_path / "train.json").write_text(json.dumps(calib))
    (tmp_path / "test.json").write_text(json.dumps(evald))
    r = _recipe(tiny_llama, f'dataset = "{tmp_path / "train.json"}"\n[evaluation]\ndataset = "{tmp_path / "test.json"}"\n')
    c = build_calibration(r, _tok(tiny_llama))
    assert c.n_contexts == 35 and len(c.eval_texts) == 5
    assert not any(e in t for e in c.eval_texts for t in c.texts)


def test_windows_shape_bos_and_seeded_hash(tiny_llama: Path) -> None:
    tok = _tok(tiny_llama)
    a = build_calibration(_recipe(tiny_llama), tok)
    b = build_calibration(_recipe(tiny_llama), tok)
    c = build_calibration(_recipe(tiny_llama, calib="samples = 8\nseq_len = 128\nseed = 1\n"), tok)
    assert a.windows.shape == (8, 128)
    assert (a.windows[:, 0] == tok.bos_token_id).all()
    assert a.sha256 == b.sha256 != c.sha256
    assert tok.eos_token_id in a.windows  # items are separated by EOS


def test_template_formats_each_item(tiny_llama: Path) -> None:
    tpl = 'template = "USER: {context} FRAGE: {question} ASSISTANT: {answer}"\n'
    c = build_calibration(_recipe(tiny_llama, tpl), _tok(tiny_llama))
    assert all(t.startswith("USER: ") and " FRAGE: " in t and " ASSISTANT: " in t for t in c.texts)


def test_prompt_template_is_the_default_template() -> None:
    r = parse_recipe('[model]\nsource = "a/b"\nprompt_template = "SYS USER: {prompt} ASSISTANT:"\n'
                     '[[variants]]\nformat = "gptq"\n', check_source=False)
    assert template_for(r) == "SYS USER: {context}\n\n{question} ASSISTANT: {answer}"


def test_chat_template_is_used_without_a_prompt_template(smollm2: Path) -> None:
    tpl = template_for(_recipe(smollm2), _tok(smollm2))
    assert "<|im_start|>user" in tpl and "{context}" in tpl and "{answer}" in tpl


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "txt", "folder"])
def test_local_formats(kind: str, tmp_path: Path) -> None:
    doc = squad_doc(6, 2)
    rows = [{"context": p["context"], "question": q["question"], "answers": {"text": [q["answers"][0]["text"]],
             "answer_start": [0]}} for a in doc["data"] for p in a["paragraphs"] for q in p["qas"]]
    if kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(doc))
    elif kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "txt":
        path = tmp_path / "d.txt"
        path.write_text("\n\n".join(p["context"].replace("\n\n", " ")  # one paragraph per context
                                 for a in doc["data"] for p in a["paragraphs"]))
    else:
        path = tmp_path / "dir"
        path.mkdir()
        (path / "a.json").write_text(json.dumps({"data": doc["data"][:3]}))
        (path / "b.json").write_text(json.dumps({"data": doc["data"][3:]}))
    items, _ = load_items(str(path), "train")
    assert len(dedup_contexts(items)) == 6
    if kind != "txt":
        assert len(items) == 12 and items[0].question.startswith("Worum")


def test_bad_data_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"rows": []}')
    with pytest.raises(CalibrationError, match="SQuAD-style"):
        load_items(str(tmp_path / "bad.json"), "train")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(CalibrationError, match="neither 'context' nor 'text'"):
        load_items(str(tmp_path / "bad.jsonl"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no .json"):
        load_items(str(tmp_path / "empty"), "train")


def test_too_little_text_says_so(tiny_llama: Path, tmp_path: Path) -> None:
    (tmp_path / "small.txt").write_text("Kurz.\n\nNoch kürzer.\n\nEin dritter Satz.")
    r = _recipe(tiny_llama, f'dataset = "{tmp_path / "small.txt"}"\n', "samples = 4\nseq_len = 4096\n")
    with pytest.raises(CalibrationError, match="fewer than one window"):
        build_calibration(r, _tok(tiny_llama))


def test_large_squad_file_builds_128_windows_of_4096(smollm2: Path, tmp_path: Path) -> None:
    """A GermanQuAD-sized file (14k items): only the tokens the windows need are tokenized."""
    doc = squad_doc(3000, 5)  # 15,000 items over 3,000 contexts
    path = tmp_path / "germanquad_like.json"
    path.write_text(json.dumps(doc, ensure_ascii=False))
    r = _recipe(smollm2, f'dataset = "{path}"\n', "samples = 128\nseq_len = 4096\n")
    c = build_calibration(r, _tok(smollm2))
    assert c.windows.shape == (128, 4096)
    assert c.n_contexts + len(c.eval_texts) == 3000
    assert c.n_items < c.n_contexts  # stopped tokenizing once the windows were full


def test_calib_cli_on_shipped_sample(smollm2: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\nsource = "{smollm2}"\n[calibration]\nsamples = 16\nseq_len = 512\n'
                      '[[variants]]\nformat = "gguf"\nquant = "Q8_0"\n')
    res = CliRunner().invoke(app, ["calib", str(recipe)])
    assert res.exit_code == 0, res.output
    assert "16 x 512" in res.stdout and "mean tokens per item" in res.stdout and "sha256" in res.stdout


def test_non_german_calibration_text_warns(smollm2: Path, tmp_path: Path) -> None:
    english = "The quick brown fox jumps over the lazy dog while the committee reviews the budget. " * 200
    (tmp_path / "en.txt").write_text(english)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\nsource = "{smollm2}"\n[calibration]\ndataset = "{tmp_path / "en.txt"}"\n'
                      'samples = 2\nseq_len = 256\n[[variants]]\nformat = "gguf"\nquant = "Q8_0"\n')
    res = CliRunner().invoke(app, ["calib", str(recipe)])
    assert res.exit_code == 0 and "does not look German" in res.stderr
    ok = CliRunner().invoke(app, ["calib", str(recipe).replace("r.toml", "r2.toml")])
    assert ok.exit_code == 2  # missing file: exit 2, one line


def test_shipped_sample_reads_as_german() -> None:
    from quantkit.calibration import german_share

    items, _ = load_items(None, "train")
    assert german_share(it.context for it in items) > 0.2


def test_exports_for_every_engine(tiny_llama: Path, tmp_path: Path) -> None:
    """The same set as GPTQModel examples, llama-imatrix text and exllamav2 parquet."""
    c = build_calibration(_recipe(tiny_llama), _tok(tiny_llama))
    ex = c.examples()
    assert len(ex) == 8 and ex[0]["input_ids"] == c.windows[0].tolist() and all(ex[0]["attention_mask"])
    text = c.write_text(tmp_path / "calib.txt").read_text(encoding="utf-8")
    assert all(t in text for t in c.texts)
    table = pq.read_table(c.write_parquet(tmp_path / "calib.parquet"))
    assert table.column_names == ["text"] and table.column("text").to_pylist() == list(c.texts)
