"""The only orchestrator: recipe -> plan -> calibration -> engines -> evaluate -> cards.

A build is begun here (preflight, source, calibration, manifest, the graph of what is left:
quantkit.graph), run by an executor — LocalExecutor below, one task at a time in this
process, or quantkit.cluster's on Ray — and finished here (cards). Both executors run each
variant through `run_task`. Every finished step is written to manifest.json at once, so a
killed build resumes with the variant it was on and never redoes one whose cache key and
files still match.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, answers
from .calibration import build_calibration, language_warning
from .engines import ENGINES, Engine
from .errors import EngineError, ManifestError, QuantkitError, ResourceError, SourceError, for_variant
from .evaluate import Baseline, Quality, compute_reference, evaluate, make_eval_set, streamed_rows
from .events import Done, Estimates, Failed, Progress, Reporter, Skipped, Stage, Started, StepDone, Warn, quiet
from .graph import Action, BuildGraph, Freshness, Task, make_graph, unfinished
from .manifest import Manifest, State, VariantRecord, load_manifest, save_manifest
from .peak import PeakRss
from .plan import Plan, cache_key
from .report import write_report
from .recipe import Recipe, resolve_local_source
from .records import (BuildContext, CalibrationRecord, CalibrationSet, EngineResult, FileEntry, QualityRecord,
                      SourceModel, SourceRecord, bits_per_weight, file_entries)
from .sizing import Machine
from .source_check import check_source_folder
from .steps import REFERENCE, Products, SharedStep, StepFailed
from .variant import Variant

WORK = ".work"  # scratch inside the build folder: reference logits, shared engine files
# What a variant's own failure may raise: recorded as failed, the others go on.
VARIANT_ERRORS = (QuantkitError, MemoryError, RuntimeError, OSError, ValueError)


@dataclass(frozen=True)
class Artifact:
    """A variant's files as built, before evaluation."""

    folder: Path
    files: tuple[FileEntry, ...]
    bits_per_weight: float
    seconds: float  # the engine's quantization time, else the wall time of its build()
    result: EngineResult

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class BuildResult:
    manifest: Manifest
    built: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    failed: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- source model


def resolve_source(recipe: Recipe) -> SourceModel:
    """The source as a local folder: the recipe's folder, or a Hub snapshot."""
    local = resolve_local_source(recipe)
    if local is not None:
        return _source_record(recipe.model.source, local, "local", _folder_fingerprint(local))
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(recipe.model.source, revision=recipe.model.revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model",
                                                      "*.txt", "*.py", "README.md"]))
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: one message
        raise SourceError(recipe.model.source, f"cannot download: {e}") from None
    check_source_folder(path, recipe.model.source)
    return _source_record(recipe.model.source, path, path.name, path.name)


def _source_record(sid: str, path: Path, revision: str, fingerprint: str) -> SourceModel:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise SourceError(sid, f"no config.json in {path}")
    cfg = json.loads(cfg_path.read_text())
    arch = (cfg.get("architectures") or ["unknown"])[0]
    return SourceModel(sid, path, revision, fingerprint, count_params(path), arch)


