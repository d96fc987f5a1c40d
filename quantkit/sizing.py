"""Sizes and rates for the resource plan: the model's shape from config.json, the machine, and
the estimate records. Neutral (imports nothing of quantkit's but errors): the engines compute
their formats' estimates from these, quantkit.resources sums them into a plan.

Every constant was fitted to `benchmarks/scale.py` (random Llamas at 7B widths, 2/4/8 layers,
on the 2-core CI machine, 2026-12-01).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GB = 10**9

# The build's own process with torch, transformers, the engines, the tokenizer and the
# calibration set loaded: 0.3 GB after calibration, 0.45 GB once the engines are imported.
PROCESS_BASE = int(0.45 * GB)
GROUP_TOKENS = 2048  # quantkit.streaming: tokens per forward of the reference


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need from config.json (Llama-style decoder; MoE not modelled)."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    dtype_bytes: int = 2  # as stored: bf16/fp16 2, fp32 4

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        cfg = config.get("text_config", config)
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or config.get("torch_dtype") or "bfloat16")
        return cls(hidden=hidden, intermediate=int(cfg["intermediate_size"]),
                   layers=int(cfg["num_hidden_layers"]), vocab=int(cfg["vocab_size"]), heads=heads,
                   kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or hidden // heads),
                   tied=bool(config.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
                   dtype_bytes=4 if "float32" in dtype else 2)

    @property
    def layer_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embed_params * (1 if self.tied else 2) + self.hidden

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder layers' Linear modules: what GPTQ/AWQ/EXL2 quantize."""
        return self.layers * (self.layer_params - 2 * self.hidden)

    @property
    def bf16_bytes(self) -> int:
        return 2 * self.params

    @property
    def largest_block(self) -> int:
        """Parameters of the largest module loaded as a whole: a decoder layer or the embeddings."""
        return max(self.layer_params, self.embed_params)

    @property
    def largest_tensor(self) -> int:
        return max(self.embed_params, self.hidden * self.intermediate)

    def tensors(self) -> list[tuple[str, int]]:
        """(kind, elements) of every weight tensor in checkpoint order; kind is "embed", "head",
        "norm" or "linear" (a decoder layer's projections, what GPTQ/AWQ quantize)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        layer = [("norm", h), ("linear", q * h), ("linear", kv * h), ("linear", kv * h), ("linear", h * q),
                 ("norm", h), ("linear", i * h), ("linear", i * h), ("linear", h * i)]
        head = [] if self.tied else [("head", self.vocab * h)]
        return [("embed", self.vocab * h), *layer * self.layers, ("norm", h), *head]

    def kv_bytes(self, ctx: int, bytes_per: int = 2) -> int:
        """KV cache of one sequence of ctx tokens (f16 keys and values)."""
        return self.layers * self.kv_heads * self.head_dim * ctx * 2 * bytes_per


@dataclass(frozen=True)
class Machine:
    """Where the build runs: cores and memory; rates scale the time estimates."""

    name: str
    cores: int
    ram: int  # RAM + swap available to the build
    gpu: str | None = None
    vram: int = 0
    # Sustained matmul rate of the CPU, FLOP/s: 90 GFLOP/s measured on the 2-core CI machine
    # (llama-imatrix on BF16, torch float32), scaled by cores on other machines.
    cpu_flops: float = 90e9
    gpu_flops: float = 0.0  # dense bf16 FLOP/s actually reached (not the spec sheet's peak)

    @property
    def device(self) -> str:
        return "cuda" if self.gpu else "cpu"


def this_machine() -> Machine:
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    avail = psutil.virtual_memory().available + psutil.swap_memory().free
    gpu, vram = _cuda()
    return Machine("this machine", cores, avail, gpu, vram, cpu_flops=45e9 * cores,
                   gpu_flops=_GPU_FLOPS if gpu else 0.0)


# One H100 80 GB server (16 cores, 256 GB RAM): the GPU rate is 30 % of the SXM part's
# 989 TFLOP/s dense bf16 peak, an assumption until a device run measures it.
_GPU_FLOPS = 0.3 * 989e12
MACHINES: dict[str, Machine] = {
    "h100": Machine("one H100 80GB", 16, 256 * GB, "NVIDIA H100 80GB", 80 * GB, cpu_flops=45e9 * 16,
                    gpu_flops=_GPU_FLOPS),
}


def _cuda() -> tuple[str | None, int]:
    if not (Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi")):
        return None, 0  # no NVIDIA driver: skip importing torch (seconds) to learn that
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            return p.name, int(p.total_memory)
    except ImportError:
        pass
    return None, 0


@dataclass(frozen=True)
class Estimate:
    """Peak RAM (RssAnon, process tree), peak VRAM, disk written, seconds; stage: the peak's."""

    ram: int
    vram: int = 0
    disk: int = 0
    seconds: float = 0.0
    stage: str = ""
    files: OutputFiles | None = None  # the weight files written (a variant's estimate only)

    def as_dict(self) -> dict[str, Any]:
        return {"ram": self.ram, "vram": self.vram, "disk": self.disk, "seconds": round(self.seconds, 1),
                "peak_stage": self.stage, **({"files": self.files.as_dict()} if self.files else {})}


