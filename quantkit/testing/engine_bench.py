"""An engine on a test bench, for the engine tests (GPTQ, AWQ, EXL2, MLX) and benchmarks: a
BuildContext over a test model with the shipped German calibration sample, the variant to
build, and quality against the unquantized model through quantkit.evaluate."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.calibration import CalibrationSet, build_calibration
from quantkit.records import BuildContext, SourceModel
from quantkit.evaluate import EvalSet, Quality, Reference, compute_reference, make_eval_set, score
from quantkit.hfmodel import hf_logits
from quantkit.plan import Variant, make_plan
from quantkit.recipe import parse_recipe

EVAL_TOKENS = 2048
EVAL_CTX = 256


def recipe_text(source: Path, variant: str, *, samples: int, seq_len: int) -> str:
    return (f'[model]\nsource = "{source}"\n[calibration]\nsamples = {samples}\nseq_len = {seq_len}\n'
            f"[[variants]]\n{variant}\n")


def variant_of(source: Path, variant: str) -> Variant:
    """`variant` is the body of one [[variants]] table, e.g. 'format = "gptq"\\nbits = 8'."""
    recipe = parse_recipe(recipe_text(source, variant, samples=1, seq_len=16), check_source=False)
    return make_plan(recipe).variants[0]


@dataclass
class Bench:
    """One test model, its calibration set, eval chunks and reference log-probs."""

    source: Path
    calib: CalibrationSet
    eval_set: EvalSet
    reference: Reference
    work: Path
    events: list[tuple[str, int, Any]] = field(default_factory=list)

    def context(self) -> BuildContext:
        src = SourceModel(str(self.source), self.source, "local", "test", 0, "LlamaForCausalLM")
        return BuildContext(src, self.calib, self.work, "cpu",
                            lambda task, done, total: self.events.append((task, done, total)))


def timed_context(source: SourceModel, calib: CalibrationSet, work: Path,
                  events: list[tuple[str, int, int | None, float]] | None = None) -> BuildContext:
    """A CPU BuildContext whose progress goes to `events` as (task, done, total, perf_counter)."""

    def progress(task: str, done: int, total: int | None) -> None:
        if events is not None:
            events.append((task, done, total, time.perf_counter()))

    return BuildContext(source, calib, work, "cpu", progress)


def make_bench(source: Path, work: Path, *, samples: int = 8, seq_len: int = 256) -> Bench:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    recipe = parse_recipe(recipe_text(source, 'format = "gptq"', samples=samples, seq_len=seq_len),
                          check_source=False)
    calib = build_calibration(recipe, tok)
    es = make_eval_set(tok, calib.eval_texts, EVAL_TOKENS, EVAL_CTX)
    with hf_logits(source) as fn:
        ref = compute_reference(es, fn, work / "reference.npy")
    return Bench(source, calib, es, ref, work)


def quality(engine: Any, folder: Path, bench: Bench) -> Quality:
    """Reload the written folder the way users do (engine.open_model) and score it."""
    with engine.open_model(folder, bench.context()) as fn:
        return score(bench.eval_set, bench.reference, fn)


def build(engine: Any, variant: Variant, bench: Bench, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True)
    bench.events.clear()
    return engine.build(variant, bench.context(), out, {}).note_dict()  # the manifest's notes


def plan_baseline(plan: Any) -> tuple[Any, BuildContext, str]:
    """A built plan's own Baseline (the reference cached in its .work), an engine context, and
    the held-out text it scores."""
    from quantkit import pipeline
    from quantkit.events import quiet

    inputs = pipeline.prepare(plan)
    ctx = inputs.env().context("reference", quiet)
    return pipeline.reference_step(inputs, quiet).run(ctx, {}), ctx, "\n\n".join(inputs.calib.eval_texts)


def score_folder(fmt: str, folder: Path, base: Any, ctx: BuildContext,
                 ref: Reference | None = None) -> tuple[Quality, float]:
    """(Quality, seconds) of quantkit's scorer on a folder of `fmt`, loaded as users load it,
    against `ref` (default: the baseline's reference)."""
    from quantkit.engines import ENGINES

    t0 = time.perf_counter()
    with ENGINES[fmt].open_model(folder, ctx) as fn:
        q = score(base.eval_set, ref or base.reference, fn)
    return q, time.perf_counter() - t0