def _folder_fingerprint(path: Path) -> str:
    """Names, sizes and mtimes: cheap for multi-GB weights, changes when they change."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def count_params(path: Path) -> int:
    """Parameters in the safetensors files, read from their headers alone."""
    total = 0
    for f in path.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name != "__metadata__":
                count = 1
                for d in t["shape"]:
                    count *= d
                total += count
    return total


def detect_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


# ---------------------------------------------------------------- what a build shares


@dataclass(frozen=True)
class Inputs:
    """Source, tokenizer and calibration set: made once per build on the driving process."""

    plan: Plan
    source: SourceModel
    tokenizer: Any
    calib: CalibrationSet
    device: str

    def env(self) -> TaskEnv:
        return TaskEnv(self.plan, self.source, self.calib, self.device)


@dataclass(frozen=True)
class TaskEnv:
    """What a task needs besides its products: small and picklable (a Ray worker gets it)."""

    plan: Plan
    source: SourceModel
    calib: CalibrationSet
    device: str

    @property
    def work_dir(self) -> Path:
        return self.plan.out_dir / WORK

    def context(self, label: str, report: Reporter) -> BuildContext:
        """The engine's view, its progress reported under `label` (a variant or a step)."""
        def progress(task: str, done: int, total: int | None) -> None:
            report(Progress(label, task, done, total))

        pub = self.plan.recipe.publish
        return BuildContext(self.source, self.calib, self.work_dir, self.device, progress,
                            model_name=self.plan.recipe.model.model_name,
                            quantized_by=pub.quantized_by or pub.owner or "quantkit",
                            keep_intermediate=self.plan.recipe.build.keep_intermediate)


def prepare(plan: Plan, report: Reporter = quiet) -> Inputs:
    """Source, tokenizer and calibration set: once per build, shared by all variants."""
    from transformers import AutoTokenizer

    report(Stage(f"source {plan.recipe.model.source}"))
    source = resolve_source(plan.recipe)
    tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    report(Stage("calibration set"))
    calib = build_calibration(plan.recipe, tokenizer)
    if warning := language_warning(calib):
        report(Warn(warning))
    return Inputs(plan, source, tokenizer, calib, detect_device())


TITLE = "reference logits (unquantized model)"


def reference_step(inputs: Inputs, report: Reporter) -> SharedStep:
    """The unquantized model's log-probabilities on the held-out chunks and its answers to the
    held-out questions, cached in work_dir: run where the build is driven (it needs the
    tokenizer), shared with every task by value."""
    def run(ctx: BuildContext, deps: Products) -> Baseline:
        spec = inputs.plan.recipe.evaluation
        es = make_eval_set(inputs.tokenizer, inputs.calib.eval_texts, spec.tokens, spec.ctx)
        stem = ctx.work_dir / f"reference-{inputs.source.fingerprint[:12]}"
        # The unquantized model one block at a time: float32 on the CPU, bf16 on a GPU.
        dtype = "bfloat16" if inputs.device == "cuda" else "float32"
        rows = streamed_rows(es, inputs.source.path, dtype=dtype, device=inputs.device)
        ref = compute_reference(es, rows, Path(f"{stem}-{es.sha256[:12]}.npy"),
                                lambda d, t: report(Progress(REFERENCE, TITLE, d, t)))
        qa = answers.make_items(inputs.tokenizer, inputs.calib.eval_items, spec.qa_items,
                                inputs.plan.recipe.calibration.seed) if spec.qa_items else None
        qa_scores = _qa_reference(qa, Path(f"{stem}-qa-{qa.sha256[:12]}.npy"), inputs, dtype, report) if qa else None
        give_back_memory()
        return Baseline(es, ref, qa, qa_scores)

    return SharedStep(REFERENCE, TITLE, run, local=True)


def _qa_reference(qa: answers.QASet, cache: Path, inputs: Inputs, dtype: str, report: Reporter) -> np.ndarray:
    """The original model's answer scores, computed once per (source, items)."""
    if cache.is_file():
        return np.load(cache)
    report(Progress(REFERENCE, "answers of the original model", 0, len(qa)))
    got = answers.reference_scores(qa, inputs.source.path, dtype=dtype, device=inputs.device)
    report(Progress(REFERENCE, "answers of the original model", len(qa), len(qa)))
    np.save(cache.with_suffix(".partial.npy"), got)
    cache.with_suffix(".partial.npy").replace(cache)
    return got


def recipe_sha256(recipe: Recipe) -> str:
    return hashlib.sha256(Path(recipe.path).read_bytes()).hexdigest() if Path(recipe.path).is_file() else ""


