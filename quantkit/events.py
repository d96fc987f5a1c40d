"""What a build reports while it runs, one type per kind of event. The library emits these;
only the CLI draws them (a progress display, a live table on a Ray driver)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """A build-wide step began (source, calibration set, reference, shared engine work)."""

    text: str


@dataclass(frozen=True)
class StepDone:
    """A shared step ended (text: which, and how long it took or that it failed)."""

    key: str
    text: str
    seconds: float = 0.0  # wall time of the step (what benchmarks compare)


@dataclass(frozen=True)
class Warn:
    """Something the user should know; the build goes on."""

    message: str


@dataclass(frozen=True)
class Started:
    """A variant's build began (message: the engine and its version)."""

    variant: str
    message: str = ""


@dataclass(frozen=True)
class Progress:
    """How far a long task of a variant is (total None: unknown)."""

    variant: str
    task: str
    done: int = 0
    total: int | None = None


@dataclass(frozen=True)
class Done:
    """A variant was built and evaluated (message: its quality)."""

    variant: str
    message: str = ""


@dataclass(frozen=True)
class Skipped:
    """A variant the manifest proves up to date."""

    variant: str
    message: str = "up to date"


@dataclass(frozen=True)
class Failed:
    """A variant failed; the others go on."""

    variant: str
    message: str


@dataclass(frozen=True)
class Queued:
    """A variant waits for a Ray worker (message: what it asked for, or what it waits on)."""

    variant: str
    message: str = ""


@dataclass(frozen=True)
class OnNode:
    """A variant's Ray task began on a node; a second time means Ray ran it again."""

    variant: str
    message: str


@dataclass(frozen=True)
class Estimates:
    """The plan's seconds for what this build still does: variant names and step keys."""

    seconds: Mapping[str, float]


Event = Stage | StepDone | Warn | Started | Progress | Done | Skipped | Failed | Queued | OnNode | Estimates
Reporter = Callable[[Event], None]
# The variant's own events: a Reporter may tag them with a recipe (batch --ray) by this field.
VariantEvent = Started | Progress | Done | Skipped | Failed | Queued | OnNode


def quiet(_: Event) -> None:
    """The Reporter that draws nothing."""
