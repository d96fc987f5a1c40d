"""Memory and time at real widths (issue 9): random Llamas with 7B widths and a few layers.

Each model (hidden 4096, intermediate 11008, 32 heads, vocab 49152, the SmolLM2 tokenizer,
2/4/8 layers, bf16) is built once without instantiating it, then a GGUF ladder recipe and a
GPTQ recipe are built by `quantkit build`'s own pipeline in a fresh child process. The parent
samples the anonymous memory (RssAnon, from /proc) of the child's whole process tree, the
llama.cpp tools included, and attributes every sample to the stage the child reported last
(the harness: quantkit/testing/scale.py, which tests/test_scale.py runs too).

It prints, per run, the peak per stage and the wall time per stage; per path, the slope of the
peak against the bf16 weight bytes and a projection for 7B, 13B and 70B; for the GGUF path,
quantkit's convert+imatrix+quantize time against the llama.cpp tools run alone on the same
model (same machine, same run); and quantkit's own estimate (`quantkit plan`) against the
measured peak.

Usage: python benchmarks/scale.py [--layers 2 4 8] [--paths gguf gptq tuned ct] [--out DIR]
       [--json FILE] [--no-tools-alone] [--keep] [--light]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from quantkit.testing import table
from quantkit.testing.scale import FULL, GB, LIGHT, RECIPES, STAGES, estimate, random_llama, run_one

# bf16 bytes of the published models the projection is for (parameters x 2).
PROJECT = {"7B": 6.74e9 * 2, "13B": 13.0e9 * 2, "70B": 69.0e9 * 2}


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares line (slope, intercept) of peak bytes against weight bytes."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return slope, my - slope * mx


def report(results: list[dict[str, Any]]) -> None:
    print("\nPeak RssAnon of the process tree per stage, GB (and seconds):\n")
    rows = []
    for r in results:
        st = r["stages"]
        rows.append([r["path"], r["layers"], f"{r['weights'] / GB:.2f}",
                     *[f"{st[s]['peak'] / GB:.2f} ({st[s]['seconds']:.0f})" if s in st else "-" for s in STAGES],
                     f"{r['peak_anon'] / GB:.2f}", f"{r['peak_proc'] / GB:.2f}", f"{r['wall']:.0f}",
                     "ok" if r["rc"] == 0 else f"rc {r['rc']}"])
    print(table(["path", "layers", "bf16 GB", *STAGES, "peak anon GB", "peak RSS 1 proc GB", "wall s", "rc"],
                rows))
    _report_slopes(results)
    _report_tools(results)
    _report_estimates(results)


def _report_slopes(results: list[dict[str, Any]]) -> None:
    rows = []
    for path in dict.fromkeys(r["path"] for r in results):
        pts = [(r["weights"], r["peak_anon"]) for r in results if r["path"] == path]
        if len(pts) < 2:
            continue
        slope, icpt = fit(pts)
        rows.append([path, f"{slope:.3f}", f"{icpt / GB:.2f}",
                     *[f"{(icpt + slope * w) / GB:.1f}" for w in PROJECT.values()]])
    if rows:
        print("\nPeak RssAnon against bf16 weights (least squares), projected:\n")
        print(table(["path", "GB per GB of weights", "intercept GB", *[f"{k} GB" for k in PROJECT]], rows))


def _report_tools(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        if r.get("tools_alone"):
            st = r["stages"]
            ours = sum(st.get(s, {}).get("seconds", 0.0) for s in ("convert", "imatrix", "quantize"))
            rows.append([r["layers"], f"{ours:.0f}", f"{r['tools_alone']:.0f}", f"{ours / r['tools_alone']:.2f}",
                         f"{r['wall']:.0f}", f"{r['wall'] / r['tools_alone']:.2f}"])
    if rows:
        print("\nGGUF path against the llama.cpp tools alone (convert, imatrix, 2 x quantize), same run:\n")
        print(table(["layers", "quantkit convert+imatrix+quantize s", "tools alone s", "ratio",
                     "whole build s (with eval, card)", "ratio"], rows))


def _report_estimates(results: list[dict[str, Any]]) -> None:
    rows = [[r["path"], r["layers"], *_versus(r["estimate"]["ram"] / GB, r["peak_anon"] / GB),
             *_versus(r["estimate"]["disk"] / GB, r.get("peak_disk", 0) / GB),
             *_versus(r["estimate"]["seconds"], r["wall"])]
            for r in results if r.get("estimate")]
    if rows:
        print("\n`quantkit plan` estimate against the measurement (peak disk: build folder, sampled every 2 s):\n")
        print(table(["path", "layers", "est. RAM GB", "measured", "error", "est. disk GB", "measured", "error",
                     "est. s", "measured", "error"], rows))


def _versus(est: float, got: float) -> list[str]:
    return [f"{est:.2f}", f"{got:.2f}", f"{100 * (est / got - 1):+.0f} %" if got else "-"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--paths", nargs="+", default=["gguf", "gptq"], choices=list(RECIPES))
    ap.add_argument("--out", type=Path, default=Path("/tmp/quantkit-scale"))
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--no-tools-alone", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the build folders")
    ap.add_argument("--light", action="store_true",
                    help=f"tests/test_scale.py's work ({LIGHT.samples} windows, {LIGHT.qa_items} QA items) "
                         f"instead of {FULL.samples} and {FULL.qa_items}")
    ap.add_argument("--report", type=Path, default=None,
                    help="print the tables of an earlier --json file again, with today's estimates")
    args = ap.parse_args()
    if args.report:
        results = json.loads(args.report.read_text())
        for r in results:
            r["estimate"] = estimate(random_llama(r["layers"]), r["path"])
        report(results)
        return 0
    results = []
    for path, layers in [(p, n) for p in args.paths for n in args.layers]:
        results.append(run_one(path, layers, args, LIGHT if args.light else FULL))
        if args.json:  # after every run: a long benchmark keeps what it measured
            args.json.write_text(json.dumps(results, indent=1))
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
