"""The GGUF engine: convert the source once to a 16-bit GGUF and compute the importance matrix
once from the calibration text (two shared steps), quantize each type from that one file, read
it back before it counts, split a file above `split_max_size` into llama.cpp's shards, and
evaluate through the Python bindings from the first shard, as users load it.

The 16-bit GGUF and the imatrix live in the build's work_dir, keyed by everything that changes
them (source fingerprint, llama.cpp version, calibration hash): a resumed build finds them, and
a different source or calibration never reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ... import formats as f
from ... import toolchain as llamacpp
from ...errors import EngineError
from ...records import BuildContext, EngineResult, LogitsFn
from ...sizing import Estimate, Machine, ModelShape, Workload
from ...steps import ONE_GPU, Products, SharedStep, TaskResources
from ...variant import Variant
from ..base import Engine
from .estimate import (IMATRIX_CTX, convert_estimate, expected_bytes, imatrix_ctx, imatrix_estimate, output_files,
                       sensitivity_estimate, variant_estimate)
from .files import file_name, imatrix_file, missing_shards, model_name, quantized_by, remove_shards, shards, slug
from .header import check, imatrix_info, read_back, read_header
from .mix import CANDIDATES, PROBES, SAMPLE_ROWS, Mix, Sensitivity, allocate, budget_for, rebuild_command, sensitivity, \
    stock_mix, summary_line, wrong_types
from .. import _autoround as ar
from .autoround import build_autoround
from .params import GGUF_TYPES, GGUFParams, autoround, check_params, ftype, label, tuned, uses_imatrix
from .runner import LlamaRunner
from .spec import SPEC
from .split import check_shards, split_file
from .tools import explain, llama_threads, need_space, run

BASE = "gguf/base"  # shared step: the 16-bit GGUF -> (path, read_back info)
IMATRIX = "gguf/imatrix"  # shared step: the importance matrix -> (path, imatrix_info)
SENSITIVITY = "gguf/sensitivity"  # shared step: tensor x type -> (bytes, error), for tuned mixes
RAY_CPUS = 4  # cores per GGUF task on a Ray cluster: llama-quantize and scoring use them all
RAY = TaskResources(cpus=RAY_CPUS)


@dataclass(frozen=True)
class Built:
    """One quantized model, checked: one file or its shards in order; `notes` become card lines."""

    paths: tuple[Path, ...]
    notes: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.paths[0]


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def base_type(source: Path) -> str:
    """BF16 for bf16 checkpoints (lossless), else F16, as llama.cpp's `--outtype auto` picks."""
    try:
        cfg = json.loads((source / "config.json").read_text())
    except (OSError, ValueError):
        return "F16"
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or cfg.get("text_config", {}).get("dtype", ""))
    return "BF16" if "bfloat16" in dtype else "F16"


