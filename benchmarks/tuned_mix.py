"""Tuned per-tensor GGUF mixes against llama.cpp's stock types of the same size, in one build
(same 16-bit GGUF, same German importance matrix), on held-out German text.

    python benchmarks/tuned_mix.py [--out DIR] [--budgets Q4_K_M Q3_K_M Q2_K] [--samples 32 --seq-len 512]

The model is the de-gridded SmolLM2-135M (quantkit.testing.degridded_smollm2). The SmolLM2
fixture was rebuilt from a Q4_1 GGUF: its weights sit on Q4_1's grid, so Q4_1 (and Q5_1, whose
grid nearly contains it) reproduce them almost exactly, and a mix that falls back to those
block-32 types wins for that reason alone. De-gridding adds seeded uniform noise of half a Q4_1
step per weight, so no type starts with the weights on its grid, and the candidates stay the ones
a real model gets (SmolLM2's 576-wide rows fall back from K-quants to Q4_0/Q5_0/Q5_1/Q8_0 as
llama.cpp does; the 1536-wide ffn_down rows take K-quants).

Prints:
1. per budget, stock type against tuned mix: file bytes, mean and p99.9 KLD, ΔPPL, same top-1
   (quantkit's scorer against the transformers model: what the cards show);
2. per tuned mix, the tensor classes that went up or down against the stock mix;
3. the rebuild check: the card's stock `llama-quantize` command over the published rules, the
   imatrix and the 16-bit GGUF gives the same bytes (sha256);
4. the cost: the allocator's extra time (sensitivity step, dry runs and allocation) against the
   ladder's own build time for the same types (conversion, imatrix, quantization);
5. the proxy against measured KLD: the build's calibration probes (one tensor class in one third
   of the layers at the probe type, everything else the 16-bit file's own, on calibration
   text); the Spearman rank correlation of the importance-weighted error with the measured
   increase of mean KLD.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.testing import degridded_smollm2, table
from quantkit.testing.engine_bench import plan_baseline, score_folder

BUDGETS = ["Q4_K_M", "Q3_K_M", "Q2_K"]
CLASSES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def recipe_text(model: Path, budgets: list[str], samples: int = 32, seq_len: int = 512) -> str:
    return (f'[model]\nsource = "{model}"\nname = "SmolLM2-135M-Instruct"\n'
            f'[calibration]\nsamples = {samples}\nseq_len = {seq_len}\n'
            '[evaluation]\ntokens = 4096\nctx = 512\nqa_items = 0\n'
            '[build]\nkeep_intermediate = true\n'
            f'[[variants]]\nformat = "gguf"\nquant = {json.dumps(budgets)}\n'
            f'[[variants]]\nformat = "gguf"\nmix = "tuned"\ntarget = {json.dumps(budgets)}\n')


def build(out: Path, budgets: list[str], samples: int, seq_len: int) -> tuple[Any, dict[str, float]]:
    """The build, and the seconds of each shared step."""
    from quantkit import pipeline
    from quantkit.events import StepDone
    from quantkit.plan import load_plan

    steps: dict[str, float] = {}

    def report(e: Any) -> None:
        if isinstance(e, StepDone):
            steps[e.key] = e.seconds

    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "recipe.toml"
    recipe.write_text(recipe_text(degridded_smollm2(), budgets, samples, seq_len))
    plan = load_plan(recipe, out / "build")
    res = pipeline.build(plan, report=report, preflight=False)
    if res.failed:
        sys.exit(f"build failed: {res.failed}")
    return plan, steps


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def rebuilds(folder: Path, notes: dict[str, Any], work: Path, where: Path) -> bool:
    """Run the card's command in an empty folder holding only what it names."""
    from quantkit.toolchain import find_toolchain

    argv = shlex.split(notes["rebuild"])
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    base = next(work.glob(f"gguf/base-*/{argv[-3]}"))
    (where / base.name).symlink_to(base)
    for name in (argv[argv.index("--tensor-type-file") + 1], argv[argv.index("--imatrix") + 1]):
        shutil.copy(folder / name, where / name)
    subprocess.run([str(find_toolchain().quantize), *argv[1:]], cwd=where, check=True, capture_output=True)
    return _sha(where / argv[-2]) == _sha(folder / argv[-2])


def quality_rows(plan: Any, manifest: Any, budgets: list[str]) -> list[list[str]]:
    rows = []
    for b in budgets:
        stock, tuned = manifest.variants[f"gguf-{b}"], manifest.variants[f"gguf-{b}_tuned"]
        for name, r in ((b, stock), (f"{b}_tuned", tuned)):
            q = r.quality
            rel = "" if r is stock else f"{tuned.size_bytes / stock.size_bytes:.4f}"
            krel = "" if r is stock else f"{q.kld / stock.quality.kld:.3f}"
            prel = "" if r is stock else f"{q.kld_p999 / stock.quality.kld_p999:.3f}"
            rows.append([name, f"{r.size_bytes:,}", rel, f"{q.kld:.5f}", krel, f"{q.kld_p999:.4f}", prel,
                         f"{q.delta_ppl_pct:+.2f} %", f"{100 * q.top1:.2f} %"])
    return rows


