"""compressed-tensors, vLLM's own checkpoint format, written by llm-compressor
(`quant_method: compressed-tensors` in config.json). Schemes, as vLLM/RedHatAI name them:

- W4A16: 4-bit integer weights by GPTQ (llm-compressor's GPTQModifier) on our German
  calibration windows, one fp scale per group; vLLM runs it with Marlin kernels.
- W8A8-FP8: FP8_DYNAMIC, FP8 weights with a scale per output channel (data-free) and FP8
  activations with a scale per token, computed at run time.
- NVFP4A16: FP4 (E2M1) weights in groups of 16 with FP8 scales and a global scale (data-free).
- NVFP4: the same weights plus FP4 activations; their global scales are calibrated on the
  German windows.

Loading for scoring goes through transformers' compressed-tensors integration, as users load
it: weights are decompressed to dense on the first forward pass, and the schemes that
quantize activations (FP8, NVFP4) quantize them on the fly (fake quantization), so the CPU
score includes the activation error.

llm-compressor 0.14 pins transformers<=5.17; it runs on the project's transformers 5.23 when
installed without its dependency pins (the Makefile's `--no-deps` line; DESIGN §4).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import shutil
import sys
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import Field, model_validator

from .. import formats as f
from ..errors import EngineError, EngineUnavailable
from ..records import BuildContext, EngineResult, LogitsFn
from ..sizing import PROCESS_BASE, Estimate, Machine, ModelShape, Workload, gpu_runtime_overhead, pack_files
from ..steps import ONE_GPU, Products, TaskResources
from ..variant import Variant
from . import _gptqmodel as gm
from .base import Engine

CT_EXTRA = ("pip install 'quantkit-workbench[ct]' && pip install --no-deps llmcompressor==0.14.0.1 "
            "(llmcompressor pins transformers<=5.17; it runs on 5.23 without that pin)")
SCHEMES = ("W4A16", "W8A8-FP8", "NVFP4A16", "NVFP4")
CALIBRATED = frozenset({"W4A16", "NVFP4"})  # the schemes that read the calibration windows
W4A16_ONLY = ("group_size", "act_order", "damp")  # GPTQ's settings; the other schemes have none
# Our scheme names -> llm-compressor's preset names (W4A16 is built from the settings).
PRESETS = {"W8A8-FP8": "FP8_DYNAMIC", "NVFP4A16": "NVFP4A16", "NVFP4": "NVFP4"}
# config.json's quantization_config.format per scheme: what vLLM dispatches its kernels on.
FORMATS = {"W4A16": "pack-quantized", "W8A8-FP8": "float-quantized", "NVFP4A16": "nvfp4-pack-quantized",
           "NVFP4": "nvfp4-pack-quantized"}
# Weight bits (incl. scales) per quantized weight, for sizes: int4 + an fp scale per group;
# FP8 + a scale per row; FP4 + an FP8 scale per 16.
IGNORE = ["lm_head"]  # vLLM/RedHatAI keep the head unquantized; embeddings are not Linear


class CTParams(f.ParamsModel):
    scheme: Literal["W4A16", "W8A8-FP8", "NVFP4A16", "NVFP4"] = "W4A16"
    group_size: f.GroupSize = 128  # W4A16: weights per scale; -1 one scale per output channel
    act_order: bool = True  # W4A16: GPTQ in order of activation size ("weight" ordering, no g_idx)
    damp: f.Damp = 0.1  # W4A16: GPTQ's dampening, as a fraction of the Hessian's mean diagonal
    seq_len: int | None = Field(None, ge=16)  # None: [calibration] seq_len
    split_max_size: f.SizeSetting = f.SPLIT_DEFAULT  # larger weights become safetensors shards

    @model_validator(mode="after")
    def _w4a16_settings(self) -> CTParams:
        misplaced = [k for k in W4A16_ONLY if k in self.model_fields_set and self.scheme != "W4A16"]
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)} apply only to scheme = \"W4A16\" (GPTQ), not "
                             f"\"{self.scheme}\", whose weight layout is fixed")
        return self


# ---------------------------------------------------------------- the format


def _name(p: CTParams) -> str:
    if p.scheme == "W4A16":
        return f"w4a16-{p.group_size}g" + ("-actorder" if p.act_order else "")
    return {"W8A8-FP8": "fp8-dynamic", "NVFP4A16": "nvfp4a16", "NVFP4": "nvfp4"}[p.scheme]


_DESCRIBE = {
    "W8A8-FP8": "FP8 weights (per channel) and dynamic per-token FP8 activations; data-free",
    "NVFP4A16": "NVFP4 weights (FP4, FP8 scale per 16), 16-bit activations; data-free",
    "NVFP4": "NVFP4 weights and activations; activation scales calibrated on the dataset",
}


def _describe(p: Mapping[str, Any]) -> str:
    if p["scheme"] != "W4A16":
        return _DESCRIBE[p["scheme"]]
    gs = "per channel" if p.get("group_size") == -1 else f"group size {p.get('group_size')}"
    return f"INT4 weights by GPTQ, {gs}" + (", act order" if p.get("act_order") else "") + ", 16-bit activations"


def _bits(p: Mapping[str, Any]) -> str:
    return {"W4A16": "4", "W8A8-FP8": "8", "NVFP4A16": "4 (FP4)", "NVFP4": "4 (FP4)"}[p["scheme"]]


def _gpu(p: Mapping[str, Any]) -> str:
    """vLLM's kernels per scheme (its compressed-tensors docs): what a user must own."""
    return {"W4A16": "Ampere+ (Marlin)", "W8A8-FP8": "Ada/Hopper+ (Ampere: weight-only FP8 Marlin)",
            "NVFP4A16": "Ampere+ (FP4 Marlin); Blackwell native",
            "NVFP4": "Blackwell (FP4 tensor cores)"}[p["scheme"]]


