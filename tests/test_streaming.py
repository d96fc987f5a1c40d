"""The layer-streamed reference: the whole model's logits, one block of weights at a time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from quantkit.errors import SourceError
from quantkit.evaluate import compute_reference, make_eval_set, streamed_rows
from quantkit.hfmodel import hf_logits
from quantkit.streaming import _Loader, streamed_logits


def _chunks(vocab: int, n: int = 5, ctx: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(3, vocab, size=(n, ctx), dtype=np.int64)


def _max_diff(model: Path, chunks: np.ndarray, keep: int, group_tokens: int) -> float:
    with hf_logits(model) as fn:
        full = [fn(c)[-keep:] for c in chunks]
    got = list(streamed_logits(model, chunks, keep, group_tokens=group_tokens))
    assert len(got) == len(chunks) and got[0].shape == full[0].shape
    return max(float(np.abs(g - f).max()) for g, f in zip(got, full))


def test_streamed_logits_equal_the_whole_model(tiny_llama):
    # groups of two chunks and a last group of one: every grouping gives the same logits
    assert _max_diff(tiny_llama, _chunks(1024), keep=32, group_tokens=128) < 1e-4


def test_tied_head_reads_the_embeddings(smollm2_2l):
    cfg = json.loads((smollm2_2l / "config.json").read_text())
    assert cfg["tie_word_embeddings"]
    assert _max_diff(smollm2_2l, _chunks(49152, n=2, ctx=48), keep=20, group_tokens=4096) < 1e-3


def test_one_block_of_weights_in_memory_at_a_time(tiny_llama, monkeypatch):
    import torch

    peak, models = [0], []
    real_load = _Loader.load

    def load(self, prefix, block):
        real_load(self, prefix, block)
        model = models[0]
        peak[0] = max(peak[0], sum(p.numel() for p in model.parameters() if p.device.type != "meta"))

    monkeypatch.setattr(_Loader, "load", load)
    from quantkit import streaming

    real_empty = streaming._empty_model
    monkeypatch.setattr(streaming, "_empty_model", lambda *a: models.append(real_empty(*a)) or models[0])
    list(streamed_logits(tiny_llama, _chunks(1024, n=2), keep=8))
    total = sum(p.numel() for p in models[0].parameters())
    largest = max(1024 * 256, 4 * 256 * 256 + 3 * 256 * 768 + 2 * 256)  # embeddings/head vs one layer
    assert 0 < peak[0] <= largest < total / 2
    assert all(p.device.type == "meta" for p in models[0].parameters())  # nothing left behind
    assert torch.is_tensor(next(models[0].buffers()))  # RoPE tables were computed, not empty


def test_reference_from_streamed_rows_equals_the_per_chunk_one(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    texts = ["Der Rhein fließt durch Basel, Straßburg und Köln bis in die Nordsee. " * 30]
    es = make_eval_set(tok, texts, tokens=256, ctx=64)
    streamed = compute_reference(es, streamed_rows(es, tiny_llama), tmp_path / "a.npy")
    with hf_logits(tiny_llama) as fn:
        whole = compute_reference(es, fn, tmp_path / "b.npy")
    assert np.abs(np.asarray(streamed.logprobs, np.float32) - np.asarray(whole.logprobs, np.float32)).max() < 2e-3
    assert streamed.ppl == pytest.approx(whole.ppl, rel=1e-4)


def test_weights_missing_from_the_checkpoint_are_a_source_error(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "model"
    shutil.copytree(tiny_llama, src)
    state = load_file(str(src / "model.safetensors"))
    save_file({k: v for k, v in state.items() if ".layers.1." not in k}, str(src / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(SourceError, match="not found by name"):
        list(streamed_logits(src, _chunks(1024, n=1), keep=8))


def test_reference_falls_back_to_the_whole_model_when_names_do_not_match(tiny_llama, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from quantkit import streaming

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    es = make_eval_set(tok, ["Die Elbe fließt durch Dresden und Hamburg in die Nordsee. " * 30], tokens=128, ctx=64)
    with hf_logits(tiny_llama) as fn:
        whole = compute_reference(es, fn, tmp_path / "a.npy")
    monkeypatch.setattr(streaming._Weights, "has", lambda self, name: False)  # as for renamed keys
    fallback = compute_reference(es, streamed_rows(es, tiny_llama), tmp_path / "b.npy")
    assert np.array_equal(np.asarray(fallback.logprobs), np.asarray(whole.logprobs))
