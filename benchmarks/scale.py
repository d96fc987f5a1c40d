"""Memory and time at real widths (issue 9): random Llamas with 7B widths and a few layers.

Each model (hidden 4096, intermediate 11008, 32 heads, vocab 49152, the SmolLM2 tokenizer,
2/4/8 layers, bf16) is built once without instantiating it, then a GGUF ladder recipe and a
GPTQ recipe are built by `quantkit build`'s own pipeline in a fresh child process. The parent
samples the anonymous memory (RssAnon, from /proc) of the child's whole process tree, the
llama.cpp tools included, and attributes every sample to the stage the child reported last.

It prints, per run, the peak per stage and the wall time per stage; per path, the slope of the
peak against the bf16 weight bytes and a projection for 7B, 13B and 70B; for the GGUF path,
quantkit's convert+imatrix+quantize time against the llama.cpp tools run alone on the same
model (same machine, same run); and quantkit's own estimate (`quantkit plan`) against the
measured peak.

Usage: python benchmarks/scale.py [--layers 2 4 8] [--paths gguf gptq] [--out DIR]
       [--json FILE] [--no-tools-alone] [--keep]
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

from quantkit.testing import CACHE, smollm2, table

ROOT = Path(__file__).resolve().parent.parent

GB = 1e9
HIDDEN, INTERMEDIATE, HEADS, VOCAB = 4096, 11008, 32, 49152
# bf16 bytes of the published models the projection is for (parameters x 2).
PROJECT = {"7B": 6.74e9 * 2, "13B": 13.0e9 * 2, "70B": 69.0e9 * 2}
STAGES = ("source", "calibration", "convert", "imatrix", "quantize", "reference", "reload and score",
          "card")
RECIPES = {
    "gguf": ('[[variants]]\nformat = "gguf"\nquant = ["Q4_K_M", "Q8_0"]\nimatrix = true\n'),
    "gptq": ('[[variants]]\nformat = "gptq"\nbits = 4\ngroup_size = 128\nact_order = true\n'),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- models


def random_llama(layers: int) -> Path:
    """A bf16 Llama at 7B widths, written tensor by tensor (never the whole model in RAM)."""
    out = CACHE / f"rand7b-{layers}l-v1"
    if (out / "config.json").is_file():
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                      num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                      max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16",
                      bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])
    cfg.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(smollm2()).save_pretrained(tmp)
    gen = torch.Generator().manual_seed(layers)
    index: dict[str, str] = {}
    for part, tensors in enumerate(_tensor_groups(cfg)):
        name = f"model-{part + 1:05d}.safetensors"
        data = {k: _init(shape, gen) for k, shape in tensors}
        save_file(data, str(tmp / name), metadata={"format": "pt"})
        index.update(dict.fromkeys(data, name))
    total = sum(os.path.getsize(tmp / f) for f in set(index.values()))
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    tmp.rename(out)
    return out


def _tensor_groups(cfg: Any) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Embeddings, one group per layer, then the head: one safetensors file each."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    groups = [[("model.embed_tokens.weight", (v, h))]]
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        groups.append([(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                       *[(p + f"self_attn.{m}_proj.weight", (h, h)) for m in "qkvo"],
                       (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                       (p + "mlp.down_proj.weight", (h, i))])
    groups.append([("model.norm.weight", (h,)), ("lm_head.weight", (v, h))])
    return groups


def _init(shape: tuple[int, ...], gen: Any) -> Any:
    import torch

    if len(shape) == 1:  # norms: ones, as a trained model's are near
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def weight_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.glob("*.safetensors"))


# ---------------------------------------------------------------- one measured build


def recipe_text(model: Path, path: str) -> str:
    return (f'[model]\nsource = "{model}"\nname = "rand7b"\n'
            f'[calibration]\nsamples = 8\nseq_len = 512\n'
            f'[evaluation]\ntokens = 1024\nctx = 512\n'
            f'[publish]\nowner = "bench"\n' + RECIPES[path])


def _stage_of(ev: Any) -> str | None:
    """The pipeline's events -> the stage names of the table."""
    t = ev.task
    if ev.kind == "stage":
        for prefix, stage in (("source", "source"), ("calibration", "calibration"),
                              ("reference", "reference"), ("model cards", "card")):
            if t.startswith(prefix):
                return stage
        return None
    if ev.kind != "task":
        return None
    if t.startswith("convert"):
        return "convert"
    if t.startswith("importance"):
        return "imatrix"
    if t.startswith(("quantize", "load source", "save")):
        return "quantize"
    if t == "evaluate":
        return "reload and score"
    return None