def _w4a16(p: Mapping[str, Any], cell: str) -> str:
    """A GPTQ setting's cell: "-" for the schemes without it."""
    return cell if p.get("scheme") == "W4A16" else "-"


# vLLM reads the scheme from config.json: no --quantization flag.
VLLM = f.Runtime("vLLM", f.always, "`vllm serve REPO --revision BRANCH`")
SGLANG = f.Runtime("SGLang", f.always, "`python -m sglang.launch_server --model-path REPO --revision BRANCH`")
TRANSFORMERS = f.Runtime("transformers + compressed-tensors", f.always,
                         "`AutoModelForCausalLM.from_pretrained` (decompresses to dense)")

SPEC = f.FormatSpec(
    name="compressed-tensors", repo_suffix="compressed-tensors", params=CTParams, variant_name=_name,
    branch_name=_name, name_keys=frozenset({"scheme", "group_size", "act_order"}),
    # The vLLM/RedHatAI cards' facts: scheme, calibration, GPU generation, plus measured quality.
    columns=(f.BRANCH, f.Column("Scheme", lambda r: str(r.params.get("scheme"))),
             f.Column("Bits", lambda r: _bits(r.params)),
             f.Column("GS", lambda r: _w4a16(r.params, f.group_size_cell(r.params))),
             f.Column("Act Order", lambda r: _w4a16(r.params, f.yes(r.params.get("act_order")))),
             f.Column("Dataset", lambda r: r.dataset if r.params.get("scheme") in CALIBRATED else "none (data-free)"),
             f.Column("Seq Len", lambda r: str(r.seq_len or "n/a") if r.params.get("scheme") in CALIBRATED else "-"),
             f.SIZE, f.memory_column("VRAM"), f.Column("GPU", lambda r: _gpu(r.params)), *f.QUALITY,
             f.DESCRIPTION),
    describe=_describe, use="GPU serving with vLLM or SGLang; one compressed-tensors scheme per branch",
    tags=("compressed-tensors", "vllm", "llmcompressor", "quantized", "quantkit"), library_name="transformers",
    run_device="VRAM", run_overhead=gpu_runtime_overhead,
    runtimes=(VLLM, SGLANG, TRANSFORMERS, f.TEXTGEN_WEBUI),
    example={"scheme": "W4A16", "group_size": 128, "act_order": True},
)


# ---------------------------------------------------------------- the engine


