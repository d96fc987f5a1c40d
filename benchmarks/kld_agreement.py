"""quantkit's KL divergence against llama.cpp's own (`llama-perplexity --kl-divergence`), on the
same held-out German text at the same context length, with the seconds each side spends.

    python benchmarks/kld_agreement.py [--out DIR] [--types Q8_0 Q4_K_M Q3_K_M Q2_K] [--chunks 8]

Builds the SmolLM2-135M GGUF ladder (German imatrix) plus a BF16 GGUF with quantkit into DIR
(reused when it is there), then for every type prints: quantkit's mean / p99.9 KLD and same
top-1 against the transformers model (what the cards show), the same against the BF16 GGUF
(llama.cpp's base), and llama.cpp's figures from `llama-perplexity --kl-divergence-base` on the
BF16 GGUF and `--kl-divergence` on the type; and the seconds of quantkit's scorer (load, logits,
every metric) and of llama-perplexity for the same chunks.

Where the two protocols differ, and what that explains:
- the base: ours is the transformers checkpoint in float32, theirs the BF16 GGUF (weights rounded
  to bf16, llama.cpp's kernels): the BF16 row shows that distance itself;
- the chunks: we put BOS before ctx-1 tokens of text; llama.cpp overwrites the first token of
  each ctx-token slice with BOS (and its slices start one token earlier); both score the second
  half, so the scored tokens differ by a few positions per chunk;
- llama.cpp stores the base's log-probabilities as 16-bit integers per row (values below the
  row's maximum minus 16 nats dropped); we store float16 log-probabilities.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from quantkit.testing import smollm2, table
from quantkit.testing.engine_bench import plan_baseline, score_folder

TYPES = ["Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K"]


def recipe_text(model: Path, types: list[str], chunks: int, ctx: int) -> str:
    return (f'[model]\nsource = "{model}"\nname = "SmolLM2-135M-Instruct"\n'
            f'[calibration]\nsamples = 32\nseq_len = 512\n'
            f'[evaluation]\ntokens = {chunks * (ctx - 1)}\nctx = {ctx}\nqa_items = 0\n'
            f'[[variants]]\nformat = "gguf"\nquant = {["BF16", *types]!r}\n').replace("'", '"')


def build(out: Path, types: list[str], chunks: int, ctx: int) -> Any:
    from quantkit import pipeline
    from quantkit.plan import load_plan

    recipe = out / "recipe.toml"
    out.mkdir(parents=True, exist_ok=True)
    recipe.write_text(recipe_text(smollm2(), types, chunks, ctx))
    plan = load_plan(recipe, out / "build")
    res = pipeline.build(plan, preflight=False)
    if res.failed:
        sys.exit(f"build failed: {res.failed}")
    return plan


def folder_of(plan: Any, quant: str) -> Path:
    return plan.variant_dir(next(v for v in plan.variants if v.name == f"gguf-{quant}"))


def gguf_base(folder: Path, base: Any, ctx: Any, cache: Path) -> Any:
    """The BF16 GGUF's log-probabilities on our chunks: llama.cpp's base, our protocol."""
    from quantkit.engines import ENGINES
    from quantkit.evaluate import chunk_rows, compute_reference

    with ENGINES["gguf"].open_model(folder, ctx) as fn:
        return compute_reference(base.eval_set, chunk_rows(base.eval_set, fn), cache)


_STAT = re.compile(r"^(Mean\s+KLD|99\.9%\s+KLD|Same top p)\s*:\s*(\S+)", re.M)


def llama(tool: Path, model: Path, text: Path, kld: Path, ctx: int, chunks: int, base: bool) -> tuple[dict, float]:
    """One llama-perplexity run: its statistics and its wall seconds. Its logger writes from a
    thread the process may exit before it has flushed (llama.cpp issue 22142): a run whose
    statistics went missing is run again, and the seconds are those of the complete run."""
    from quantkit.engines.gguf import llama_threads

    cmd = [str(tool), "-m", str(model), "-c", str(ctx), "-t", str(llama_threads()), "--kl-divergence-base", str(kld)]
    cmd += ["-f", str(text), "--chunks", str(chunks)] if base else ["--kl-divergence"]
    for _ in range(5):
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if res.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        # keyed by the first word: "Mean", "99.9%", "Same" (llama.cpp pads the labels with spaces)
        stats = {k.split()[0]: float(v) for k, v in _STAT.findall(res.stdout)}
        if base or "Mean" in stats:
            return stats, seconds
    sys.exit(f"{' '.join(cmd)} printed no statistics in 5 runs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/quantkit-kld-agreement"))
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    args = ap.parse_args()
    from quantkit import toolchain
    from quantkit.engines.gguf import first_shard

    plan = build(args.out, args.types, args.chunks, args.ctx)
    base, ctx, text = plan_baseline(plan)
    (args.out / "eval.txt").write_text(text, encoding="utf-8")
    tool = toolchain.find_toolchain().perplexity
    bf16 = folder_of(plan, "BF16")
    kld_file = args.out / "bf16.kld"
    _, t_base = llama(tool, bf16 / first_shard(p.name for p in bf16.iterdir()), args.out / "eval.txt", kld_file,
                      args.ctx, args.chunks, base=True)
    against = gguf_base(bf16, base, ctx, args.out / "bf16-logprobs.npy")
    rows = []
    for quant in ["BF16", *args.types]:
        folder = folder_of(plan, quant)
        q, t_ours = score_folder("gguf", folder, base, ctx)
        g, _ = score_folder("gguf", folder, base, ctx, against)
        lc, t_lc = llama(tool, folder / first_shard(p.name for p in folder.iterdir()), args.out / "eval.txt",
                         kld_file, args.ctx, args.chunks, base=False)
        rows.append([quant, f"{q.kld:.5f}", f"{g.kld:.5f}", f"{lc.get('Mean', float('nan')):.5f}",
                     f"{q.kld_p999:.4f}", f"{g.kld_p999:.4f}", f"{lc.get('99.9%', float('nan')):.4f}",
                     f"{100 * q.top1:.2f} %", f"{100 * g.top1:.2f} %", f"{lc.get('Same', float('nan')):.2f} %",
                     f"{t_ours:.1f}", f"{t_lc:.1f}", f"{t_ours / t_lc:.2f}"])
    print(f"SmolLM2-135M-Instruct, held-out German text, ctx {args.ctx}, {len(base.eval_set.chunks)} chunks "
          f"({base.eval_set.n_scored} scored tokens); llama-perplexity's base run took {t_base:.1f} s")
    print(table(["type", "KLD ours (HF base)", "ours (BF16 GGUF base)", "llama.cpp", "p99.9 ours (HF)",
                 "ours (GGUF base)", "llama.cpp", "same top-1 ours (HF)", "ours (GGUF base)", "llama.cpp",
                 "s ours", "s llama.cpp", "ours / llama.cpp"], rows))


if __name__ == "__main__":
    main()
