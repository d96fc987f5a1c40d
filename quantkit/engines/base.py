"""The engine contract: every hook a format module implements, with the defaults in one
place. The records it exchanges live in quantkit.records and quantkit.steps, its format
knowledge in a FormatSpec (quantkit.formats).

Engines keep no state between calls: what a shared step makes is its return value, handed
to `build` in `inputs`; one engine object serves every build of a process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Generic, TypeVar

from ..formats import FormatSpec
from ..records import BuildContext, EngineResult, LogitsFn
from ..sizing import Estimate, Machine, ModelShape, Workload
from ..steps import Products, SharedStep, TaskResources
from ..variant import ParamsModel, Variant

P = TypeVar("P", bound=ParamsModel)


class Engine(ABC, Generic[P]):
    """One module per format subclasses this; ENGINES in __init__.py lists them.

    Required: `name`, `spec`, `version`, `build`, `open_model`, `estimate`, `resources`.
    Optional, with the defaults below: `shared_steps`, `needs`.
    """

    name: str  # the engine's name in messages and cache keys
    spec: FormatSpec  # everything the other stages need to know about its format

    @abstractmethod
    def version(self) -> str:
        """Engine name+version string; raises EngineUnavailable when it cannot run here."""

    @abstractmethod
    def build(self, variant: Variant[P], ctx: BuildContext, out_dir: Path, inputs: Products) -> EngineResult:
        """Write the variant's files into out_dir (created, empty). `inputs` holds the products
        of everything `needs` named: shared steps by key, other variants' folders by name."""

    @abstractmethod
    def open_model(self, folder: Path, ctx: BuildContext) -> AbstractContextManager[LogitsFn]:
        """Load a built variant the way its users do and yield a logits function."""

    @abstractmethod
    def estimate(self, variant: Variant[P], shape: ModelShape, work: Workload, machine: Machine) -> Estimate:
        """Peak RAM/VRAM, disk and seconds of building and scoring the variant (quantkit.resources)."""

    @abstractmethod
    def resources(self, variant: Variant[P]) -> TaskResources:
        """What one build task of this variant asks of a cluster node (quantkit.cluster)."""

    def shared_steps(self, variants: Sequence[Variant[P]]) -> tuple[SharedStep, ...]:
        """Work the given variants share, done once per build before the first that needs it.
        Default: none."""
        return ()

    def needs(self, variant: Variant[P], variants: Sequence[Variant[P]]) -> tuple[str, ...]:
        """What `build` reads: keys of shared steps, and names of other variants of the build
        (`variants`: this format's variants in the plan) whose folders it uses. Default: the
        shared steps this variant alone would need, no other variant."""
        return tuple(s.key for s in self.shared_steps([variant]))
