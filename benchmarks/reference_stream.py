"""The streamed reference against the whole-model one (issue 9, "quality unchanged").

Computes the demo recipe's reference log-probabilities twice, each in a fresh process: the
way quantkit did before (whole model in float32, chunk by chunk) and the way it does now
(quantkit.streaming: one block at a time). Prints the largest difference, both perplexities,
the seconds and the peak RssAnon of each process.

Usage: python benchmarks/reference_stream.py [--model DIR] [--tokens 4096] [--ctx 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from quantkit.testing import smollm2, table

MODES = ("whole", "streamed")


def child(mode: str, model: Path, tokens: int, ctx: int, out: Path) -> None:
    """Runs in its own process so that its peak memory is its own."""
    from transformers import AutoTokenizer

    from quantkit.calibration import build_calibration
    from quantkit.evaluate import compute_reference, make_eval_set, streamed_rows
    from quantkit.hfmodel import hf_logits
    from quantkit.recipe import parse_recipe

    recipe = parse_recipe(f'[model]\nsource = "{model}"\n[calibration]\nsamples = 32\nseq_len = 512\n'
                          '[[variants]]\nformat = "gguf"\nquant = "Q8_0"\n', check_source=False)
    tok = AutoTokenizer.from_pretrained(model)
    es = make_eval_set(tok, build_calibration(recipe, tok).eval_texts, tokens, ctx)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            status = open("/proc/self/status").read()
            peak[0] = max(peak[0], int(status.split("RssAnon:")[1].split()[0]) * 1024)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    if mode == "whole":
        with hf_logits(model) as fn:
            ref = compute_reference(es, fn, out / "ref.npy")
    else:
        ref = compute_reference(es, streamed_rows(es, model), out / "ref.npy")
    seconds = time.perf_counter() - t0
    stop.set()
    (out / "result.json").write_text(json.dumps({"ppl": ref.ppl, "seconds": seconds, "peak_anon": peak[0],
                                                 "chunks": len(es.chunks), "scored": es.n_scored}))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), Path(sys.argv[6]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args()
    model = args.model or smollm2()
    results, refs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            out = Path(tmp) / mode
            out.mkdir()
            subprocess.run([sys.executable, __file__, "--child", mode, str(model), str(args.tokens), str(args.ctx),
                            str(out)], check=True, stdout=subprocess.DEVNULL)
            results[mode] = json.loads((out / "result.json").read_text())
            refs[mode] = np.load(out / "ref.npy").astype(np.float32)
    diff = float(np.abs(refs["whole"] - refs["streamed"]).max())
    top1 = float((refs["whole"].argmax(-1) == refs["streamed"].argmax(-1)).mean())
    r = results["whole"]
    print(f"\n{model.name}: {r['chunks']} chunks of {args.ctx} tokens, {r['scored']} scored positions\n")
    print(table(["reference", "PPL", "seconds", "peak RssAnon GB"],
                [[m, f"{results[m]['ppl']:.4f}", f"{results[m]['seconds']:.1f}",
                  f"{results[m]['peak_anon'] / 1e9:.2f}"] for m in MODES]))
    print(f"\nmax |Δ log-prob| {diff:.2e}, top-1 agreement {100 * top1:.2f} %, "
          f"PPL ratio {results['streamed']['ppl'] / r['ppl']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
