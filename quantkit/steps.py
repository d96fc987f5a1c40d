"""The pieces a build graph is made of (quantkit.graph): what a task needs of a machine, and
the shared steps an engine declares. Neutral: the engines build these, the graph and its
executors run them.

A shared step is work that several variants of one build read (the GGUF engine's 16-bit
file and importance matrix). Its product is its return value, handed to every task that
needs it; an engine keeps nothing between calls.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .records import BuildContext
from .sizing import Estimate, Machine, ModelShape, Workload

# Step key or variant name -> what it made (a step's return value, a variant's folder).
Products = Mapping[str, Any]
REFERENCE = "reference"  # the step every evaluation reads: the unquantized model's log-probabilities


@dataclass(frozen=True)
class TaskResources:
    """What one task asks of a node: cores and GPUs (a Ray executor clamps it to the largest
    node; the local executor runs one task at a time with the whole machine)."""

    cpus: float = 1.0
    gpus: float = 0.0

    def as_ray(self) -> dict[str, float]:
        return {"num_cpus": self.cpus, **({"num_gpus": self.gpus} if self.gpus else {})}


ONE_GPU = TaskResources(cpus=1.0, gpus=1.0)


def _no_release(ctx: BuildContext, product: Any) -> list[Path]:
    return []


@dataclass(frozen=True)
class SharedStep:
    """Work done once per build for the variants that name its key (Engine.needs)."""

    key: str  # unique in a build, e.g. "gguf/base"
    title: str  # the progress line while it runs
    run: Callable[[BuildContext, Products], Any]  # (context, its deps' products) -> its product
    deps: tuple[str, ...] = ()  # keys of the steps whose products it reads
    # Delete the product's temporaries once no task needs it (the 16-bit GGUF: as large as
    # the source); returns what was removed. Not called with [build] keep_intermediate.
    release: Callable[[BuildContext, Any], list[Path]] = _no_release
    estimate: Callable[[ModelShape, Workload, Machine], Estimate] | None = None  # for the plan
    resources: TaskResources = TaskResources()
    # Runs in the process that drives the build (it needs what only that process holds, e.g.
    # the tokenizer); a Ray executor shares its product with every task through the object store.
    local: bool = False

    @property
    def releases(self) -> bool:
        return self.release is not _no_release


class StepFailed(Exception):
    """A shared step's product when the step raised: every task that needs it fails with it."""

    def __init__(self, key: str, error: BaseException):
        self.key = key
        self.error = error
        super().__init__(f"{key}: {error}")
