"""GPTQ through GPTQModel (AutoGPTQ's maintained successor), written as GPTQ v1
(`checkpoint_format: gptq`): the layout AutoGPTQ, ExLlama, TGI, vLLM and transformers read.

`engine = "auto-gptq"` in a recipe uses AutoGPTQ 0.7.1 instead, where it is installed
(it imports only with transformers 4.57 and quantizes only on CUDA).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, field_validator, model_serializer, model_validator

from .. import formats as f
from ..errors import EngineError, EngineUnavailable
from ..records import BuildContext, EngineResult, LogitsFn
from ..sizing import Estimate, Machine, ModelShape, Workload, gpu_runtime_overhead
from ..steps import ONE_GPU, Products, TaskResources
from ..variant import Variant
from . import _autoround as ar
from . import _gptqmodel as gm
from .base import Engine

AUTOGPTQ_EXTRA = "pip install 'quantkit-workbench[auto-gptq]'"


class GPTQParams(f.ParamsModel):
    bits: int = 4
    group_size: f.GroupSize = 128
    act_order: bool = True
    damp: f.Damp = 0.1
    sym: bool = True
    true_sequential: bool = True
    seq_len: int | None = Field(None, ge=16)  # None: [calibration] seq_len
    engine: Literal["gptqmodel", "auto-gptq"] = "gptqmodel"
    split_max_size: f.SizeSetting = f.SPLIT_DEFAULT  # larger weights become safetensors shards
    # autoround: AutoRound (SignRound) tunes rounding and clipping per block and writes GPTQ v1
    method: Literal["gptq", "autoround"] = "gptq"
    autoround: ar.AutoRoundSettings | None = None  # its settings; None: the "light" preset

    @model_validator(mode="before")
    @classmethod
    def _no_act_order(cls, data: Any) -> Any:
        """AutoRound keeps the columns in order: its variants default to act_order = false."""
        if isinstance(data, dict) and data.get("method") == "autoround" and "act_order" not in data:
            return {**data, "act_order": False}
        return data

    @model_validator(mode="after")
    def _method(self) -> GPTQParams:
        if self.method == "gptq":
            if self.autoround is not None:
                raise ValueError('autoround settings need method = "autoround"')
            return self
        if self.act_order:
            raise ValueError("AutoRound does not reorder columns: set act_order = false")
        if self.engine != "gptqmodel":
            raise ValueError('method = "autoround" is its own engine: drop engine = "auto-gptq"')
        if self.bits == 8 and not self.sym:
            raise ValueError("AutoRound's GPTQ export of 8 bits is symmetric only: set sym = true")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A GPTQ variant dumps as before AutoRound existed (same cache key, manifest, card rows)."""
        d = handler(self)
        if d.get("method") == "gptq":
            d.pop("method")
            d.pop("autoround", None)
        else:
            d["autoround"] = ar.dump(self.autoround)
        return d

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, v: int) -> int:
        return f.one_of(v, (2, 3, 4, 8))


_LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM")


def _exllama(p: Mapping[str, Any], arch: str | None) -> bool | None:
    """ExLlama's GPTQ kernels are 4-bit only and know Llama-style layers (TheBloke's column)."""
    if p.get("bits") != 4:
        return False
    return None if not arch else arch in _LLAMA_LIKE


def _describe(p: Mapping[str, Any]) -> str:
    return (f"{p['bits']}-bit" + (", AutoRound" if p.get("method") == "autoround" else "") + (", act order" if p.get("act_order") else "")
            + (", no grouping" if p.get("group_size") == -1 else f", group size {p.get('group_size')}"))


def _damp(r: f.CardRow) -> str:
    """AutoRound solves no Hessian: no dampening to show."""
    return "n/a" if r.params.get("method") == "autoround" else f"{r.params.get('damp', 0):g}"


def _name(p: GPTQParams) -> str:
    """TheBloke's branch name; an AutoRound variant adds the method, so it never takes a GPTQ one's."""
    method = "-autoround" if p.method == "autoround" else ""
    return f"gptq-{p.bits}bit-{p.group_size}g-actorder_{p.act_order}{method}"


SPEC = f.FormatSpec(
    name="gptq", repo_suffix="GPTQ", params=GPTQParams, variant_name=_name, branch_name=_name,
    name_keys=frozenset({"bits", "group_size", "act_order", "method"}),
    # TheBloke's GPTQ table plus measured quality.
    columns=(f.BRANCH, f.BITS, f.GROUP_SIZE,
             f.Column("Act Order", lambda r: f.yes(r.params.get("act_order"))),
             f.Column("Damp %", _damp), f.DATASET, f.SEQ_LEN, f.SIZE,
             f.memory_column("VRAM"),
             f.Column("ExLlama", lambda r: f.yes(_exllama(r.params, r.architecture))), *f.QUALITY,
             f.DESCRIPTION),
    describe=_describe, use="GPU inference; one set of GPTQ parameters per branch",
    tags=("gptq", "quantized", "quantkit"), library_name="transformers",  # loads through GPTQModel
    run_device="VRAM", run_overhead=gpu_runtime_overhead,
    runtimes=(
        f.Runtime("ExLlama (v1/v2 kernels)", _exllama, "ExLlamav2 loader"),
        # transformers 5 loads GPTQ checkpoints through GPTQModel (+ optimum), any bit width.
        f.Runtime("transformers + GPTQModel", f.always, "`AutoModelForCausalLM.from_pretrained`"),
        # vLLM has GPTQ kernels for 2/3/4/8 bits; we write GPTQ v1 ("gptq"), which it reads.
        gm.VLLM, gm.TGI,
        f.TEXTGEN_WEBUI,
    ),
    example={"bits": 4, "group_size": 128, "act_order": True},
)