class CTEngine(Engine[CTParams]):
    name = "compressed-tensors"
    spec = SPEC

    def version(self) -> str:
        return ct_version()

    def resources(self, variant: Variant[CTParams]) -> TaskResources:
        return ONE_GPU

    def build(self, variant: Variant[CTParams], ctx: BuildContext, out_dir: Path,
              inputs: Products) -> EngineResult:
        p = variant.params
        quantizer = self.version()
        examples = gm.calibration_examples(ctx.calib.windows, p.seq_len) if p.scheme in CALIBRATED else []
        device = gm.device_of(ctx.device)
        _quantize(variant, ctx, out_dir, examples, device)
        finish_folder(out_dir, ctx.source.path)
        check_output(out_dir, p, f.parse_size(p.split_max_size))
        notes = gm.calibration_notes(examples) if examples else {"calibration_samples": 0}
        return EngineResult(quantizer, device, notes={"scheme": p.scheme, **notes})

    def open_model(self, folder: Path, ctx: BuildContext) -> AbstractContextManager[LogitsFn]:
        return open_ct(folder, gm.device_of(ctx.device), ctx.work_dir / f"{folder.name}.llmcompressor.log")

    def estimate(self, variant: Variant[CTParams], shape: ModelShape, work: Workload,
                 machine: Machine) -> Estimate:
        return estimate(variant.params, shape, work, machine)


@functools.lru_cache(maxsize=1)
def ct_version() -> str:
    """'llmcompressor 0.14.0.1, compressed-tensors 0.20.0'; EngineUnavailable without them."""
    try:
        with _quiet_logs(None):
            import compressed_tensors
            import llmcompressor
    except Exception as e:  # noqa: BLE001 - a broken install fails in many ways
        raise EngineUnavailable(CTEngine.name, f"cannot import llm-compressor ({type(e).__name__}: {e}); "
                                f"install it with {CT_EXTRA}") from None
    return f"llmcompressor {llmcompressor.__version__}, compressed-tensors {compressed_tensors.__version__}"


# ---------------------------------------------------------------- quantize


@contextmanager
def _quiet_logs(log_path: Path | None) -> Iterator[None]:
    """llm-compressor logs through loguru to stdout and draws tqdm bars on stderr: both go to
    log_path (or nowhere) while it runs; afterwards loguru keeps one sink, warnings to stderr."""
    from loguru import logger

    sink = gm._Sink(log_path)
    logger.remove()
    logger.add(cast(Any, sink), level="INFO", format="{time:HH:mm:ss} | {level} | {message}")  # a text stream
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        # every sink, also the one llm-compressor's import adds on the redirected stdout
        logger.remove()
        logger.add(sys.stderr, level="WARNING")
        sink.close()


