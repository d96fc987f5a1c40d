"""Memory and time of a build at real widths (issue 9): the harness behind benchmarks/scale.py
and tests/test_scale.py.

A random Llama with 7B widths (hidden 4096, intermediate 11008, 32 heads, vocab 49152, the
SmolLM2 tokenizer, a few layers, bf16) is built once without instantiating it; a recipe is
built by `quantkit build`'s own pipeline in a fresh child process (`python -m
quantkit.testing.scale --child ...`), while the parent samples the anonymous memory (RssAnon,
from /proc) of the child's whole process tree, the llama.cpp tools included, and attributes
every sample to the stage the child reported last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.testing.models import CACHE, smollm2

GB = 1e9
TASK = "task: "  # timeline lines naming each progress task as it starts (not a stage)
HIDDEN, INTERMEDIATE, HEADS, VOCAB = 4096, 11008, 32, 49152
STAGES = ("source", "calibration", "convert", "imatrix", "tuned mix", "quantize", "reference", "reload and score",
          "card")
RECIPES = {
    "gguf": ('[[variants]]\nformat = "gguf"\nquant = ["Q4_K_M", "Q8_0"]\nimatrix = true\n'),
    "gptq": ('[[variants]]\nformat = "gptq"\nbits = 4\ngroup_size = 128\nact_order = true\n'),
    # compressed-tensors through llm-compressor: GPTQ W4A16 (its sequential pipeline) and the data-free FP8
    "ct": ('[[variants]]\nformat = "compressed-tensors"\nscheme = "W4A16"\ngroup_size = 128\n'
           '[[variants]]\nformat = "compressed-tensors"\nscheme = "W8A8-FP8"\n'),
    # a stock Q4_K_M and a tuned mix of its size: the sensitivity step and the allocation ("tuned mix")
    "tuned": ('[[variants]]\nformat = "gguf"\nquant = "Q4_K_M"\n'
              '[[variants]]\nformat = "gguf"\nmix = "tuned"\ntarget = "Q4_K_M"\n'),
    # the same with the three-type ladder a publisher builds: one sensitivity step serves all three
    "tuned3": ('[[variants]]\nformat = "gguf"\nquant = ["Q4_K_M", "Q3_K_M", "Q2_K"]\n'
               '[[variants]]\nformat = "gguf"\nmix = "tuned"\ntarget = ["Q4_K_M", "Q3_K_M", "Q2_K"]\n'),
    # AutoRound's memory does not grow with its iterations: 2 of them on 2 windows of 512 keep the
    # run short at 7B widths on a CPU; GGUF (whole model in float32) and GPTQ (its low_cpu_mem path)
    "autoround": ('[[variants]]\nformat = "gguf"\nquant = "Q4_K_M"\nmethod = "autoround"\n'
                  'autoround = { iters = 2, nsamples = 2, batch_size = 2 }\n'
                  '[[variants]]\nformat = "gptq"\nbits = 4\ngroup_size = 128\nmethod = "autoround"\n'
                  'autoround = { iters = 2, nsamples = 2, batch_size = 2 }\n'),
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
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[("model.embed_tokens.weight", (v, h))]]
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


@dataclass(frozen=True)
class Work:
    """How much text a measured build runs through. The peak (the streamed reference) is set by
    the widths, the window (512) and the reference's token groups, not by how many windows or
    answers there are; scoring's own, lower peak follows the longest answer sequence."""
    samples: int = 8  # calibration windows of 512 tokens
    qa_items: int = 16  # 64 answer sequences: several groups of the streamed reference pass


FULL = Work()
# tests/test_scale.py: the same windows and groups, fewer of them (4 items still fill more than
# one reference group of GROUP_TOKENS); measured against FULL in the README's scale section.
LIGHT = Work(samples=4, qa_items=4)


def recipe_text(model: Path, path: str, work: Work = FULL) -> str:
    return (f'[model]\nsource = "{model}"\nname = "rand7b"\n'
            f'[calibration]\nsamples = {work.samples}\nseq_len = 512\n'
            f'[evaluation]\ntokens = 1024\nctx = 512\nqa_items = {work.qa_items}\n'
            f'[publish]\nowner = "bench"\n' + RECIPES[path])


