"""What the GPTQ and AWQ engines share: GPTQModel set-up, one quantize call with per-layer
progress, an output folder that holds what users download and nothing else, and the
reload through transformers that evaluation uses.

GPTQModel writes its own progress bars and log lines to stdout; they go to a log file in
the build's work_dir instead, so the CLI's progress display stays readable.

On CPU GPTQModel computes in bf16 (bf16 sources) or fp32, never fp16, whose CPU matmuls are
slow; the saved checkpoint is fp16 either way, the same as one made on a GPU.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import formats as f
from ..errors import EngineError, EngineUnavailable
from ..records import WEIGHT_SUFFIXES, LogitsFn, ProgressFn
from ..sizing import PROCESS_BASE, Estimate, Machine, ModelShape, OutputFiles, Workload, pack_files

# Runtimes that serve both GPTQ and AWQ checkpoints (the card's compatibility rows).
# vLLM has kernels for GPTQ 2/3/4/8 bits and AWQ GEMM; TGI serves both with --quantize.
VLLM = f.Runtime("vLLM", f.always, "`vllm serve REPO --revision BRANCH --quantization {fmt}`")
TGI = f.Runtime("Text Generation Inference", f.always, "`--quantize {fmt}`")

GPTQ_EXTRA = "pip install 'quantkit-workbench[gptq]'"
# What the checkpoint holds besides the packed weights (embeddings, norms, scales): fp16,
# as AutoGPTQ wrote it and as the fp16-only GPTQ/AWQ kernels (vLLM's, ExLlama) expect.
SAVE_DTYPE = "float16"

# Files of the engine's output folder that we keep; tokenizer, generation config and the
# rest come from the source itself (GPTQModel rewrites tokenizer_config.json, drops
# tokenizer.model and turns on do_sample in generation_config.json).
ENGINE_FILES = ("config.json", "quantize_config.json")
ENGINE_SUFFIXES = (".safetensors", ".safetensors.index.json")
# Source files that are not copied: weights (the quantized ones replace them), configs the
# engine wrote, the model card (card.py writes one per variant), git metadata.
SKIP_SOURCE = {"config.json", "quantize_config.json", "quant_config.json", "README.md", "readme.md"}
SKIP_SOURCE_SUFFIXES = (*WEIGHT_SUFFIXES, ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npz",
                        ".index.json")
# quantization_config.meta keys that hold machine-local paths: not for publishing.
LOCAL_META_KEYS = ("offload_to_disk_path",)


# ---------------------------------------------------------------- environment


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def prepare_env() -> None:
    """GPTQModel sizes its CPU pools from this; on 2 cores its own default fails."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(cpu_count()))


@functools.lru_cache(maxsize=1)
def gptqmodel_version() -> str:
    """'gptqmodel 7.6.0'; EngineUnavailable when it (or torch, optimum) cannot be imported."""
    prepare_env()
    try:
        with contextlib.redirect_stdout(_Sink()):  # the import prints a banner
            import gptqmodel
            import optimum  # noqa: F401 - transformers needs it to load GPTQ checkpoints
    except Exception as e:  # noqa: BLE001 - a broken install fails in many ways
        raise EngineUnavailable("gptqmodel", f"cannot import GPTQModel ({type(e).__name__}: {e}); "
                                f"install it with {GPTQ_EXTRA}") from None
    return f"gptqmodel {gptqmodel.__version__}"


class _Sink:
    """A write-only text stream; writes after close are dropped (GPTQModel's render thread)."""

    _logbar_queue_wrapped = True  # logbar writes to it as it is, without its own queue

    def __init__(self, path: Path | None = None):
        self._f = open(path, "a", encoding="utf-8", errors="replace") if path else None  # noqa: SIM115

    def write(self, s: str) -> int:
        f = self._f
        if f is not None and not f.closed:
            f.write(s)
        return len(s)

    def flush(self) -> None:
        if self._f is not None and not self._f.closed:
            self._f.flush()

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


@contextmanager
def engine_output(log_path: Path | None) -> Iterator[None]:
    """Send what GPTQModel prints to stdout into log_path (appended)."""
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    sink = _Sink(log_path)
    try:
        with contextlib.redirect_stdout(sink):
            yield
    finally:
        sink.close()


def device_of(ctx_device: str) -> str:
    return "cuda" if ctx_device == "cuda" else "cpu"


