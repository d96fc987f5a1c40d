"""Typed errors. The library raises these; only cli.py turns them into messages and exit codes."""

from __future__ import annotations

from dataclasses import dataclass


class QuantkitError(Exception):
    """Base of every error quantkit raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One bad field of a recipe: where it is and what is wrong."""

    path: str  # e.g. "variants[2].group_size"
    message: str
    line: int | None = None  # 1-based TOML line, where known

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line else ""
        return f"{self.path}{where}: {self.message}"


class RecipeError(QuantkitError):
    def __init__(self, file: str, problems: list[Problem]):
        self.file = file
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


class CalibrationError(QuantkitError):
    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"calibration data {source}: {reason}")


class SourceError(QuantkitError):
    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"model {source}: {reason}")


class EngineError(QuantkitError):
    def __init__(self, engine: str, reason: str, variant: str | None = None):
        self.engine = engine
        self.reason = reason
        self.variant = variant
        who = f"{variant}: " if variant else ""
        super().__init__(f"{who}{engine}: {reason}")


class EngineUnavailable(EngineError):
    """The engine (or its toolchain) is not installed; the message says how to get it."""


class EvalError(QuantkitError):
    def __init__(self, variant: str, reason: str):
        self.variant = variant
        self.reason = reason
        super().__init__(f"{variant}: evaluation failed: {reason}")


class ManifestError(QuantkitError):
    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class PublishError(QuantkitError):
    def __init__(self, repo: str, reason: str, branch: str | None = None):
        self.repo = repo
        self.branch = branch
        self.reason = reason
        where = f"{repo}@{branch}" if branch else repo
        super().__init__(f"publish {where}: {reason}")


class BusyError(QuantkitError):
    """Another quantkit run holds the output folder's lock."""

    def __init__(self, lock_path: str, holder: str, hint: str):
        self.lock_path = lock_path
        self.holder = holder
        super().__init__(f"{lock_path}: {holder} is using this output folder; {hint}")


class BuildFailed(QuantkitError):
    """Some variants failed; the others were kept. Carries name → reason."""

    def __init__(self, failures: dict[str, str]):
        self.failures = failures
        super().__init__(", ".join(f"{k}: {v}" for k, v in failures.items()))


class GateRefused(QuantkitError):
    """Variants over the recipe's quality gate were not published; the others were.
    Carries name → the measured value against its limit."""

    def __init__(self, refused: dict[str, str]):
        self.refused = refused
        super().__init__("; ".join(f"{k}: {v}" for k, v in refused.items()))


class ClusterError(QuantkitError):
    """Ray is missing, or the cluster cannot be reached or started."""

    def __init__(self, address: str, reason: str):
        self.address = address
        self.reason = reason
        super().__init__(f"ray cluster {address}: {reason}")


class ResourceError(QuantkitError):
    """The machine cannot meet the build's resource plan (RAM, disk, GPU memory)."""

    def __init__(self, what: str, reason: str):
        self.what = what
        self.reason = reason
        super().__init__(f"{what}: {reason}")


def for_variant(e: BaseException, variant: str) -> BaseException:
    """A shared step's failure as one variant reports it: an engine error gets the variant's
    name (its message then names the variant, as its own failures do); others stay as they are."""
    if isinstance(e, EngineError) and not e.variant:
        return type(e)(e.engine, e.reason, variant)
    return e
