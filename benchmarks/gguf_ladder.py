"""The GGUF ladder on SmolLM2-135M-Instruct with German held-out text (issue 4, "Must show").

1. Wall time: quantkit's GGUF engine (convert once, imatrix once, every type in parallel
   up to cores/RAM, each file read back and checked) against the same work by hand
   (the converter, llama-imatrix, then llama-quantize type after type), in one run. With
   --rounds 2 the order alternates (hand, quantkit, quantkit, hand) so load from other
   processes falls on both.
2. Quality of every type: size, bits per weight, PPL, ΔPPL %, KLD and top-1 agreement
   against the unquantized HF model (quantkit.evaluate, the same chunks for every format),
   evaluated through llama-cpp-python; plus KLD with and without the German imatrix.

Needs the toolchain and bindings: `quantkit toolchain`.
Usage: python benchmarks/gguf_ladder.py [--out DIR] [--eval-tokens 8192] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from quantkit.testing import smollm2, table
from quantkit.testing.engine_bench import timed_context

TYPES = ["F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0",
         "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_XS", "IQ3_M", "IQ2_M"]
NO_IMATRIX = ["Q2_K", "Q3_K_M", "Q4_K_M"]  # also built without the imatrix, to show its gain
KLD_ORDER = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def setup(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """Recipe, plan (the variants), tokenizer, calibration set, source: as `quantkit build` makes them."""
    from transformers import AutoTokenizer

    from quantkit.calibration import build_calibration
    from quantkit.pipeline import resolve_source
    from quantkit.plan import make_plan
    from quantkit.recipe import parse_recipe

    q = ", ".join(f'"{t}"' for t in args.types)
    nq = ", ".join(f'"{t}"' for t in args.no_imatrix)
    text = (f'[model]\nsource = "{args.model}"\nname = "SmolLM2-135M-Instruct"\n'
            f'[calibration]\nsamples = {args.calib_samples}\nseq_len = {args.calib_seq_len}\n'
            f'[evaluation]\ntokens = {args.eval_tokens}\nctx = {args.ctx}\n'
            f'[[variants]]\nformat = "gguf"\nquant = [{q}]\nimatrix = true\n'
            + (f'[[variants]]\nformat = "gguf"\nquant = [{nq}]\nimatrix = false\n' if nq else ""))
    recipe = parse_recipe(text, check_source=False)
    plan = make_plan(recipe, args.out / "quantkit")
    tok = AutoTokenizer.from_pretrained(args.model)
    return plan, tok, build_calibration(recipe, tok), resolve_source(recipe)


def _span(events: list, prefix: str) -> float:
    ts = [t for task, _, _, t in events if task.startswith(prefix)]
    return max(ts) - min(ts) if ts else 0.0


# ---------------------------------------------------------------- the two ways to build the ladder


def run_quantkit(plan: Any, source: Any, calib: Any, work: Path, out: Path) -> dict[str, Any]:
    """The engine as a build runs it: its shared steps once (convert, imatrix), then each type."""
    from quantkit.engines.gguf import GGUFEngine
    from quantkit.errors import EngineError

    events: list = []
    ctx = timed_context(source, calib, work, events)
    eng = GGUFEngine()
    t0 = time.perf_counter()
    made: dict[str, Any] = {}
    for step in eng.shared_steps(plan.variants):
        made[step.key] = step.run(ctx, {k: made[k] for k in step.deps})
    notes, failed = {}, {}
    for v in plan.variants:
        try:
            notes[v.name] = eng.build(v, ctx, out / v.name, {k: made[k] for k in eng.needs(v, plan.variants)})
        except EngineError as e:
            failed[v.name] = str(e)
    total = time.perf_counter() - t0
    convert, imatrix = _span(events, "convert"), _span(events, "importance matrix")
    return {"total": total, "convert": convert, "imatrix": imatrix, "quantize": total - convert - imatrix,
            "failed": failed, "notes": notes}


def _timed(cmd: list[str], **kw: Any) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t0


def run_by_hand(plan: Any, ctx: Any, out: Path) -> dict[str, Any]:
    """What a user types: convert, imatrix on the same text and settings, then each type serially."""
    from quantkit import toolchain as llamacpp
    from quantkit.engines import gguf

    tc = llamacpp.find_toolchain()
    out.mkdir(parents=True)
    btype = gguf.base_type(ctx.source.path)
    base = out / f"model.{btype}.gguf"
    text = ctx.calib.write_text(out / "calibration.txt")
    n_ctx = gguf.imatrix_ctx(int(ctx.calib.windows.size))
    threads = str(gguf.llama_threads())
    t = {"convert": _timed([sys.executable, str(tc.converter), str(ctx.source.path), "--outtype",
                            btype.lower(), "--outfile", str(base)], env=tc.converter_env())}
    t["imatrix"] = _timed([str(tc.imatrix), "-m", str(base), "-f", str(text), "-o", str(out / "imatrix.gguf"),
                           "-c", str(n_ctx), "-b", str(n_ctx), "-t", threads, "--no-ppl",
                           "--output-frequency", "1000000", "-ngl", "0"])
    t["quantize"] = 0.0
    for v in plan.variants:
        quant = v.params.quant
        im = ["--imatrix", str(out / "imatrix.gguf")] if v.params.imatrix and quant not in gguf.NO_IMATRIX_USE else []
        t["quantize"] += _timed([str(tc.quantize), *im, str(base), str(out / f"{v.name}.gguf"), quant, threads])
    t["total"] = t["convert"] + t["imatrix"] + t["quantize"]
    return t


def timing_rounds(plan: Any, source: Any, calib: Any, args: argparse.Namespace) -> tuple[list[dict], list[dict], Path]:
    hand, qk, last_qk = [], [], args.out / "quantkit"
    for r in range(args.rounds):
        order = ("hand", "quantkit") if r % 2 == 0 else ("quantkit", "hand")
        for who in order:
            d = args.out / f"round{r}" / who
            shutil.rmtree(d, ignore_errors=True)
            log(f"round {r}: {who} ...")
            if who == "hand":
                hand.append(run_by_hand(plan, timed_context(source, calib, d / "work"), d))
                log(f"  by hand {hand[-1]['total']:.1f} s")
            else:
                qk.append(run_quantkit(plan, source, calib, d / "work", d / "variants"))
                log(f"  quantkit {qk[-1]['total']:.1f} s, failed: {qk[-1]['failed'] or 'none'}")
                last_qk = d
    return hand, qk, last_qk


# ---------------------------------------------------------------- quality


def evaluate_all(plan: Any, source: Any, calib: Any, tok: Any, qk_dir: Path, args: argparse.Namespace) -> dict:
    from quantkit.records import bits_per_weight, file_entries
    from quantkit.engines.gguf import GGUFEngine
    from quantkit.evaluate import compute_reference, make_eval_set, score
    from quantkit.hfmodel import hf_logits

    es = make_eval_set(tok, calib.eval_texts, args.eval_tokens, args.ctx)
    log(f"reference: {len(es.chunks)} chunks of {es.ctx} tokens ({es.n_scored} scored)")
    with hf_logits(source.path) as fn:
        ref = compute_reference(es, fn, args.out / f"reference-{es.sha256[:12]}.npy")
    eng, ctx, rows = GGUFEngine(), timed_context(source, calib, qk_dir / "work"), {}
    for v in plan.variants:
        folder = qk_dir / "variants" / v.name
        if not folder.is_dir():
            continue
        t0 = time.perf_counter()
        with eng.open_model(folder, ctx) as fn:
            q = score(es, ref, fn)
        files = file_entries(folder)
        rows[v.name] = {"quant": v.params.quant, "imatrix": v.params.imatrix, "bytes": sum(f.size for f in files),
                        "bpw": bits_per_weight(files, source.n_params), **q.as_dict(),
                        "eval_seconds": round(time.perf_counter() - t0, 1)}
        log(f"  {v.name}: KLD {q.kld:.5f}  ΔPPL {q.delta_ppl_pct:+.2f} %")
    return {"ref_ppl": ref.ppl, "tokens": es.n_scored, "rows": rows}


# ---------------------------------------------------------------- report


def report(quality: dict, hand: list[dict], qk: list[dict], args: argparse.Namespace) -> list[str]:
    rows, notes = quality["rows"], qk[-1]["notes"]
    print(f"\nSmolLM2-135M-Instruct, German held-out text: {quality['tokens']} scored tokens, "
          f"ctx {args.ctx}, reference PPL {quality['ref_ppl']:.3f} (HF float32)\n")
    body = [[r["quant"] + ("" if r["imatrix"] or r["quant"] in ("F16", "BF16") else " (no imatrix)"),
             f"{r['bytes'] / 2**20:.1f} MiB", f"{r['bpw']:.2f}", f"{r['ppl']:.3f}", f"{r['delta_ppl_pct']:+.2f}",
             f"{r['kld']:.5f}", f"{100 * r['top1']:.1f} %", f"{notes[name].quantize_seconds:.1f}"]
            for name, r in rows.items()]
    print(table(["type", "size", "bpw", "PPL", "ΔPPL %", "KLD", "top-1", "quantize s"], body))
    checks = []
    klds = [rows[f"gguf-{t}"]["kld"] for t in KLD_ORDER if f"gguf-{t}" in rows]
    ok = len(klds) == len(KLD_ORDER) and all(a < b for a, b in zip(klds, klds[1:]))
    checks.append(f"{'PASS' if ok else 'FAIL'} KLD order {' < '.join(KLD_ORDER)}: "
                  + " < ".join(f"{k:.5f}" for k in klds))
    im_rows = []
    for t in args.no_imatrix:
        w, wo = rows.get(f"gguf-{t}"), rows.get(f"gguf-{t}-noimatrix")
        if w and wo:
            gain = 100 * (1 - w["kld"] / wo["kld"])
            im_rows.append([t, f"{wo['kld']:.5f}", f"{w['kld']:.5f}", f"{gain:.1f} %",
                            f"{wo['delta_ppl_pct']:+.2f}", f"{w['delta_ppl_pct']:+.2f}"])
            if t in ("Q2_K", "Q3_K_M"):
                checks.append(f"{'PASS' if gain >= 15 else 'FAIL'} imatrix lowers {t} KLD by {gain:.1f} % (>= 15 %)")
    print("\nGerman importance matrix vs none (same type):\n")
    print(table(["type", "KLD no imatrix", "KLD imatrix", "KLD lower by", "ΔPPL % no im.", "ΔPPL % im."], im_rows))
    print("\nWall time of the ladder (convert + imatrix + every type):\n")
    t_rows = [[f"by hand #{i}", f"{h['convert']:.1f}", f"{h['imatrix']:.1f}", f"{h['quantize']:.1f}",
               f"{h['total']:.1f}"] for i, h in enumerate(hand)]
    t_rows += [[f"quantkit #{i}", f"{q['convert']:.1f}", f"{q['imatrix']:.1f}", f"{q['quantize']:.1f}",
                f"{q['total']:.1f}"] for i, q in enumerate(qk)]
    print(table(["run", "convert s", "imatrix s", "quantize s (+checks)", "total s"], t_rows))
    ratio = sum(q["total"] for q in qk) / sum(h["total"] for h in hand)
    checks.append(f"{'PASS' if ratio <= 1.1 else 'FAIL'} quantkit / by hand = {ratio:.3f} (target <= 1.1)")
    print("\n" + "\n".join(checks))
    return checks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="HF folder (default: SmolLM2 built offline)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/quantkit-gguf-ladder"))
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--no-imatrix", nargs="*", default=NO_IMATRIX)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    args.model = args.model or smollm2()
    args.out.mkdir(parents=True, exist_ok=True)
    plan, tok, calib, source = setup(args)
    log(f"{len(plan.variants)} variants; calibration {calib.windows.shape} from {calib.source}; "
        f"{os.cpu_count()} cores, llama.cpp threads {os.environ.get('QUANTKIT_THREADS', 'all')}")
    for f in source.path.glob("*.safetensors"):  # both runs start from a warm page cache
        f.read_bytes()
    hand, qk, last = timing_rounds(plan, source, calib, args)
    quality = evaluate_all(plan, source, calib, tok, last, args)
    checks = report(quality, hand, qk, args)
    (args.out / "results.json").write_text(json.dumps(
        {"quality": quality, "hand": hand, "quantkit": [{k: v for k, v in q.items()} for q in qk],
         "checks": checks}, indent=1, default=str))
    log(f"results in {args.out / 'results.json'}")
    return 0 if all(c.startswith("PASS") for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
