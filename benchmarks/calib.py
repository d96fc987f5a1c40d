"""Calibration-set build time and peak memory: the shipped sample, and a GermanQuAD-sized
(14k-item) SQuAD file cut into 128 x 4096 tokens. Each case runs in its own process so
its peak RSS is its own. Usage: python benchmarks/calib.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quantkit.testing import smollm2, table
from quantkit.testing.squad import squad_doc


def run_case(model: Path, dataset: str | None, samples: int, seq_len: int) -> dict:
    from transformers import AutoTokenizer

    from quantkit.calibration import build_calibration
    from quantkit.recipe import parse_recipe

    ds = f'dataset = "{dataset}"\n' if dataset else ""
    r = parse_recipe(f'[model]\nsource = "{model}"\n[calibration]\n{ds}samples = {samples}\n'
                     f'seq_len = {seq_len}\n[[variants]]\nformat = "gguf"\nquant = "Q8_0"\n', check_source=False)
    tok = AutoTokenizer.from_pretrained(str(model))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    c = build_calibration(r, tok)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"items": c.n_items, "contexts": c.n_contexts, "windows": f"{c.windows.shape[0]} x {c.windows.shape[1]}",
            "mean_tokens": round(c.tokens_available / c.n_items, 1), "seconds": round(secs, 2),
            "peak_rss_mib": round(peak / 1024), "rss_growth_mib": round((peak - before) / 1024)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--case":  # child process
        print(json.dumps(run_case(Path(sys.argv[2]), sys.argv[3] or None, int(sys.argv[4]), int(sys.argv[5]))))
        return
    model = smollm2()
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "germanquad_like.json"
        big.write_text(json.dumps(squad_doc(3000, 5), ensure_ascii=False))
        cases = [("shipped sample, 32 x 512", "", 32, 512), ("shipped sample, all text x 512", "", 10_000, 512),
                 ("14k-item SQuAD file, 128 x 4096", str(big), 128, 4096)]
        rows = []
        for name, ds, n, L in cases:
            out = subprocess.run([sys.executable, __file__, "--case", str(model), ds, str(n), str(L)],
                                 capture_output=True, text=True, check=True).stdout
            d = json.loads(out.strip().splitlines()[-1])
            rows.append([name, d["items"], d["contexts"], d["mean_tokens"], d["windows"], d["seconds"],
                         d["peak_rss_mib"], d["rss_growth_mib"]])
    print(table(["case", "items used", "contexts", "mean tokens/item", "windows", "seconds",
                 "peak RSS MiB", "RSS growth MiB"], rows))


if __name__ == "__main__":
    main()