def start_manifest(plan: Plan, inputs: Inputs) -> Manifest:
    """The manifest on disk (or a new one) with this build's source and calibration, saved."""
    manifest = load_manifest(plan.out_dir) or Manifest(recipe_sha256(plan.recipe), {})
    src, c = inputs.source, inputs.calib
    manifest = replace(manifest, recipe_sha256=recipe_sha256(plan.recipe),
                       calibration=CalibrationRecord(c.source, c.sha256, int(c.windows.shape[0]),
                                                     int(c.windows.shape[1]), c.n_items, c.n_contexts,
                                                     len(c.eval_texts)),
                       source=SourceRecord(src.id, src.revision, src.fingerprint, src.n_params, src.architecture,
                                           __version__))
    save_manifest(plan.out_dir, manifest)
    return manifest


def _files_intact(folder: Path, rec: VariantRecord) -> bool:
    """Sizes only: re-hashing multi-GB files on every run would cost minutes."""
    return bool(rec.files) and all(
        (folder / f.path).is_file() and (folder / f.path).stat().st_size == f.size
        for f in rec.files if f.path != "README.md")


def freshness(plan: Plan, v: Variant[Any], env: TaskEnv, m: Manifest) -> Freshness:
    """The variant's cache key, and whether the manifest's files for it are on disk."""
    engine = ENGINES[v.format]
    try:
        version = engine.version()
    except QuantkitError as e:  # the engine cannot run here: the task records why
        return Freshness(error=str(e))
    key = cache_key(v, source_fingerprint=env.source.fingerprint, calib_sha256=env.calib.sha256,
                    engine=engine.name, engine_version=version)
    rec = m.variants.get(v.name)
    intact = rec is not None and rec.cache_key == key and _files_intact(plan.variant_dir(v), rec)
    return Freshness(key, version, intact)


# ---------------------------------------------------------------- begin and finish


@dataclass(frozen=True)
class Begun:
    """A build made ready: its graph, what tasks need, and the manifest so far."""

    plan: Plan
    graph: BuildGraph
    env: TaskEnv
    manifest: Manifest
    report: Reporter

    def save(self, m: Manifest, name: str) -> None:
        save_manifest(self.plan.out_dir, m)


@dataclass(frozen=True)
class Ran:
    """What an executor reports back."""

    manifest: Manifest
    built: tuple[str, ...] = ()
    failed: Mapping[str, str] = field(default_factory=dict)


def begin(plan: Plan, *, only: list[str] | None = None, report: Reporter = quiet, preflight: bool = False,
          machine: Machine | None = None, goal: State = State.EVALUATED, rescore: bool = False,
          defer: bool = False) -> Begun:
    """Preflight (before anything is read or downloaded; `machine`: what to weigh against,
    default this one), shared inputs, manifest, graph (see graph.make_graph for the rest)."""
    variants = plan.select(only)
    if not rescore:
        check_resources(plan, variants, report, machine, refuse=preflight)
    inputs = prepare(plan, report)
    manifest = start_manifest(plan, inputs)
    env = inputs.env()
    fresh = {v.name: freshness(plan, v, env, manifest) for v in variants}
    graph = make_graph(plan, variants, manifest, fresh, reference_step(inputs, report), goal=goal,
                       keep_intermediate=plan.recipe.build.keep_intermediate, rescore=rescore, defer=defer)
    for name in graph.skipped:
        report(Skipped(name))
    for v in graph.moved:  # the recipe moved it: same files, new place
        manifest = manifest.with_variant(v.name, replace(manifest.variants[v.name], branch=v.branch, repo=v.repo))
    if graph.moved:
        save_manifest(plan.out_dir, manifest)
    return Begun(plan, graph, env, manifest, report)