@dataclass(frozen=True)
class OutputFiles:
    """The weight files a variant will write: how many, the largest, and how large the one
    file would be unsplit (what the Hub's file limit is weighed against)."""

    count: int
    largest: int
    unsplit: int
    limit: int  # the variant's split_max_size in bytes

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "largest": self.largest, "unsplit": self.unsplit, "limit": self.limit}


def pack_files(tensor_bytes: list[int], limit: int, header: int = 0) -> OutputFiles:
    """Tensors in order into files of at most `limit` bytes of data, a new file when the next
    tensor would not fit: what llama-gguf-split and GPTQModel's sharding both do. `header`:
    bytes every file adds besides its tensors (counted once for the unsplit file)."""
    files, current = [], 0
    for n in tensor_bytes:
        if current and current + n > limit:
            files.append(current)
            current = 0
        current += n
    files.append(current)
    total = sum(tensor_bytes) + header
    if len(files) == 1:
        return OutputFiles(1, total, total, limit)
    return OutputFiles(len(files), max(files) + header, total, limit)


@dataclass(frozen=True)
class Workload:
    """The recipe's token counts, the same for every variant."""

    calib_tokens: int
    eval_tokens: int
    eval_ctx: int


def reference_estimate(shape: ModelShape, work: Workload, machine: Machine) -> Estimate:
    """quantkit.streaming: one block in the compute dtype, one group's activations and logits."""
    chunks = max(1, min(GROUP_TOKENS // work.eval_ctx, work.eval_tokens // work.eval_ctx))
    tokens = chunks * work.eval_ctx  # one forward
    acts = tokens * 4 * (4 * shape.hidden + 3 * shape.intermediate)
    logits = chunks * work.eval_ctx // 2 * shape.vocab * 4  # only the scored half is kept
    flops = 2 * shape.params * work.eval_tokens
    if machine.device == "cuda":
        return Estimate(PROCESS_BASE, 2 * shape.largest_block + acts + logits, seconds=flops / machine.gpu_flops,
                        stage="reference")
    return Estimate(PROCESS_BASE + 4 * shape.largest_block + acts + logits,
                    seconds=flops / machine.cpu_flops, stage="reference")


def reference_cache_bytes(shape: ModelShape, work: Workload) -> int:
    """The reference log-probabilities on disk (fp16, scored positions only)."""
    return work.eval_tokens // 2 * shape.vocab * 2


# ---------------------------------------------------------------- memory to run a variant

RUN_CTX = 4096  # the context the cards' memory column assumes


@dataclass(frozen=True)
class RunMemory:
    """What a runtime holds to run a variant: its files, the KV cache, and the runtime's own
    buffers (`overhead`, stated per format in its FormatSpec)."""

    weights: int
    kv_cache: int
    overhead: int
    ctx: int = RUN_CTX

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead


def run_memory(weight_bytes: int, shape: ModelShape, overhead: int, ctx: int = RUN_CTX) -> RunMemory:
    """Weights + f16 KV cache of one sequence of ctx tokens (layers x kv heads x head dim x ctx x 2
    for keys and values x 2 bytes) + the runtime's buffers."""
    return RunMemory(weight_bytes, shape.kv_bytes(ctx), overhead, ctx)


# A GPU runtime's own memory besides weights and KV cache: the CUDA context, cuBLAS workspace
# and the caching allocator's reserve. Stated from what CUDA runtimes commonly take, not
# measured here (no GPU): a device run of benchmarks/gpu_check.sh can replace it.
CUDA_RUNTIME = 500 * 10**6


def gpu_runtime_overhead(shape: ModelShape, ctx: int = RUN_CTX) -> int:
    """CUDA_RUNTIME plus one layer's activations for a prefill of ctx tokens (bf16)."""
    return CUDA_RUNTIME + ctx * (2 * shape.hidden + shape.intermediate) * 2
