"""Build state on disk: build/<model>/manifest.json, written atomically after every step.

A re-run skips what the manifest proves done; a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from . import atomic
from .errors import ManifestError
from .records import CalibrationRecord, FileEntry, PublishedRecord, QualityRecord, SourceRecord

STATES = ("failed", "built", "evaluated", "carded", "published")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class VariantRecord:
    format: str
    branch: str
    repo: str
    state: str
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

    def at_least(self, state: str) -> bool:
        return self.state != "failed" and STATES.index(self.state) >= STATES.index(state)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)  # nested records become plain objects: the file format is unchanged
        d["files"] = [asdict(f) for f in self.files]
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
        rec = VariantRecord.from_json(v)
        if rec.state not in STATES:
            raise ValueError(f"variant {name}: unknown state {rec.state!r}")
        variants[name] = rec
    return Manifest(str(d["recipe_sha256"]), variants,
                    CalibrationRecord.from_json(d.get("calibration")) or CalibrationRecord(),
                    SourceRecord.from_json(d.get("source")) or SourceRecord())


def save_manifest(out_dir: Path, m: Manifest) -> Path:
    """Temp file, fsync, rename (quantkit.atomic): never a half-written manifest."""
    text = json.dumps(m.to_json(), indent=2, sort_keys=True) + "\n"
    return atomic.write_text(out_dir / MANIFEST, text)