def source_dtype(source: Path) -> str:
    try:
        cfg = json.loads((source / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    cfg = cfg.get("text_config", cfg) if "dtype" not in cfg and "torch_dtype" not in cfg else cfg
    return str(cfg.get("dtype") or cfg.get("torch_dtype") or "")


def compute_dtype(source: Path, device: str) -> str:
    """The dtype GPTQModel quantizes in. fp16 on CUDA. On CPU fp16 matmuls have no fast
    kernels (about 40x slower than bf16 on an AVX512-BF16 CPU, measured): bf16 for bf16
    checkpoints (their exact weights), fp32 for the rest (no rounding to bf16 first)."""
    if device == "cuda":
        return "float16"
    return "bfloat16" if source_dtype(source) == "bfloat16" else "float32"


# ---------------------------------------------------------------- calibration


def calibration_examples(windows: np.ndarray, seq_len: int | None = None) -> list[dict[str, list[int]]]:
    """Token windows as GPTQModel examples, cut to seq_len tokens when that is shorter."""
    rows = windows[:, :seq_len] if seq_len else windows
    return [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in rows]


def calibration_notes(examples: list[dict[str, list[int]]]) -> dict[str, Any]:
    n = len(examples)
    seq = len(examples[0]["input_ids"]) if n else 0
    return {"calibration_samples": n, "calibration_seq_len": seq, "calibration_tokens": n * seq}


# ---------------------------------------------------------------- quantize


@dataclass(frozen=True)
class QuantJob:
    """One GPTQModel run: load the source with a quantize config, quantize, save."""

    engine: str  # "gptq" / "awq": for error messages
    source: Path
    config_cls: str  # name in gptqmodel.quantization: "GPTQConfig", "AWQConfig", "RTNConfig"
    config: dict[str, Any]  # its keyword arguments
    examples: list[dict[str, list[int]]] | None  # None for RTN (no calibration)
    device: str  # "cuda" or "cpu"
    backend: str = "AUTO"  # gptqmodel.BACKEND member name
    batch_size: int = 4
    dtype: str = ""  # compute dtype; "" = compute_dtype(source, device)
    max_file_bytes: int = f.parse_size(f.SPLIT_DEFAULT)  # the variant's split_max_size


# Sharding. GPTQModel's save() shards at "4GB" (4 GiB) unless told otherwise and counts only
# tensor bytes; each file also carries a JSON header (~120 bytes a tensor). What it is given
# leaves room for that header, so no file exceeds split_max_size. The files are what
# transformers writes and reads: model-0000i-of-0000N.safetensors plus
# model.safetensors.index.json (one model.safetensors when everything fits).
HEADER_ALLOWANCE = 10**6


def shard_bytes(max_file_bytes: int) -> int:
    """Tensor bytes per shard for GPTQModel's save(max_shard_size=...), in bytes (an int: its
    strings count in binary units, ours in decimal)."""
    return max_file_bytes - min(HEADER_ALLOWANCE, max_file_bytes // 50)


class _LayerProgress:
    """GPTQModel's layer-complete hook -> ProgressFn("quantize layers", done, total)."""

    def __init__(self, report: ProgressFn, total: int | None):
        self.report, self.total, self.done = report, total, 0

    def __call__(self, layer_idx: int, submodule_finalized: bool) -> None:
        if not submodule_finalized:  # the second call per layer comes from a finalizer thread
            self.done += 1
            self.report("quantize layers", self.done, self.total)


def _reporter(progress: ProgressFn, stdout: Any) -> ProgressFn:
    """Progress drawn on the real stdout, never into the engine log; never raises."""

    def report(task: str, done: int, total: int | None) -> None:
        try:
            with contextlib.redirect_stdout(stdout):
                progress(task, done, total)
        except Exception:  # noqa: BLE001 - a drawing problem must not stop quantization
            pass

    return report


def run(job: QuantJob, out_dir: Path, progress: ProgressFn, log_path: Path | None,
        offload_dir: Path | None = None) -> None:
    """Quantize and save into out_dir; any engine failure becomes an EngineError."""
    prepare_env()
    gptqmodel_version()
    import gptqmodel.quantization as gq
    import torch
    from gptqmodel import BACKEND, GPTQModel

    kwargs = dict(job.config)
    if offload_dir is not None:  # GPTQModel's default is a fresh folder under /tmp
        shutil.rmtree(offload_dir, ignore_errors=True)  # left over by a killed run
        kwargs["offload_to_disk_path"] = str(offload_dir)
    report = _reporter(progress, sys.stdout)
    report("load source", 0, None)
    model = None
    try:
        with engine_output(log_path):
            qcfg = getattr(gq, job.config_cls)(**kwargs)
            model = GPTQModel.load(str(job.source), qcfg, device=job.device,
                                   dtype=getattr(torch, job.dtype or compute_dtype(job.source, job.device)))
            total = _n_layers(model)
            model.layer_callback = _LayerProgress(report, total)
            report("quantize layers", 0, total)
            model.quantize(job.examples, batch_size=job.batch_size, backend=BACKEND[job.backend])
            report("save", 0, None)
            model.save(str(out_dir), max_shard_size=shard_bytes(job.max_file_bytes))
    except (MemoryError, torch.OutOfMemoryError):  # the pipeline reports these as out of memory
        raise
    except Exception as e:  # noqa: BLE001 - GPTQModel raises anything from anywhere
        where = f" (GPTQModel log: {log_path})" if log_path else ""
        raise EngineError(job.engine, f"GPTQModel failed: {type(e).__name__}: {e}{where}") from e
    finally:
        if offload_dir is not None:
            shutil.rmtree(offload_dir, ignore_errors=True)
        model = None  # free the weights before the caller reloads anything
        if job.device == "cuda":
            torch.cuda.empty_cache()


def _n_layers(model: Any) -> int | None:
    cfg = getattr(getattr(model, "model", None), "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    return getattr(cfg, "num_hidden_layers", None)


# ---------------------------------------------------------------- output folder


def finish_folder(out_dir: Path, source: Path, *, log_dir: Path | None = None,
                  log_name: str = "quant_log.csv") -> dict[str, Any]:
    """Keep the engine's weights and configs, copy the source's tokenizer and side files,
    drop machine-local paths from the quantization config, store floats as fp16.
    Returns notes from GPTQModel's per-module log."""
    notes: dict[str, Any] = {}
    for p in sorted(out_dir.iterdir()):
        if p.name == "quant_log.csv":
            notes.update(_log_notes(p))
            if log_dir is not None:
                log_dir.mkdir(parents=True, exist_ok=True)
                shutil.move(str(p), log_dir / log_name)
        if p.exists() and not (p.name in ENGINE_FILES or p.name.endswith(ENGINE_SUFFIXES)):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for p in sorted(source.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.name not in SKIP_SOURCE \
                and not p.name.endswith(SKIP_SOURCE_SUFFIXES):
            shutil.copy2(p, out_dir / p.name)
    for name in ENGINE_FILES:
        _scrub_local_paths(out_dir / name)
    to_save_dtype(out_dir)
    _write_json(out_dir / "config.json", with_legacy_rope(_read_json(out_dir / "config.json")))
    return notes


def to_save_dtype(folder: Path) -> None:
    """Cast the float tensors GPTQModel saved in its compute dtype (bf16/fp32 on CPU) to
    fp16, shard by shard, and say so in config.json. Packed integer tensors stay as they are."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    want = getattr(torch, SAVE_DTYPE)
    sizes: dict[str, int] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as sf:
            meta = sf.metadata()
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
        cast = {k: t.to(want) if t.is_floating_point() and t.dtype != want else t for k, t in tensors.items()}
        if any(cast[k] is not tensors[k] for k in tensors):
            save_file(cast, str(shard), metadata=meta)
        sizes[shard.name] = sum(t.numel() * t.element_size() for t in cast.values())
        del tensors, cast
    cfg = _read_json(folder / "config.json")
    cfg.update(dtype=SAVE_DTYPE, torch_dtype=SAVE_DTYPE)  # torch_dtype: what transformers 4 reads
    _write_json(folder / "config.json", cfg)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        doc = _read_json(index)
        doc.setdefault("metadata", {})["total_size"] = sum(sizes.values())
        _write_json(index, doc)


def with_legacy_rope(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes RoPE settings only as `rope_parameters`; transformers 4, AutoGPTQ,
    ExLlama and older vLLM/TGI read `rope_theta` / `rope_scaling` and silently fall back to
    theta 10000 without them (SmolLM2's is 100000: KLD 0.2 in AutoGPTQ). Write both forms;
    transformers 5 prefers `rope_parameters`."""
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict) or "rope_theta" not in rp:  # absent, or nested per layer type
        return cfg
    out = {**cfg, "rope_theta": rp["rope_theta"]}
    if rp.get("rope_type", "default") != "default":
        out["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    return out


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _scrub_local_paths(path: Path) -> None:
    if not path.is_file():
        return
    doc = _read_json(path)
    qc = doc.get("quantization_config", doc)
    meta = qc.get("meta") if isinstance(qc, dict) else None
    if isinstance(meta, dict) and any(k in meta for k in LOCAL_META_KEYS):
        for k in LOCAL_META_KEYS:
            meta.pop(k, None)
        _write_json(path, doc)


def _log_notes(path: Path) -> dict[str, Any]:
    """GPTQModel's per-module log: mean loss and the largest damping it had to use."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, ValueError, csv.Error):
        return {}
    out: dict[str, Any] = {"quantized_modules": len(rows)}
    if losses := _floats(rows, "loss"):
        # GPTQModel's CPU workers log modules in the order they finish: fsum is the same in
        # any order (np.mean's last digits were not), and 6 digits are what a card needs
        out["mean_module_loss"] = float(f"{math.fsum(losses) / len(losses):.6g}")
    if damps := _floats(rows, "damp"):
        out["max_damp_percent"] = max(damps)
    return out


def _floats(rows: list[dict[str, str]], key: str) -> list[float]:
    """The numeric values of a column ("not applicable" and blanks skipped)."""
    out = []
    for r in rows:
        try:
            out.append(float(r.get(key) or "nan"))
        except ValueError:
            continue
    return [x for x in out if x == x]


def read_quant_config(folder: Path) -> dict[str, Any]:
    """config.json's quantization_config (what transformers reads)."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EngineError("gptqmodel", f"no readable config.json in the output: {e}") from None
    return cfg.get("quantization_config") or {}


def check_output(engine: str, folder: Path, expect: dict[str, Any], max_file_bytes: int | None = None) -> None:
    """The saved folder is what transformers and the runtimes expect, or an EngineError.
    Checked after finish_folder: a CPU build saved in fp32 shrinks to fp16 there."""
    qc = read_quant_config(folder)
    bad = {k: qc.get(k) for k, v in expect.items() if qc.get(k) != v}
    if bad:
        raise EngineError(engine, f"config.json quantization_config has {bad}, expected "
                          f"{ {k: expect[k] for k in bad} }")
    if not any(p.suffix == ".safetensors" for p in folder.iterdir()):
        raise EngineError(engine, "no .safetensors weights written")
    stray = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    if stray:
        raise EngineError(engine, f"pickle weight files written: {', '.join(stray)}")
    if max_file_bytes is not None:
        check_shards(engine, folder, max_file_bytes)


def check_shards(engine: str, folder: Path, max_file_bytes: int) -> None:
    """Each weight file within the limit (a tensor larger than it would get a file of its own),
    and several files only with an index that maps every tensor to one of them."""
    files = sorted(folder.glob("*.safetensors"))
    big = [f"{p.name} ({p.stat().st_size} bytes)" for p in files if p.stat().st_size > max_file_bytes]
    if big:
        raise EngineError(engine, f"{', '.join(big)} over split_max_size ({max_file_bytes} bytes): a single "
                          "tensor is larger than that; raise split_max_size")
    if len(files) > 1:
        index = folder / "model.safetensors.index.json"
        mapped = set(_read_json(index).get("weight_map", {}).values()) if index.is_file() else set()
        if mapped != {p.name for p in files}:
            raise EngineError(engine, f"{len(files)} safetensors shards but model.safetensors.index.json "
                              f"maps {sorted(mapped) or 'none'}")


# ---------------------------------------------------------------- reload


@contextmanager
def open_quantized(folder: Path, device: str, log_path: Path | None = None) -> Iterator[LogitsFn]:
    """Load through transformers.AutoModelForCausalLM, as users do, and yield logits.

    CPU: bfloat16, the dtype the CPU kernels run fast in; a float32 load would hold the
    unquantized embeddings and head at twice their size (1.6 GB at 7B widths, measured).
    CUDA: float16 on the GPU.
    """
    prepare_env()
    gptqmodel_version()
    from ..hfmodel import hf_logits

    if device == "cuda":
        cm = hf_logits(folder, dtype="float16", device_map={"": "cuda:0"})
    else:
        cm = hf_logits(folder, dtype="bfloat16", device="cpu")
    with contextlib.ExitStack() as stack:
        with engine_output(log_path):
            fn = stack.enter_context(cm)
        yield fn


# ---------------------------------------------------------------- resource estimates
# Fitted to benchmarks/scale.py (random Llamas at 7B widths, 2-core CI machine, 2026-12-01):
# GPTQModel reads the source layer by layer (its lazy "turtle" model) and offloads finished
# layers, so what it holds is the unquantized embeddings and head, the layer at work with
# its Hessians, and the calibration inputs and outputs of that layer.

LAYER_WORK_FACTOR = 2.0  # the layer at work, in bf16 layer sizes (weights, their f32 copies)
RETAINED = 1.0e9  # what GPTQModel's process keeps after quantizing, malloc_trim or not (1.44 GB at 7B widths)
RELOAD_FACTOR = 1.5  # transformers' GPTQ/AWQ load holds the checkpoint and the kernels' repacked copy
CPU_SECONDS_PER_TFLOP = 110.0  # GPTQModel's CPU path, per TFLOP of forward + GPTQ updates
GPU_FLOPS_SHARE = 0.05  # GPTQ on a GPU is bound by per-module work, not by matmul peak


def packed_bytes(shape: ModelShape, bits: int, group_size: int) -> int:
    """Quantized Linear weights with their fp16 scales and packed zeros; the rest in fp16."""
    gs = group_size if group_size > 0 else shape.hidden
    linear = shape.linear_params * bits / 8 + shape.linear_params / gs * (2 + bits / 8)
    return int(linear + (shape.params - shape.linear_params) * 2)


def _work_tflop(shape: ModelShape, work: Workload, passes: float) -> float:
    """Forward passes over the calibration tokens plus GPTQ's column updates (rows x cols^2)."""
    forward = passes * 2 * shape.linear_params * work.calib_tokens
    h, i = shape.hidden, shape.intermediate
    updates = shape.layers * (4 * h**3 + 2 * i * h**2 + h * i**2)
    return (forward + updates) / 1e12


def output_files(shape: ModelShape, bits: int, group_size: int, max_file_bytes: int) -> OutputFiles:
    """The safetensors files GPTQModel writes: packed Linear weights (with scales and zeros),
    everything else fp16, packed into shards in checkpoint order."""
    gs = group_size if group_size > 0 else shape.hidden
    sizes = [int(n * bits / 8 + n / gs * (2 + bits / 8)) if kind == "linear" else 2 * n
             for kind, n in shape.tensors()]
    return pack_files(sizes, shard_bytes(max_file_bytes))


def estimate(shape: ModelShape, work: Workload, machine: Machine, bits: int, group_size: int,
             passes: float, max_file_bytes: int | None = None) -> Estimate:
    """GPTQModel quantizing layer by layer (`passes`: forward passes over the calibration
    tokens per layer), then the reload through transformers (bf16) for scoring."""
    e = _estimate(shape, work, machine, bits, group_size, passes)
    limit = max_file_bytes or f.parse_size(f.SPLIT_DEFAULT)
    return replace(e, files=output_files(shape, bits, group_size, limit))


def _estimate(shape: ModelShape, work: Workload, machine: Machine, bits: int, group_size: int,
              passes: float) -> Estimate:
    out = packed_bytes(shape, bits, group_size)
    offload = out - (shape.params - shape.linear_params) * 2  # finished layers, on disk until saved
    unquantized = (shape.params - shape.layers * shape.layer_params) * 2
    hessians = 4 * (6 * shape.hidden**2 + shape.intermediate**2)
    inputs = work.calib_tokens * shape.hidden * 2 * 2  # the layer's inputs and outputs, bf16
    at_work = LAYER_WORK_FACTOR * 2 * shape.layer_params + hessians + inputs
    reload = PROCESS_BASE + RETAINED + RELOAD_FACTOR * out
    score = 2 * shape.params * work.eval_tokens
    tflop = _work_tflop(shape, work, passes)
    if machine.device == "cuda":
        seconds = tflop * 1e12 / (GPU_FLOPS_SHARE * machine.gpu_flops) + score / machine.gpu_flops
        return Estimate(int(PROCESS_BASE + unquantized + inputs), int(at_work + out), out + offload, seconds,
                        "quantize")
    quant = PROCESS_BASE + unquantized + at_work
    seconds = tflop * CPU_SECONDS_PER_TFLOP * 2 / machine.cores + score / machine.cpu_flops
    ram, stage = max((quant, "quantize"), (reload, "reload and score"))
    return Estimate(int(ram), 0, out + offload, seconds, stage)


def is_installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False

