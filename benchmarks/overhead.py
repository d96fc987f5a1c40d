"""quantkit's wall-time overhead over GPTQModel called directly (issue 3, item 7).

One GPTQ variant of SmolLM2-135M-Instruct, the same settings and the same calibration
windows, in the same run:
  direct    a fresh process: the windows, then GPTQModel.load + quantize + save, nothing else
  quantkit  a fresh process: `quantkit build RECIPE` (calibration, quantize, reload and
            evaluate against the reference, size, card)
Compares the quantize step (GPTQModel load + quantize + save vs the engine's build step
from manifest.json) and the whole processes. --repeat N alternates the order N times and
reports the median.

Usage: python benchmarks/overhead.py [--samples 128] [--seq-len 512] [--repeat 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from quantkit.testing import packed_sha, smollm2, table

ROOT = Path(__file__).resolve().parent.parent

VARIANT = "gptq-{bits}bit-{gs}g-actorder_True"


def recipe_text(model: Path, samples: int, seq_len: int, bits: int, gs: int, eval_tokens: int) -> str:
    return f'''[model]
source = "{model}"
name = "smollm2-overhead"

[calibration]
samples = {samples}
seq_len = {seq_len}

[evaluation]
tokens = {eval_tokens}
ctx = 512

[[variants]]
format = "gptq"
bits = {bits}
group_size = {gs}
act_order = true
damp = 0.1
'''


def direct(recipe_path: Path, dest: Path, dtype_name: str) -> dict:
    """Child process: quantkit's calibration windows (data only), then GPTQModel as its README shows."""
    from transformers import AutoTokenizer

    from quantkit.calibration import build_calibration
    from quantkit.recipe import load_recipe

    recipe = load_recipe(recipe_path, check_source=False)
    spec = recipe.variants[0].params
    src = recipe.model.source
    calib = build_calibration(recipe, AutoTokenizer.from_pretrained(src))
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(len(os.sched_getaffinity(0))))
    import torch
    from gptqmodel import GPTQModel
    from gptqmodel.quantization import GPTQConfig

    t0 = time.perf_counter()  # imports count in the process wall time, as in quantkit's
    cfg = GPTQConfig(bits=spec.bits, group_size=spec.group_size, desc_act=spec.act_order, sym=spec.sym,
                     damp_percent=spec.damp, true_sequential=spec.true_sequential)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype_name == "auto":  # what quantkit computes in for this bf16 model (fp16 is slow on CPUs)
        dtype_name = "float16" if device == "cuda" else "bfloat16"
    m = GPTQModel.load(src, cfg, device=device, dtype=getattr(torch, dtype_name))
    m.quantize(calib.examples(), batch_size=4)
    m.save(str(dest))
    return {"quantize_seconds": time.perf_counter() - t0, "calib_sha256": calib.sha256, "dtype": dtype_name}


def quantkit_cli() -> list[str]:
    exe = Path(sys.executable).parent / "quantkit"
    return [str(exe)] if exe.is_file() else [sys.executable, "-c", "from quantkit.cli import main; main()"]


def timed(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}):\n{log.read_text(errors='replace')[-2000:]}")
    return time.perf_counter() - t0


def run_direct(recipe: Path, out: Path, i: int, dtype: str) -> dict:
    dest = out / f"direct-{i}"
    shutil.rmtree(dest, ignore_errors=True)
    res_file = out / f"direct-{i}.json"
    wall = timed([sys.executable, __file__, "--direct", str(recipe), "--dest", str(dest),
                  "--result", str(res_file), "--direct-dtype", dtype], out / f"direct-{i}.log")
    res = json.loads(res_file.read_text())
    return {**res, "wall": wall, "weights": packed_sha(dest, with_dtype=False)}


def run_quantkit(recipe: Path, out: Path, i: int, name: str) -> dict:
    dest = out / f"quantkit-{i}"
    shutil.rmtree(dest, ignore_errors=True)
    wall = timed([*quantkit_cli(), "build", str(recipe), "--out", str(dest)], out / f"quantkit-{i}.log")
    m = json.loads((dest / "manifest.json").read_text())
    v = m["variants"][name]
    return {"wall": wall, "quantize_seconds": v["seconds"], "calib_sha256": m.get("calibration", {}).get("sha256"),
            "weights": packed_sha(dest / name, with_dtype=False), "quality": v.get("quality")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "bench-overhead")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--direct-dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                    help="GPTQModel's compute dtype in the direct call (auto: quantkit's choice)")
    ap.add_argument("--eval-tokens", type=int, default=2048, help="quantkit build's [evaluation] tokens")
    ap.add_argument("--direct", type=Path, help=argparse.SUPPRESS)  # internal: the direct child
    ap.add_argument("--dest", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.direct:
        a.result.write_text(json.dumps(direct(a.direct, a.dest, a.direct_dtype)))
        return
    model = (a.model or smollm2()).resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    recipe = a.out / "recipe.toml"
    recipe.write_text(recipe_text(model, a.samples, a.seq_len, a.bits, a.group_size, a.eval_tokens))
    name = VARIANT.format(bits=a.bits, gs=a.group_size)
    runs: dict[str, list[dict]] = {"direct": [], "quantkit": []}
    for i in range(a.repeat):
        order = ["direct", "quantkit"] if i % 2 == 0 else ["quantkit", "direct"]
        for kind in order:
            print(f"run {i + 1}/{a.repeat}: {kind} ...", flush=True)
            r = run_direct(recipe, a.out, i, a.direct_dtype) if kind == "direct" else run_quantkit(recipe, a.out, i, name)
            runs[kind].append(r)
            print(f"  wall {r['wall']:.1f} s, quantize {r['quantize_seconds']:.1f} s", flush=True)
    print("\n" + report(runs, a))


def report(runs: dict[str, list[dict]], a: argparse.Namespace) -> str:
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("wall", "quantize_seconds")}
           for k, v in runs.items()}
    d, q = med["direct"], med["quantkit"]
    rows = [[f"GPTQModel direct ({runs['direct'][0]['dtype']})", f"{d['quantize_seconds']:.1f}", f"{d['wall']:.1f}", "-"],
            ["quantkit build", f"{q['quantize_seconds']:.1f}", f"{q['wall']:.1f}",
             f"{q['wall'] - q['quantize_seconds']:.1f}"]]
    same_calib = {r["calib_sha256"] for v in runs.values() for r in v}
    same_weights = {r["weights"] for v in runs.values() for r in v}
    qual = runs["quantkit"][0].get("quality") or {}
    return "\n".join([
        f"{VARIANT.format(bits=a.bits, gs=a.group_size)}, {a.samples} x {a.seq_len} calibration tokens requested, "
        f"median of {a.repeat} run(s), {os.cpu_count()} CPU cores", "",
        table(["run", "quantize s (load+quantize+save)", "process wall s", "other stages s"], rows), "",
        f"quantize step: quantkit / direct = {q['quantize_seconds'] / d['quantize_seconds']:.3f} "
        f"(overhead {100 * (q['quantize_seconds'] / d['quantize_seconds'] - 1):+.1f} %, target < 5 %)",
        f"whole process: quantkit build / direct = {q['wall'] / d['wall']:.3f} (quantkit build also "
        f"evaluates: reference + variant logits, sizes, card)",
        f"same calibration windows: {len(same_calib) == 1}; identical quantized tensors: {len(same_weights) == 1}",
        f"quantkit build quality: {qual}",
    ])


if __name__ == "__main__":
    main()
