"""The Engine protocol every format module implements. The records it exchanges live in
quantkit.records, its format knowledge in a FormatSpec (quantkit.formats)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..formats import FormatSpec
from ..records import BuildContext, EngineResult, LogitsFn

if TYPE_CHECKING:
    from ..plan import Variant
    from ..sizing import Estimate, Machine, ModelShape, Workload


class Engine(Protocol):
    """One module per format implements this; ENGINES in __init__.py lists them."""

    name: str  # the engine's name in messages and cache keys
    spec: FormatSpec  # everything the other stages need to know about its format

    def version(self) -> str:
        """Engine name+version string; raises EngineUnavailable when it cannot run here."""
        ...

    def build(self, variant: Variant, ctx: BuildContext, out_dir: Path) -> EngineResult:
        """Write the variant's files into out_dir (created, empty)."""
        ...

    def open_model(self, folder: Path, ctx: BuildContext) -> AbstractContextManager[LogitsFn]:
        """Load a built variant the way its users do and yield a logits function."""
        ...

    def estimate(self, variant: Variant, shape: ModelShape, work: Workload, machine: Machine) -> Estimate:
        """Peak RAM/VRAM, disk and seconds of building and scoring the variant (quantkit.resources)."""
        ...


# An engine may also define `prepare(variants, ctx) -> {name: error}`: work shared by the
# variants of one build, done before the per-variant loop (the GGUF engine converts once,
# computes the imatrix once and quantizes all types in parallel there), and
# `release(ctx) -> list[Path]`: delete the temporaries of that shared work once the last of
# its variants is built (the 16-bit GGUF: as large as the source), unless ctx.keep_intermediate;
# and `shared_estimate(shape, work, machine)`: what prepare() needs, once per build.
