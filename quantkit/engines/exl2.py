"""EXL2 through exllamav2's own converter (CUDA only: exllamav2 does not even import
without it). The calibration set goes in as parquet, the form `convert_exl2 -c` reads.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
import numpy as np
from pydantic import field_validator

from .. import formats as f
from ..errors import EngineError, EngineUnavailable
from ..records import BuildContext, EngineResult, LogitsFn
from ..sizing import PROCESS_BASE, Estimate, Machine, ModelShape, OutputFiles, Workload, gpu_runtime_overhead
from ..steps import ONE_GPU, Products, TaskResources
from ..variant import Variant
from .base import Engine

PIN = "0.3.2"


class EXL2Params(f.ParamsModel):
    bpw: float
    head_bits: int = 6

    @field_validator("bpw")
    @classmethod
    def _bpw_range(cls, v: float) -> float:
        if not 2.0 <= v <= 8.0:
            raise ValueError("must be between 2.0 and 8.0")
        return float(v)

    @field_validator("head_bits")
    @classmethod
    def _check_head_bits(cls, v: int) -> int:
        return f.one_of(v, (2, 3, 4, 5, 6, 8))


def _bpw(p: EXL2Params) -> str:
    """"4.0", "6.5", "4.25": as exllamav2 users name their branches."""
    return f"{p.bpw:.2f}".rstrip("0").rstrip(".") if p.bpw * 10 % 1 else f"{p.bpw:.1f}"


SPEC = f.FormatSpec(
    name="exl2", repo_suffix="exl2", params=EXL2Params,
    variant_name=lambda p: f"exl2-{_bpw(p)}bpw", branch_name=lambda p: f"{_bpw(p)}bpw",
    name_keys=frozenset({"bpw"}),
    columns=(f.BRANCH, f.Column("Bits/weight", lambda r: f"{r.params.get('bpw')}"),
             f.Column("Head bits", lambda r: str(r.params.get("head_bits"))), f.DATASET, f.SIZE,
             f.memory_column("VRAM"),
             *f.QUALITY, f.DESCRIPTION),
    describe=lambda p: f"{p['bpw']} bits per weight, {p.get('head_bits')}-bit output layer",
    use="GPU inference with exllamav2, one bits-per-weight choice per branch",
    tags=("exl2", "quantized", "quantkit"), library_name=None,  # exllamav2 is not a Hub library id
    run_device="VRAM", run_overhead=gpu_runtime_overhead,
    runtimes=(
        f.TEXTGEN_WEBUI,
        # EXL2 is exllamav2's own format (CUDA only) and the servers built on it.
        f.Runtime("exllamav2", f.always, "`ExLlamaV2Config(DIR)`"),
        f.Runtime("TabbyAPI", f.always, "model folder in `models/`"),
    ),
    example={"bpw": 4.0},
)


class EXL2Engine(Engine[EXL2Params]):
    name = "exllamav2"
    spec = SPEC

    def resources(self, variant: Variant[EXL2Params]) -> TaskResources:
        return ONE_GPU

    def version(self) -> str:
        try:
            v = importlib.metadata.version("exllamav2")
        except importlib.metadata.PackageNotFoundError:
            raise EngineUnavailable(self.name, f"not installed: pip install 'quantkit-workbench[exl2]' "
                                    f"(exllamav2=={PIN}, needs a CUDA GPU)") from None
        if not _cuda():
            raise EngineUnavailable(self.name, "EXL2 conversion needs a CUDA GPU; none found")
        return f"exllamav2 {v}"

    def build(self, variant: Variant[EXL2Params], ctx: BuildContext, out_dir: Path,
              inputs: Products) -> EngineResult:
        p = variant.params
        work = ctx.work_dir / f"exl2-job-{variant.name}"
        calib = ctx.calib.write_parquet(ctx.work_dir / f"calibration-{ctx.calib.sha256[:12]}.parquet")
        seq = int(ctx.calib.windows.shape[1])
        shared = _measurement_file(ctx)
        reuse = shared.is_file()
        cmd = [sys.executable, "-m", "exllamav2.conversion.convert_exl2", "-i", str(ctx.source.path),
               "-o", str(work), "-nr", "-cf", str(out_dir), "-b", str(p.bpw), "-hb", str(p.head_bits),
               "-c", str(calib), "-l", str(min(seq, 2048)), "-ml", str(min(seq, 2048)),
               "-r", str(len(ctx.calib.texts)), *(["-m", str(shared)] if reuse else [])]
        ctx.progress("exllamav2 convert", 0, None)
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if res.returncode != 0 or not any(out_dir.glob("*.safetensors")):
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            raise EngineError(self.name, "convert_exl2 failed: " + " | ".join(tail), variant.name)
        if not reuse and (work / "measurement.json").is_file():
            shutil.copyfile(work / "measurement.json", shared)
        ctx.progress("exllamav2 convert", 1, 1)
        return EngineResult(_quantizer(), "cuda", notes={"bpw": p.bpw, "head_bits": p.head_bits})

    def estimate(self, variant: Variant[EXL2Params], shape: ModelShape, work: Workload,
                 machine: Machine) -> Estimate:
        """exllamav2's converter: a measurement pass and a quantization pass over the calibration
        rows, one layer on the GPU at a time (unmeasured here: no GPU; from its design)."""
        out = int(shape.params * variant.params.bpw / 8)
        flops = 2 * 2 * shape.params * work.calib_tokens
        gpu_rate = machine.gpu_flops * 0.05 if machine.gpu_flops else 0.0
        seconds = flops / gpu_rate if gpu_rate else float("inf")
        vram = 6 * 2 * shape.layer_params + work.calib_tokens * shape.hidden * 4 * 4
        return Estimate(int(PROCESS_BASE + 4 * shape.largest_tensor), int(vram + out), out + shape.bf16_bytes,
                        seconds, "quantize", OutputFiles(1, out, out, out))

    @contextmanager
    def open_model(self, folder: Path, ctx: BuildContext) -> Iterator[LogitsFn]:
        import torch
        from exllamav2 import ExLlamaV2, ExLlamaV2Config

        config = ExLlamaV2Config(str(folder))
        model = ExLlamaV2(config)
        model.load()

        def fn(ids: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                x = torch.as_tensor(ids, dtype=torch.long)[None]
                return model.forward(x).float()[0].cpu().numpy()

        try:
            yield fn
        finally:
            model.unload()


def _measurement_file(ctx: BuildContext) -> Path:
    """Where the build keeps exllamav2's measurement pass: it depends on the source and the
    calibration set, not on the target bpw, so every bpw of a build shares the first one's."""
    key = hashlib.sha256(f"{ctx.source.fingerprint}:{ctx.calib.sha256}".encode()).hexdigest()[:12]
    return ctx.work_dir / f"exl2-measurement-{key}.json"


def _quantizer() -> str:
    """The converter's name and version as installed (its converter ran as a subprocess)."""
    try:
        return f"exllamav2 {importlib.metadata.version('exllamav2')}"
    except importlib.metadata.PackageNotFoundError:
        return "exllamav2"


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
