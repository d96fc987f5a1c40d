"""The only orchestrator: recipe -> plan -> calibration -> engines -> evaluate -> cards.

Every finished step is written to manifest.json at once, so a killed build resumes with
the variant it was on and never redoes one whose cache key and files still match.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .calibration import CalibrationSet, build_calibration, language_warning
from .engines import ENGINES
from .errors import EngineError, ManifestError, QuantkitError, ResourceError, SourceError
from .evaluate import EvalSet, Quality, Reference, compute_reference, make_eval_set, score, streamed_rows
from .manifest import Manifest, VariantRecord, load_manifest, save_manifest
from .plan import Plan, Variant, cache_key
from .recipe import Recipe, resolve_local_source
from .records import (BuildContext, CalibrationRecord, EngineResult, FileEntry, QualityRecord, SourceModel,
                      SourceRecord, bits_per_weight, file_entries)
from .source_check import check_source_folder

WORK = ".work"  # scratch inside the build folder: reference logits, shared engine files


@dataclass(frozen=True)
class Event:
    """What the pipeline reports; the CLI draws it. kind: stage|warn|start|task|done|skip|fail."""

    kind: str
    variant: str = ""
    task: str = ""
    done: int = 0
    total: int | None = None
    message: str = ""


Reporter = Callable[[Event], None]


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


def _quiet(_: Event) -> None:
    pass


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


# ---------------------------------------------------------------- shared inputs


@dataclass
class _Inputs:
    """What every variant of one build shares, made on first use."""

    plan: Plan
    source: SourceModel
    tokenizer: Any
    calib: CalibrationSet
    device: str
    report: Reporter
    eval_set: EvalSet | None = None
    reference: Reference | None = None
    # Where each finished step's record goes. None: straight into manifest.json. A Ray worker
    # (cluster.py) hands records to the driver instead, the one writer of the manifest.
    record_sink: Callable[[str, VariantRecord], None] | None = None

    @property
    def work_dir(self) -> Path:
        return self.plan.out_dir / WORK

    def save(self, m: Manifest, name: str) -> None:
        if self.record_sink is None:
            save_manifest(self.plan.out_dir, m)
        else:
            self.record_sink(name, m.variants[name])

    def context(self, v: Variant) -> BuildContext:
        def progress(task: str, done: int, total: int | None) -> None:
            self.report(Event("task", v.name, task, done, total))

        pub = self.plan.recipe.publish
        return BuildContext(self.source, self.calib, self.work_dir, self.device, progress,
                            model_name=self.plan.recipe.model.model_name,
                            quantized_by=pub.quantized_by or pub.owner or "quantkit",
                            keep_intermediate=self.plan.recipe.build.keep_intermediate)

    def ensure_reference(self) -> tuple[EvalSet, Reference]:
        if self.reference is None:
            spec = self.plan.recipe.evaluation
            self.eval_set = make_eval_set(self.tokenizer, self.calib.eval_texts, spec.tokens, spec.ctx)
            cache = self.work_dir / f"reference-{self.source.fingerprint[:12]}-{self.eval_set.sha256[:12]}.npy"
            self.report(Event("stage", task="reference logits (unquantized model)"))
            self.reference = compute_reference(
                self.eval_set, self._reference_rows(), cache,
                lambda d, t: self.report(Event("task", "reference", "reference logits", d, t)))
            _give_back_memory()
        assert self.eval_set is not None
        return self.eval_set, self.reference

    def _reference_rows(self) -> Iterator[np.ndarray]:
        """The unquantized model one block at a time: float32 on the CPU, bf16 on a GPU."""
        assert self.eval_set is not None
        dtype = "bfloat16" if self.device == "cuda" else "float32"
        return streamed_rows(self.eval_set, self.source.path, dtype=dtype, device=self.device)


def detect_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def prepare(plan: Plan, report: Reporter = _quiet) -> _Inputs:
    """Source, tokenizer and calibration set: once per build, shared by all variants."""
    from transformers import AutoTokenizer

    report(Event("stage", task=f"source {plan.recipe.model.source}"))
    source = resolve_source(plan.recipe)
    tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    report(Event("stage", task="calibration set"))
    calib = build_calibration(plan.recipe, tokenizer)
    if warning := language_warning(calib):
        report(Event("warn", message=warning))
    return _Inputs(plan, source, tokenizer, calib, detect_device(), report)


# ---------------------------------------------------------------- build


def recipe_sha256(recipe: Recipe) -> str:
    return hashlib.sha256(Path(recipe.path).read_bytes()).hexdigest() if Path(recipe.path).is_file() else ""


def build(plan: Plan, *, only: list[str] | None = None, report: Reporter = _quiet,
          preflight: bool = True) -> BuildResult:
    """Build, evaluate and card every selected variant; failures are recorded, not raised.
    With `preflight`, a build the machine cannot hold (RAM, disk) is refused before any work."""
    variants = plan.select(only)
    if preflight:
        check_resources(plan, variants, report)
    inputs = prepare(plan, report)
    manifest = start_manifest(plan, inputs)
    built, skipped, failed = [], [], {}
    _prepare_engines(variants, inputs, manifest)
    last_of_format = {v.format: v.name for v in variants}
    for v in variants:
        manifest, outcome = build_one(v, inputs, manifest)
        if outcome == "failed":
            failed[v.name] = manifest.variants[v.name].error or "failed"
        else:
            (built if outcome == "built" else skipped).append(v.name)
        if last_of_format[v.format] == v.name:
            _release_engine(v, inputs)
    manifest = _cards(plan, manifest, report)
    return BuildResult(manifest, tuple(built), tuple(skipped), failed)


def start_manifest(plan: Plan, inputs: _Inputs) -> Manifest:
    """The manifest on disk (or a new one) with this build's source and calibration, saved."""
    manifest = load_manifest(plan.out_dir) or Manifest(recipe_sha256(plan.recipe), {})
    src = inputs.source
    manifest = replace(manifest, recipe_sha256=recipe_sha256(plan.recipe), calibration=_calib_info(inputs.calib),
                       source=SourceRecord(src.id, src.revision, src.fingerprint, src.n_params, src.architecture,
                                           __version__))
    save_manifest(plan.out_dir, manifest)
    return manifest


