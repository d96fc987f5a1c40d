"""The resource plan: peak RAM, VRAM, disk and time of every variant and of the whole build,
worked out from the model's config.json alone (a local folder, or that one file from the Hub;
never the weights), before anything runs.

RAM is anonymous memory (RssAnon) of the whole process tree, the figure that decides whether
a machine runs out: weights that llama.cpp or safetensors map from disk sit in the page cache
and are given back under pressure. Every constant below was fitted to `benchmarks/scale.py`
(random Llamas at 7B widths, 2/4/8 layers, on the 2-core CI machine, 2026-12-01); the engines
own the formulas of their formats (`estimate()` on each engine), this module the shared stages
(source, calibration, reference logits) and the sums.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ResourceError

GB = 10**9

# The build's own process with torch, transformers, the engines, the tokenizer and the
# calibration set loaded: 0.3 GB after calibration, 0.45 GB once the engines are imported.
PROCESS_BASE = 0.45 * GB
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

    def as_dict(self) -> dict[str, Any]:
        return {"ram": self.ram, "vram": self.vram, "disk": self.disk, "seconds": round(self.seconds, 1),
                "peak_stage": self.stage}


@dataclass(frozen=True)
class Workload:
    """The recipe's token counts, the same for every variant."""

    calib_tokens: int
    eval_tokens: int
    eval_ctx: int


@dataclass(frozen=True)
class ResourcePlan:
    machine: Machine
    shape: ModelShape
    variants: dict[str, Estimate] = field(default_factory=dict)
    build: Estimate = Estimate(0)

    def as_dict(self) -> dict[str, Any]:
        return {"machine": self.machine.name, "params": self.shape.params, "bf16_bytes": self.shape.bf16_bytes,
                "build": self.build.as_dict(), "variants": {k: v.as_dict() for k, v in self.variants.items()}}


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


def plan_resources(plan: Any, machine: Machine | None = None, config: dict[str, Any] | None = None,
                   only: list[str] | None = None) -> ResourcePlan:
    """Every selected variant's estimate (its own stages plus the shared reference) and the
    build's: the largest RAM/VRAM, the disk of all outputs plus the largest temporary, the
    sum of the time."""
    from .engines import ENGINES

    machine = machine or this_machine()
    shape = ModelShape.from_config(config if config is not None else model_config(plan.recipe))
    r = plan.recipe
    work = Workload(r.calibration.samples * r.calibration.seq_len, r.evaluation.tokens, r.evaluation.ctx)
    ref = reference_estimate(shape, work, machine)
    selected = plan.select(only)
    variants = {v.name: _with_reference(ENGINES[v.format].estimate(v, shape, work, machine), ref)
                for v in selected}
    shared = _shared(selected, shape, work, machine)
    ref = replace(ref, disk=reference_cache_bytes(shape, work))
    return ResourcePlan(machine, shape, variants, _combine(list(variants.values()), [ref, *shared]))


def _with_reference(e: Estimate, ref: Estimate) -> Estimate:
    """A variant is scored against the reference: its peak is the larger of the two."""
    return e if e.ram >= ref.ram else replace(e, ram=ref.ram, vram=max(e.vram, ref.vram), stage=ref.stage)


def _shared(variants: Any, shape: ModelShape, work: Workload, machine: Machine) -> list[Estimate]:
    """Work an engine does once for all its variants (GGUF: convert and imatrix)."""
    from .engines import ENGINES

    out = []
    for fmt in dict.fromkeys(v.format for v in variants):
        shared = getattr(ENGINES[fmt], "shared_estimate", None)
        if shared is not None:
            out.append(shared(shape, work, machine))
    return out


def _combine(variants: list[Estimate], once: list[Estimate]) -> Estimate:
    """Peaks are maxima; disk and time add up (the shared steps' and the reference's once)."""
    if not variants:
        return Estimate(0)
    every = [*variants, *once]
    peak = max(every, key=lambda e: e.ram)
    return Estimate(ram=peak.ram, vram=max(e.vram for e in every), disk=sum(e.disk for e in every),
                    seconds=sum(e.seconds for e in every), stage=peak.stage)


def model_config(recipe: Any) -> dict[str, Any]:
    """config.json: the local folder's, the Hub cache's, or that one file from the Hub."""
    from .recipe import read_model_config

    cfg = read_model_config(recipe)
    if cfg is not None:
        return cfg
    _reachable_hub(recipe.model.source)
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(recipe.model.source, "config.json", revision=recipe.model.revision)
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 - offline, private, missing: one message
        raise ResourceError("config.json", f"cannot read {recipe.model.source}'s config.json: "
                            f"{type(e).__name__}") from None


def _reachable_hub(source: str) -> None:
    """huggingface_hub retries an unknown host for 25 s; an offline machine learns it at once."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.getaddrinfo(host, None)
    except OSError:
        raise ResourceError("config.json", f"{source}: config.json is not in the Hub cache and "
                            f"{host} cannot be reached") from None


def check_fits(rp: ResourcePlan, out_dir: Path, free: int | None = None) -> None:
    """Refuse a build the machine cannot hold, naming the variants that would fit.
    `free`: the disk space at out_dir (default: asked from the file system)."""
    free = _free_disk(out_dir) if free is None else free
    short = []
    if rp.build.ram > rp.machine.ram:
        short.append(f"about {rp.build.ram / GB:.1f} GB RAM at its peak ({rp.build.stage}), "
                     f"{rp.machine.ram / GB:.1f} GB available (RAM + swap)")
    if rp.build.disk > free:
        short.append(f"about {rp.build.disk / GB:.1f} GB of disk in {out_dir}, {free / GB:.1f} GB free")
    if rp.build.vram > rp.machine.vram > 0:
        short.append(f"about {rp.build.vram / GB:.1f} GB of GPU memory, {rp.machine.vram / GB:.1f} GB on "
                     f"{rp.machine.gpu}")
    if short:
        fits = [n for n, e in rp.variants.items() if e.ram <= rp.machine.ram and e.disk <= free
                and (not rp.machine.vram or e.vram <= rp.machine.vram)]
        hint = ("what fits: " + " ".join(f"--only {n}" for n in fits)) if fits else "no variant fits alone"
        raise ResourceError("build", f"needs {'; '.join(short)}; {hint} (or --no-preflight to try anyway)")


def _free_disk(path: Path) -> int:
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free
