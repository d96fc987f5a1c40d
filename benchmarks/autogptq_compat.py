"""Does a quantkit GPTQ output load in AutoGPTQ 0.7.1, what TheBloke's users ran? (issue 3)

AutoGPTQ 0.7.1 imports only with transformers 4.57, so it gets its own virtual
environment (created once, cached): transformers 4.57, auto-gptq 0.7.1, peft<0.14,
datasets<4.5, and torch (the local CPU wheel when there is one: $QUANTKIT_TORCH_WHEEL or
/opt/wheels, else the same torch version from PyPI).

The GPTQ folder (default: a 4-bit-64g build of the tiny test Llama made here) is loaded on
CPU by AutoGPTQ.from_quantized in that environment and by transformers+GPTQModel in this
one; both score the same token ids and the logits are compared.

Tied embeddings (SmolLM2): AutoGPTQ 0.7.1's CPU loader leaves embed_tokens and lm_head at
zero for every tied model (accelerate's load_checkpoint_in_model with device_map
{"": "cpu"} and a tied lm_head missing from the file, the standard layout; the same steps
on a plain fp16 model show it, under transformers 4.40 and 4.57, accelerate 0.27 to 1.15).
That reading is reported, then the embedding is put back from the same file and the
quantized layers are compared.

Usage: python benchmarks/autogptq_compat.py [--folder GPTQ_DIR] [--venv DIR]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from quantkit.testing import CACHE

ROOT = Path(__file__).resolve().parent.parent

PINS = ["transformers==4.57.*", "auto-gptq==0.7.1", "peft<0.14", "datasets<4.5",
        "accelerate", "safetensors", "sentencepiece", "protobuf", "numpy<2.3"]

CHILD = r'''
import glob, json, sys, numpy as np, torch, transformers, auto_gptq
from auto_gptq import AutoGPTQForCausalLM
from safetensors import safe_open
folder, ids_path, out_path = sys.argv[1:4]
m = AutoGPTQForCausalLM.from_quantized(folder, device="cpu", use_safetensors=True, use_triton=False,
        disable_exllama=True, disable_exllamav2=True, inject_fused_attention=False,
        inject_fused_mlp=False, model_basename="model")
ids = torch.as_tensor(np.load(ids_path), dtype=torch.long)

def logits():
    with torch.inference_mode():
        return torch.cat([m(input_ids=row[None]).logits[0].float() for row in ids]).numpy()

# AutoGPTQ 0.7.1 on CPU (device_map {"": "cpu"}, offload_state_dict) never fills a tied
# embedding: lm_head and embed_tokens come out as zeros for any tied model, quantized by
# anyone. Measure as loaded, then with the embedding put back from the same file.
emb = m.model.get_input_embeddings().weight
tied = bool(m.model.config.tie_word_embeddings)
info = {"tied": tied, "embedding_loaded": bool(emb.abs().max() > 0)}
if tied and not info["embedding_loaded"]:
    np.save(out_path.replace(".npy", "-as-loaded.npy"), logits())
    for f in glob.glob(folder + "/*.safetensors"):
        with safe_open(f, "pt") as sf:
            if "model.embed_tokens.weight" in sf.keys():
                emb.data.copy_(sf.get_tensor("model.embed_tokens.weight"))
    m.model.tie_weights()
np.save(out_path, logits())
print(json.dumps({**info, "auto_gptq": auto_gptq.__version__, "transformers": transformers.__version__,
                  "torch": torch.__version__, "qlinear": type(m.model.model.layers[0].self_attn.q_proj).__module__}))
'''


def torch_requirement() -> str:
    wheel = os.environ.get("QUANTKIT_TORCH_WHEEL") or next(iter(sorted(glob.glob("/opt/wheels/torch-*cpu*.whl"))), "")
    if wheel:
        return wheel
    import torch

    return f"torch=={torch.__version__.split('+')[0]}"


def ensure_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if py.is_file() and subprocess.run([str(py), "-c", "import auto_gptq, transformers"],
                                       capture_output=True).returncode == 0:
        return py
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", torch_requirement(), *PINS], check=True)
    return py


def build_tiny_gptq(dest: Path) -> Path:
    """A 4-bit-64g GPTQ of the tiny test Llama through quantkit's engine."""
    from quantkit.engines import ENGINES
    from quantkit.testing.engine_bench import build, make_bench, variant_of

    src = CACHE / "tiny-llama-v1"
    if not (src / "config.json").is_file():
        raise SystemExit(f"{src} missing: run the tests once (tests/conftest.py builds it), or pass --folder")
    bench = make_bench(src, dest.parent / "work")
    build(ENGINES["gptq"], variant_of(src, 'format = "gptq"\nbits = 4\ngroup_size = 64'), bench, dest)
    return dest


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(p || q) per position, from logits."""
    def logsm(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = logsm(p_logits), logsm(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, help="a GPTQ output folder (default: tiny Llama, built here)")
    ap.add_argument("--source", type=Path, help="its unquantized source (default with --folder: none)")
    ap.add_argument("--venv", type=Path, default=CACHE.parent / "venv-autogptq")
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="quantkit-autogptq-"))
    folder = (a.folder or build_tiny_gptq(tmp / "gptq")).resolve()
    source = a.source or (None if a.folder else CACHE / "tiny-llama-v1")
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    ids = np.random.default_rng(0).integers(3, vocab, size=(2, a.tokens))
    ids[:, 0] = 1  # BOS
    np.save(tmp / "ids.npy", ids)
    py = ensure_venv(a.venv)
    res = subprocess.run([str(py), "-c", CHILD, str(folder), str(tmp / "ids.npy"), str(tmp / "ag.npy")],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"AutoGPTQ could not load {folder}:\n{res.stderr[-3000:]}")
    info = json.loads(res.stdout.strip().splitlines()[-1])
    from quantkit.engines import _gptqmodel as gm
    from quantkit.hfmodel import hf_logits

    with gm.open_quantized(folder, "cpu") as fn:
        ours = np.concatenate([fn(row) for row in ids])
    theirs = np.load(tmp / "ag.npy")
    top1 = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
    between = kl(ours, theirs)
    print(f"folder: {folder}")
    print(f"AutoGPTQ {info['auto_gptq']} (transformers {info['transformers']}, torch {info['torch']}, "
          f"kernel {info['qlinear']}) loaded it on CPU")
    if not info["embedding_loaded"]:
        raw = np.load(tmp / "ag-as-loaded.npy")
        print(f"tied embeddings: AutoGPTQ left embed_tokens/lm_head at zero (its CPU loader does this to "
              f"every tied model); as loaded: KLD {kl(ours, raw):.2e}, top-1 agreement "
              f"{float((ours.argmax(-1) == raw.argmax(-1)).mean()):.4f}. With the embedding put back from "
              f"the same file:")
    print(f"AutoGPTQ vs transformers {__import__('transformers').__version__} + GPTQModel on {ours.shape[0]} "
          f"positions: KLD {between:.2e}, max |logit diff| {np.abs(ours - theirs).max():.4f}, "
          f"top-1 agreement {top1:.4f}")
    if source is None:
        return
    with hf_logits(source) as fn:
        ref = np.concatenate([fn(row) for row in ids])
    quant = kl(ref, ours)
    print(f"for scale: KLD of the quantized model to its source {quant:.2e}; AutoGPTQ's reading differs "
          f"from transformers' by {100 * between / quant:.2f} % of that")
    if between > 0.05 * quant:
        raise SystemExit("AutoGPTQ does not read the checkpoint the way transformers does")


if __name__ == "__main__":
    main()