def build_one(v: Variant, inputs: _Inputs, manifest: Manifest) -> tuple[Manifest, str]:
    """Build and evaluate one variant given the shared inputs: (manifest, "built"|"skipped"|"failed").
    A failure of the variant's own is recorded (state failed, with the reason), never raised."""
    try:
        manifest, did = _one_variant(v, inputs, manifest)
        return manifest, "built" if did else "skipped"
    except (QuantkitError, MemoryError, RuntimeError, OSError, ValueError) as e:
        reason = _reason(e)
        manifest = manifest.with_variant(v.name, _failed_record(v, manifest, reason))
        inputs.save(manifest, v.name)
        inputs.report(Event("fail", v.name, message=reason))
        return manifest, "failed"


def check_resources(plan: Plan, variants: tuple[Variant, ...], report: Reporter = _quiet) -> None:
    """Estimate what the variants still to build need (resources.py) and refuse early,
    with ResourceError, when RAM + swap or disk cannot hold it. A config the estimate
    cannot read is a warning, not a refusal: the build itself will say what is wrong."""
    from .resources import check_fits, plan_resources

    done = load_manifest(plan.out_dir)
    todo = [v.name for v in variants
            if not (done and (r := done.variants.get(v.name)) and r.at_least("evaluated"))]
    if not todo:
        return
    try:
        rp = plan_resources(plan, only=todo)
    except (ResourceError, KeyError, ValueError, TypeError) as e:
        report(Event("warn", message=f"no resource estimate ({type(e).__name__}: {e}); building anyway"))
        return
    b = rp.build
    report(Event("stage", task=f"resource plan: peak RAM ~{b.ram / 1e9:.1f} GB ({b.stage}), "
                 f"disk ~{b.disk / 1e9:.1f} GB, ~{b.seconds / 60:.0f} min"))
    check_fits(rp, plan.out_dir)


def reevaluate(plan: Plan, *, only: list[str] | None = None, report: Reporter = _quiet) -> BuildResult:
    """Score built variants again (e.g. after changing [evaluation]); builds nothing."""
    inputs = prepare(plan, report)
    manifest = load_manifest(plan.out_dir)
    if manifest is None:
        raise ManifestError(str(plan.out_dir / "manifest.json"), "not built yet: run `quantkit build` first")
    done, failed = [], {}
    for v in plan.select(only):
        rec = manifest.variants.get(v.name)
        if rec is None or not rec.at_least("built"):
            continue
        try:
            q = _evaluate(v, inputs, ENGINES[v.format], plan.variant_dir(v))
        except (QuantkitError, MemoryError, RuntimeError, OSError, ValueError) as e:
            failed[v.name] = _reason(e)
            report(Event("fail", v.name, message=failed[v.name]))
            continue
        state = rec.state if rec.at_least("evaluated") else "evaluated"
        manifest = manifest.with_variant(v.name, replace(rec, state=state, quality=_rounded(q)))
        save_manifest(plan.out_dir, manifest)
        report(Event("done", v.name, message=f"ΔPPL {q.delta_ppl_pct:+.2f} %, KLD {q.kld:.4f}"))
        done.append(v.name)
    return BuildResult(_cards(plan, manifest, report), tuple(done), (), failed)


def _reason(e: BaseException) -> str:
    if isinstance(e, QuantkitError):
        return str(e)
    if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
        return f"out of memory: {e}".strip()
    last = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" (at {Path(last.filename).name}:{last.lineno})" if last else ""
    return f"{type(e).__name__}: {e}{where}"


def _failed_record(v: Variant, m: Manifest, reason: str) -> VariantRecord:
    old = m.variants.get(v.name)
    base = old or VariantRecord(v.format, v.branch, v.repo, "failed", params=v.params_dict())
    return replace(base, state="failed", error=reason)


def _calib_info(c: CalibrationSet) -> CalibrationRecord:
    return CalibrationRecord(c.source, c.sha256, int(c.windows.shape[0]), int(c.windows.shape[1]), c.n_items,
                             c.n_contexts, len(c.eval_texts))


