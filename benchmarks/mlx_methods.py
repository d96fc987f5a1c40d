"""MLX methods on SmolLM2-135M-Instruct with German held-out text: which one to make the default.

Rows (MLX affine format, embeddings quantized as mlx_lm.convert does):
  rtn-4bit-64g    mlx_lm.convert (round to nearest): the baseline
  gptq-4bit-64g   GPTQModel GPTQ on the German calibration windows, repacked to MLX
  awq-4bit-64g    GPTQModel AWQ (GEMM) on the first --awq-samples windows, repacked to MLX
                  (GPTQModel's AWQ takes ~55 s a layer on 2 cores with all 78 windows)
  rtn-8bit-64g    mlx_lm.convert at 8 bits: near-lossless, checked against the source model

Every row is scored with quantkit.evaluate (the protocol of every format: PPL, KLD, top-1
against the unquantized float32 model) through the engine's torch scorer (weights from
mx.dequantize with float32 scales); one chunk of each row also goes through mlx_lm.load and
MLX's own forward (float32) to check that scorer (max |Δlogit|).

Results are kept in --out; a re-run skips rows already measured (--fresh redoes them).

Usage: python benchmarks/mlx_methods.py [--awq-samples 16] [--check-tokens 128] [--only ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.testing import smollm2, table

ROOT = Path(__file__).resolve().parent.parent

# name -> (method, bits, group size)
ROWS: dict[str, tuple[str, int, int]] = {
    "rtn-4bit-64g": ("rtn", 4, 64),
    "gptq-4bit-64g": ("gptq", 4, 64),
    "awq-4bit-64g": ("awq", 4, 64),
    "rtn-8bit-64g": ("rtn", 8, 64),
}
# GPTQModel patches printing (DESIGN.md §4): the report goes to a copy of the real stdout.
OUT = os.fdopen(os.dup(1), "w", buffering=1)


def say(*a: object) -> None:
    print(*a, file=OUT, flush=True)


def make_calibration(model: Path, out: Path, samples: int, seq_len: int) -> Any:
    from transformers import AutoTokenizer

    from quantkit.calibration import build_calibration
    from quantkit.recipe import parse_recipe

    cache = out / f"calib-de-{samples}x{seq_len}.pkl"
    if cache.is_file():
        return pickle.loads(cache.read_bytes())
    recipe = parse_recipe(f'[model]\nsource = "{model}"\n[calibration]\nsamples = {samples}\n'
                          f'seq_len = {seq_len}\n[[variants]]\nformat = "gptq"\n', check_source=False)
    calib = build_calibration(recipe, AutoTokenizer.from_pretrained(str(model)))
    cache.write_bytes(pickle.dumps(calib))
    return calib


def build_row(name: str, model: Path, out: Path, calib: Any, awq_samples: int) -> dict[str, Any]:
    from quantkit.records import BuildContext, SourceModel
    from quantkit.engines.mlx import MLXEngine, MLXParams
    from quantkit.plan import Variant

    method, bits, gs = ROWS[name]
    if method == "awq":
        calib = dataclasses.replace(calib, windows=calib.windows[:awq_samples])
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    ctx = BuildContext(SourceModel(str(model), model, "local", "bench", 0, "LlamaForCausalLM"),
                       calib, out / "work", "cpu", lambda *a: None)
    variant = Variant(name, "mlx", "bench/x", name, MLXParams(method=method, bits=bits, group_size=gs), 0)
    t0 = time.perf_counter()
    notes = MLXEngine().build(variant, ctx, folder, {}).note_dict()
    return {"seconds": time.perf_counter() - t0, "notes": notes,
            "windows": len(calib.windows) if method != "rtn" else 0}


def evaluate_row(name: str, model: Path, out: Path, es: Any, ref: Any, source_chunk: np.ndarray,
                 check_tokens: int, n_params: int) -> dict[str, Any]:
    from quantkit.records import bits_per_weight, file_entries
    from quantkit.engines.mlx import mlx_lm_logits, torch_scorer
    from quantkit.evaluate import score

    folder = out / name
    ids = es.chunks[0, :check_tokens]
    t0 = time.perf_counter()
    with torch_scorer(folder) as fn:
        q = score(es, ref, fn)
        mine = fn(ids)
    eval_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = mlx_lm_logits(folder, ids)
    files = file_entries(folder)
    return {**q.as_dict(), "tokens": q.tokens, "eval_sha": es.sha256, "eval_seconds": eval_s,
            "weight_bytes": sum(f.size for f in files if f.path.endswith(".safetensors")),
            "bpw": bits_per_weight(files, n_params),
            "mlx_check_seconds": time.perf_counter() - t0,
            "max_dlogit_mlx_vs_scorer": float(np.abs(mine - theirs).max()),
            "top1_mlx_vs_scorer": float((mine.argmax(-1) == theirs.argmax(-1)).mean()),
            "max_dlogit_vs_source": float(np.abs(mine - source_chunk).max())}


def report(results: dict[str, dict], calib: Any, awq_samples: int, check_tokens: int) -> str:
    rows = []
    for name, r in results.items():
        cal = f"German ({r['windows']} w)" if r["windows"] else "none"
        rows.append([name, cal, f"{r['weight_bytes'] / 2**20:.1f}", f"{r['bpw']:.3f}",
                     f"{r['delta_ppl_pct']:+.2f}", f"{r['kld']:.4f}", f"{r['top1']:.3f}",
                     f"{r['seconds']:.0f}", f"{r['max_dlogit_mlx_vs_scorer']:.2e}",
                     f"{r['max_dlogit_vs_source']:.3f}"])
    first = next(iter(results.values()))
    lines = [f"SmolLM2-135M-Instruct, MLX affine, CPU; calibration {len(calib.windows)} x "
             f"{calib.windows.shape[1]} German tokens (AWQ: first {awq_samples} windows); evaluation: "
             f"German held-out text, {first['tokens']} scored tokens, reference PPL {first['ref_ppl']:.2f} "
             "(float32)", "",
             table(["variant", "calibration", "weights MiB", "bpw", "ΔPPL %", "KLD", "top-1", "seconds",
                    f"max|Δlogit| mlx_lm vs scorer ({check_tokens} tok)",
                    f"max|Δlogit| vs source ({check_tokens} tok)"], rows), ""]
    rtn = results.get("rtn-4bit-64g")
    for name in ("gptq-4bit-64g", "awq-4bit-64g"):
        if rtn and name in results:
            ratio = results[name]["kld"] / rtn["kld"]
            lines.append(f"{name}: KLD / RTN KLD = {ratio:.3f} (cut {100 * (1 - ratio):.1f} %, target >= 25 %): "
                         f"{'met' if ratio <= 0.75 else 'MISSED'}")
    if "rtn-8bit-64g" in results:
        r = results["rtn-8bit-64g"]
        lines.append(f"rtn-8bit-64g vs source: ΔPPL {r['delta_ppl_pct']:+.3f} %, KLD {r['kld']:.5f}, "
                     f"max |Δlogit| {r['max_dlogit_vs_source']:.3f} on {check_tokens} tokens")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="source checkpoint (default: SmolLM2-135M-Instruct, built offline)")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "bench-mlx")
    ap.add_argument("--samples", type=int, default=128, help="calibration windows (at most what the sample holds)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--awq-samples", type=int, default=16, help="AWQ on only the first N windows (CPU time)")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--check-tokens", type=int, default=128,
                    help="tokens of the first chunk run through mlx_lm.load (MLX's CPU backend is slow)")
    ap.add_argument("--only", nargs="*", choices=list(ROWS))
    ap.add_argument("--fresh", action="store_true")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from quantkit.evaluate import compute_reference, hf_logits, make_eval_set
    from quantkit.pipeline import count_params

    model = (a.model or smollm2()).resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    calib = make_calibration(model, a.out, a.samples, a.seq_len)
    es = make_eval_set(AutoTokenizer.from_pretrained(str(model)), calib.eval_texts, a.eval_tokens, a.ctx)
    with hf_logits(model, dtype="float32") as fn:
        ref = compute_reference(es, fn, a.out / f"reference-{es.sha256[:12]}-float32.npy")
        source_chunk = fn(es.chunks[0, :a.check_tokens])
    n_params = count_params(model)
    results: dict[str, dict] = {}
    for name in a.only or list(ROWS):
        prev = a.out / f"{name}.result.json"
        old = json.loads(prev.read_text()) if prev.is_file() and not a.fresh else {}
        key = {"calib_sha256": calib.sha256, "awq_samples": a.awq_samples if ROWS[name][0] == "awq" else None,
               "eval_sha": es.sha256, "check_tokens": a.check_tokens}
        if "kld" in old and all(old.get(k) == v for k, v in key.items()):
            results[name] = old
            continue
        say(f"{name}: building ...")
        r = {**build_row(name, model, a.out, calib, a.awq_samples), **key}
        say(f"{name}: {r['seconds']:.0f} s; scoring ...")
        r.update(evaluate_row(name, model, a.out, es, ref, source_chunk, a.check_tokens, n_params))
        prev.write_text(json.dumps(r, indent=2, default=str))
        results[name] = r
        say(f"{name}: ΔPPL {r['delta_ppl_pct']:+.2f} %  KLD {r['kld']:.4f}  top-1 {r['top1']:.3f}  "
            f"mlx_lm vs scorer {r['max_dlogit_mlx_vs_scorer']:.2e}")
    text = report(results, calib, a.awq_samples, a.check_tokens)
    (a.out / "report.md").write_text(text + "\n")
    say("\n" + text)


if __name__ == "__main__":
    sys.exit(main())
