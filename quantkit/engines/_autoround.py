"""What the GGUF and GPTQ engines share for `method = "autoround"`: Intel's AutoRound (SignRound:
signed-gradient descent on each block's rounding and clipping against the block's own output),
fed with our calibration windows, exporting with that rounding kept (its own GGUF packer, or
GPTQ v1 checkpoints).

AutoRound runs in a child process (`python -m quantkit.engines._autoround JOB.json`): it logs
through its own handlers, exits the interpreter on some bad inputs, and holds the whole model
while it tunes; a child keeps all of that out of the build, gives its memory back when it ends,
and dies with the build (PR_SET_PDEATHSIG), so a killed build leaves nothing running.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from .. import formats as f
from ..errors import EngineError, EngineUnavailable
from ..records import ProgressFn
from ..sizing import PROCESS_BASE, Estimate, Machine, ModelShape, Workload

EXTRA = "pip install 'quantkit-workbench[autoround]'"
PIN = "0.16.1"

# AutoRound's own presets (auto_round/cli/main.py RECIPES): iterations, samples, learning rate
# (None: AutoRound's 1/iters). "opt_rtn": no descent, AutoRound's imatrix-weighted rounding.
PRESETS: dict[str, tuple[int, int, float | None]] = {
    "best": (1000, 512, None),
    "default": (200, 128, None),
    "light": (50, 128, 5e-3),
    "opt_rtn": (0, 128, None),
}

# llama.cpp file types AutoRound's GGUF packer writes (auto_round/export/export_to_gguf/export.py
# FTYPE_MAP). Q2_K and the IQ* types are not among them; Q2_K_S is its 2-bit K type.
GGUF_TYPES = ("Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
              "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


class AutoRoundSettings(f.ParamsModel):
    """`autoround = { ... }` in a variant: a preset, and any of its values overridden."""

    preset: Literal["light", "default", "best", "opt_rtn"] = "light"  # light: 50 iterations
    iters: int | None = Field(None, ge=0, le=10000)  # None: the preset's; 0: no descent
    lr: float | None = Field(None, gt=0, lt=1)  # None: the preset's (AutoRound's 1/iters when unset)
    nsamples: int | None = Field(None, ge=1, le=4096)  # None: the preset's, at most the windows there are
    seq_len: int | None = Field(None, ge=16)  # None: the calibration windows' length
    batch_size: int = Field(8, ge=1, le=64)
    low_gpu_mem_usage: bool = True  # block inputs kept on the CPU: slower on a GPU, far less VRAM
    alg_ext: bool = False  # AutoRound's extended GGUF search (enable_alg_ext): better, much slower


@dataclass(frozen=True)
class Tuning:
    """The settings a run used, resolved against the calibration windows (the card's line)."""

    iters: int
    lr: float | None
    nsamples: int
    seq_len: int
    batch_size: int
    low_gpu_mem_usage: bool
    alg_ext: bool
    preset: str

    def describe(self) -> str:
        how = "imatrix-weighted rounding, no descent" if self.iters == 0 else \
            f"{self.iters} iterations" + (f", lr {self.lr:g}" if self.lr else "")
        return f"AutoRound {self.preset} ({how}; {self.nsamples} x {self.seq_len} calibration tokens)"


def resolve(s: AutoRoundSettings | None, windows: np.ndarray) -> Tuning:
    """The preset, overridden where the recipe says, cut to the windows there are: AutoRound
    skips windows shorter than its seqlen and exits when none is left."""
    s = s or AutoRoundSettings()
    iters, nsamples, lr = PRESETS[s.preset]
    n, width = int(windows.shape[0]), int(windows.shape[1])
    return Tuning(iters=s.iters if s.iters is not None else iters, lr=s.lr if s.lr is not None else lr,
                  nsamples=min(s.nsamples or nsamples, n), seq_len=min(s.seq_len or width, width),
                  batch_size=min(s.batch_size, n), low_gpu_mem_usage=s.low_gpu_mem_usage,
                  alg_ext=s.alg_ext, preset=s.preset)


PLAN_SEQ_LEN = 512  # the plan knows calibration tokens, not windows: a typical window


def planned(s: AutoRoundSettings | None, calib_tokens: int) -> Tuning:
    """What resolve() will give, from the plan's token count alone (estimates)."""
    seq = (s.seq_len if s else None) or PLAN_SEQ_LEN
    return resolve(s, np.zeros((max(1, calib_tokens // seq), seq), dtype=np.int32))


def dump(s: AutoRoundSettings | None) -> dict[str, Any]:
    """Only what the recipe set: the variant's cache key stays the same when defaults are spelt out."""
    return (s or AutoRoundSettings()).model_dump(exclude_defaults=True)


@functools.lru_cache(maxsize=1)
def version() -> str:
    """'auto-round 0.16.1'; EngineUnavailable when it is not installed."""
    from importlib import metadata

    try:
        return f"auto-round {metadata.version('auto-round')}"
    except metadata.PackageNotFoundError:
        raise EngineUnavailable("autoround", f'method = "autoround" needs AutoRound: {EXTRA}') from None


# ---------------------------------------------------------------- one run


@dataclass(frozen=True)
class Job:
    """What the child process does: AutoRound on `source` with `scheme`, saved as `format`."""

    engine: str  # "gguf" / "gptq": for error messages
    source: str
    format: str  # AutoRound's: "gguf:q2_k_s", "auto_gptq"
    scheme: dict[str, Any]  # AutoRound's scheme: "W4A16" plus group_size / sym overrides
    tuning: dict[str, Any]  # asdict(Tuning)
    windows: str  # .npy file of int32 token windows
    device: str  # "cpu" or "cuda"
    out_dir: str


def run(job: Job, work: Path, progress: ProgressFn, variant: str) -> float:
    """Run the job in a child process; its output goes to work/autoround.log. Returns seconds."""
    version()
    work.mkdir(parents=True, exist_ok=True)
    spec = work / "job.json"
    spec.write_text(json.dumps(asdict(job), indent=2), encoding="utf-8")
    log = work / "autoround.log"
    progress("autoround", 0, None)
    t0 = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        rc = subprocess.run([sys.executable, "-m", "quantkit.engines._autoround", str(spec)], stdout=out,
                            stderr=subprocess.STDOUT, env=_child_env(), preexec_fn=_die_with_parent,
                            check=False).returncode
    if rc in (-signal.SIGKILL, 137):
        raise MemoryError(f"AutoRound was killed (out of memory?); its log: {log}")
    if rc != 0:
        raise EngineError(job.engine, f"AutoRound failed (exit {rc}): {_last_error(log)} (log: {log})", variant)
    progress("autoround", 1, 1)
    return round(time.monotonic() - t0, 2)


def _child_env() -> dict[str, str]:
    """The child imports this checkout's quantkit; AutoRound stays offline (its GGUF converter
    would otherwise fetch llama.cpp's latest conversion code for unknown architectures)."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root,
            "AUTO_ROUND_GGUF_AUTO_UPDATE": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - not Linux
        pass


def _last_error(log: Path) -> str:
    """The exception line of the child's traceback, else AutoRound's last ERROR line."""
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ("Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0]) and not ln.startswith("File"):
            return ln[:400]
    errors = [ln for ln in lines if " ERROR " in ln]
    return (errors[-1] if errors else (lines[-1] if lines else "no output"))[:400]


def _child(spec: Path) -> None:
    """The child's work: load, tune, save (AutoRound's own quantize_and_save)."""
    import torch
    from auto_round import AutoRound
    from transformers import AutoTokenizer

    job = Job(**json.loads(spec.read_text(encoding="utf-8")))
    t = Tuning(**job.tuning)
    windows = np.load(job.windows)[: t.nsamples, : t.seq_len]
    data = [torch.from_numpy(w.astype(np.int64))[None] for w in windows]
    scheme = dict(job.scheme)
    kwargs: dict[str, Any] = {"iters": t.iters, "nsamples": t.nsamples, "seqlen": t.seq_len,
                              "batch_size": t.batch_size, "low_gpu_mem_usage": t.low_gpu_mem_usage,
                              "device_map": "0" if job.device == "cuda" else "cpu",
                              "enable_torch_compile": False, "seed": 42, **scheme.pop("overrides", {})}
    if t.lr is not None:
        kwargs["lr"] = t.lr
    if t.alg_ext:
        kwargs["enable_alg_ext"] = True
    tok = AutoTokenizer.from_pretrained(job.source)
    ar = AutoRound(job.source, tok, scheme=scheme["name"], dataset=data, **kwargs)
    ar.quantize_and_save(job.out_dir, format=job.format)


# ---------------------------------------------------------------- estimates
# AutoRound holds the whole model in float32 on the CPU (its GGUF path turns low_cpu_mem_usage
# off), the block at work with its gradients and Adam-free SignRound state, and every block's
# cached inputs and outputs for the calibration samples.

BLOCK_WORK_FACTOR = 4.0  # the block at work: weights, their float copies, rounding/clipping state, grads
# AutoRound's GGUF writer (low_cpu_mem_usage off) converts every tensor beside the float32 model
# it tuned: fitted on scale.py's 2-layer 7B-width run, whose GGUF run peaked at 10.58 GB against
# 6.95 GB without this term (one depth measured: how it splits from the block term is not).
GGUF_EXPORT_FACTOR = 1.15  # x the float32 model
CPU_SECONDS_PER_TFLOP = 60.0  # forward + backward per iteration on a batch, CPU (fitted on SmolLM2)


def estimate(shape: ModelShape, tuning: Tuning, machine: Machine, stock: Estimate, *,
             gguf: bool = False) -> Estimate:
    """One AutoRound run instead of the stock method's quantization, then the stock path's reload
    and scoring (`stock`: the stock method's estimate of the same files). gguf: its own GGUF
    writer's run."""
    model = 4 * shape.params * (1 + (GGUF_EXPORT_FACTOR if gguf else 0))
    cache = 2 * 4 * tuning.nsamples * tuning.seq_len * shape.hidden
    block = BLOCK_WORK_FACTOR * 4 * shape.layer_params
    per_iter = 3 * 2 * shape.layer_params * tuning.batch_size * tuning.seq_len  # fwd + bwd
    tflop = (shape.layers * max(tuning.iters, 1) * per_iter + 2 * shape.params * tuning.nsamples
             * tuning.seq_len) / 1e12
    if machine.device == "cuda":
        on_gpu = block + (0 if tuning.low_gpu_mem_usage else cache)
        seconds = tflop * 1e12 / (0.1 * machine.gpu_flops)
        return Estimate(max(int(PROCESS_BASE + model + cache), stock.ram), max(int(on_gpu), stock.vram),
                        stock.disk, seconds, "autoround", stock.files)
    ram = int(PROCESS_BASE + model + cache + block)
    seconds = tflop * CPU_SECONDS_PER_TFLOP * 2 / machine.cores
    peak, stage = max((ram, "autoround"), (stock.ram, stock.stage))
    return Estimate(peak, 0, stock.disk, seconds, stage, stock.files)


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
