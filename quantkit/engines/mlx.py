"""MLX (Apple's array framework) through mlx-lm: its affine format, w = scale * q + bias per
contiguous group of `group_size` input columns, in the layout `mlx_lm.load` reads
(model.safetensors with `weight`/`scales`/`biases` per quantized module, config.json with
`quantization: {group_size, bits}`). Embeddings (and an untied head) are quantized at the
same bits and group size, as `mlx_lm.convert` does.

Methods:
  rtn   round to nearest: `mlx_lm.convert`'s Python API.
  gptq  GPTQ on our calibration windows, computed on torch by GPTQModel (asymmetric groups,
        no act-order permutation), then repacked exactly into MLX's affine format
        (bias = -scale * zero). mlx-lm's own `quant.gptq` runs its Hessian passes through
        MLX, whose Linux CPU backend is slow: on two layers of SmolLM2-135M it took 24 s for
        512 calibration tokens (5.8 s Hessians, 1.2 s per Linear), which scales to ~30 min for
        the full model on our 78 x 512 German tokens, against 6.5 min for GPTQModel's
        (sequential, act-group-aware) GPTQ.
  awq   AWQ (GEMM, zero points) by GPTQModel on torch, repacked the same way. mlx-lm's
        `quant.awq` grid search took 91 s per layer of SmolLM2 on only 4 x 128 tokens.
  dwq, dynamic   mlx-lm's learned / sensitivity-based methods train through MLX: refused on
        this backend (see UNSUPPORTED_METHODS for the measured times).

Quality is scored by a torch model of the same architecture whose weights are
`mx.dequantize`d with float32 scales and biases: the same numbers as MLX's own float32
forward (max |Δlogit| ~1e-4 on SmolLM2) at torch's speed. `mlx_lm_logits` runs one chunk
through `mlx_lm.load` itself to check that.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import field_validator, model_validator

from .. import formats as f
from ..errors import EngineError, EngineUnavailable
from ..records import BuildContext, EngineResult, LogitsFn
from ..sizing import PROCESS_BASE, Estimate, Machine, ModelShape, Workload, gpu_runtime_overhead
from ..steps import ONE_GPU, Products, TaskResources
from ..variant import Variant
from .base import Engine

MLX_EXTRA = "pip install 'mlx[cpu]' mlx-lm  (on macOS: pip install mlx-lm)"
BITS = (2, 3, 4, 6, 8)  # what mx.quantize packs in affine mode
GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "awq", "gptq", "dwq", "dynamic")
# Repacking unpacks GPTQ v1 / AWQ GEMM words: 2/4/8 bits fill a 32-bit word evenly.
CALIBRATED_BITS = {"gptq": (2, 4, 8), "awq": (4,)}  # GPTQModel's AWQ GEMM is 4-bit only
UNSUPPORTED_METHODS = {
    # Measured on the 2-core CI machine, 2026-12-01 (mlx 0.32.4 CPU backend, SmolLM2-135M,
    # float32; bf16 is ~10x slower there): one gradient step of mlx-lm's dynamic_quant
    # sensitivity pass over 1 x 128 tokens took 46 s, i.e. ~4 h for 78 x 512 calibration tokens.
    "dwq": "mlx-lm's DWQ fine-tunes the quantized scales and biases by gradient descent through "
           "MLX; on MLX's Linux CPU backend one gradient step over 128 tokens of SmolLM2-135M took "
           "46 s (measured), so a DWQ run over the calibration windows would take hours",
    "dynamic": "mlx-lm's dynamic_quant estimates per-layer sensitivities from gradients through MLX; "
               "on MLX's Linux CPU backend one gradient step over 128 tokens of SmolLM2-135M took 46 s "
               "(measured), ~4 h for 78 x 512 calibration tokens",
}
# Per-word shifts that undo AWQ's GEMM interleaving (order 0 2 4 6 1 3 5 7), as mlx-lm's
# own AWQ loader (mlx_lm.utils._unpack_awq_weights) unpacks them.
AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
# GPTQ v1 stores each zero point minus one, subtracted from the packed word as a whole
# (GPTQModel's convert_gptq_v2_to_v1_format); adding the word back is exact modulo 2^32.
V1_ZERO_OFFSET = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}
# mlx-lm writes its own README; card.py writes the model card of every variant.
DROP_FILES = ("README.md",)


class MLXParams(f.ParamsModel):
    bits: int = 4
    group_size: int = 64
    # German-calibrated GPTQ: KLD 0.41 against RTN's 0.77 on SmolLM2-135M at 4 bits, g64 (-46 %,
    # benchmarks/mlx_methods.py), in ~6.5 min on 2 CPU cores.
    method: Literal["rtn", "awq", "gptq", "dwq", "dynamic"] = "gptq"
    target_bpw: float | None = None  # mlx-lm dynamic_quant's average bits per weight

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, v: int) -> int:
        return f.one_of(v, BITS)

    @field_validator("group_size")
    @classmethod
    def _check_group_size(cls, v: int) -> int:
        return f.one_of(v, GROUP_SIZES)

    @field_validator("method", mode="before")
    @classmethod
    def _check_method(cls, v: Any) -> Any:
        if v not in METHODS:
            raise ValueError(f"must be one of {', '.join(METHODS)}")
        if v in UNSUPPORTED_METHODS:
            raise ValueError(f"{v!r} is not supported by quantkit's MLX engine: "
                             f"{UNSUPPORTED_METHODS[v]}. Use method = \"gptq\" (German-calibrated "
                             "GPTQ, repacked to MLX), \"awq\" or \"rtn\"")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> MLXParams:
        if self.target_bpw is not None and self.method != "dynamic":
            raise ValueError(f'target_bpw applies only to method = "dynamic", not "{self.method}"')
        allowed = CALIBRATED_BITS.get(self.method)
        if allowed and self.bits not in allowed:
            raise ValueError(f"method = \"{self.method}\" supports bits {', '.join(map(str, allowed))}, "
                             f"not {self.bits} (use method = \"rtn\" for {self.bits} bits)")
        return self


# ---------------------------------------------------------------- the format


_METHOD_WORDS = {"rtn": "round to nearest", "gptq": "GPTQ, German-calibrated", "awq": "AWQ, German-calibrated"}


def _name(p: MLXParams) -> str:
    return f"mlx-{p.bits}bit-{p.group_size}g-{p.method}"


SPEC = f.FormatSpec(
    name="mlx", repo_suffix="MLX", params=MLXParams, variant_name=_name, branch_name=_name,
    name_keys=frozenset({"bits", "group_size", "method"}),
    columns=(f.BRANCH, f.BITS, f.GROUP_SIZE,
             f.Column("Method", lambda r: str(r.params.get("method"))), f.DATASET, f.SIZE,
             f.memory_column("RAM"), *f.QUALITY, f.TOP1, f.DESCRIPTION),
    describe=lambda p: (f"{p['bits']}-bit MLX affine, group size {p.get('group_size')}, "
                        f"{_METHOD_WORDS.get(str(p.get('method')), p.get('method'))}"),
    use="Apple silicon: mlx-lm, LM Studio's MLX engine",
    tags=("mlx", "quantized", "quantkit"), library_name="mlx",
    runtimes=(
        f.Runtime("mlx-lm", f.always, "`mlx_lm.load(REPO, revision=BRANCH)`"),
        f.Runtime("mlx-lm server (OpenAI API)", f.always, "`mlx_lm.server --model DIR`"),
        f.Runtime("LM Studio (MLX engine, Apple silicon)", f.always, "search REPO in Discover"),
    ),
    example={"bits": 4, "group_size": 64, "method": "rtn"},
    # Apple silicon's unified memory: the GPU runtime's buffers, as stated for CUDA (unmeasured here).
    run_device="RAM", run_overhead=gpu_runtime_overhead,
)


# ---------------------------------------------------------------- the engine


class MLXEngine(Engine[MLXParams]):
    name = "mlx"
    spec = SPEC

    def version(self) -> str:
        return mlx_version()

    def resources(self, variant: Variant[MLXParams]) -> TaskResources:
        """GPTQ/AWQ run GPTQModel on torch (a GPU when there is one); round to nearest is one
        mlx-lm call on MLX's own device (the CPU on a Linux node)."""
        return ONE_GPU if variant.params.method in CALIBRATED_BITS else TaskResources(cpus=1)

    def build(self, variant: Variant[MLXParams], ctx: BuildContext, out_dir: Path,
              inputs: Products) -> EngineResult:
        p = variant.params
        quantizer = self.version()
        log = ctx.work_dir / f"{variant.name}.mlx.log"
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        check_widths(ctx.source.path, p.group_size)
        if p.method == "rtn":
            ctx.progress("quantize", 0, None)
            notes = _build_rtn(ctx.source.path, out_dir, p, ctx.work_dir / f"{variant.name}.mlx-tmp", log)
        elif p.method in ("gptq", "awq"):
            notes = _build_calibrated(variant, ctx, out_dir, p)
        else:  # refused by MLXParams already; kept for params built without validation
            raise EngineError(self.name, UNSUPPORTED_METHODS.get(p.method, p.method), variant.name)
        rope = finish_folder(out_dir, ctx.source.path)
        check_output(out_dir, p)
        # GPTQ/AWQ ran on torch (ctx.device); rtn and the repack on MLX's default device.
        device = ctx.device if p.method in ("gptq", "awq") else _mlx_device()
        return EngineResult(quantizer, device, notes={
            **notes, "bits": p.bits, "group_size": p.group_size,
            "embeddings": f"round to nearest, {p.bits} bits, group size {p.group_size} (as mlx_lm.convert)",
            **rope})

    def open_model(self, folder: Path, ctx: BuildContext) -> AbstractContextManager[LogitsFn]:
        return torch_scorer(folder, device="cuda" if ctx.device == "cuda" else "cpu")

    def estimate(self, variant: Variant[MLXParams], shape: ModelShape, work: Workload,
                 machine: Machine) -> Estimate:
        p = variant.params
        return estimate(shape, work, machine, p)