def recipe(p: CTParams) -> Any:
    """llm-compressor's modifier for a scheme: GPTQ for W4A16, plain quantization otherwise."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if p.scheme != "W4A16":
        return QuantizationModifier(targets="Linear", scheme=PRESETS[p.scheme], ignore=IGNORE)
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True,
                               strategy="channel" if p.group_size == -1 else "group",
                               group_size=None if p.group_size == -1 else p.group_size,
                               actorder="weight" if p.act_order else None)
    return GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                        ignore=IGNORE, dampening_frac=p.damp)


def _loader(examples: list[dict[str, list[int]]]) -> Any:
    """The calibration windows as a DataLoader of single sequences (llm-compressor takes one as is)."""
    import torch
    from torch.utils.data import DataLoader

    rows = [{"input_ids": torch.tensor([e["input_ids"]]), "attention_mask": torch.tensor([e["attention_mask"]])}
            for e in examples]
    return DataLoader(cast(Any, rows), batch_size=None)  # a list is a map-style dataset


def _quantize(variant: Variant[CTParams], ctx: BuildContext, out_dir: Path,
              examples: list[dict[str, list[int]]], device: str) -> None:
    """Load the source in bf16 (the dtype vLLM checkpoints keep their dense tensors and scales
    in; GPTQ's Hessians are fp32 either way), run llm-compressor's oneshot (sequential pipeline: one layer at a time
    through the calibration data) and save compressed; failures become EngineErrors."""
    import torch
    from transformers import AutoModelForCausalLM

    p = variant.params
    log_path = ctx.work_dir / f"{variant.name}.llmcompressor.log"
    report = gm._reporter(ctx.progress, sys.stdout)
    model = None
    try:
        with _quiet_logs(log_path):
            from llmcompressor import oneshot

            report("load source", 0, None)
            model = AutoModelForCausalLM.from_pretrained(
                str(ctx.source.path), dtype=torch.bfloat16,
                device_map={"": "cuda:0"} if device == "cuda" else None)
            report("quantize", 0, None)
            data = {"dataset": _loader(examples), "pipeline": "sequential"} if examples else {}
            oneshot(model=model, recipe=recipe(p), **data)
            report("save", 0, None)
            model.save_pretrained(str(out_dir), save_compressed=True,
                                  max_shard_size=gm.shard_bytes(f.parse_size(p.split_max_size)))
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - llm-compressor raises anything from anywhere
        raise EngineError(CTEngine.name, f"llm-compressor failed: {type(e).__name__}: {e} "
                          f"(log: {log_path})", variant.name) from e
    finally:
        model = None
        _reset_session()


def _reset_session() -> None:
    """llm-compressor's global session keeps the model (and GPTQ's state) after oneshot: drop it,
    or the next variant of the build holds two models."""
    try:
        from llmcompressor.core import active_session

        active_session().reset()
    except Exception:  # noqa: BLE001 - nothing to free when the import itself failed
        pass
    gc.collect()


# ---------------------------------------------------------------- output folder

# What llm-compressor writes that we keep; tokenizer and generation config come from the source
# (transformers' save writes its own generation_config.json; the source's is what users had).
KEEP = ("config.json", "recipe.yaml")


def finish_folder(out_dir: Path, source: Path) -> None:
    """Keep the weights, config.json and recipe.yaml (how it was made, as RedHatAI's repos
    carry it); copy the source's tokenizer and generation config; write the legacy RoPE keys."""
    for p in sorted(out_dir.iterdir()):
        if not (p.name in KEEP or p.name.endswith(gm.ENGINE_SUFFIXES)):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for p in sorted(source.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.name not in gm.SKIP_SOURCE \
                and not p.name.endswith(gm.SKIP_SOURCE_SUFFIXES):
            shutil.copy2(p, out_dir / p.name)
    cfg = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    (out_dir / "config.json").write_text(json.dumps(gm.with_legacy_rope(cfg), indent=2) + "\n", encoding="utf-8")


def expected_weights(p: CTParams) -> dict[str, Any]:
    """The weight arguments config.json must state for the scheme."""
    if p.scheme == "W4A16":
        return {"num_bits": 4, "type": "int", "symmetric": True,
                "strategy": "channel" if p.group_size == -1 else "group",
                "group_size": None if p.group_size == -1 else p.group_size,
                "actorder": "weight" if p.act_order else None}
    if p.scheme == "W8A8-FP8":
        return {"num_bits": 8, "type": "float", "strategy": "channel"}
    return {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}


def check_output(folder: Path, p: CTParams, max_file_bytes: int) -> None:
    """config.json says compressed-tensors with the scheme's layout, compressed-tensors' own
    ModelCompressor accepts it (what transformers and vLLM build from it), and the weights are
    safetensors within split_max_size; else an EngineError."""
    qc = gm.read_quant_config(folder)
    want: dict[str, Any] = {"quant_method": "compressed-tensors", "format": FORMATS[p.scheme],
                            "quantization_status": "compressed"}
    groups = list((qc.get("config_groups") or {}).values())
    weights = groups[0].get("weights") or {} if len(groups) == 1 else {}
    want.update({f"weights.{k}": v for k, v in expected_weights(p).items()})
    have = {**qc, **{f"weights.{k}": v for k, v in weights.items()}}
    bad = {k: have.get(k) for k, v in want.items() if have.get(k) != v}
    if bad:
        raise EngineError(CTEngine.name, f"config.json quantization_config has {bad}, expected "
                          f"{ {k: want[k] for k in bad} } for {p.scheme} ({len(groups)} config group(s))")
    _compressor_check(qc)
    gm.check_output(CTEngine.name, folder, {"quant_method": "compressed-tensors"}, max_file_bytes)


def _compressor_check(qc: dict[str, Any]) -> None:
    """compressed-tensors 0.20 has no ModelCompressor.from_pretrained any more; the loaders
    (transformers, vLLM) go through from_compression_config, so that is the check."""
    from compressed_tensors.compressors import ModelCompressor
    from transformers import CompressedTensorsConfig

    try:
        mc = ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(qc))
    except Exception as e:  # noqa: BLE001 - pydantic and its own ValueErrors
        raise EngineError(CTEngine.name, f"compressed-tensors rejects the config: {type(e).__name__}: {e}") from e
    if mc.quantization_config is None:
        raise EngineError(CTEngine.name, "compressed-tensors reads no quantization config from config.json")


# ---------------------------------------------------------------- reload


