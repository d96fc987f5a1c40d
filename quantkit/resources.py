"""The resource plan: peak RAM, VRAM, disk and time of every variant and of the whole build,
worked out from the model's config.json alone (a local folder, or that one file from the Hub;
never the weights), before anything runs.

RAM is anonymous memory (RssAnon) of the whole process tree, the figure that decides whether
a machine runs out: weights that llama.cpp or safetensors map from disk sit in the page cache
and are given back under pressure. The records and the shared stages' formulas live in
quantkit.sizing; the engines own the formulas of their formats (`estimate()` on each engine);
this module sums them into a plan and checks it against the machine.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ResourceError
from .steps import REFERENCE
from .sizing import (GB, MACHINES, PROCESS_BASE, Estimate, Machine, ModelShape, RunMemory, Workload,
                     reference_cache_bytes, reference_estimate, run_memory, this_machine)

__all__ = ["GB", "MACHINES", "PROCESS_BASE", "Estimate", "Machine", "ModelShape", "ResourcePlan", "Workload",
           "check_fits", "file_warnings", "model_config", "plan_resources", "reference_estimate", "this_machine"]


@dataclass(frozen=True)
class ResourcePlan:
    machine: Machine
    shape: ModelShape
    variants: dict[str, Estimate] = field(default_factory=dict)
    build: Estimate = Estimate(0)
    run: dict[str, tuple[str, RunMemory]] = field(default_factory=dict)  # variant -> (RAM|VRAM, memory to run)
    steps: dict[str, Estimate] = field(default_factory=dict)  # shared step key (and the reference) -> estimate

    def as_dict(self) -> dict[str, Any]:
        return {"machine": self.machine.name, "params": self.shape.params, "bf16_bytes": self.shape.bf16_bytes,
                "build": self.build.as_dict(),
                "variants": {k: {**v.as_dict(), **self._run_dict(k)} for k, v in self.variants.items()}}

    def _run_dict(self, name: str) -> dict[str, Any]:
        if name not in self.run:
            return {}
        device, r = self.run[name]
        return {"run_memory": {"device": device, "bytes": r.total, "weights": r.weights, "kv_cache": r.kv_cache,
                               "overhead": r.overhead, "ctx": r.ctx}}


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
    steps = {REFERENCE: ref, **shared}
    # Memory to run each variant, from the estimated size of its files (the card has the measured one).
    specs = {v.name: ENGINES[v.format].spec for v in selected}
    run = {v.name: (specs[v.name].run_device, run_memory(_output_bytes(variants[v.name]), shape,
                                                          specs[v.name].run_overhead(shape)))
           for v in selected}
    return ResourcePlan(machine, shape, variants, _combine(list(variants.values()), list(steps.values())), run, steps)


def file_warnings(rp: ResourcePlan) -> dict[str, str]:
    """Variant name -> one line, for each variant with a file over the Hub's limit: one that
    split_max_size splits (what it would be unsplit, and the planned files), or one that would
    still be over it (publish refuses that)."""
    from .formats import HUB_FILE_LIMIT, human_size

    out = {}
    for name, e in rp.variants.items():
        files = e.files
        if files is None or files.unsplit <= HUB_FILE_LIMIT:
            continue
        hub = f"over the Hub's {human_size(HUB_FILE_LIMIT)} file limit"
        if files.largest > HUB_FILE_LIMIT:
            out[name] = (f"its largest file would be {human_size(files.largest)}, {hub}: publish would refuse "
                         f"it; set split_max_size to 20G or less")
        else:
            out[name] = (f"one file of {human_size(files.unsplit)} unsplit would be {hub}; split_max_size "
                         f"{human_size(files.limit)} writes {files.count} files of at most {human_size(files.largest)}")
    return out


def _output_bytes(e: Estimate) -> int:
    """The variant's files together, as estimated (the disk figure also counts temporaries)."""
    return e.files.unsplit if e.files else e.disk


def _with_reference(e: Estimate, ref: Estimate) -> Estimate:
    """A variant is scored against the reference: its peak is the larger of the two."""
    return e if e.ram >= ref.ram else replace(e, ram=ref.ram, vram=max(e.vram, ref.vram), stage=ref.stage)


def _shared(variants: Any, shape: ModelShape, work: Workload, machine: Machine) -> dict[str, Estimate]:
    """Work an engine does once for all its variants (its shared steps: GGUF's convert and imatrix)."""
    from .engines import ENGINES

    out = {}
    for fmt in dict.fromkeys(v.format for v in variants):
        for step in ENGINES[fmt].shared_steps([v for v in variants if v.format == fmt]):
            if step.estimate is not None:
                out[step.key] = step.estimate(shape, work, machine)
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
