"""Test models, built here (no downloads) and cached for tests and benchmarks alike.

Each is built once under $QUANTKIT_CACHE/test-models (default ~/.cache/quantkit), under a
name that carries a version string (`tiny-llama-v1`, `smollm2-135m-instruct-2l-v1`), so later
runs, CI and the benchmarks reuse them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any
from pathlib import Path

import quantkit

CACHE = Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache" / "quantkit")) / "test-models"
# The folder holding the quantkit package: the checkout's root, with calibration/ beside it.
ROOT = Path(quantkit.__file__).resolve().parent.parent
CALIB_DIR = ROOT / "calibration"


def cached(name: str, build: Callable[[Path], object]) -> Path:
    """Build into a temp folder next to the cache entry, then rename: never half a model. Two
    test workers may build the same entry at once: the first rename wins, the other build is
    dropped."""
    dest = CACHE / name
    if (dest / "config.json").is_file():
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=f".{name}."))
    try:
        build(tmp)
        try:
            tmp.rename(dest)
        except OSError:  # another worker's rename came first (a non-empty folder is never replaced)
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def smollm2_name(layers: int | None = None) -> str:
    return "smollm2-135m-instruct-v1" if layers is None else f"smollm2-135m-instruct-{layers}l-v1"


def build_smollm2(out: Path, layers: int | None = None) -> None:
    from quantkit.demo import build_smollm2 as build

    build(out, layers=layers)


def smollm2(layers: int | None = None) -> Path:
    """The real SmolLM2-135M-Instruct (bf16), or its first `layers` layers: the tests' checkpoint."""
    from quantkit.demo import build_smollm2 as build

    return build(CACHE / smollm2_name(layers), layers=layers)


def german_text() -> str:
    """All contexts of the shipped sample, for training the tiny tokenizer."""
    out = []
    for f in sorted(CALIB_DIR.glob("*.json")):
        for art in json.loads(f.read_text(encoding="utf-8"))["data"]:
            out += [p["context"] for p in art["paragraphs"]]
    return "\n".join(out)


def build_tiny_llama(out: Path) -> None:
    """A random Llama (hidden 256, intermediate 768, 2 layers) with a German SentencePiece tokenizer."""
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


def tiny_llama() -> Path:
    return cached("tiny-llama-v1", build_tiny_llama)


def degrid(weights: Any, seed: int, block: int = 32) -> Any:
    """A weight matrix moved off the Q4_1 grid it was rebuilt from: per block of `block` along a
    row, seeded uniform noise of up to half that block's Q4_1 step ((max − min) / 15) each way."""
    import torch

    w = weights.float()
    rows, cols = w.shape
    blocks = w.reshape(rows, cols // block, block)
    step = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 15
    gen = torch.Generator().manual_seed(seed)
    noise = (torch.rand(blocks.shape, generator=gen) - 0.5) * step
    return (blocks + noise).reshape(rows, cols)


def build_degridded_smollm2(out: Path, layers: int | None = None) -> None:
    """SmolLM2-135M with every 2-D weight off its Q4_1 grid (DESIGN §4): block-32 4-bit types then
    get no unearned advantage, so method and mix comparisons on it are fair. Seeded."""
    import torch
    from safetensors.torch import load_file, save_file

    src = smollm2(layers)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    state = load_file(str(src / "model.safetensors"))
    out_state = {k: (degrid(v, seed=i).to(torch.bfloat16) if v.ndim == 2 and v.shape[1] % 32 == 0 else v)
                 for i, (k, v) in enumerate(sorted(state.items()))}
    save_file(out_state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "README.md").write_text("SmolLM2-135M-Instruct moved off its Q4_1 grid with seeded noise of half a "
                                   "Q4_1 step per weight (quantkit.testing.models.degrid).\n", encoding="utf-8")


def degridded_smollm2(layers: int | None = None) -> Path:
    """The de-gridded SmolLM2 (see build_degridded_smollm2), cached like the others."""
    name = "smollm2-135m-instruct-degridded-v1" if layers is None else f"smollm2-135m-instruct-{layers}l-degridded-v1"
    return cached(name, lambda out: build_degridded_smollm2(out, layers))