def child(recipe: Path, out: Path, timeline: Path) -> int:
    """Runs in the measured process: the same pipeline `quantkit build` runs."""
    sys.path.insert(0, str(ROOT))
    from quantkit.pipeline import build
    from quantkit.plan import make_plan
    from quantkit.recipe import load_recipe

    fh = open(timeline, "w", buffering=1)  # noqa: SIM115 - line-buffered for the parent
    last = [""]

    def report(ev: Any) -> None:
        stage = _stage_of(ev)
        if stage and stage != last[0]:
            last[0] = stage
            fh.write(f"{time.time():.3f} {stage}\n")
        if ev.kind == "fail":
            fh.write(f"{time.time():.3f} FAIL {ev.variant}: {ev.message}\n")

    res = build(make_plan(load_recipe(recipe), out), report=report)
    fh.write(f"{time.time():.3f} end\n")
    return 1 if res.failed else 0


def _tree_rss(pid: int) -> tuple[int, int]:
    """(RssAnon of the process tree, largest RSS of one process), bytes."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    anon = top = 0
    for p in procs:
        try:
            fields = dict(line.split(":", 1) for line in open(f"/proc/{p.pid}/status"))
        except (OSError, ValueError):
            continue
        anon += int(fields.get("RssAnon", "0 kB").split()[0]) * 1024
        top = max(top, int(fields.get("VmRSS", "0 kB").split()[0]) * 1024)
    return anon, top


def measure(model: Path, path: str, out: Path) -> dict[str, Any]:
    """Build one recipe in a child process; sample its tree every 0.1 s."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    recipe, timeline = out / "recipe.toml", out / "timeline.txt"
    recipe.write_text(recipe_text(model, path))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    p = subprocess.Popen([sys.executable, __file__, "--child", str(recipe), str(out / "build"), str(timeline)],
                         stdout=open(out / "child.log", "w"), stderr=subprocess.STDOUT, env=env)
    samples: list[tuple[float, int, int]] = []
    disk = 0
    while p.poll() is None:
        samples.append((time.time(), *_tree_rss(p.pid)))
        if len(samples) % 20 == 0:  # every 2 s: walking the folder costs more than /proc
            disk = max(disk, _disk_used(out / "build"))
        time.sleep(0.1)
    wall = time.time() - t0
    marks = _read_timeline(timeline)
    fails = [line for line in timeline.read_text().splitlines() if " FAIL " in line] if timeline.exists() else []
    return {"path": path, "rc": p.returncode, "wall": wall, "fails": fails,
            "stages": _per_stage(samples, marks, t0), "peak_anon": max(s[1] for s in samples), "peak_disk": disk,
            "peak_proc": max(s[2] for s in samples)}