def _copy_imatrix(src: Path, dest: Path) -> None:
    """A hard link when the file system allows (same bytes, no copy), else a copy."""
    dest.unlink(missing_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


class GGUFEngine(Engine[GGUFParams]):
    """Engine for `format = "gguf"`; see the module docstring for the flow."""

    name = "gguf"
    spec = SPEC

    def __init__(self, llama_cpp_dir: str | Path | None = None):
        self.llama_cpp_dir = llama_cpp_dir  # None: LLAMA_CPP_DIR, PATH, then the cache

    def toolchain(self) -> llamacpp.Toolchain:
        return llamacpp.find_toolchain(self.llama_cpp_dir)

    def version(self) -> str:
        tc = self.toolchain()
        return f"llama.cpp {tc.version()} / llama-cpp-python {llamacpp.PIN}"

    def resources(self, variant: Variant[GGUFParams]) -> TaskResources:
        return ONE_GPU if autoround(variant.params) else RAY  # AutoRound tunes on a GPU where there is one

    # -- shared steps: the 16-bit GGUF and the importance matrix

    def shared_steps(self, variants: Sequence[Variant[GGUFParams]]) -> tuple[SharedStep, ...]:
        steps = [SharedStep(BASE, "convert to a 16-bit GGUF", self.base_gguf, release=release_base,
                            estimate=convert_estimate, resources=RAY)]
        if any(check_params(v, raise_=False)[1] for v in variants):
            steps.append(SharedStep(IMATRIX, "importance matrix", self.imatrix, deps=(BASE,),
                                    estimate=imatrix_estimate, resources=RAY))
        if any(tuned(v.params) for v in variants):
            steps.append(SharedStep(SENSITIVITY, "tensor sensitivity", self.sensitivity, deps=(BASE, IMATRIX),
                                    estimate=sensitivity_estimate, resources=RAY))
        return tuple(steps)

    def base_gguf(self, ctx: BuildContext, inputs: Products) -> tuple[Path, dict[str, Any]]:
        """Convert the source once per (source, llama.cpp version, name) into work_dir."""
        tc = self.toolchain()
        btype = base_type(ctx.source.path)
        key = _key(ctx.source.fingerprint, tc.version(), btype, model_name(ctx))
        out = ctx.work_dir / "gguf" / f"base-{key}" / file_name(ctx, btype)
        if not out.is_file():
            _convert(ctx, tc, btype, out)
        return out, read_back(out)

    def imatrix(self, ctx: BuildContext, inputs: Products) -> tuple[Path, dict[str, Any]]:
        """Importance matrix from the calibration text, once per (base GGUF, calibration)."""
        base, _ = inputs[BASE]
        folder = ctx.work_dir / "gguf" / f"imatrix-{_key(base.parent.name, ctx.calib.sha256, IMATRIX_CTX)}"
        out = folder / f"{model_name(ctx)}.imatrix.gguf"
        if not out.is_file():
            _compute_imatrix(ctx, self.toolchain(), base, out)
        return out, imatrix_info(out)

    def sensitivity(self, ctx: BuildContext, inputs: Products) -> Sensitivity:
        """Every tensor's error per candidate type, calibrated by probes on the calibration text;
        once per (base GGUF, importance matrix)."""
        base, _ = inputs[BASE]
        im, _ = inputs[IMATRIX]
        tc = self.toolchain()
        key = _key(base.parent.name, im.parent.name, CANDIDATES, SAMPLE_ROWS, PROBES, tc.version())
        folder = ctx.work_dir / "gguf" / f"sensitivity-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        text = ctx.calib.write_text(folder / "calibration.txt")
        return sensitivity(tc, base, im, text, int(ctx.calib.windows.size), folder / "sensitivity.json", ctx.progress)

    # -- one variant

    def build(self, variant: Variant[GGUFParams], ctx: BuildContext, out_dir: Path,
              inputs: Products) -> EngineResult:
        """Write `{name}.{QUANT}.gguf` (or its shards) into out_dir, with the imatrix beside it."""
        quant, use_im = check_params(variant)
        if autoround(variant.params):
            device = "cuda" if ctx.device == "cuda" else "cpu"
            path, notes = build_autoround(variant, ctx, out_dir, inputs[BASE], device, self.toolchain(),
                                          overrides(ctx))
            return EngineResult(notes["quantizer"], device, notes.pop("quantize_seconds"), {**notes, "file": path.name})
        im = inputs[IMATRIX] if use_im else None
        if tuned(variant.params):
            built = build_tuned(variant, ctx, out_dir, inputs, self.toolchain())
        else:
            built = quantize(variant, ctx, out_dir, inputs[BASE], im, self.toolchain())
        notes = {k: v for k, v in built.notes.items() if k != "quantize_seconds"}
        if im is not None:
            _copy_imatrix(im[0], out_dir / imatrix_file(ctx))
        return EngineResult(f"llama.cpp {notes['llama_cpp']}", "cpu", built.notes["quantize_seconds"],
                            {**notes, "file": built.path.name})

    def estimate(self, variant: Variant[GGUFParams], shape: ModelShape, work: Workload,
                 machine: Machine) -> Estimate:
        quant = check_params(variant, raise_=False)[0]
        e = variant_estimate(quant, shape, work, machine)
        if autoround(variant.params):  # AutoRound's run, writing the same bytes as the stock type
            e = ar.estimate(shape, ar.planned(variant.params.autoround, work.calib_tokens), machine, e, gguf=True)
        return replace(e, files=output_files(quant, shape, f.parse_size(variant.params.split_max_size)))

    @contextmanager
    def open_model(self, folder: Path, ctx: BuildContext) -> Iterator[LogitsFn]:
        """Load the GGUF with llama-cpp-python as users do (a split one from its first shard;
        llama.cpp opens the others); logits for the ids as given (no BOS added)."""
        names = shards(p.name for p in folder.glob("*.gguf"))
        if not names or (bad := missing_shards(names)):
            raise EngineError("gguf", f"{folder} holds no complete GGUF model: "
                              + (", ".join(bad) if names else "no .gguf file"))
        runner = LlamaRunner(folder / names[0])
        try:
            yield runner
        finally:
            runner.close()


def release_base(ctx: BuildContext, product: Any) -> list[Path]:
    """Delete the 16-bit GGUFs (and staging folders an older version left); the imatrix (small,
    published beside the files) stays. A later build that needs the base converts it again."""
    gone = [p for pattern in ("base-*", "staged-*") for p in (ctx.work_dir / "gguf").glob(pattern)]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def _convert(ctx: BuildContext, tc: llamacpp.Toolchain, btype: str, out: Path) -> None:
    need_space(out.parent, expected_bytes(btype, ctx.source.n_params), f"the {btype} GGUF", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    ctx.progress(f"convert to {btype} GGUF", 0, 1)
    res = run([sys.executable, tc.converter, ctx.source.path.resolve(),
               "--outtype", btype.lower(), "--outfile", tmp.resolve(), "--model-name", model_name(ctx)],
              env=tc.converter_env())
    if res.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise EngineError("gguf", explain(res, f"converting {ctx.source.id} to GGUF", out.parent))
    got = read_back(tmp)
    if not got["tensors"] or not got["architecture"]:
        raise EngineError("gguf", f"the converter wrote an empty GGUF for {ctx.source.id}")
    tmp.replace(out)
    ctx.progress(f"convert to {btype} GGUF", 1, 1)


def _compute_imatrix(ctx: BuildContext, tc: llamacpp.Toolchain, base: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # Relative names: they end up in the metadata (quantize.imatrix.dataset), not our paths.
    text = ctx.calib.write_text(out.parent / f"{slug(ctx.calib.source)}.txt")
    n_ctx = imatrix_ctx(int(ctx.calib.windows.size))
    total = max(1, int(ctx.calib.windows.size) // n_ctx)
    ctx.progress("importance matrix", 0, total)
    tmp = out.with_name("partial.imatrix.gguf")
    res = run([tc.imatrix, "-m", base.resolve(), "-f", text.name, "-o", tmp.name, "-c", str(n_ctx),
               "-b", str(n_ctx), "-t", str(llama_threads()), "--no-ppl", "--output-frequency", "1000000",
               "-ngl", "0"], cwd=out.parent)
    if res.returncode != 0 or not tmp.is_file():
        raise EngineError("gguf", explain(res, "computing the importance matrix", out.parent))
    tmp.replace(out)
    ctx.progress("importance matrix", total, total)


def quantize(variant: Variant[GGUFParams], ctx: BuildContext, out_dir: Path, base: tuple[Path, dict[str, Any]],
             im: tuple[Path, dict[str, Any]] | None, tc: llamacpp.Toolchain,
             extra_args: Sequence[str] = ()) -> Built:
    """One type from the shared 16-bit GGUF into out_dir, read back and checked. `extra_args`:
    more llama-quantize options (a tensor-type file), placed before the positional ones."""
    quant = check_params(variant)[0]
    base_path, base_info = base
    limit = f.parse_size(variant.params.split_max_size)
    need = expected_bytes(quant, ctx.source.n_params)
    need_space(out_dir, 2 * need if need > limit else need, quant, variant.name)  # split: both at once
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / file_name(ctx, label(variant.params))
    tmp = out.with_suffix(".partial")
    t0 = time.monotonic()
    ctx.progress(f"quantize {quant}", 0, 1)
    cmd: list[str | Path] = [tc.quantize, *overrides(ctx), *extra_args]
    if im:
        cmd += ["--imatrix", im[0].name]  # relative: the path lands in the metadata
    res = run(cmd + [base_path.resolve(), tmp.resolve(), quant, str(llama_threads())],
              cwd=im[0].parent if im else None)
    if res.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise EngineError("gguf", explain(res, f"quantizing to {quant}", out_dir), variant.name)
    got = check(tmp, quant, base_info, variant.name)
    paths, split_notes = _finish(tmp, out, limit, quant, base_info, variant.name, tc)
    ctx.progress(f"quantize {quant}", 1, 1)
    seconds = round(time.monotonic() - t0, 2)
    return Built(paths, {**_notes(quant, base_path, got, im, tc), **split_notes, "quantize_seconds": seconds})


def build_tuned(variant: Variant[GGUFParams], ctx: BuildContext, out_dir: Path, inputs: Products,
                tc: llamacpp.Toolchain) -> Built:
    """The budget from the stock mix, the allocation, its `--tensor-type-file` beside the file,
    then stock llama-quantize from that file; the written types must be the chosen ones."""
    base, im = inputs[BASE], inputs[IMATRIX]
    quant, name = ftype(variant.params), label(variant.params)
    t0 = time.monotonic()
    ctx.progress("allocate a tuned mix", 0, 1)
    stock = stock_mix(tc, base[0], im[0], quant)
    mix = allocate(inputs[SENSITIVITY], stock, budget_for(stock, read_header(base[0])["infos"],
                                                          variant.params.target_bpw))
    out_dir.mkdir(parents=True, exist_ok=True)
    rules = out_dir / f"{model_name(ctx)}.{name}.tensor-types.txt"
    rules.write_text(mix.rules(), encoding="utf-8")
    allocating = round(time.monotonic() - t0, 2)
    ctx.progress("allocate a tuned mix", 1, 1)
    # The imatrix under its published name, from the variant folder: the name lands in the
    # metadata, so the card's rebuild command gives the same bytes.
    published = out_dir / imatrix_file(ctx)
    _copy_imatrix(im[0], published)
    built = quantize(variant, ctx, out_dir, base, (published, im[1]), tc,
                     ("--pure", "--tensor-type-file", rules.name))
    written = {i.name: i.type for p in built.paths for i in read_header(p)["infos"]}
    if bad := wrong_types(mix, written):
        raise EngineError("gguf", f"llama-quantize did not follow {rules.name}: {'; '.join(bad[:3])}", variant.name)
    notes = {**built.notes, **_mix_notes(mix, rules.name, ctx, built, base[0], quant), "allocate_seconds": allocating,
             "quantize_seconds": round(time.monotonic() - t0, 2)}  # the variant's own time: allocation included
    return replace(built, notes=notes)


def _mix_notes(mix: Mix, rules: str, ctx: BuildContext, built: Built, base: Path, quant: str) -> dict[str, Any]:
    return {"tensor_type_file": rules, "mix_budget_bytes": mix.budget, "mix_tensor_bytes": mix.bytes,
            "mix_predicted_error_vs_stock": round(mix.error / mix.stock_error, 4) if mix.stock_error else None,
            "mix_changes": summary_line(mix),
            "rebuild": rebuild_command(rules, imatrix_file(ctx), base.name, built.path.name, quant,
                                       overrides(ctx))}


def overrides(ctx: BuildContext) -> list[str]:
    """Metadata llama-quantize writes for us (it keeps override strings to 127 bytes)."""
    return ["--override-kv", f"general.quantized_by=str:{quantized_by(ctx)[:120]}",
            "--override-kv", f"general.name=str:{model_name(ctx)[:120]}"]


def _finish(tmp: Path, out: Path, limit: int, quant: str, base_info: dict[str, Any], variant: str,
            tc: llamacpp.Toolchain) -> tuple[tuple[Path, ...], dict[str, Any]]:
    """The checked file under its name, or its shards when it is larger than the limit."""
    if tmp.stat().st_size <= limit:
        tmp.replace(out)
        return (out,), {}
    try:
        parts = split_file(tc, tmp, out.with_suffix(""), limit, variant)
        notes = check_shards(parts, quant, base_info, limit, variant)
    except EngineError:
        remove_shards(out.with_suffix(""))
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return parts, {**notes, "split_max_size": limit}


def _notes(quant: str, base: Path, got: dict[str, Any], im: tuple[Path, dict[str, Any]] | None,
           tc: llamacpp.Toolchain) -> dict[str, Any]:
    return {"quant": quant, "base": base.name.split(".")[-2], "imatrix": im is not None,
            "imatrix_dataset": got["imatrix_dataset"], "imatrix_chunks": got["imatrix_chunks"],
            "tensors": got["tensors"], "tensor_types": got["tensor_types"], "llama_cpp": tc.version()}


__all__ = ["GGUFEngine", "GGUF_TYPES", "BASE", "IMATRIX", "quantize", "uses_imatrix", "LlamaRunner"]
