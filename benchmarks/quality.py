"""GPTQ / AWQ quality on SmolLM2-135M-Instruct with German held-out text (issue 3, item 7).

Rows (group size 64: 128 does not divide SmolLM2's width 576):
  rtn-4bit-64g       plain round-to-nearest (GPTQModel's RTN mode, no calibration): the baseline
  gptq-4bit-64g      quantkit's GPTQ engine, German calibration (the shipped sample)
  gptq-4bit-64g-en   the same, calibrated on English text (licence files from site-packages)
  gptq-4bit-32g      German calibration
  gptq-8bit-64g      German calibration
  direct-4bit-64g    GPTQModel called directly, the same German windows and settings
  awq-4bit-64g       quantkit's AWQ engine (about 28 min on 2 CPU cores: --awq; on by default on CUDA)

Each row is quantized in its own process (its seconds and peak RSS are its own), reloaded
through transformers and scored with quantkit.evaluate against the unquantized model.
Results are kept in --out; a re-run skips rows already measured (--fresh redoes them).

Usage: python benchmarks/quality.py [--awq] [--samples 128] [--seq-len 512] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

from quantkit.testing import packed_sha, smollm2, table

ROOT = Path(__file__).resolve().parent.parent

# name -> (kind, bits, group size, calibration); GPTQ rows use act_order, damp 0.1, sym.
ROWS: dict[str, tuple[str, int, int, str]] = {
    "rtn-4bit-64g": ("rtn", 4, 64, "-"),
    "gptq-4bit-64g": ("gptq", 4, 64, "de"),
    "gptq-4bit-64g-en": ("gptq", 4, 64, "en"),
    "gptq-4bit-32g": ("gptq", 4, 32, "de"),
    "gptq-8bit-64g": ("gptq", 8, 64, "de"),
    "direct-4bit-64g": ("direct", 4, 64, "de"),
    "awq-4bit-64g": ("awq", 4, 64, "de"),
}
DAMP = 0.1
BATCH = 4  # GPTQModel's quantize batch size, the same for quantkit and the direct call


# ---------------------------------------------------------------- calibration sets


def english_text(dest: Path) -> Path:
    """Unique paragraphs of the licence texts installed in site-packages: English, offline."""
    site = Path(sysconfig.get_paths()["purelib"])
    files = sorted({*site.glob("*.dist-info/licenses/**/*"), *site.glob("*.dist-info/LICENSE*")})
    paras: dict[str, None] = {}
    for f in files:
        if f.is_file():
            for p in f.read_text(encoding="utf-8", errors="ignore").split("\n\n"):
                if len(p.strip()) > 40:
                    paras[p.strip()] = None
    dest.write_text("\n\n".join(paras), encoding="utf-8")
    return dest


def make_calibration(model: Path, out: Path, samples: int, seq_len: int) -> dict[str, Any]:
    """German and English sets with the same template, window count and length."""
    from transformers import AutoTokenizer

    from quantkit.calibration import build_calibration
    from quantkit.recipe import parse_recipe

    tok = AutoTokenizer.from_pretrained(str(model))

    def recipe(dataset: str, n: int) -> Any:
        ds = f'dataset = "{dataset}"\n' if dataset else ""
        return parse_recipe(f'[model]\nsource = "{model}"\n[calibration]\n{ds}samples = {n}\n'
                            f'seq_len = {seq_len}\n[[variants]]\nformat = "gptq"\n', check_source=False)

    de = build_calibration(recipe("", samples), tok)
    en = build_calibration(recipe(str(english_text(out / "english.txt")), len(de.windows)), tok)
    if len(en.windows) < len(de.windows):
        raise SystemExit(f"only {len(en.windows)} English windows for {len(de.windows)} German ones")
    for name, c in (("de", de), ("en", en)):
        (out / f"calib-{name}.pkl").write_bytes(pickle.dumps(c))
    return {"de": de, "en": en}


# ---------------------------------------------------------------- one row (child process)


def quantize_row(name: str, model: Path, out: Path, device: str, awq_samples: int | None) -> dict[str, Any]:
    """Runs in a child process: quantize one row into out/<name>/, return its timing."""
    kind, bits, gs, lang = ROWS[name]
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    calib = pickle.loads((out / f"calib-{lang}.pkl").read_bytes()) if lang != "-" else None
    if kind == "awq" and awq_samples:  # AWQ's CPU time grows with the calibration tokens
        calib = dataclasses.replace(calib, windows=calib.windows[:awq_samples])
    t0 = time.perf_counter()
    if kind == "direct":
        direct_gptqmodel(model, folder, calib.examples(), bits, gs, device)
    elif kind == "rtn":
        from quantkit.engines import _gptqmodel as gm

        gm.run(gm.QuantJob("rtn", model, "RTNConfig", {"bits": bits, "group_size": gs, "sym": True},
                           None, device), folder, lambda *a: None, out / f"{name}.gptqmodel.log")
    else:
        quantkit_engine(kind, model, folder, calib, bits, gs, device, out)
    seconds = time.perf_counter() - t0
    res = {"seconds": seconds, "windows": len(calib.windows) if calib else 0}
    try:
        import torch

        if torch.cuda.is_available():
            res["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    except ImportError:
        pass
    return res


def direct_gptqmodel(model: Path, folder: Path, examples: list, bits: int, gs: int, device: str) -> None:
    """GPTQModel as its README shows it: no quantkit code on this path."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(len(os.sched_getaffinity(0))))
    import torch
    from gptqmodel import GPTQModel
    from gptqmodel.quantization import GPTQConfig

    cfg = GPTQConfig(bits=bits, group_size=gs, desc_act=True, sym=True, damp_percent=DAMP,
                     true_sequential=True)
    # The compute dtype quantkit uses for this bf16 model: fp16 matmuls are very slow on CPUs.
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    m = GPTQModel.load(str(model), cfg, device=device, dtype=dtype)
    m.quantize(examples, batch_size=BATCH)
    m.save(str(folder))