def finish(b: Begun, ran: Ran) -> BuildResult:
    """The cards of every evaluated variant, from the manifest as the executor left it."""
    from . import card

    b.report(Stage("model cards"))
    m = card.write_cards(b.plan, ran.manifest, b.plan.out_dir)
    save_manifest(b.plan.out_dir, m)
    page = write_report(b.plan, m, b.plan.out_dir)
    b.report(Stage(f"report: {page}"))
    return BuildResult(m, tuple(ran.built), b.graph.skipped, dict(ran.failed))


def build(plan: Plan, *, only: list[str] | None = None, report: Reporter = quiet,
          preflight: bool = True) -> BuildResult:
    """Build, evaluate and card every selected variant in this process; failures are recorded,
    not raised. With `preflight`, a build the machine cannot hold (RAM, disk) is refused before
    any work."""
    b = begin(plan, only=only, report=report, preflight=preflight)
    return finish(b, LocalExecutor().run(b))


def reevaluate(plan: Plan, *, only: list[str] | None = None, report: Reporter = quiet) -> BuildResult:
    """Score built variants again (e.g. after changing [evaluation]); builds nothing."""
    if load_manifest(plan.out_dir) is None:
        raise ManifestError(str(plan.out_dir / "manifest.json"), "not built yet: run `quantkit build` first")
    b = begin(plan, only=only, report=report, rescore=True)
    return finish(b, LocalExecutor().run(b))


def check_resources(plan: Plan, variants: tuple[Variant[Any], ...], report: Reporter = quiet,
                    machine: Machine | None = None, refuse: bool = True) -> None:
    """Estimate what the variants still to build need (resources.py), report the estimates
    (the progress display's ETAs) and, with `refuse`, refuse early, with ResourceError, when
    RAM + swap or disk cannot hold it. A config the estimate cannot read is a warning, not a
    refusal: the build itself will say what is wrong."""
    from .resources import check_fits, plan_resources

    todo = [v.name for v in unfinished(variants, load_manifest(plan.out_dir))]
    if not todo:
        return
    try:
        rp = plan_resources(plan, machine, only=todo)
    except (ResourceError, KeyError, ValueError, TypeError) as e:
        report(Warn(f"no resource estimate ({type(e).__name__}: {e}); building anyway"))
        return
    b = rp.build
    report(Stage(f"resource plan: peak RAM ~{b.ram / 1e9:.1f} GB ({b.stage}), "
                 f"disk ~{b.disk / 1e9:.1f} GB, ~{b.seconds / 60:.0f} min"))
    report(Estimates({**{k: e.seconds for k, e in rp.steps.items()}, **{k: e.seconds for k, e in rp.variants.items()}}))
    if refuse:
        check_fits(rp, plan.out_dir)


# ---------------------------------------------------------------- one task


Save = Callable[[Manifest, str], None]


@dataclass(frozen=True)
class Outcome:
    kind: str  # "built" (built and/or scored), "skipped" (nothing to do), "failed"
    reason: str | None = None  # why it failed


def run_task(task: Task, env: TaskEnv, m: Manifest, products: Products, report: Reporter,
             save: Save) -> tuple[Manifest, Outcome]:
    """Build (unless only scoring) and evaluate one variant. A failure of the variant's own, or
    of a step it needs, is recorded (state failed, with the reason) and reported, never raised;
    re-scoring leaves a failure out of the manifest."""
    v = task.variant
    if task.action == Action.PUBLISH:  # nothing to build or score: the caller pushes it
        return m, Outcome("skipped")
    try:
        if task.action == Action.FAIL:
            raise _Unavailable(task.fresh.error or "its engine cannot run here")
        with PeakRss() as peak:
            m = _run(task, env, m, products, report, save)
        m = m.with_variant(v.name, replace(m.variants[v.name], task_seconds=round(peak.seconds, 2),
                                           peak_ram=peak.bytes))
        save(m, v.name)
        return m, Outcome("built")
    except VARIANT_ERRORS as e:
        reason = failure_reason(e)
        if task.action != Action.RESCORE:
            m = m.with_variant(v.name, failed_record(v, m, reason))
            save(m, v.name)
        report(Failed(v.name, reason))
        return m, Outcome("failed", reason)


