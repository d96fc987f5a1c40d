"""AutoRound against the stock methods, in one build, on held-out German text (issue 23).

    python benchmarks/autoround.py [--out DIR] [--layers 2] [--iters 10] [--samples 16 --seq-len 256]
                                   [--gguf-preset opt_rtn] [--group-size 64]

GGUF: llama.cpp's stock types with the German importance matrix (Q2_K, Q2_K_S, Q3_K_S, Q4_K_M)
against AutoRound's files of the Q2_K class (Q2_K_S), Q3_K_S and Q4_K_M (its own packer). GPTQ:
GPTQModel's GPTQ (act order, damp 0.1) against AutoRound's GPTQ export at 4-bit and 2-bit.

The model is the de-gridded SmolLM2-135M (quantkit.testing.degridded_smollm2; with --layers N its
first N layers): the fixture was rebuilt from a Q4_1 GGUF, so 4-bit block-32 grids would
recover it almost exactly (DESIGN §4); de-gridding removes that unearned advantage. Its width
576 is no multiple of 128, so GPTQ's group size is 64 here (the CPU int4 kernel refuses 128),
and llama.cpp's K types fall back to other block types on the 576-wide rows (AutoRound's packer
does the same).

AutoRound's settings: the GGUF files use --gguf-preset (default opt_rtn: no descent, its
imatrix-weighted rounding, what AutoRound itself recommends for GGUF without its alg_ext)
and, for the Q2_K class, also a SignRound run with --iters iterations (lr 5e-3, the light
preset's); the GPTQ variants use SignRound with --iters iterations. Each figure's settings are
printed with the table.

Prints, per variant: bytes, mean and p99.9 KLD, ΔPPL, same top-1 (quantkit's scorer against the
transformers model, the cards' figures), quantize seconds and the peak RssAnon of the build's
process tree while that variant was built and scored (same machine, same run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from quantkit.testing import degridded_smollm2, table

GGUF_STOCK = ["Q2_K", "Q2_K_S", "Q3_K_S", "Q4_K_M"]
GGUF_AUTOROUND = ["Q2_K_S", "Q3_K_S", "Q4_K_M"]
GB = 1e9


def recipe_text(model: Path, a: argparse.Namespace, signround_gguf: bool = False) -> str:
    """The main build; or (signround_gguf) the second one: the Q2_K class by SignRound's descent
    beside the same stock Q2_K (a variant's name is its type and method, so it needs its own build)."""
    ar_tune = f'autoround = {{ preset = "light", iters = {a.iters} }}'
    head = (f'[model]\nsource = "{model}"\nname = "SmolLM2-135M-Instruct"\n'
            f'[calibration]\nsamples = {a.samples}\nseq_len = {a.seq_len}\n'
            f'[evaluation]\ntokens = {a.eval_tokens}\nctx = 512\nqa_items = 0\n')
    if signround_gguf:
        return (head + '[[variants]]\nformat = "gguf"\nquant = "Q2_K"\n'
                f'[[variants]]\nformat = "gguf"\nquant = "Q2_K_S"\nmethod = "autoround"\n{ar_tune}\n')
    stock = list(dict.fromkeys([*GGUF_STOCK[:2], *a.types]))  # Q2_K, Q2_K_S and every type AutoRound writes
    gguf = (f'[[variants]]\nformat = "gguf"\nquant = {_list(stock)}\n'
            f'[[variants]]\nformat = "gguf"\nquant = {_list(a.types)}\nmethod = "autoround"\n'
            f'autoround = {{ preset = "{a.gguf_preset}" }}\n')
    if not a.gptq:
        return head + gguf
    return (head + gguf + f'[[variants]]\nformat = "gptq"\nbits = [4, 2]\ngroup_size = {a.group_size}\nact_order = true\n'
            f'[[variants]]\nformat = "gptq"\nbits = [4, 2]\ngroup_size = {a.group_size}\nmethod = "autoround"\n'
            f'{ar_tune}\n')


def _list(xs: list[str]) -> str:
    return "[" + ", ".join(f'"{x}"' for x in xs) + "]"


def build(out: Path, a: argparse.Namespace, signround_gguf: bool = False) -> Any:
    from quantkit import pipeline
    from quantkit.plan import load_plan

    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "recipe.toml"
    recipe.write_text(recipe_text(degridded_smollm2(a.layers), a, signround_gguf))
    plan = load_plan(recipe, out / "build")
    res = pipeline.build(plan, report=lambda e: None, preflight=False)
    if res.failed:
        print(f"failed variants: {res.failed}", file=sys.stderr)
    return plan


def row(name: str, r: Any, ref: Any | None) -> list[str]:
    q = r.quality
    if q is None:
        return [name, "failed", "", "", "", "", "", "", "", "", ""]
    rel = (lambda k: f"{getattr(q, k) / getattr(ref.quality, k):.3f}") if ref is not None and ref.quality else \
        (lambda k: "")
    return [name, f"{r.size_bytes:,}", f"{r.size_bytes / ref.size_bytes:.3f}" if ref else "", f"{q.kld:.4f}",
            rel("kld"), f"{q.kld_p999:.3f}", f"{q.delta_ppl_pct:+.1f} %", f"{100 * q.top1:.1f} %",
            f"{r.seconds:.0f}", f"{r.peak_ram / GB:.2f}", _how(r)]


def _how(r: Any) -> str:
    n = r.notes
    if n.get("method") == "autoround":
        return n.get("made_with", "")
    if r.format == "gguf":
        return "llama-quantize, German imatrix"
    return f"GPTQModel, {n.get('calibration_samples')} x {n.get('calibration_seq_len')} tokens"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/quantkit-autoround"))
    ap.add_argument("--layers", type=int, default=None, help="the first N layers of SmolLM2 (default: all 30)")
    ap.add_argument("--iters", type=int, default=50, help="SignRound iterations (the light preset's 50)")
    ap.add_argument("--gguf-preset", default="opt_rtn", choices=["opt_rtn", "light", "default", "best"])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--types", nargs="+", default=GGUF_AUTOROUND, help="AutoRound's GGUF types")
    ap.add_argument("--no-gptq", dest="gptq", action="store_false", help="the GGUF part only")
    a = ap.parse_args()
    from quantkit.manifest import load_manifest

    plan = build(a.out / "main", a)
    v = dict(load_manifest(plan.out_dir).variants)
    if a.iters:
        second = build(a.out / "signround-gguf", a, signround_gguf=True)
        v2 = load_manifest(second.out_dir).variants
        v["gguf-Q2_K_S_autoround-signround"], v["gguf-Q2_K (second build)"] = v2["gguf-Q2_K_S_autoround"], v2["gguf-Q2_K"]
    layers = f"first {a.layers} layers" if a.layers else "all 30 layers"
    print(f"de-gridded SmolLM2-135M-Instruct ({layers}); calibration {a.samples} x {a.seq_len} German tokens "
          f"(one set for every method); held-out German text, {a.eval_tokens} tokens, ctx 512\n")
    heads = ["variant", "bytes", "× ref", "KLD mean", "× ref", "KLD p99.9", "ΔPPL", "same top-1", "quantize s",
             "peak GB", "how"]
    ref2 = v["gguf-Q2_K"]
    rows = [row("Q2_K (stock, imatrix)", ref2, None), row("Q2_K_S (stock, imatrix)", v["gguf-Q2_K_S"], ref2),
            row(f"Q2_K_S AutoRound {a.gguf_preset}", v["gguf-Q2_K_S_autoround"], ref2),
            *([row("Q2_K_S AutoRound SignRound", v["gguf-Q2_K_S_autoround-signround"], ref2),
               row("Q2_K (stock, 2nd build: same?)", v["gguf-Q2_K (second build)"], ref2)] if a.iters else [])]
    for t in (t for t in a.types if t != "Q2_K_S"):
        rows += [row(f"{t} (stock, imatrix)", v[f"gguf-{t}"], None),
                 row(f"{t} AutoRound {a.gguf_preset}", v[f"gguf-{t}_autoround"], v[f"gguf-{t}"])]
    print("GGUF (× ref: against the stock imatrix file of the row's class; Q2_K class against Q2_K):")
    print(table(heads, rows))
    if not a.gptq:
        return
    gs = a.group_size
    g = [(f"gptq-{b}bit-{gs}g-actorder_True", f"gptq-{b}bit-{gs}g-actorder_False-autoround") for b in (4, 2)]
    rows = [r for stock, mine in g for r in (row(stock, v[stock], None), row(mine, v[mine], v[stock]))]
    print(f"\nGPTQ, group size {gs} (× ref: against GPTQModel's GPTQ of the same bits):")
    print(table(heads, rows))


if __name__ == "__main__":
    main()
