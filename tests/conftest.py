"""Shared fixtures: models built here (no downloads), a temp HF_HOME, GPU skipping.

Models are built once and cached under $QUANTKIT_CACHE/test-models (default
~/.cache/quantkit), keyed by a version string, so later runs and CI reuse them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CALIB_DIR = ROOT / "calibration"
CACHE = Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache" / "quantkit")) / "test-models"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any("gpu" in it.keywords for it in items) and not _cuda():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for it in items:
            if "gpu" in it.keywords:
                it.add_marker(skip)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the user's Hub cache or token."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)


def _cached(name: str, build) -> Path:
    """Build into a temp folder next to the cache entry, then rename: never half a model."""
    dest = CACHE / name
    if (dest / "config.json").is_file():
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=f".{name}."))
    try:
        build(tmp)
        if not dest.exists():
            tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def german_text() -> str:
    """All contexts of the shipped sample, for training the tiny tokenizer."""
    out = []
    for f in sorted(CALIB_DIR.glob("*.json")):
        for art in json.loads(f.read_text(encoding="utf-8"))["data"]:
            out += [p["context"] for p in art["paragraphs"]]
    return "\n".join(out)


def _build_tiny_llama(out: Path) -> None:
    import sentencepiece as spm
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    corpus = out / "corpus.txt"
    corpus.write_text(german_text(), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=1024, model_type="bpe",
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        num_threads=2, minloglevel=2)
    corpus.unlink()
    (out / "tokenizer.vocab").unlink()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}))
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 1024, len(tok)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    """A random Llama (hidden 256, intermediate 768, 2 layers) with a German SentencePiece tokenizer."""
    return _cached("tiny-llama-v1", _build_tiny_llama)


def _build_smollm2(out: Path, layers: int | None = None) -> None:
    from quantkit.demo import build_smollm2

    build_smollm2(out, layers=layers)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real pretrained SmolLM2-135M-Instruct (30 layers), bf16."""
    return _cached("smollm2-135m-instruct-v1", _build_smollm2)


@pytest.fixture(scope="session")
def smollm2_2l() -> Path:
    """SmolLM2-135M-Instruct cut to its first two layers (real weights)."""
    return _cached("smollm2-135m-instruct-2l-v1", lambda out: _build_smollm2(out, layers=2))


@pytest.fixture(scope="session")
def german_sample() -> Path:
    return CALIB_DIR