def quantkit_engine(kind: str, model: Path, folder: Path, calib: Any, bits: int, gs: int,
                    device: str, out: Path) -> None:
    from quantkit.engines import ENGINES
    from quantkit.records import BuildContext, SourceModel
    from quantkit.plan import make_plan
    from quantkit.recipe import parse_recipe

    body = f"bits = {bits}\ngroup_size = {gs}" + (f"\ndamp = {DAMP}\nact_order = true" if kind == "gptq" else "")
    recipe = parse_recipe(f'[model]\nsource = "{model}"\n[[variants]]\nformat = "{kind}"\n{body}\n',
                          check_source=False)
    variant = make_plan(recipe).variants[0]
    ctx = BuildContext(SourceModel(str(model), model, "local", "bench", 0, "LlamaForCausalLM"),
                       calib, out / "work", device, lambda *a: None)
    ENGINES[kind].build(variant, ctx, folder, {})


def run_child(name: str, model: Path, out: Path, device: str, awq_samples: int | None) -> dict[str, Any]:
    """Quantize a row in a fresh process; its rusage gives the peak RSS."""
    cmd = [sys.executable, __file__, "--row", name, "--model", str(model), "--out", str(out),
           "--device", device, *(["--awq-samples", str(awq_samples)] if awq_samples else [])]
    log = open(out / f"{name}.log", "w")  # noqa: SIM115
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if p.returncode != 0:
        tail = (out / f"{name}.log").read_text(errors="replace")[-2000:]
        raise SystemExit(f"{name} failed (exit {p.returncode}):\n{tail}")
    res = json.loads((out / f"{name}.result.json").read_text())
    res["peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux reports KiB
    return res


# ---------------------------------------------------------------- evaluation (parent)


def evaluate_rows(names: list[str], model: Path, out: Path, device: str, eval_tokens: int,
                  ctx: int, results: dict[str, dict]) -> None:
    from transformers import AutoTokenizer

    from quantkit.engines import ENGINES
    from quantkit.engines import _gptqmodel as gm
    from quantkit.records import bits_per_weight, file_entries
    from quantkit.evaluate import compute_reference, make_eval_set, score
    from quantkit.hfmodel import hf_logits
    from quantkit.pipeline import count_params

    de = pickle.loads((out / "calib-de.pkl").read_bytes())
    tok = AutoTokenizer.from_pretrained(str(model))
    es = make_eval_set(tok, de.eval_texts, eval_tokens, ctx)
    ref_dtype = "bfloat16" if device == "cuda" else "float32"
    with hf_logits(model, dtype=ref_dtype, device=device) as fn:
        ref = compute_reference(es, fn, out / f"reference-{es.sha256[:12]}-{ref_dtype}.npy")
    n_params = count_params(model)
    for name in names:
        r = results[name]
        if "kld" in r and r.get("eval_sha") == es.sha256:
            continue
        folder = out / name
        engine = ENGINES["awq" if ROWS[name][0] == "awq" else "gptq"]
        t0 = time.perf_counter()
        with gm.open_quantized(folder, device, out / f"{name}.eval.log") as fn:
            q = score(es, ref, fn)
        files = file_entries(folder)
        weights = sum(f.size for f in files if f.path.endswith(".safetensors"))
        r.update(q.as_dict(), tokens=q.tokens, eval_sha=es.sha256, eval_seconds=time.perf_counter() - t0,
                 weight_bytes=weights, bpw=bits_per_weight(files, n_params), engine=engine.name,
                 packed_sha256=packed_sha(folder))
        (out / f"{name}.result.json").write_text(json.dumps(r, indent=2))
        print(f"{name}: ΔPPL {q.delta_ppl_pct:+.2f} %  KLD {q.kld:.4f}  top-1 {q.top1:.3f}", flush=True)


def report(results: dict[str, dict], calib: dict[str, Any], device: str) -> str:
    rows = []
    for name, r in results.items():
        kind, bits, gs, lang = ROWS[name]
        label = {"de": "German", "en": "English", "-": "none"}[lang]
        rows.append([name, f"{label} ({r['windows']} w)" if r.get("windows") else label,
                     f"{r['weight_bytes'] / 2**20:.1f}", f"{r['bpw']:.2f}", f"{r['delta_ppl_pct']:+.2f}",
                     f"{r['kld']:.4f}", f"{r['top1']:.3f}", f"{r['seconds']:.0f}",
                     f"{r['peak_rss_bytes'] / 2**30:.2f}"])
    de = calib["de"]
    lines = [f"SmolLM2-135M-Instruct, device {device}; calibration {len(de.windows)} x "
             f"{de.windows.shape[1]} tokens; evaluation: German held-out text, "
             f"{next(iter(results.values()))['tokens']} scored tokens, reference PPL "
             f"{next(iter(results.values()))['ref_ppl']:.2f}", "",
             table(["variant", "calibration", "weights MiB", "bpw", "ΔPPL %", "KLD", "top-1",
                    "seconds", "peak RSS GiB"], rows), ""]
    lines += checks(results)
    return "\n".join(lines)


def checks(r: dict[str, dict]) -> list[str]:
    """The issue's targets, each with its measured value."""
    out = []

    def have(*names: str) -> bool:
        return all(n in r for n in names)

    if have("gptq-4bit-64g", "rtn-4bit-64g"):
        g, rtn = r["gptq-4bit-64g"]["delta_ppl_pct"], r["rtn-4bit-64g"]["delta_ppl_pct"]
        verdict = ("met" if g / rtn <= 0.65 else "MISSED") if rtn > 0 else "not meaningful (RTN ΔPPL <= 0)"
        out.append(f"GPTQ 4bit-64g ΔPPL / RTN 4bit-64g ΔPPL = {g / rtn:.3f} (target <= 0.65): {verdict}; "
                   f"KLD ratio {r['gptq-4bit-64g']['kld'] / r['rtn-4bit-64g']['kld']:.3f}")
    if have("awq-4bit-64g", "rtn-4bit-64g"):
        a, rtn = r["awq-4bit-64g"], r["rtn-4bit-64g"]
        out.append(f"AWQ 4bit-64g ΔPPL / RTN 4bit-64g ΔPPL = {a['delta_ppl_pct'] / rtn['delta_ppl_pct']:.3f}; "
                   f"KLD {a['kld']:.4f} vs RTN {rtn['kld']:.4f}")
    if have("gptq-8bit-64g"):
        d = r["gptq-8bit-64g"]["delta_ppl_pct"]
        out.append(f"GPTQ 8bit-64g ΔPPL = {d:+.3f} % (target |ΔPPL| < 1 %): {'met' if abs(d) < 1 else 'MISSED'}")
    if have("gptq-4bit-64g", "gptq-4bit-64g-en"):
        de, en = r["gptq-4bit-64g"]["kld"], r["gptq-4bit-64g-en"]["kld"]
        out.append(f"German KLD: German calibration {de:.4f} vs English {en:.4f} "
                   f"({en / de:.2f}x): {'met' if de < en else 'MISSED'}")
    if have("gptq-4bit-64g", "direct-4bit-64g"):
        a, b = r["gptq-4bit-64g"], r["direct-4bit-64g"]
        rel = abs(a["delta_ppl_pct"] - b["delta_ppl_pct"]) / abs(b["delta_ppl_pct"])
        same = a["packed_sha256"] == b["packed_sha256"]
        out.append(f"quantkit vs direct GPTQModel: ΔPPL {a['delta_ppl_pct']:+.2f} % vs {b['delta_ppl_pct']:+.2f} % "
                   f"({100 * rel:.2f} % relative, target <= 2 %): {'met' if rel <= 0.02 else 'MISSED'}; "
                   f"quantized tensors identical: {same}; seconds {a['seconds']:.0f} vs {b['seconds']:.0f}")
    return out


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="source checkpoint (default: SmolLM2-135M-Instruct, built offline)")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "bench-quality")
    ap.add_argument("--samples", type=int, default=128, help="calibration windows (at most what the sample holds)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--awq", action=argparse.BooleanOptionalAction, default=None,
                    help="include AWQ (default: only on CUDA; about 28 min on 2 CPU cores)")
    ap.add_argument("--awq-samples", type=int, help="AWQ on only the first N calibration windows")
    ap.add_argument("--only", nargs="*", choices=list(ROWS), help="measure only these rows")
    ap.add_argument("--fresh", action="store_true", help="re-measure rows already in --out")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: quantize one row in this process
    a = ap.parse_args()
    device = a.device if a.device != "auto" else _detect_device()
    if a.row:
        res = quantize_row(a.row, a.model, a.out, device, a.awq_samples)
        (a.out / f"{a.row}.result.json").write_text(json.dumps(res))
        return
    model = (a.model or smollm2()).resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    calib = make_calibration(model, a.out, a.samples, a.seq_len)
    awq = a.awq if a.awq is not None else device == "cuda"
    names = a.only or [n for n in ROWS if awq or ROWS[n][0] != "awq"]
    results: dict[str, dict] = {}
    for name in names:
        lang = ROWS[name][3]
        sha = calib[lang].sha256 if lang in calib else "-"
        prev = a.out / f"{name}.result.json"
        old = json.loads(prev.read_text()) if prev.is_file() and not a.fresh else {}
        # --awq-samples changes what the AWQ row is calibrated on: part of its key.
        limit = a.awq_samples if ROWS[name][0] == "awq" else None
        key = {"calib_sha256": sha, "device": device, "sample_limit": limit}
        if "peak_rss_bytes" in old and all(old.get(k) == v for k, v in key.items()):
            results[name] = old
            continue
        print(f"{name}: quantizing ...", flush=True)
        results[name] = {**run_child(name, model, a.out, device, a.awq_samples), **key}
        (a.out / f"{name}.result.json").write_text(json.dumps(results[name], indent=2))
        print(f"{name}: {results[name]['seconds']:.0f} s", flush=True)
    evaluate_rows(names, model, a.out, device, a.eval_tokens, a.ctx, results)
    text = report(results, calib, device)
    (a.out / "report.md").write_text(text + "\n")
    print("\n" + text)


def _detect_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