@contextmanager
def open_ct(folder: Path, device: str, log_path: Path | None = None) -> Iterator[LogitsFn]:
    """Load through transformers as users do (bf16 on CPU: the checkpoint's dense dtype);
    compressed-tensors decompresses on the first forward and fake-quantizes activations
    where the scheme quantizes them."""
    ct_version()
    from ..hfmodel import hf_logits

    cm = hf_logits(folder, dtype="bfloat16", device_map={"": "cuda:0"}) if device == "cuda" \
        else hf_logits(folder, dtype="bfloat16", device="cpu")
    with contextlib.ExitStack() as stack:
        with _quiet_logs(log_path):
            fn = stack.enter_context(cm)

        def logits(ids: Any) -> Any:
            with _quiet_logs(log_path):  # the first call decompresses, with a progress bar
                return fn(ids)

        yield logits


# ---------------------------------------------------------------- resource estimates
# llm-compressor loads the whole model (bf16) and runs the sequential pipeline: one decoder layer
# at a time through the calibration windows. GPTQ keeps a float32 Hessian for every Linear of the
# layer at once (q, k, v, o, gate, up: hidden^2 each; down: intermediate^2), and solves one module
# at a time in float32. Saving compresses module by module in place. Scoring reloads the branch
# through transformers: the compressed tensors, then the dense bf16 model they decompress into.

WEIGHT_BYTES = {"W4A16": 0.5, "W8A8-FP8": 1.0, "NVFP4A16": 0.5 + 1 / 16, "NVFP4": 0.5 + 1 / 16}
LIBRARY_BASE = int(0.3e9)  # llm-compressor's and compressed-tensors' imports beside PROCESS_BASE


def output_bytes(p: CTParams, shape: ModelShape) -> list[int]:
    """Tensor bytes in checkpoint order: quantized Linear weights with their scales, the rest bf16."""
    gs = p.group_size if p.group_size > 0 else shape.hidden
    scale = 2 / gs if p.scheme == "W4A16" else 0.0  # W4A16: a bf16 scale per group
    return [int(n * (WEIGHT_BYTES[p.scheme] + scale)) if kind == "linear" else 2 * n for kind, n in shape.tensors()]


def _quantize_ram(p: CTParams, shape: ModelShape, work: Workload) -> int:
    h, i = shape.hidden, shape.intermediate
    calibrated = p.scheme in CALIBRATED
    hessians = 4 * (6 * h * h + i * i) if p.scheme == "W4A16" else 0
    solve = 4 * 2 * h * i if p.scheme == "W4A16" else 0  # the largest module in float32, and its update
    acts = work.calib_tokens * h * 2 * 2 if calibrated else 0  # a layer's inputs and outputs, bf16
    return PROCESS_BASE + LIBRARY_BASE + 2 * shape.params + hessians + solve + acts


def estimate(p: CTParams, shape: ModelShape, work: Workload, machine: Machine) -> Estimate:
    sizes = output_bytes(p, shape)
    out, dense = sum(sizes), 2 * shape.params
    files = pack_files(sizes, gm.shard_bytes(f.parse_size(p.split_max_size)))
    calib = work.calib_tokens if p.scheme in CALIBRATED else 0
    passes = 2 if calib else 0  # calibrate, then propagate the layer's outputs
    tflop = gm._work_tflop(shape, work, passes) if p.scheme == "W4A16" else passes * 2 * shape.linear_params * calib / 1e12
    score = 2 * shape.params * work.eval_tokens
    if machine.device == "cuda":
        seconds = tflop * 1e12 / (gm.GPU_FLOPS_SHARE * machine.gpu_flops) + score / machine.gpu_flops
        return Estimate(int(PROCESS_BASE + LIBRARY_BASE + dense), int(_quantize_ram(p, shape, work) - PROCESS_BASE),
                        out, seconds, "quantize", files)
    reload = PROCESS_BASE + LIBRARY_BASE + dense + out
    ram, stage = max((_quantize_ram(p, shape, work), "quantize"), (reload, "reload and score"))
    # llm-compressor's CPU pipeline: ~2.3x GPTQModel's time per calibration token (benchmarks/ct_schemes.py)
    seconds = 2.3 * tflop * gm.CPU_SECONDS_PER_TFLOP * 2 / machine.cores + score / machine.cpu_flops
    return Estimate(int(ram), 0, out, seconds, stage, files)