class _Unavailable(QuantkitError):
    """The engine cannot run here; its message was taken when the graph was made."""


def _run(task: Task, env: TaskEnv, m: Manifest, products: Products, report: Reporter, save: Save) -> Manifest:
    v, engine = task.variant, ENGINES[task.variant.format]
    rec = m.variants.get(v.name)
    if task.action != Action.RESCORE:
        report(Started(v.name, f"{engine.name} ({task.fresh.version})"))
    if task.action == Action.BUILD:
        inputs = {k: product(products, k, v) for k in task.needs if k != REFERENCE}
        art = _build_files(v, env, engine, inputs, report)
        give_back_memory()
        rec = VariantRecord(v.format, v.branch, v.repo, State.BUILT, task.fresh.key, v.params_dict(), art.files,
                            art.size_bytes, art.bits_per_weight, None, round(art.seconds, 2), engine.name,
                            task.fresh.version, art.result.note_dict())
        m = m.with_variant(v.name, rec)
        save(m, v.name)
    assert rec is not None
    q = _evaluate(v, env, engine, product(products, REFERENCE, v), report)
    state = rec.state if task.action == Action.RESCORE and rec.at_least(State.EVALUATED) else State.EVALUATED
    m = m.with_variant(v.name, rec.moved_to(state, quality=_rounded(q), error=None))
    save(m, v.name)
    report(Done(v.name, f"ΔPPL {q.delta_ppl_pct:+.2f} %, KLD {q.kld:.4f}"))
    return m


def product(products: Products, key: str, v: Variant[Any]) -> Any:
    """What a step (or another variant) made; its failure raised as this variant's."""
    got = products[key]
    if isinstance(got, StepFailed):
        e = for_variant(got.error, v.name)
        raise e if isinstance(e, VARIANT_ERRORS) else EngineError(key, f"{type(e).__name__}: {e}", v.name)
    return got


def failure_reason(e: BaseException) -> str:
    if isinstance(e, QuantkitError):
        return str(e)
    if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
        return f"out of memory: {e}".strip()
    last = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" (at {Path(last.filename).name}:{last.lineno})" if last else ""
    return f"{type(e).__name__}: {e}{where}"


def failed_record(v: Variant[Any], m: Manifest, reason: str) -> VariantRecord:
    old = m.variants.get(v.name)
    base = old or VariantRecord(v.format, v.branch, v.repo, State.FAILED, params=v.params_dict())
    return base.moved_to(State.FAILED, error=reason)


