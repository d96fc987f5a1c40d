"""Build state on disk: build/<model>/manifest.json, written atomically after every step.

A re-run skips what the manifest proves done; a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .engines.base import FileEntry
from .errors import ManifestError

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
    quality: dict[str, float] | None = None
    seconds: float = 0.0  # quantize time
    engine: str = ""
    engine_version: str = ""
    notes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # why it failed, when state == "failed"
    published: dict[str, str] | None = None  # {"repo", "branch", "commit"}

    def at_least(self, state: str) -> bool:
        return self.state != "failed" and STATES.index(self.state) >= STATES.index(state)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["files"] = [asdict(f) for f in self.files]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VariantRecord:
        d = dict(d)
        d["files"] = tuple(FileEntry(**f) for f in d.get("files", []))
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class Manifest:
    recipe_sha256: str
    variants: dict[str, VariantRecord]
    calibration: dict[str, Any] = field(default_factory=dict)  # source, sha256, counts
    source: dict[str, Any] = field(default_factory=dict)  # id, revision, fingerprint

    def with_variant(self, name: str, rec: VariantRecord) -> Manifest:
        return replace(self, variants={**self.variants, name: rec})

    def to_json(self) -> dict[str, Any]:
        return {"recipe_sha256": self.recipe_sha256, "source": self.source,
                "calibration": self.calibration,
                "variants": {k: v.to_json() for k, v in self.variants.items()}}


def load_manifest(out_dir: Path) -> Manifest | None:
    path = out_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return Manifest(d["recipe_sha256"], {k: VariantRecord.from_json(v) for k, v in d["variants"].items()},
                        d.get("calibration", {}), d.get("source", {}))
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(str(path), f"unreadable manifest ({e}); move it away to rebuild") from None


def save_manifest(out_dir: Path, m: Manifest) -> Path:
    """Write to a temp file in the same folder, fsync, rename: never a half-written manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MANIFEST
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".manifest.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(m.to_json(), f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
