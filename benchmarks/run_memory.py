"""Memory to run a variant, estimated (file + KV cache at 4k context + runtime buffers, the
cards' "Max RAM required" / VRAM column) against what the runtimes report on a real load:

- llama.cpp (through llama-cpp-python, n_ctx 4096): its logged model, KV and compute buffers,
  for SmolLM2-135M Q4_K_M and Q8_0 GGUF files built here;
- torch (transformers + GPTQModel on the CPU): the bytes of every parameter and buffer of a
  loaded GPTQ 4-bit model (2-layer SmolLM2), plus the same KV cache formula.

    python benchmarks/run_memory.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from quantkit.testing import smollm2, table
from quantkit.testing.engine_bench import timed_context

MIB = 1 << 20

# llama.cpp's load log: "CPU_Mapped model buffer size = 100.5 MiB", "CPU KV buffer size = 90 MiB",
# "CPU compute buffer size = 97.4 MiB" (names vary a little between versions: match loosely).
_BUF = re.compile(r"(?P<what>model buffer|KV buffer|compute buffer|output buffer)\s+size\s*=\s*(?P<mib>[\d.]+)\s*MiB")


def llama_buffers(path: Path, ctx: int) -> dict[str, float]:
    """Load the file as users do and read llama.cpp's own buffer report (bytes)."""
    from llama_cpp import Llama

    with tempfile.TemporaryFile(mode="w+") as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)  # llama.cpp logs from C to fd 2
        try:
            llm = Llama(model_path=str(path), n_ctx=ctx, n_batch=512, verbose=True)
            del llm
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        text = log.read()
    out: dict[str, float] = {}
    for m in _BUF.finditer(text):
        key = m.group("what").split()[0]
        out[key] = out.get(key, 0.0) + float(m.group("mib")) * MIB
    return out


def gguf_rows(model: Path, work: Path) -> list[list[object]]:
    from quantkit.engines.gguf import SPEC, GGUFEngine
    from quantkit.sizing import ModelShape, run_memory

    shape = ModelShape.from_config(json.loads((model / "config.json").read_text()))
    plan, calib, source = _plan(model, work / "gguf", 'format = "gguf"\nquant = ["Q4_K_M", "Q8_0"]\nimatrix = false')
    eng = GGUFEngine()
    ctx = timed_context(source, calib, work / "work")
    rows = []
    for v in plan.variants:
        path = eng.quantize(v, ctx, work / v.name).path
        got = llama_buffers(path, 4096)
        est = run_memory(path.stat().st_size, shape, SPEC.run_overhead(shape))
        measured = sum(got.values())
        rows.append([path.name, f"{path.stat().st_size / MIB:.1f}", f"{got.get('model', 0) / MIB:.1f}",
                     f"{got.get('KV', 0) / MIB:.1f} / {est.kv_cache / MIB:.1f}",
                     f"{(got.get('compute', 0) + got.get('output', 0)) / MIB:.1f} / {est.overhead / MIB:.1f}",
                     f"{measured / MIB:.1f}", f"{est.total / MIB:.1f}", f"{est.total / measured:.3f}"])
    return rows


def gptq_rows(model: Path, work: Path) -> list[list[object]]:
    """A GPTQ 4-bit load through transformers + GPTQModel on the CPU: the bytes torch holds for
    the model's parameters and buffers, against the weight files the estimate counts."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantkit.engines.gptq import SPEC, GPTQEngine
    from quantkit.sizing import ModelShape, run_memory

    shape = ModelShape.from_config(json.loads((model / "config.json").read_text()))
    plan, calib, source = _plan(model, work / "gptq", 'format = "gptq"\nbits = 4\ngroup_size = 64\nact_order = false')
    (v,) = plan.variants
    out = work / "gptq" / v.name
    out.mkdir(parents=True, exist_ok=True)
    GPTQEngine().build(v, timed_context(source, calib, work / "gptq-work"), out, {})
    m = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16, device_map="cpu")
    held = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
    files = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    est = run_memory(files, shape, SPEC.run_overhead(shape))
    return [[v.name, f"{files / MIB:.2f}", f"{held / MIB:.2f}", f"{files / held:.3f}",
             f"{est.kv_cache / MIB:.1f}", f"{est.overhead / MIB:.1f}", f"{est.total / MIB:.1f}"]]


def _plan(model: Path, work: Path, variant: str):
    from transformers import AutoTokenizer

    from quantkit.calibration import build_calibration
    from quantkit.pipeline import resolve_source
    from quantkit.plan import make_plan
    from quantkit.recipe import parse_recipe

    text = (f'[model]\nsource = "{model}"\nname = "SmolLM2-135M-Instruct"\n[calibration]\nsamples = 8\n'
            f'seq_len = 256\n[[variants]]\n{variant}\n')
    recipe = parse_recipe(text, check_source=False)
    tok = AutoTokenizer.from_pretrained(model)
    return make_plan(recipe, work / "plan"), build_calibration(recipe, tok), resolve_source(recipe)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="run-memory-"))
    rows = gguf_rows(smollm2(), work)
    print("llama.cpp, n_ctx 4096 (SmolLM2-135M; MiB; 'a / b' = llama.cpp / our formula)")
    print(table(["file", "file MiB", "model buffer", "KV", "compute+output", "llama.cpp total",
                 "estimate", "estimate / measured"], rows))
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(len(os.sched_getaffinity(0))))
    rows = gptq_rows(smollm2(layers=2), work)
    print("\ntransformers + GPTQModel, CPU (SmolLM2-135M, first 2 layers; MiB)")
    print(table(["variant", "weight files", "torch params+buffers", "files / torch", "KV at 4k (est.)",
                 "runtime overhead (stated)", "estimate"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
