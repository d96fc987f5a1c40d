"""AWQ through GPTQModel: GEMM layout with zero points (`quant_method: awq`, `version: gemm`),
what AutoAWQ wrote and what transformers, vLLM and TGI load. On CPU the scale search runs
on GPTQModel's torch kernel (`BACKEND.AWQ_TORCH`): about 55 s a layer of SmolLM2-135M on 2
cores with 78 x 512 calibration tokens (28 min for its 30 layers, GPTQ: 4 min), so AWQ is
the slowest CPU format by far.

`engine = "autoawq"` in a recipe uses AutoAWQ 0.2.9 (archived) instead, where installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator

from .. import formats as f
from ..errors import EngineError, EngineUnavailable
from ..records import BuildContext, EngineResult, LogitsFn
from ..sizing import Estimate, Machine, ModelShape, Workload, gpu_runtime_overhead
from ..steps import ONE_GPU, Products, TaskResources
from ..variant import Variant
from . import _gptqmodel as gm
from .base import Engine

AUTOAWQ_EXTRA = "pip install 'quantkit-workbench[autoawq]'"
AUTOAWQ_PARALLEL_SAMPLES = 8  # AutoAWQ runs all samples at once by default: a memory spike


class AWQParams(f.ParamsModel):
    bits: int = 4
    group_size: f.GroupSize = 128
    zero_point: bool = True
    engine: Literal["gptqmodel", "autoawq"] = "gptqmodel"
    split_max_size: f.SizeSetting = f.SPLIT_DEFAULT  # larger weights become safetensors shards

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, v: int) -> int:
        return f.one_of(v, (4,))


def _describe(p: Mapping[str, Any]) -> str:
    return f"{p['bits']}-bit AWQ (GEMM), group size {p.get('group_size')}"


def _name(p: AWQParams) -> str:
    return f"awq-{p.bits}bit-{p.group_size}g"


SPEC = f.FormatSpec(
    name="awq", repo_suffix="AWQ", params=AWQParams, variant_name=_name, branch_name=_name,
    name_keys=frozenset({"bits", "group_size"}),
    columns=(f.BRANCH, f.BITS, f.GROUP_SIZE,
             f.Column("Zero point", lambda r: f.yes(r.params.get("zero_point"))),
             f.DATASET, f.SEQ_LEN, f.SIZE, f.memory_column("VRAM"), *f.QUALITY, f.DESCRIPTION),
    describe=_describe, use="GPU inference with AWQ (GEMM) kernels",
    tags=("awq", "quantized", "quantkit"), library_name="transformers",  # GPTQModel's AWQ kernels
    run_device="VRAM", run_overhead=gpu_runtime_overhead,
    runtimes=(
        gm.VLLM, gm.TGI, f.TEXTGEN_WEBUI,
        # AWQ GEMM checkpoints load in transformers through GPTQModel's AWQ kernels.
        f.Runtime("transformers + GPTQModel (AWQ GEMM)", f.always, "`AutoModelForCausalLM.from_pretrained`"),
    ),
    example={"bits": 4, "group_size": 128},
)


class AWQEngine(Engine[AWQParams]):
    name = "awq"
    spec = SPEC

    def version(self) -> str:
        return gm.gptqmodel_version()

    def resources(self, variant: Variant[AWQParams]) -> TaskResources:
        return ONE_GPU

    def build(self, variant: Variant[AWQParams], ctx: BuildContext, out_dir: Path,
              inputs: Products) -> EngineResult:
        p = variant.params
        examples = gm.calibration_examples(ctx.calib.windows)
        device = gm.device_of(ctx.device)
        if p.engine == "autoawq":
            quantizer = _build_autoawq(variant, ctx, out_dir, examples)
        else:
            quantizer = self.version()
            # AwqTorchLinear packs only fp16/bf16 (fp32 kills GPTQModel's finalizer thread and
            # with it the process); fp16 matmuls are slow on CPUs: bf16 there.
            job = gm.QuantJob(self.name, ctx.source.path, "AWQConfig", awq_config(p), examples, device,
                              backend="AWQ_TORCH" if device == "cpu" else "AUTO",
                              dtype="bfloat16" if device == "cpu" else "float16",
                              max_file_bytes=f.parse_size(p.split_max_size))
            gm.run(job, out_dir, ctx.progress, ctx.work_dir / f"{variant.name}.gptqmodel.log",
                   offload_dir=ctx.work_dir / f"{variant.name}.offload")
        notes = gm.finish_folder(out_dir, ctx.source.path, log_dir=ctx.work_dir,
                                 log_name=f"{variant.name}.quant_log.csv")
        gm.check_output(self.name, out_dir, expected_config(p), f.parse_size(p.split_max_size))
        return EngineResult(quantizer, device, notes={**gm.calibration_notes(examples), **notes})

    def open_model(self, folder: Path, ctx: BuildContext) -> AbstractContextManager[LogitsFn]:
        return gm.open_quantized(folder, gm.device_of(ctx.device),
                                 ctx.work_dir / f"{folder.name}.gptqmodel.log")

    def estimate(self, variant: Variant[AWQParams], shape: ModelShape, work: Workload,
                 machine: Machine) -> Estimate:
        p = variant.params
        # The scale search runs the layer ~20 times per module group: measured 6.5x GPTQ's
        # time on SmolLM2-135M (1676 s against 259 s), i.e. about 13 passes to GPTQ's 2.
        return gm.estimate(shape, work, machine, p.bits, p.group_size, passes=13,
                           max_file_bytes=f.parse_size(p.split_max_size))


def expected_config(p: AWQParams) -> dict[str, Any]:
    return {"quant_method": "awq", "version": "gemm", "bits": p.bits, "group_size": p.group_size,
            "zero_point": p.zero_point}


def awq_config(p: AWQParams) -> dict[str, Any]:
    """AWQConfig arguments: zero point is asymmetric quantization (sym=False)."""
    return {"bits": p.bits, "group_size": p.group_size, "sym": not p.zero_point, "format": "gemm"}


# ---------------------------------------------------------------- optional: AutoAWQ


def _build_autoawq(variant: Variant[AWQParams], ctx: BuildContext, out_dir: Path,
                   examples: list[dict[str, list[int]]]) -> str:
    """AutoAWQ 0.2.9 on the same token windows. Returns its version."""
    p = variant.params
    try:
        import awq
        from awq import AutoAWQForCausalLM
    except Exception as e:  # noqa: BLE001 - not installed or broken against this transformers
        raise EngineUnavailable(AWQEngine.name, f'engine = "autoawq" needs AutoAWQ, which cannot be '
                                f"imported here ({type(e).__name__}: {e}). Install it with "
                                f'{AUTOAWQ_EXTRA}, or use engine = "gptqmodel", the default.',
                                variant.name) from None
    import torch
    from transformers import AutoTokenizer

    src = str(ctx.source.path)
    qc = {"zero_point": p.zero_point, "q_group_size": p.group_size, "w_bit": p.bits, "version": "GEMM"}
    ctx.progress("quantize", 0, None)
    try:
        with gm.engine_output(ctx.work_dir / f"{variant.name}.autoawq.log"):
            model = AutoAWQForCausalLM.from_pretrained(src, torch_dtype=torch.float16, safetensors=True)
            # Windows are passed as token lists: AutoAWQ concatenates and re-cuts them into
            # blocks of max_calib_seq_len, which gives back exactly these windows.
            model.quantize(AutoTokenizer.from_pretrained(src), quant_config=qc,
                           calib_data=[e["input_ids"] for e in examples],
                           max_calib_samples=len(examples),
                           max_calib_seq_len=len(examples[0]["input_ids"]),
                           n_parallel_calib_samples=AUTOAWQ_PARALLEL_SAMPLES)
            model.save_quantized(str(out_dir), safetensors=True)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001
        raise EngineError(AWQEngine.name, f"AutoAWQ failed: {type(e).__name__}: {e}", variant.name) from e
    return f"autoawq {awq.__version__}"