def _files_intact(folder: Path, rec: VariantRecord) -> bool:
    """Sizes only: re-hashing multi-GB files on every run would cost minutes."""
    return bool(rec.files) and all(
        (folder / f.path).is_file() and (folder / f.path).stat().st_size == f.size
        for f in rec.files if f.path != "README.md")


def _freshness(v: Variant, inputs: _Inputs, m: Manifest) -> tuple[str, str, VariantRecord | None, bool]:
    """(engine version, cache key, record, whether the record's files are this key's and intact)."""
    engine = ENGINES[v.format]
    version = engine.version()
    key = cache_key(v, source_fingerprint=inputs.source.fingerprint, calib_sha256=inputs.calib.sha256,
                    engine=engine.name, engine_version=version)
    rec = m.variants.get(v.name)
    fresh = rec is not None and rec.cache_key == key and _files_intact(inputs.plan.variant_dir(v), rec)
    return version, key, rec, fresh


def _prepare_engines(variants: tuple[Variant, ...], inputs: _Inputs, m: Manifest) -> None:
    """Let engines with shared work do it once for the variants still to build.
    Errors surface again from build() under each variant's name, so none is raised here."""
    for fmt, engine in ENGINES.items():
        prepare_fn = getattr(engine, "prepare", None)
        if prepare_fn is None:
            continue
        try:
            todo = [v for v in variants if v.format == fmt and not _freshness(v, inputs, m)[3]]
            if todo:
                inputs.report(Event("stage", task=f"{engine.name}: shared work for {len(todo)} variants"))
                prepare_fn(todo, inputs.context(todo[0]))
        except QuantkitError:
            continue


def _give_back_memory() -> None:
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


def _release_engine(v: Variant, inputs: _Inputs) -> None:
    """The format's last variant is done: its engine's shared temporaries can go."""
    release = getattr(ENGINES[v.format], "release", None)
    if release is not None:
        for path in release(inputs.context(v)):
            inputs.report(Event("stage", task=f"removed {path.name} (no variant needs it)"))


def _one_variant(v: Variant, inputs: _Inputs, m: Manifest) -> tuple[Manifest, bool]:
    engine = ENGINES[v.format]
    version, key, rec, fresh = _freshness(v, inputs, m)
    folder = inputs.plan.variant_dir(v)
    if fresh and rec.at_least("evaluated"):
        if (rec.branch, rec.repo) != (v.branch, v.repo):  # the recipe moved it: same files, new place
            m = m.with_variant(v.name, replace(rec, branch=v.branch, repo=v.repo))
            inputs.save(m, v.name)
        inputs.report(Event("skip", v.name, message="up to date"))
        return m, False
    inputs.report(Event("start", v.name, message=f"{engine.name} ({version})"))
    if not (fresh and rec.at_least("built")):
        art = _build_files(v, inputs, engine)
        _give_back_memory()
        rec = VariantRecord(v.format, v.branch, v.repo, "built", key, v.params_dict(), art.files,
                            art.size_bytes, art.bits_per_weight, None, round(art.seconds, 2),
                            engine.name, version, art.result.note_dict())
        m = m.with_variant(v.name, rec)
        inputs.save(m, v.name)
    assert rec is not None
    q = _evaluate(v, inputs, engine, folder)
    m = m.with_variant(v.name, replace(rec, state="evaluated", quality=_rounded(q), error=None))
    inputs.save(m, v.name)
    inputs.report(Event("done", v.name, message=f"ΔPPL {q.delta_ppl_pct:+.2f} %, KLD {q.kld:.4f}"))
    return m, True


def _build_files(v: Variant, inputs: _Inputs, engine: Any) -> Artifact:
    """Build into a hidden partial folder, then swap it in: a crash leaves no half variant."""
    out = inputs.plan.variant_dir(v)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    inputs.work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        result: EngineResult = engine.build(v, inputs.context(v), tmp)
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
    # Engines that did the work ahead in prepare() report their own time for it.
    seconds = result.quantize_seconds if result.quantize_seconds is not None else seconds
    return Artifact(out, files, bits_per_weight(files, inputs.source.n_params), seconds, result)


def _evaluate(v: Variant, inputs: _Inputs, engine: Any, folder: Path) -> Quality:
    es, ref = inputs.ensure_reference()
    inputs.report(Event("task", v.name, "evaluate", 0, len(es.chunks)))
    try:
        with engine.open_model(folder, inputs.context(v)) as fn:
            return score(es, ref, fn, lambda d, t: inputs.report(Event("task", v.name, "evaluate", d, t)))
    finally:
        _give_back_memory()


def _rounded(q: Quality) -> QualityRecord:
    return QualityRecord(**{k: round(val, 6) for k, val in q.as_dict().items()})


def _cards(plan: Plan, m: Manifest, report: Reporter) -> Manifest:
    from . import card

    report(Event("stage", task="model cards"))
    m = card.write_cards(plan, m, plan.out_dir)
    save_manifest(plan.out_dir, m)
    return m