def cost(manifest: Any, steps: dict[str, float], budgets: list[str]) -> list[list[str]]:
    ladder = steps["gguf/base"] + steps["gguf/imatrix"] + sum(manifest.variants[f"gguf-{b}"].seconds for b in budgets)
    alloc = sum(manifest.variants[f"gguf-{b}_tuned"].notes["allocate_seconds"] for b in budgets)
    extra = steps["gguf/sensitivity"] + alloc
    return [["ladder: convert + imatrix + quantize", f"{ladder:.1f}", "1.00"],
            ["sensitivity step", f"{steps['gguf/sensitivity']:.1f}", f"{steps['gguf/sensitivity'] / ladder:.3f}"],
            ["dry runs + allocation (all budgets)", f"{alloc:.1f}", f"{alloc / ladder:.3f}"],
            ["allocator's extra time", f"{extra:.1f}", f"{extra / ladder:.3f}"]]


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (np.argsort(np.argsort(x)).astype(float) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def probe_rows(plan: Any) -> tuple[list[list[str]], float, float]:
    """The build's own probes (calibration text): the proxy's predicted error against the
    measured KLD increase; Spearman over all probes and the mean within a class."""
    from quantkit.engines.gguf.mix import Sensitivity

    sens = Sensitivity.load(next((plan.out_dir / ".work").glob("gguf/sensitivity-*/sensitivity.json")))
    rows = [[p.cls, f"{p.first}-{p.last}", f"{p.predicted:.4g}", f"{p.measured:.5f}", f"{p.scale:.3g}"]
            for p in sens.probes]
    pred, got = [p.predicted for p in sens.probes], [p.measured for p in sens.probes]
    within = [spearman([p.predicted for p in sens.probes if p.cls == c], [p.measured for p in sens.probes
                                                                         if p.cls == c])
              for c in dict.fromkeys(p.cls for p in sens.probes)]
    return rows, spearman(pred, got), float(np.nanmean(within))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/quantkit-tuned-mix"))
    ap.add_argument("--budgets", nargs="+", default=BUDGETS)
    # the calibration text (importance matrix, probes): the demo's 32 x 512 tokens by default;
    # the probes' cost is fixed, the ladder's imatrix grows with it (the recipe default: 128 x 4096)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    from quantkit.manifest import load_manifest

    plan, steps = build(args.out, args.budgets, args.samples, args.seq_len)
    m = load_manifest(plan.out_dir)
    base, ctx, _ = plan_baseline(plan)
    print(f"de-gridded SmolLM2-135M-Instruct, held-out German text: {base.eval_set.n_scored} scored tokens, "
          f"ctx {base.eval_set.ctx}; one build, one importance matrix\n")
    print(table(["file", "bytes", "× stock", "KLD mean", "× stock", "KLD p99.9", "× stock", "ΔPPL", "same top-1"],
                quality_rows(plan, m, args.budgets)))
    print("\nwhat each tuned mix changed against the stock mix (tensors up / down a type):")
    for b in args.budgets:
        n = m.variants[f"gguf-{b}_tuned"].notes
        print(f"- {b}_tuned: {n['mix_changes']} (predicted error {n['mix_predicted_error_vs_stock']}× stock's)")
    print("\nrebuilt by stock llama-quantize from the published rules, same sha256:")
    for b in args.budgets:
        v = next(x for x in plan.variants if x.name == f"gguf-{b}_tuned")
        ok = rebuilds(plan.variant_dir(v), m.variants[v.name].notes, plan.out_dir / ".work", args.out / "rebuild")
        print(f"- {b}_tuned: {'same bytes' if ok else 'DIFFERENT BYTES'}")
    print("\ncost, seconds (this machine, same build):")
    print(table(["", "seconds", "× ladder"], cost(m, steps, args.budgets)))
    from quantkit.engines.gguf import probes

    rows, rho, within = probe_rows(plan)
    lower = "".join(f", {cls} at {t}" for cls, t in probes.LOWER.items())
    print(f"\nthe proxy against measured ΔKLD: the build's probes (one class in one third of the layers at "
          f"{probes.LOW}{lower},\nthe rest as the 16-bit GGUF has them, scored by llama.cpp on calibration text "
          "against it):")
    print(table(["class", "layers", "proxy error", "ΔKLD measured", "KLD per unit error"], rows))
    print(f"Spearman rank correlation of proxy and ΔKLD over {len(rows)} probes: {rho:.3f}; "
          f"within a class (over its thirds), mean: {within:.3f}")


if __name__ == "__main__":
    main()
