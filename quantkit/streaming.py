"""An unquantized transformers model run with one block's weights in memory at a time.

The reference logits used to load the whole model in float32: 2x its bf16 size in RAM,
which put a 7B model out of reach of a 24 GB machine. Here the model is built with empty
(meta) parameters; a forward pre-hook loads each block (embeddings, every decoder layer,
the final norm, the head) from the safetensors files just before it runs and a forward
hook drops it again. The forward itself is the model's own, so every architecture that
transformers knows computes exactly what the whole model would, and peak memory is one
block in the compute dtype plus the activations of one group of chunks.

Chunks are run in groups of about `group_tokens` tokens; every group reads the weights
again (from the page cache after the first), which costs little next to the matmuls.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SourceError

GROUP_TOKENS = 2048  # tokens per forward: bounds the activations, not the weights


def weight_index(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it, from the headers alone."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        doc = json.loads(index.read_text(encoding="utf-8"))
        return {k: path / f for k, f in doc["weight_map"].items()}
    out: dict[str, Path] = {}
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            out.update(dict.fromkeys((k for k in json.loads(fh.read(n)) if k != "__metadata__"), f))
    return out


class _Weights:
    """Reads single tensors from the checkpoint's safetensors files, lazily opened."""

    def __init__(self, path: Path, stack: ExitStack, tied: dict[str, str]):
        self.index, self.stack, self.tied = weight_index(path), stack, tied
        self.files: dict[Path, Any] = {}
        if not self.index:
            raise SourceError(str(path), "no .safetensors weights to read")

    def has(self, name: str) -> bool:
        return name in self.index or self.tied.get(name) in self.index

    def get(self, name: str) -> Any:
        from safetensors import safe_open

        key = name if name in self.index else self.tied[name]
        f = self.index[key]
        if f not in self.files:
            self.files[f] = self.stack.enter_context(safe_open(str(f), "pt"))
        return self.files[f].get_tensor(key)


def _blocks(model: Any) -> list[tuple[str, Any]]:
    """The modules loaded as a whole: every child of the base model holding parameters
    (each element of a ModuleList on its own), and the output head."""
    import torch

    names = {m: n for n, m in model.named_modules()}
    base = model.base_model
    out = []
    for child in base.children():
        parts = list(child) if isinstance(child, torch.nn.ModuleList) else [child]
        out += [(names[p], p) for p in parts if any(True for _ in p.parameters())]
    head = model.get_output_embeddings()
    if head is not None and head is not base:
        out.append((names[head], head))
    return out


def _tied_names(model: Any) -> dict[str, str]:
    """Parameters a tied checkpoint does not store, and where to read them instead."""
    tied = getattr(model, "_tied_weights_keys", None)
    if isinstance(tied, dict) and getattr(model.config, "tie_word_embeddings", False):
        return dict(tied)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or not getattr(model.config, "tie_word_embeddings", False):
        return {}
    names = {m: n for n, m in model.named_modules()}
    return {f"{names[head]}.weight": f"{names[emb]}.weight"}


class _Loader:
    """Forward hooks that put a block's weights in place before it runs and take them after."""

    def __init__(self, weights: _Weights, dtype: Any, device: str):
        self.weights, self.dtype, self.device = weights, dtype, device

    def load(self, prefix: str, block: Any) -> None:
        import torch

        for name, _ in list(block.named_parameters()):
            mod, attr = _owner(block, name)
            t = self.weights.get(f"{prefix}.{name}").to(device=self.device, dtype=self.dtype)
            mod._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)

    def drop(self, block: Any) -> None:
        import torch

        for name, p in list(block.named_parameters()):
            mod, attr = _owner(block, name)
            mod._parameters[attr] = torch.nn.Parameter(torch.empty(p.shape, device="meta", dtype=p.dtype),
                                                       requires_grad=False)

    def attach(self, blocks: list[tuple[str, Any]]) -> list[Any]:
        hooks = []
        for prefix, block in blocks:
            hooks.append(block.register_forward_pre_hook(lambda m, _a, prefix=prefix: self.load(prefix, m)))
            hooks.append(block.register_forward_hook(lambda m, _a, _o: self.drop(m)))
        return hooks


def _owner(block: Any, name: str) -> tuple[Any, str]:
    path, _, attr = name.rpartition(".")
    return (block.get_submodule(path) if path else block), attr


def _empty_model(path: Path, dtype: Any, device: str) -> Any:
    """The architecture with meta parameters and real buffers (RoPE tables are computed)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    for mod in model.modules():
        for n, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[n] = b.to(device)
    return model


@contextmanager
def streamed_model(path: Path, *, dtype: str = "float32", device: str = "cpu") -> Iterator[Any]:
    """The model with its blocks loaded on demand; SourceError when its weights do not
    cover its parameters (a checkpoint layout transformers would have to convert)."""
    import torch

    td = getattr(torch, dtype)
    model = _empty_model(path, td, device)
    blocks = _blocks(model)
    with ExitStack() as stack:
        weights = _Weights(path, stack, _tied_names(model))
        missing = [f"{p}.{n}" for p, b in blocks for n, _ in b.named_parameters()
                   if not weights.has(f"{p}.{n}")]
        if missing:
            raise SourceError(str(path), f"{len(missing)} parameters not found by name in the "
                              f"safetensors files (first: {missing[0]})")
        hooks = _Loader(weights, td, device).attach(blocks)
        try:
            yield model
        finally:
            for h in hooks:
                h.remove()


def streamed_logits(path: Path, chunks: np.ndarray, keep: int, *, dtype: str = "float32",
                    device: str = "cpu", group_tokens: int = GROUP_TOKENS) -> Iterator[np.ndarray]:
    """Logits of the last `keep` positions of every chunk [n, ctx], one chunk at a time
    (float32 numpy [keep, vocab]), with one block of weights in memory at a time."""
    import torch

    per_group = max(1, group_tokens // chunks.shape[1])
    with streamed_model(path, dtype=dtype, device=device) as model, torch.inference_mode():
        for start in range(0, len(chunks), per_group):
            x = torch.as_tensor(chunks[start:start + per_group], dtype=torch.long, device=device)
            logits = model(input_ids=x, use_cache=False, logits_to_keep=keep).logits
            for row in logits:
                yield row.float().cpu().numpy()
            del logits