class GPTQEngine(Engine[GPTQParams]):
    name = "gptq"
    spec = SPEC

    def version(self) -> str:
        return gm.gptqmodel_version()  # AutoRound variants name theirs in the variant's notes

    def resources(self, variant: Variant[GPTQParams]) -> TaskResources:
        return ONE_GPU

    def build(self, variant: Variant[GPTQParams], ctx: BuildContext, out_dir: Path,
              inputs: Products) -> EngineResult:
        p = variant.params
        if p.method == "autoround":
            return _build_autoround(variant, ctx, out_dir)
        examples = gm.calibration_examples(ctx.calib.windows, p.seq_len)
        device = gm.device_of(ctx.device)
        if p.engine == "auto-gptq":
            quantizer = _build_autogptq(variant, ctx, out_dir, examples, device)
            notes: dict[str, Any] = {}
        else:
            quantizer = self.version()
            _build_gptqmodel(variant, ctx, out_dir, examples, device)
            notes = gm.finish_folder(out_dir, ctx.source.path, log_dir=ctx.work_dir,
                                     log_name=f"{variant.name}.quant_log.csv")
        gm.check_output(self.name, out_dir, expected_config(p), f.parse_size(p.split_max_size))
        return EngineResult(quantizer, device, notes={"damp_percent": p.damp,
                                                      **gm.calibration_notes(examples), **notes})

    def open_model(self, folder: Path, ctx: BuildContext) -> AbstractContextManager[LogitsFn]:
        return gm.open_quantized(folder, gm.device_of(ctx.device),
                                 ctx.work_dir / f"{folder.name}.gptqmodel.log")

    def estimate(self, variant: Variant[GPTQParams], shape: ModelShape, work: Workload,
                 machine: Machine) -> Estimate:
        p = variant.params
        e = gm.estimate(shape, work, machine, p.bits, p.group_size, passes=2,  # inputs, then outputs
                        max_file_bytes=f.parse_size(p.split_max_size))
        if p.method == "autoround":  # AutoRound's run instead of GPTQModel's, the same files
            tuning = ar.planned(_with_seq_len(p), work.calib_tokens)
            return ar.estimate(shape, tuning, machine, e)
        return e


def expected_config(p: GPTQParams) -> dict[str, Any]:
    """What config.json's quantization_config must say for this variant."""
    return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": p.bits,
            "group_size": p.group_size, "desc_act": p.act_order, "sym": p.sym}


def gptq_config(p: GPTQParams) -> dict[str, Any]:
    """GPTQConfig arguments for a variant. act_group_aware (GPTQModel's default for static
    groups) cannot go with desc_act; it changes quantization order only, not the format."""
    return {"bits": p.bits, "group_size": p.group_size, "desc_act": p.act_order,
            "act_group_aware": not p.act_order, "sym": p.sym, "damp_percent": p.damp,
            "true_sequential": p.true_sequential}


def _build_gptqmodel(variant: Variant[GPTQParams], ctx: BuildContext, out_dir: Path,
                     examples: list[dict[str, list[int]]], device: str) -> None:
    p = variant.params
    job = gm.QuantJob(GPTQEngine.name, ctx.source.path, "GPTQConfig", gptq_config(p), examples, device,
                      max_file_bytes=f.parse_size(p.split_max_size))
    gm.run(job, out_dir, ctx.progress, ctx.work_dir / f"{variant.name}.gptqmodel.log",
           offload_dir=ctx.work_dir / f"{variant.name}.offload")


# ---------------------------------------------------------------- AutoRound


def _with_seq_len(p: GPTQParams) -> ar.AutoRoundSettings:
    """The variant's seq_len, when set, is AutoRound's too (its own setting wins)."""
    s = p.autoround or ar.AutoRoundSettings()
    return s if s.seq_len or not p.seq_len else s.model_copy(update={"seq_len": p.seq_len})


def autoround_scheme(p: GPTQParams) -> dict[str, Any]:
    return {"name": f"W{p.bits}A16", "overrides": {"group_size": p.group_size, "sym": p.sym}}