def give_back_memory() -> None:
    """Return freed heap memory to the system. GPTQModel's worker threads leave their malloc
    arenas full of freed blocks (2 GB at 7B widths, measured): without this the next stage
    starts on top of them."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _build_files(v: Variant[Any], env: TaskEnv, engine: Engine[Any], inputs: Products,
                 report: Reporter) -> Artifact:
    """Build into a hidden partial folder, then swap it in: a crash leaves no half variant."""
    out = env.plan.variant_dir(v)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    env.work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        result = engine.build(v, env.context(v.name, report), tmp, inputs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    # Swap by renames: a kill leaves the old folder, the new one or neither at `out`, never
    # half of one (the manifest's size check rebuilds a missing one).
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    files = file_entries(out)
    if not any(f.path.endswith((".safetensors", ".gguf")) for f in files):
        raise EngineError(engine.name, "wrote no weight files", v.name)
    seconds = result.quantize_seconds if result.quantize_seconds is not None else seconds
    return Artifact(out, files, bits_per_weight(files, env.source.n_params), seconds, result)


def _evaluate(v: Variant[Any], env: TaskEnv, engine: Engine[Any], base: Baseline, report: Reporter) -> Quality:
    report(Progress(v.name, "evaluate", 0, len(base.eval_set.chunks)))
    try:
        with engine.open_model(env.plan.variant_dir(v), env.context(v.name, report)) as fn:
            return evaluate(base, fn, lambda d, t: report(Progress(v.name, "evaluate", d, t)))
    finally:
        give_back_memory()


def _rounded(q: Quality) -> QualityRecord:
    got: dict[str, Any] = {k: round(val, 6) if isinstance(val, float) else val for k, val in q.as_dict().items()}
    return QualityRecord(**got)


# ---------------------------------------------------------------- the local executor


class LazyProducts(Mapping[str, Any]):
    """Products made on first use: a shared step runs (after the steps it reads) just before
    the first task that needs it, and a failure is remembered as StepFailed for this build
    only. A variant's product is its folder, or StepFailed when it failed in this build.
    `provided`: products made elsewhere (a Ray worker gets the reference and failures)."""

    def __init__(self, steps: Mapping[str, SharedStep], env: TaskEnv, report: Reporter,
                 provided: Mapping[str, Any] | None = None, failed: Mapping[str, str] | None = None):
        self.steps, self.env, self.report = steps, env, report
        self.made: dict[str, Any] = dict(provided or {})
        self.failed = failed if failed is not None else {}

    def __getitem__(self, key: str) -> Any:
        if key in self.made:
            return self.made[key]
        if key in self.steps:
            self.made[key] = self._run(self.steps[key])
            return self.made[key]
        if key in self.failed:
            return StepFailed(key, EngineError(key, f"needs {key}, which failed: {self.failed[key]}"))
        return self.env.plan.out_dir / key

    def _run(self, step: SharedStep) -> Any:
        deps = {k: self[k] for k in step.deps}
        bad = next((d for d in deps.values() if isinstance(d, StepFailed)), None)
        if bad is not None:
            return bad
        label = step.title if step.key == REFERENCE else f"{step.key}: {step.title}"
        self.report(Progress(step.key, step.title))  # a bar (with the plan's ETA) while it runs
        t0 = time.perf_counter()
        try:
            made = step.run(self.env.context(step.key, self.report), deps)
        except Exception as e:  # noqa: BLE001 - every task that needs it fails with it, under its own name
            took = time.perf_counter() - t0
            self.report(StepDone(step.key, f"{label}: failed after {took:.0f} s", took))
            return StepFailed(step.key, e)
        took = time.perf_counter() - t0
        self.report(StepDone(step.key, f"{label} ({took:.0f} s)", took))
        return made

    def __iter__(self) -> Iterator[str]:
        return iter(self.made)

    def __len__(self) -> int:
        return len(self.made)


class LocalExecutor:
    """Runs a graph's tasks one at a time, in the graph's order, in this process; a step's
    temporaries go once the last task that needs it has ended."""

    def run(self, b: Begun) -> Ran:
        m, built, failed = b.manifest, list[str](), dict[str, str]()
        products = LazyProducts(b.graph.steps, b.env, b.report, failed=failed)
        left = {k: set(users) for k, users in b.graph.release_after.items()}
        for task in b.graph.tasks:
            m, outcome = run_task(task, b.env, m, products, b.report, b.save)
            name = task.variant.name
            if outcome.kind == "failed":
                failed[name] = outcome.reason or "failed"
            elif outcome.kind == "built":
                built.append(name)
            for key in [k for k, users in left.items() if name in users]:
                left[key].discard(name)
                if not left[key] and key in products.made:
                    release(b, key, products.made[key])
        return Ran(m, tuple(built), failed)


def release(b: Begun, key: str, made: Any) -> None:
    """A step's temporaries, once no task needs them (graph.release_after)."""
    if isinstance(made, StepFailed):
        return
    for path in b.graph.steps[key].release(b.env.context(key, b.report), made):
        b.report(Stage(f"removed {path.name} (no variant needs it)"))
