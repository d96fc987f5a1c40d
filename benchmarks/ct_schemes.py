"""compressed-tensors schemes against GPTQModel's GPTQ on SmolLM2-135M-Instruct (issue 24).

Rows, each built by quantkit's own engine in its own process (its seconds and peak RSS are its
own), reloaded the way users load it and scored with quantkit.evaluate against the unquantized
model on the held-out German text of the shipped sample:

  gptq-4bit-{gs}g      GPTQModel GPTQ, act order, damp 0.1 (the gptq format): the baseline
  ct-w4a16-{gs}g       llm-compressor GPTQ (W4A16), act order ("weight"), damp 0.1, same windows
  ct-fp8-dynamic       W8A8-FP8 (FP8_DYNAMIC): data-free weights, per-token FP8 activations
  ct-nvfp4a16          NVFP4 weights, data-free
  ct-nvfp4             NVFP4 weights and activations, activation scales calibrated

Group size 64 by default: 128 does not divide SmolLM2's width 576 (llm-compressor refuses
it, GPTQModel's CPU kernel cannot run it; DESIGN §4). The model is the de-gridded copy by
default: the fixture's weights sit on a Q4_1 grid that flatters block-wise 4-bit types
(DESIGN §4, 2026-12-06); --plain uses the fixture as it is.

Usage: python benchmarks/ct_schemes.py [--layers 2] [--plain] [--group-size 64]
       [--samples 32] [--seq-len 512] [--rows ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ROWS = ("gptq-4bit", "ct-w4a16", "ct-fp8-dynamic", "ct-nvfp4a16", "ct-nvfp4")


def variant_body(row: str, gs: int) -> str:
    """The [[variants]] body of a row."""
    if row == "gptq-4bit":
        return f'format = "gptq"\nbits = 4\ngroup_size = {gs}\nact_order = true\ndamp = 0.1'
    if row == "ct-w4a16":
        return f'format = "compressed-tensors"\nscheme = "W4A16"\ngroup_size = {gs}\nact_order = true\ndamp = 0.1'
    scheme = {"ct-fp8-dynamic": "W8A8-FP8", "ct-nvfp4a16": "NVFP4A16", "ct-nvfp4": "NVFP4"}[row]
    return f'format = "compressed-tensors"\nscheme = "{scheme}"'


def model_path(args: argparse.Namespace) -> Path:
    from quantkit.testing import degridded_smollm2, smollm2

    return smollm2(args.layers) if args.plain else degridded_smollm2(args.layers)


def child(args: argparse.Namespace) -> None:
    """One row: build, reload, score; the result as JSON in --out/ROW.json."""
    from quantkit.engines import ENGINES
    from quantkit.testing.engine_bench import build, make_bench, quality, variant_of

    model = model_path(args)
    bench = make_bench(model, args.out / "work", samples=args.samples, seq_len=args.seq_len)
    v = variant_of(model, variant_body(args.row, args.group_size))
    folder = args.out / args.row
    t0 = time.perf_counter()
    notes = build(ENGINES[v.format], v, bench, folder)
    seconds = time.perf_counter() - t0
    q = quality(ENGINES[v.format], folder, bench)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    res = {"row": args.row, "variant": v.name, "bytes": weights, "seconds": seconds, "kld": q.kld,
           "kld_p999": q.kld_p999, "delta_ppl_pct": q.delta_ppl_pct, "top1": q.top1, "ppl": q.ppl,
           "ref_ppl": q.ref_ppl, "notes": dict(notes)}
    (args.out / f"{args.row}.json").write_text(json.dumps(res, indent=2))


def run_row(row: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", row, "--out", str(args.out), "--samples", str(args.samples),
           "--seq-len", str(args.seq_len), "--group-size", str(args.group_size)]
    cmd += ["--layers", str(args.layers)] if args.layers else []
    cmd += ["--plain"] if args.plain else []
    with open(args.out / f"{row}.log", "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own peak RSS
        p.returncode = rc = os.waitstatus_to_exitcode(status)
    res_file = args.out / f"{row}.json"
    if rc != 0 or not res_file.is_file():
        return {"row": row, "error": f"rc {rc}, see {args.out / (row + '.log')}"}
    res = json.loads(res_file.read_text())
    res["peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux reports KiB
    res_file.write_text(json.dumps(res, indent=2))
    return res


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from quantkit.testing import table

    base = next((r for r in results if r["row"] == "gptq-4bit" and "kld" in r), None)
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["row"], "-", "-", "-", "-", "-", "-", "-", r["error"]])
            continue
        vs = f"{r['kld'] / base['kld']:.2f}x" if base else "-"
        rows.append([r["variant"], f"{r['bytes'] / 1e6:.1f}", f"{r['kld']:.4f}", f"{r['kld_p999']:.3f}", vs,
                     f"{r['delta_ppl_pct']:+.2f}", f"{100 * r['top1']:.1f}", f"{r['seconds']:.0f}",
                     f"{r['peak_rss_bytes'] / 1e9:.2f}"])
    model = f"SmolLM2-135M-Instruct{f' ({args.layers} layers)' if args.layers else ''}" \
            f"{'' if args.plain else ', de-gridded'}"
    print(f"\n{model}; calibration {args.samples} x {args.seq_len} German tokens; held-out German text\n")
    print(table(["variant", "MB", "mean KLD", "p99.9 KLD", "KLD / GPTQ", "ΔPPL %", "top-1 %", "build s", "peak RSS GB"],
                rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="first N layers only (2: the CI cut)")
    ap.add_argument("--plain", action="store_true", help="the fixture as it is, not de-gridded")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS)
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "ct_schemes")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        args.row = args.child
        child(args)
        return
    model_path(args)  # build the cached model once, before the rows race for it
    results = []
    for row in args.rows:
        results.append(run_row(row, args))
        print(f"{row}: {json.dumps({k: v for k, v in results[-1].items() if k != 'notes'})}", flush=True)
    report(results, args)


if __name__ == "__main__":
    main()