def _mlx_device() -> str:
    import mlx.core as mx

    return "gpu" if mx.default_device() == mx.gpu else "cpu"


def mlx_version() -> str:
    """'mlx-lm 0.32.2 (mlx 0.32.4)'; EngineUnavailable when either cannot be imported."""
    try:
        import mlx.core as mx
        import mlx_lm
    except Exception as e:  # noqa: BLE001 - missing, or a wheel for another platform
        raise EngineUnavailable("mlx", f"cannot import mlx / mlx-lm ({type(e).__name__}: {e}); "
                                f"install them with {MLX_EXTRA}") from None
    return f"mlx-lm {importlib.metadata.version('mlx-lm')} (mlx {importlib.metadata.version('mlx')})"


# ---------------------------------------------------------------- rtn: mlx_lm.convert


def _build_rtn(source: Path, out_dir: Path, p: MLXParams, tmp: Path, log: Path) -> dict[str, Any]:
    """mlx_lm.convert into a fresh folder (it refuses an existing one), then moved into out_dir."""
    from mlx_lm.convert import convert

    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _output_to(log):
            convert(str(source), str(tmp), quantize=True, q_group_size=p.group_size, q_bits=p.bits,
                    dtype=_source_dtype(source))
        for item in sorted(tmp.iterdir()):
            shutil.move(str(item), out_dir / item.name)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - mlx-lm raises anything (unknown model_type, ...)
        raise EngineError("mlx", f"mlx_lm.convert failed: {type(e).__name__}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"method": "rtn (mlx_lm.convert)"}


def check_widths(source: Path, group_size: int) -> None:
    """mlx-lm leaves a module unquantized, silently, when the group size does not divide its
    input width (SmolLM2's 576 at group size 128): refuse instead."""
    cfg = _read_json(source / "config.json")
    cfg = cfg.get("text_config", cfg)
    heads = cfg.get("num_attention_heads") or 0
    head_dim = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // heads if heads else 0)
    widths = {k: cfg.get(k) for k in ("hidden_size", "intermediate_size")}
    widths["num_attention_heads x head_dim"] = heads * head_dim
    bad = {k: v for k, v in widths.items() if isinstance(v, int) and v and v % group_size}
    if bad:
        raise EngineError("mlx", f"group size {group_size} does not divide the input width of "
                          f"{', '.join(f'{k} {v}' for k, v in bad.items())}; mlx-lm would leave those "
                          "modules unquantized. Use a group size that divides them (e.g. 64 or 32)")


def _source_dtype(source: Path) -> str | None:
    """The source's float dtype for mlx_lm.convert, which reads only `torch_dtype` (transformers
    5 writes `dtype`); None keeps the weights as stored."""
    cfg = _read_json(source / "config.json")
    dt = cfg.get("torch_dtype") or cfg.get("dtype")
    return dt if dt in ("float16", "bfloat16", "float32") else None


@contextmanager
def _output_to(log: Path) -> Iterator[None]:
    """mlx-lm prints [INFO] lines and progress bars; they go to the variant's log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        yield


# ---------------------------------------------------------------- gptq / awq: GPTQModel + repack


def _build_calibrated(variant: Variant[MLXParams], ctx: BuildContext, out_dir: Path, p: MLXParams) -> dict[str, Any]:
    """GPTQModel quantizes on torch into work_dir; its groups are repacked into MLX files."""
    from . import _gptqmodel as gm

    gptqmodel = gm.gptqmodel_version()
    examples = gm.calibration_examples(ctx.calib.windows)
    device = gm.device_of(ctx.device)
    tmp = ctx.work_dir / f"{variant.name}.{p.method}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # AWQ on the CPU: GPTQModel's torch kernel, which packs only bf16/fp16 (as the AWQ engine does)
    cpu_awq: dict[str, Any] = {"backend": "AWQ_TORCH", "dtype": "bfloat16"} if p.method == "awq" \
        and device == "cpu" else {}
    job = gm.QuantJob(f"mlx/{p.method}", ctx.source.path, *_gptqmodel_config(p), examples, device, **cpu_awq)
    try:
        gm.run(job, tmp, ctx.progress, ctx.work_dir / f"{variant.name}.gptqmodel.log",
               offload_dir=ctx.work_dir / f"{variant.name}.offload")
        ctx.progress("repack to MLX", 0, None)
        with _output_to(ctx.work_dir / f"{variant.name}.mlx.log"):
            n = repack_to_mlx(tmp, ctx.source.path, out_dir, p)
    finally:
        if not ctx.keep_intermediate:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"method": f"{p.method} ({gptqmodel.replace('gptqmodel', 'GPTQModel')}, repacked to MLX affine)",
            "repacked_modules": n, **gm.calibration_notes(examples),
            "repack": "GPTQModel's codes and zero points kept exactly; scales and biases stored in the "
                      "model's dtype (bf16 for bf16 sources: within 0.1 of a quantization step)"}


def _gptqmodel_config(p: MLXParams) -> tuple[str, dict[str, Any]]:
    """Asymmetric groups over contiguous columns: what MLX's affine format holds exactly.
    No act-order (desc_act) permutation; GPTQModel's act_group_aware only changes the order
    in which groups are quantized, not which columns form a group (checked in repack)."""
    if p.method == "awq":
        return "AWQConfig", {"bits": p.bits, "group_size": p.group_size, "sym": False, "format": "gemm"}
    return "GPTQConfig", {"bits": p.bits, "group_size": p.group_size, "desc_act": False, "sym": False,
                          "damp_percent": 0.1, "true_sequential": True}


def unpack_words(words: np.ndarray, bits: int, axis: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """int32 words holding 32/bits codes each, low bits first, along `axis` (0: rows, 1: columns)."""
    u = words.astype(np.int64) & 0xFFFFFFFF
    pf = 32 // bits
    shifts = np.arange(pf, dtype=np.int64) * bits if order is None else np.asarray(order, np.int64) * bits
    if axis == 0:  # [rows / pf, cols] -> [rows, cols]
        q = (u[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
        return q.reshape(-1, words.shape[1]).astype(np.uint32)
    q = (u[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)  # [rows, cols / pf] -> [rows, cols]
    return q.reshape(words.shape[0], -1).astype(np.uint32)


def pack_mlx(q: np.ndarray, bits: int) -> np.ndarray:
    """[out, in] codes -> [out, in * bits / 32] uint32 words, as mx.quantize packs them."""
    pf = 32 // bits
    shifts = (np.arange(pf, dtype=np.uint64) * bits)[None, None, :]
    words = (q.reshape(q.shape[0], -1, pf).astype(np.uint64) << shifts).sum(axis=-1)
    return words.astype(np.uint32)


def gptq_groups(t: dict[str, Any], bits: int, group_size: int, fmt: str) -> tuple[np.ndarray, ...]:
    """One GPTQ v1 / AWQ GEMM module -> MLX (codes [out, in], scales [out, groups] f32,
    biases [out, groups] f32) with w = scales * q + biases = scales * (q - zero)."""
    scales = t["scales"].float().numpy()  # [groups, out]
    if fmt == "awq":
        q = unpack_words(t["qweight"].numpy(), bits, axis=1, order=AWQ_ORDER)  # [in, out]
        zeros = unpack_words(t["qzeros"].numpy(), bits, axis=1, order=AWQ_ORDER)  # [groups, out]
    else:
        q = unpack_words(t["qweight"].numpy(), bits, axis=0)
        words = (t["qzeros"].numpy().astype(np.int64) + V1_ZERO_OFFSET[bits]) & 0xFFFFFFFF
        zeros = unpack_words(words, bits, axis=1)
        g_idx = t.get("g_idx")
        if g_idx is not None and not np.array_equal(g_idx.numpy(), np.arange(q.shape[0]) // group_size):
            raise EngineError("mlx", "GPTQ groups are not contiguous columns (act-order): "
                              "MLX's affine format cannot hold them")
    zeros = zeros[:, :scales.shape[1]]
    if q.shape[0] != scales.shape[0] * group_size:
        raise EngineError("mlx", f"{q.shape[0]} input columns do not make {scales.shape[0]} groups of {group_size}")
    s = np.ascontiguousarray(scales.T)
    return np.ascontiguousarray(q.T), s, -s * zeros.T.astype(np.float32)


def _read_quantized(folder: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any], str]:
    """GPTQModel's output: module prefix -> its packed tensors, the other tensors by name, and
    the format (gptq/awq)."""
    from safetensors import safe_open

    qc = _read_json(folder / "config.json").get("quantization_config") or {}
    fmt = "awq" if qc.get("quant_method") == "awq" else "gptq"
    if fmt == "gptq" and qc.get("checkpoint_format", "gptq") != "gptq":
        raise EngineError("mlx", f"GPTQModel wrote checkpoint_format {qc.get('checkpoint_format')!r}, expected gptq")
    modules: dict[str, dict[str, Any]] = {}
    rest: dict[str, Any] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as sf:
            for k in sf.keys():
                prefix, _, leaf = k.rpartition(".")
                if leaf in ("qweight", "qzeros", "scales", "g_idx"):
                    modules.setdefault(prefix, {})[leaf] = sf.get_tensor(k)
                else:
                    rest[k] = sf.get_tensor(k)
    return modules, rest, fmt


def repack_to_mlx(quantized: Path, source: Path, out_dir: Path, p: MLXParams) -> int:
    """Write an mlx-lm folder whose decoder Linear modules hold GPTQModel's groups exactly and
    whose other quantizable modules (embeddings, untied head) are RTN, as mlx_lm.convert makes
    them. Returns the number of repacked modules."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import load, quantize_model, save

    loaded: Any = load(str(source), lazy=True, return_config=True)
    model, tokenizer, config = loaded
    if (dt := _source_dtype(source)) is not None:
        model.set_dtype(getattr(mx, dt))
    model, config = quantize_model(model, config, p.group_size, p.bits)
    modules, rest, fmt = _read_quantized(quantized)
    found = dict(model.named_modules())
    for prefix, t in modules.items():
        m = found.get(prefix)
        if not isinstance(m, nn.QuantizedLinear) or (m.bits, m.group_size) != (p.bits, p.group_size):
            raise EngineError("mlx", f"{prefix}: no {p.bits}-bit MLX module of group size {p.group_size} "
                              "to take GPTQModel's weights")
        q, s, b = gptq_groups(t, p.bits, p.group_size, fmt)
        if q.shape[1] * p.bits // 32 != m.weight.shape[1] or q.shape[0] != m.weight.shape[0]:
            raise EngineError("mlx", f"{prefix}: GPTQModel's shape {q.shape} does not match the model")
        dtype = m.scales.dtype
        m.weight = mx.array(pack_mlx(q, p.bits))
        m.scales, m.biases = mx.array(s).astype(dtype), mx.array(b).astype(dtype)
    if not modules:
        raise EngineError("mlx", "GPTQModel's output holds no quantized modules")
    _take_float_tensors(model, rest)
    save(str(out_dir), str(source), model, tokenizer, config)
    return len(modules)


def _take_float_tensors(model: Any, tensors: dict[str, Any]) -> None:
    """The unquantized tensors GPTQModel wrote (norms): AWQ folds its scales into them."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(model.parameters()))
    take = []
    for k, t in tensors.items():
        prefix = k.rpartition(".")[0]
        mine = params.get(k)
        if mine is None or f"{prefix}.scales" in params or not t.is_floating_point():
            continue  # not in the MLX model, or a module quantized there (the embeddings: RTN)
        if tuple(mine.shape) != tuple(t.shape):
            raise EngineError("mlx", f"{k}: GPTQModel's shape {tuple(t.shape)} != {tuple(mine.shape)}")
        take.append((k, mx.array(t.float().numpy()).astype(mine.dtype)))
    model.load_weights(take, strict=False)


# ---------------------------------------------------------------- output folder


def finish_folder(out_dir: Path, source: Path) -> dict[str, Any]:
    """Write `rope_theta` (and `rope_scaling`) into config.json: mlx-lm 0.32.2 reads only those,
    and a transformers 5 checkpoint has only `rope_parameters`, so mlx-lm would silently use
    theta 10000. Drop mlx-lm's README. Returns notes."""
    for name in DROP_FILES:
        (out_dir / name).unlink(missing_ok=True)
    path = out_dir / "config.json"
    cfg = _read_json(path)
    src = _read_json(source / "config.json")
    rp = cfg.get("rope_parameters") or src.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        cfg["rope_theta"] = rp["rope_theta"]
        if rp.get("rope_type", "default") != "default" and "rope_scaling" not in cfg:
            cfg["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        _write_json(path, cfg)
    return {"rope_theta": cfg["rope_theta"]} if "rope_theta" in cfg else {}


def check_output(folder: Path, p: MLXParams) -> None:
    """What mlx_lm.load needs: config.json with the quantization and rope_theta, weights, tokenizer."""
    cfg = _read_json(folder / "config.json")
    q = cfg.get("quantization") or {}
    if (q.get("bits"), q.get("group_size")) != (p.bits, p.group_size):
        raise EngineError("mlx", f"config.json quantization is {q}, expected bits {p.bits}, group size {p.group_size}")
    if "rope_parameters" in cfg and "rope_theta" not in cfg:
        raise EngineError("mlx", "config.json has no rope_theta (mlx-lm would use 10000)")
    if not list(folder.glob("model*.safetensors")):
        raise EngineError("mlx", "no model*.safetensors written")
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise EngineError("mlx", "no tokenizer files written")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- scoring


def dequantized_state(folder: Path) -> dict[str, Any]:
    """Every tensor of an MLX folder as float32 torch tensors, quantized modules through
    mx.dequantize with their scales and biases cast to float32 first (dequantizing in bf16
    rounds the weights: up to 1 logit off on SmolLM2)."""
    import mlx.core as mx
    import torch

    cfg = _read_json(folder / "config.json")
    default = cfg.get("quantization") or {}
    weights: dict[str, Any] = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        weights.update(dict(mx.load(str(shard))))  # type: ignore[arg-type]
    out: dict[str, Any] = {}
    for k, v in weights.items():
        prefix, _, leaf = k.rpartition(".")
        if leaf in ("scales", "biases") or (leaf == "weight" and f"{prefix}.scales" in weights):
            continue
        out[k] = torch.from_numpy(np.array(v.astype(mx.float32)))
    for k in weights:
        if k.endswith(".scales"):
            prefix = k[:-len(".scales")]
            own = default.get(prefix)
            q: dict[str, Any] = own if isinstance(own, dict) else default
            w = mx.dequantize(weights[f"{prefix}.weight"], weights[k].astype(mx.float32),
                              weights[f"{prefix}.biases"].astype(mx.float32),
                              group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"))
            out[f"{prefix}.weight"] = torch.from_numpy(np.array(w))
    return out


def torch_config(folder: Path) -> Any:
    """The transformers config of an MLX folder, without its quantization entries."""
    from transformers import AutoConfig

    cfg = {k: v for k, v in _read_json(folder / "config.json").items()
           if k not in ("quantization", "quantization_config")}
    return AutoConfig.for_model(**cfg)


@contextmanager
def torch_scorer(folder: Path, device: str = "cpu") -> Iterator[LogitsFn]:
    """A float32 torch model filled with the MLX folder's dequantized weights, as logits."""
    import torch
    from transformers import AutoModelForCausalLM

    config = torch_config(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = dequantized_state(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied and "rotary_emb" not in k]
    if missing or unexpected:
        raise EngineError("mlx", f"{folder.name}: weights do not fit {type(model).__name__}: "
                          f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}")
    if tied:
        model.tie_weights()
    model = model.to(device).eval()
    del state

    def fn(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.as_tensor(ids, dtype=torch.long, device=model.device)[None]
            return model(input_ids=x).logits[0].float().cpu().numpy()

    yield fn  # the model goes with this generator's frame when the with-block ends


def mlx_lm_logits(folder: Path, ids: np.ndarray, dtype: str | None = "float32") -> np.ndarray:
    """Logits [len(ids), vocab] of one chunk through `mlx_lm.load` and MLX's own forward.
    dtype "float32" casts the loaded parameters (scales and biases included) to float32, the
    fast path of MLX's CPU backend (bf16 is ~10x slower there); None runs them as stored."""
    import mlx.core as mx
    import mlx_lm

    model = mlx_lm.load(str(folder))[0]
    if dtype is not None:
        model.set_dtype(getattr(mx, dtype))
    logits = model(mx.array(np.asarray(ids, dtype=np.int32))[None])[0].astype(mx.float32)
    return np.array(logits)


# ---------------------------------------------------------------- resource estimates

# mlx_lm.convert of SmolLM2-135M took 9.6 s with its imports on 2 cores; what it holds is the
# source (loaded lazily, bf16) and the quantized copy.
CONVERT_SECONDS = 4.0
CONVERT_SECONDS_PER_PARAM = 4e-8
GPTQMODEL_PASSES = {"gptq": 2, "awq": 13}  # forward passes per layer, as engines/gptq.py and awq.py


def mlx_bytes(shape: ModelShape, bits: int, group_size: int) -> int:
    """Every matrix (embeddings and head included) at `bits` with a scale and bias per group;
    scales, biases and norms in the source's dtype (mlx_lm.convert keeps it)."""
    matrices = shape.linear_params + shape.embed_params * (1 if shape.tied else 2)
    b = shape.dtype_bytes
    return int(matrices * (bits / 8 + 2 * b / group_size) + (shape.params - matrices) * b)


def estimate(shape: ModelShape, work: Workload, machine: Machine, p: MLXParams) -> Estimate:
    """mlx-lm's convert (or the repack after GPTQModel), then the float32 torch scorer."""
    out = mlx_bytes(shape, p.bits, p.group_size)
    convert_ram = PROCESS_BASE + shape.bf16_bytes + out
    score_ram = PROCESS_BASE + 4 * shape.params + 2 * out  # f32 model + the MLX tensors loaded
    convert_s = CONVERT_SECONDS + CONVERT_SECONDS_PER_PARAM * shape.params * 2 / machine.cores
    score_s = 2 * shape.params * work.eval_tokens / (machine.gpu_flops or machine.cpu_flops)
    ram, stage = max((convert_ram, "convert"), (score_ram, "reload and score"))
    if p.method not in GPTQMODEL_PASSES:
        return Estimate(int(ram), 0, out, convert_s + score_s, stage)
    from . import _gptqmodel as gm

    # GPTQModel's estimate includes its own reload and scoring, which the repack replaces.
    g = gm.estimate(shape, work, machine, p.bits, p.group_size, passes=GPTQMODEL_PASSES[p.method])
    ram, stage = max((ram, stage), (g.ram, g.stage))
    return Estimate(int(ram), g.vram, g.disk + out, g.seconds + convert_s, stage)
