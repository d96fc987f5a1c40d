"""Build state on disk: build/<model>/manifest.json, written atomically after every step.

A re-run skips what the manifest proves done; a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from . import atomic
from .errors import ManifestError
from .records import CalibrationRecord, FileEntry, PublishedRecord, QualityRecord, SourceRecord

MANIFEST = "manifest.json"


class State(str, Enum):
    """A variant's build state; written to manifest.json as its value."""

    FAILED = "failed"
    BUILT = "built"  # files written and checked
    EVALUATED = "evaluated"  # scored against the unquantized model
    CARDED = "carded"  # README.md written for the files as they are
    PUBLISHED = "published"  # its branch holds exactly the folder

    def __str__(self) -> str:
        return self.value


# The one place a state change is decided: from each state, where a variant may go next.
# A rebuild (new cache key) starts again at BUILT from anywhere; any step may fail.
TRANSITIONS: dict[State | None, frozenset[State]] = {
    None: frozenset({State.BUILT, State.FAILED}),
    State.FAILED: frozenset({State.BUILT, State.FAILED}),
    State.BUILT: frozenset({State.BUILT, State.EVALUATED, State.FAILED}),
    # re-scoring keeps the state; a card written or a branch pushed moves it on
    State.EVALUATED: frozenset({State.BUILT, State.EVALUATED, State.CARDED, State.PUBLISHED, State.FAILED}),
    State.CARDED: frozenset({State.BUILT, State.CARDED, State.PUBLISHED, State.FAILED}),
    # a card that changed after the push: the branch no longer holds what the folder holds
    State.PUBLISHED: frozenset({State.BUILT, State.CARDED, State.PUBLISHED, State.FAILED}),
}
ORDER = (State.BUILT, State.EVALUATED, State.CARDED, State.PUBLISHED)  # how far a variant got


@dataclass(frozen=True)
class VariantRecord:
    format: str
    branch: str
    repo: str
    state: State
    cache_key: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    files: tuple[FileEntry, ...] = ()
    size_bytes: int = 0
    bits_per_weight: float = 0.0
    quality: QualityRecord | None = None
    seconds: float = 0.0  # quantize time
    engine: str = ""
    engine_version: str = ""
    notes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # why it failed, when state == "failed"
    published: PublishedRecord | None = None
    # The last task that built and/or scored it, measured: wall seconds, and the peak RssAnon of
    # the build's process tree (what the plan's estimates are checked against in report.html).
    task_seconds: float = 0.0
    peak_ram: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.state, State):  # a state given by its name ("evaluated")
            object.__setattr__(self, "state", State(self.state))

    def at_least(self, state: State) -> bool:
        return self.state != State.FAILED and ORDER.index(self.state) >= ORDER.index(state)

    def moved_to(self, state: State, **changes: Any) -> VariantRecord:
        """This record in `state` (and with `changes`); a move TRANSITIONS does not allow is a bug."""
        if state not in TRANSITIONS[self.state]:
            raise ManifestError(MANIFEST, f"a variant cannot go from {self.state} to {state}")
        return replace(self, state=state, **changes)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)  # nested records become plain objects: the file format is unchanged
        d["files"] = [asdict(f) for f in self.files]
        d["state"] = self.state.value
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VariantRecord:
        d = dict(d)
        d["files"] = tuple(FileEntry(**f) for f in d.get("files", []))
        d["quality"] = QualityRecord.from_json(d.get("quality"))
        d["published"] = PublishedRecord.from_json(d.get("published"))
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class Manifest:
    recipe_sha256: str
    variants: dict[str, VariantRecord]
    calibration: CalibrationRecord = CalibrationRecord()
    source: SourceRecord = SourceRecord()

    def with_variant(self, name: str, rec: VariantRecord) -> Manifest:
        return replace(self, variants={**self.variants, name: rec})

    def to_json(self) -> dict[str, Any]:
        return {"recipe_sha256": self.recipe_sha256, "source": self.source.to_json(),
                "calibration": self.calibration.to_json(),
                "variants": {k: v.to_json() for k, v in self.variants.items()}}


def load_manifest(out_dir: Path) -> Manifest | None:
    """The build state, or None before the first build. A file that is not a manifest (edited
    by hand, damaged) raises ManifestError saying how to start over."""
    path = out_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ManifestError(str(path), f"{_why_unreadable(e)}; {_REBUILD.format(path=path)}") from None
    try:
        return _from_json(d)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        what = f"missing {e}" if isinstance(e, KeyError) else str(e)
        raise ManifestError(str(path), f"not a quantkit manifest ({what}); {_REBUILD.format(path=path)}") from None


# Moving the file away makes the next build start from nothing: every variant is rebuilt.
_REBUILD = "move it away (mv {path} {path}.bad) and run `quantkit build` again to rebuild every variant"


def _why_unreadable(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"
    return f"cannot read it ({e})"


def _from_json(d: Any) -> Manifest:
    if not isinstance(d, dict) or not isinstance(d.get("variants"), dict):
        raise ValueError("no 'variants' object")
    variants = {}
    for name, v in d["variants"].items():
        try:
            variants[name] = VariantRecord.from_json(v)
        except ValueError:
            raise ValueError(f"variant {name}: unknown state {v.get('state')!r}") from None
    return Manifest(str(d["recipe_sha256"]), variants,
                    CalibrationRecord.from_json(d.get("calibration")) or CalibrationRecord(),
                    SourceRecord.from_json(d.get("source")) or SourceRecord())


def save_manifest(out_dir: Path, m: Manifest) -> Path:
    """Temp file, fsync, rename (quantkit.atomic): never a half-written manifest."""
    text = json.dumps(m.to_json(), indent=2, sort_keys=True) + "\n"
    return atomic.write_text(out_dir / MANIFEST, text)