def _disk_used(folder: Path) -> int:
    """Bytes allocated under folder (files being written included)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                continue
    return total


def _read_timeline(timeline: Path) -> list[tuple[float, str]]:
    if not timeline.exists():
        return []
    marks = []
    for line in timeline.read_text().splitlines():
        t, _, stage = line.partition(" ")
        if not stage.startswith("FAIL"):
            marks.append((float(t), stage))
    return marks


def _per_stage(samples: list[tuple[float, int, int]], marks: list[tuple[float, str]], t0: float
               ) -> dict[str, dict[str, float]]:
    """Peak RssAnon and seconds per stage; time before the first mark counts as 'source'."""
    bounds = [(t0, "source"), *marks]
    out: dict[str, dict[str, float]] = {}
    for (start, stage), (end, _) in zip(bounds, [*bounds[1:], (float("inf"), "end")]):
        if stage == "end":
            continue
        peak = max((a for t, a, _ in samples if start <= t < end), default=0)
        row = out.setdefault(stage, {"peak": 0, "seconds": 0.0})
        row["peak"] = max(row["peak"], peak)
        row["seconds"] += (min(end, samples[-1][0]) - start) if samples else 0.0
    return out


# ---------------------------------------------------------------- llama.cpp alone


def tools_alone(model: Path, out: Path) -> float:
    """The GGUF ladder as a user types it: converter, llama-imatrix, llama-quantize per type."""
    sys.path.insert(0, str(ROOT))
    from quantkit.engines import gguf, llamacpp

    tc = llamacpp.find_toolchain()
    d = out / "tools-alone"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    calib = _calibration_text(out / "gguf" / "recipe.toml", d / "calibration.txt")
    base, threads = d / "base.gguf", str(gguf.llama_threads())
    t0 = time.time()
    _quiet([sys.executable, tc.converter, model, "--outtype", gguf.base_type(model).lower(), "--outfile", base],
           env=tc.converter_env())
    _quiet([tc.imatrix, "-m", base, "-f", calib, "-o", d / "imatrix.gguf", "-c", "512", "-b", "512",
            "-t", threads, "--no-ppl", "-ngl", "0"])
    for quant in ("Q4_K_M", "Q8_0"):
        _quiet([tc.quantize, "--imatrix", d / "imatrix.gguf", base, d / f"{quant}.gguf", quant, threads])
    seconds = time.time() - t0
    shutil.rmtree(d, ignore_errors=True)
    return seconds


def _calibration_text(recipe: Path, dest: Path) -> Path:
    """The same German text the build's imatrix saw, written by the same code."""
    from transformers import AutoTokenizer

    from quantkit.calibration import build_calibration
    from quantkit.recipe import load_recipe

    r = load_recipe(recipe)
    calib = build_calibration(r, AutoTokenizer.from_pretrained(r.model.source))
    return calib.write_text(dest)


def _quiet(cmd: list[Any], env: dict[str, str] | None = None) -> None:
    subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=env)


# ---------------------------------------------------------------- estimates and report


def estimate(model: Path, path: str) -> dict[str, float] | None:
    """quantkit's own resource plan for the same recipe (None before it existed)."""
    sys.path.insert(0, str(ROOT))
    try:
        from quantkit.plan import make_plan
        from quantkit.recipe import parse_recipe
        from quantkit.resources import plan_resources
    except ImportError:
        return None
    plan = make_plan(parse_recipe(recipe_text(model, path), check_source=False))
    try:
        return plan_resources(plan).build.as_dict()
    except Exception as e:  # noqa: BLE001 - a broken estimate must not lose the measurement
        log(f"  no estimate: {type(e).__name__}: {e}")
        return None


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


def run_one(path: str, layers: int, args: argparse.Namespace) -> dict[str, Any]:
    model = random_llama(layers)
    out = args.out / f"{layers}l" / path
    log(f"{layers} layers, {path} ...")
    r = {"layers": layers, "weights": weight_bytes(model), **measure(model, path, out)}
    r["estimate"] = estimate(model, path)
    if path == "gguf" and not args.no_tools_alone and r["rc"] == 0:
        r["tools_alone"] = tools_alone(model, out.parent)
    log(f"  peak {r['peak_anon'] / GB:.2f} GB anon, {r['wall']:.0f} s, rc {r['rc']} {r['fails']}")
    if not args.keep:
        shutil.rmtree(out / "build", ignore_errors=True)
    return r


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        return child(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--paths", nargs="+", default=["gguf", "gptq"], choices=list(RECIPES))
    ap.add_argument("--out", type=Path, default=Path("/tmp/quantkit-scale"))
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--no-tools-alone", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the build folders")
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
        results.append(run_one(path, layers, args))
        if args.json:  # after every run: a long benchmark keeps what it measured
            args.json.write_text(json.dumps(results, indent=1))
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
