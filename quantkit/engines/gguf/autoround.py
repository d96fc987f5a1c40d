"""A GGUF variant made by AutoRound (`method = "autoround"`): it tunes each block's rounding on
our calibration windows and writes the file with its own packer, keeping that rounding. The file
must read back as the same model llama.cpp's converter made (architecture, tensor count) in the
requested file type, or it does not count."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ...records import BuildContext
from ...errors import EngineError
from ...variant import Variant
from .. import _autoround as ar
from ... import toolchain as llamacpp
from .files import file_name
from .header import check
from .params import GGUFParams, label
from .tools import explain, llama_threads, run


def work_dir(ctx: BuildContext, variant: Variant[GGUFParams]) -> Path:
    return ctx.work_dir / "gguf" / f"{variant.name}.autoround"


def build_autoround(variant: Variant[GGUFParams], ctx: BuildContext, out_dir: Path,
                    base: tuple[Path, dict[str, Any]], device: str, tc: llamacpp.Toolchain,
                    metadata: list[str]) -> tuple[Path, dict[str, Any]]:
    """Run AutoRound into a scratch folder, check the file, copy it in under our name with our
    metadata (`metadata`: llama-quantize --override-kv arguments)."""
    quant = variant.params.quant
    tuning = ar.resolve(variant.params.autoround, ctx.calib.windows)
    work = work_dir(ctx, variant)
    shutil.rmtree(work, ignore_errors=True)  # what a killed run left
    work.mkdir(parents=True)
    np.save(work / "windows.npy", np.asarray(ctx.calib.windows, dtype=np.int32))
    job = ar.Job("gguf", str(ctx.source.path.resolve()), f"gguf:{quant.lower()}", {"name": f"GGUF:{quant}"},
                 asdict(tuning), str(work / "windows.npy"), device, str(work / "out"))
    seconds = ar.run(job, work, ctx.progress, variant.name)
    made = sorted((work / "out").rglob("*.gguf"))
    if len(made) != 1:
        raise EngineError("gguf", f"AutoRound wrote {len(made)} GGUF files, expected one "
                          f"(log: {work / 'autoround.log'})", variant.name)
    check(made[0], quant, base[1], variant.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / file_name(ctx, label(variant.params))
    got = _with_metadata(made[0], out, quant, base[1], tc, metadata, variant.name)
    shutil.copy2(work / "autoround.log", ctx.work_dir / f"{variant.name}.autoround.log")
    shutil.rmtree(work, ignore_errors=True)
    return out, {"quant": quant, "method": "autoround", "quantizer": ar.version(), "tuning": asdict(tuning),
                 "made_with": tuning.describe(), "tensors": got["tensors"], "tensor_types": got["tensor_types"],
                 "quantize_seconds": seconds}


def _with_metadata(made: Path, out: Path, quant: str, base_info: dict[str, Any], tc: llamacpp.Toolchain,
                   metadata: list[str], variant: str) -> dict[str, Any]:
    """AutoRound names the file after the source folder and leaves out who quantized it:
    llama-quantize's COPY type rewrites the metadata and copies every tensor as it is."""
    tmp = out.with_suffix(".partial")
    res = run([tc.quantize, *metadata, made.resolve(), tmp.resolve(), "COPY", str(llama_threads())])
    if res.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise EngineError("gguf", explain(res, "writing the AutoRound file's metadata", out.parent), variant)
    got = check(tmp, quant, base_info, variant)
    tmp.replace(out)
    return got
