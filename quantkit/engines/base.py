"""The Engine protocol every format implements, and the records it exchanges."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from ..calibration import CalibrationSet
    from ..plan import Variant

# (task, done, total): an engine reports long work through this; the CLI draws it.
ProgressFn = Callable[[str, int, "int | None"], None]

# Token ids of one chunk [ctx] -> logits [ctx, vocab] as float32 numpy.
LogitsFn = Callable[[np.ndarray], np.ndarray]

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")


@dataclass(frozen=True)
class SourceModel:
    id: str  # as the recipe names it: hub id or folder
    path: Path  # local folder: config.json, weights, tokenizer
    revision: str  # hub commit sha, or "local"
    fingerprint: str  # changes whenever the weights could have changed
    n_params: int  # parameters in the checkpoint (for bits per weight)
    architecture: str  # config.json's architectures[0]


@dataclass(frozen=True)
class BuildContext:
    source: SourceModel
    calib: CalibrationSet
    work_dir: Path  # scratch shared by the variants of one build (F16 GGUF, imatrix, ...)
    device: str  # "cuda" or "cpu"
    progress: ProgressFn
    model_name: str = ""  # the recipe's model name, for file names and metadata
    quantized_by: str = "quantkit"
    keep_intermediate: bool = False  # [build] keep_intermediate: leave temporaries in work_dir


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the variant's folder
    size: int
    sha256: str


@dataclass(frozen=True)
class Artifact:
    variant: str
    folder: Path
    files: tuple[FileEntry, ...]
    bits_per_weight: float
    engine: str
    engine_version: str
    seconds: float
    notes: tuple[tuple[str, Any], ...] = ()  # engine facts worth a card line

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)


class Engine(Protocol):
    """One module per format implements this; ENGINES in __init__.py lists them."""

    name: str

    def version(self) -> str:
        """Engine name+version string; raises EngineUnavailable when it cannot run here."""
        ...

    def build(self, variant: Variant, ctx: BuildContext, out_dir: Path) -> dict[str, Any]:
        """Write the variant's files into out_dir (created, empty); return notes for the card."""
        ...

    def open_model(self, folder: Path, ctx: BuildContext) -> AbstractContextManager[LogitsFn]:
        """Load a built variant the way its users do and yield a logits function."""
        ...


# An engine may also define `prepare(variants, ctx) -> {name: error}`: work shared by the
# variants of one build, done before the per-variant loop (the GGUF engine converts once,
# computes the imatrix once and quantizes all types in parallel there), and
# `release(ctx) -> list[Path]`: delete the temporaries of that shared work once the last of
# its variants is built (the 16-bit GGUF: as large as the source), unless ctx.keep_intermediate.


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_files(folder: Path) -> Iterator[Path]:
    return (p for p in sorted(folder.rglob("*")) if p.is_file())


def file_entries(folder: Path) -> tuple[FileEntry, ...]:
    return tuple(FileEntry(p.relative_to(folder).as_posix(), p.stat().st_size, sha256_file(p))
                 for p in list_files(folder))


def bits_per_weight(files: tuple[FileEntry, ...], n_params: int) -> float:
    """Bytes of the weight files x 8 / parameters of the source: what a user downloads per weight."""
    weight_bytes = sum(f.size for f in files if f.path.endswith(WEIGHT_SUFFIXES))
    return round(weight_bytes * 8 / n_params, 3) if n_params else 0.0