def _stage_of(ev: Any) -> str | None:
    """The pipeline's events -> the stage names of the table."""
    from quantkit import events

    if isinstance(ev, events.Stage):
        for prefix, stage in (("source", "source"), ("calibration", "calibration"),
                              ("reference", "reference"), ("model cards", "card")):
            if ev.text.startswith(prefix):
                return stage
        return None
    if not isinstance(ev, events.Progress):
        return None
    t = ev.task
    if t.startswith("convert"):
        return "convert"
    if t.startswith("importance"):
        return "imatrix"
    if t.startswith(("reference", "answers of the original")):
        return "reference"
    if t.startswith(("tensor sensitivity", "allocate")):
        return "tuned mix"
    if t.startswith(("quantize", "load source", "save", "autoround")):
        return "quantize"
    if t == "evaluate":
        return "reload and score"
    return None


def child(recipe: Path, out: Path, timeline: Path) -> int:
    """Runs in the measured process: the same pipeline `quantkit build` runs."""
    from quantkit import events
    from quantkit.pipeline import build
    from quantkit.plan import make_plan
    from quantkit.recipe import load_recipe

    fh = open(timeline, "w", buffering=1)  # noqa: SIM115 - line-buffered for the parent
    last, task = [""], [""]

    def report(ev: Any) -> None:
        stage = _stage_of(ev)
        if stage and stage != last[0]:
            last[0] = stage
            fh.write(f"{time.time():.3f} {stage}\n")
        if isinstance(ev, events.Progress) and ev.task != task[0]:  # finer than the stages, for reading
            task[0] = ev.task
            fh.write(f"{time.time():.3f} {TASK}{ev.task}\n")
        if isinstance(ev, events.Failed):
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


def measure(model: Path, path: str, out: Path, work: Work = FULL) -> dict[str, Any]:
    """Build one recipe in a child process; sample its tree every 0.1 s."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    recipe, timeline = out / "recipe.toml", out / "timeline.txt"
    recipe.write_text(recipe_text(model, path, work))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    p = subprocess.Popen([sys.executable, "-m", "quantkit.testing.scale", "--child", str(recipe), str(out / "build"),
                          str(timeline)],
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
        if not stage.startswith(("FAIL", TASK)):
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
    from quantkit import toolchain as llamacpp
    from quantkit.engines import gguf

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


# ---------------------------------------------------------------- the estimate, and one run


def estimate(model: Path, path: str, work: Work = FULL) -> dict[str, float] | None:
    """quantkit's own resource plan for the same recipe (None before it existed)."""
    try:
        from quantkit.plan import make_plan
        from quantkit.recipe import parse_recipe
        from quantkit.resources import plan_resources
    except ImportError:
        return None
    plan = make_plan(parse_recipe(recipe_text(model, path, work), check_source=False))
    try:
        return plan_resources(plan).build.as_dict()
    except Exception as e:  # noqa: BLE001 - a broken estimate must not lose the measurement
        log(f"  no estimate: {type(e).__name__}: {e}")
        return None


def run_one(path: str, layers: int, args: argparse.Namespace, work: Work = FULL) -> dict[str, Any]:
    model = random_llama(layers)
    out = args.out / f"{layers}l" / path
    log(f"{layers} layers, {path} ...")
    r = {"layers": layers, "weights": weight_bytes(model), **measure(model, path, out, work)}
    r["estimate"] = estimate(model, path, work)
    if path == "gguf" and not args.no_tools_alone and r["rc"] == 0:
        r["tools_alone"] = tools_alone(model, out.parent)
    log(f"  peak {r['peak_anon'] / GB:.2f} GB anon, {r['wall']:.0f} s, rc {r['rc']} {r['fails']}")
    if not args.keep:
        shutil.rmtree(out / "build", ignore_errors=True)
    return r


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "--child":
        sys.exit("usage: python -m quantkit.testing.scale --child RECIPE OUT TIMELINE")
    sys.exit(child(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])))