def _build_autoround(variant: Variant[GPTQParams], ctx: BuildContext, out_dir: Path) -> EngineResult:
    """AutoRound into a scratch folder, exported as AutoGPTQ's format (GPTQ v1), then the same
    folder rules and checks as GPTQModel's output."""
    import shutil
    from dataclasses import asdict

    import numpy as np

    p = variant.params
    tuning = ar.resolve(_with_seq_len(p), ctx.calib.windows)
    device = gm.device_of(ctx.device)
    work = ctx.work_dir / f"{variant.name}.autoround"
    shutil.rmtree(work, ignore_errors=True)  # what a killed run left
    work.mkdir(parents=True)
    np.save(work / "windows.npy", np.asarray(ctx.calib.windows, dtype=np.int32))
    job = ar.Job(GPTQEngine.name, str(ctx.source.path.resolve()), "auto_gptq", autoround_scheme(p), asdict(tuning),
                 str(work / "windows.npy"), device, str(work / "out"))
    seconds = ar.run(job, work, ctx.progress, variant.name)
    _take_autoround_output(work / "out", out_dir, variant.name)
    gm.finish_folder(out_dir, ctx.source.path)
    gm.check_output(GPTQEngine.name, out_dir, expected_config(p), f.parse_size(p.split_max_size))
    shutil.copy2(work / "autoround.log", ctx.work_dir / f"{variant.name}.autoround.log")
    shutil.rmtree(work, ignore_errors=True)
    return EngineResult(ar.version(), device, seconds,
                        {"method": "autoround", "tuning": asdict(tuning), "made_with": tuning.describe(),
                         "calibration_samples": tuning.nsamples, "calibration_seq_len": tuning.seq_len,
                         "calibration_tokens": tuning.nsamples * tuning.seq_len})


def _take_autoround_output(made: Path, out_dir: Path, variant: str) -> None:
    """AutoRound saves into a subfolder named after the model; its quantization_config lacks
    checkpoint_format (v1 is what it packs) and its side file has AutoRound's name."""
    configs = sorted(made.rglob("config.json"))
    if len(configs) != 1:
        raise EngineError(GPTQEngine.name, f"AutoRound wrote {len(configs)} checkpoints, expected one", variant)
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in configs[0].parent.iterdir():
        if p.is_file():
            p.replace(out_dir / p.name)
    cfg = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    qc = {**cfg.get("quantization_config", {}), "checkpoint_format": "gptq"}
    cfg["quantization_config"] = qc
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    (out_dir / "quantization_config.json").unlink(missing_ok=True)
    (out_dir / "quantize_config.json").write_text(json.dumps(qc, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- optional: AutoGPTQ


def _build_autogptq(variant: Variant[GPTQParams], ctx: BuildContext, out_dir: Path,
                    examples: list[dict[str, list[int]]], device: str) -> str:
    """AutoGPTQ 0.7.1, for those who want the original implementation. Returns its version."""
    p = variant.params
    try:
        import auto_gptq
        from auto_gptq import AutoGPTQForCausalLM, BaseQuantizeConfig
    except Exception as e:  # noqa: BLE001 - not installed, or installed against transformers 5
        raise EngineUnavailable(GPTQEngine.name, f'engine = "auto-gptq" needs AutoGPTQ, which '
                                f"cannot be imported here ({type(e).__name__}: {e}). Install it with "
                                f"{AUTOGPTQ_EXTRA} (auto-gptq 0.7.1 needs transformers 4.57 and a CUDA "
                                'GPU), or use engine = "gptqmodel", the default.', variant.name) from None
    if device != "cuda":
        raise EngineUnavailable(GPTQEngine.name, "auto-gptq 0.7.1 quantizes only on a CUDA GPU; "
                                'use engine = "gptqmodel" (the default) on this machine', variant.name)
    import torch

    qc = BaseQuantizeConfig(bits=p.bits, group_size=p.group_size, desc_act=p.act_order, sym=p.sym,
                            true_sequential=p.true_sequential, damp_percent=p.damp,
                            model_file_base_name="model")
    data = [{k: torch.tensor([v]) for k, v in e.items()} for e in examples]
    ctx.progress("quantize", 0, None)
    try:
        model = AutoGPTQForCausalLM.from_pretrained(str(ctx.source.path), qc, torch_dtype=torch.float16)
        model.quantize(data, batch_size=1)
        model.save_quantized(str(out_dir), use_safetensors=True)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001
        raise EngineError(GPTQEngine.name, f"AutoGPTQ failed: {type(e).__name__}: {e}", variant.name) from e
    gm.finish_folder(out_dir, ctx.source.path)
    _mark_v1(out_dir)
    return f"auto-gptq {auto_gptq.__version__}"


def _mark_v1(folder: Path) -> None:
    """AutoGPTQ writes quantize_config.json; make config.json say the same, as GPTQ v1."""
    qpath, cpath = folder / "quantize_config.json", folder / "config.json"
    qc = json.loads(qpath.read_text(encoding="utf-8")) if qpath.is_file() else {}
    cfg = json.loads(cpath.read_text(encoding="utf-8"))
    merged = {**qc, **(cfg.get("quantization_config") or {})}
    merged.setdefault("quant_method", "gptq")
    merged.setdefault("checkpoint_format", "gptq")
    cfg["quantization_config"] = merged
    cpath.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    if qc:
        qc.setdefault("checkpoint_format", "gptq")
        qpath.write_text(json.dumps(qc, indent=2) + "\n", encoding="utf-8")
