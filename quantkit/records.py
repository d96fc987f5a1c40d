"""Records and helpers every stage shares: files and their hashes, the source model, what an
engine reports, and the manifest's typed entries. This module imports nothing of quantkit's,
so any stage and any format module may use it (DESIGN §2).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from . import atomic

# (task, done, total): long work reports through this; the CLI draws it.
ProgressFn = Callable[[str, int, "int | None"], None]

# Token ids of one chunk [ctx] -> logits [ctx, vocab] as float32 numpy.
LogitsFn = Callable[[np.ndarray], np.ndarray]

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")


# ---------------------------------------------------------------- files


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the variant's folder
    size: int
    sha256: str


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


# ---------------------------------------------------------------- what engines get and give


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    """The calibration windows every variant of a build shares (quantkit.calibration makes it)."""

    windows: np.ndarray  # [samples, seq_len] int32 token ids, BOS first
    texts: tuple[str, ...]  # the formatted items the windows were cut from, in order
    eval_texts: tuple[str, ...]  # held-out plain contexts
    sha256: str  # of the windows: the cache key for everything built from them
    source: str  # where the text came from, for cards and messages
    n_items: int  # formatted items used
    n_contexts: int  # distinct contexts available for calibration
    tokens_available: int  # tokens in all formatted items (before cutting windows)
    # The held-out contexts' questions: (context, question, answer), for the answer-flip items.
    eval_items: tuple[tuple[str, str, str], ...] = ()

    def examples(self) -> list[dict[str, list[int]]]:
        """Windows as GPTQModel's calibration examples."""
        return [{"input_ids": w.tolist(), "attention_mask": [1] * len(w)} for w in self.windows]

    def write_text(self, path: Path) -> Path:
        """Plain text for llama-imatrix: the formatted items, blank line between."""
        return atomic.write_text(path, "\n\n".join(self.texts) + "\n")

    def write_parquet(self, path: Path) -> Path:
        """A `text` column per item, the form exllamav2's converter reads with -c."""
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.table({"text": list(self.texts)}), buf)
        return atomic.write_bytes(path, buf.getvalue())


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
class EngineResult:
    """What an engine's build() reports besides the files it wrote."""

    quantizer: str  # the library and version that did the work, e.g. "gptqmodel 7.6.0"
    device: str  # where it ran: "cpu" or "cuda"
    # Seconds of the quantization itself when the engine measured them (work done ahead in
    # prepare() for a batch of variants); None: the pipeline's wall time of build() stands.
    quantize_seconds: float | None = None
    notes: Mapping[str, Any] = field(default_factory=dict)  # engine facts worth a card line

    def note_dict(self) -> dict[str, Any]:
        """The manifest's notes: who quantized where, then the engine's own facts."""
        return {"quantizer": self.quantizer, "device": self.device, **self.notes}


# ---------------------------------------------------------------- the manifest's entries


class _Record:
    """JSON round trip of a flat frozen record; unknown keys from newer files are ignored."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> Any:
        if not d:
            return None
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class QualityRecord(_Record):
    """A variant's measured quality against the unquantized model (quantkit.evaluate). The tail
    and answer fields are None in manifests written before they were measured."""

    ppl: float
    ref_ppl: float
    delta_ppl_pct: float
    kld: float
    top1: float
    kld_median: float | None = None
    kld_p99: float | None = None
    kld_p999: float | None = None
    rms_dp: float | None = None  # root mean square of Δp (a fraction: 0.05 is 5 points)
    dp_p01: float | None = None
    dp_p99: float | None = None
    qa_items: int | None = None  # multiple-choice items scored (0 or None: answer flips not measured)
    qa_ref_acc: float | None = None  # the original model's accuracy on them
    qa_acc: float | None = None
    qa_flips: float | None = None  # share of items whose chosen answer differs from the original's


@dataclass(frozen=True)
class CalibrationRecord(_Record):
    """The calibration set a build used: where it came from, its hash and its counts."""

    source: str | None = None
    sha256: str | None = None
    samples: int | None = None
    seq_len: int | None = None
    items: int | None = None
    contexts: int | None = None
    eval_texts: int | None = None


@dataclass(frozen=True)
class SourceRecord(_Record):
    """The source model a build read."""

    id: str = ""
    revision: str = ""
    fingerprint: str = ""
    n_params: int = 0
    architecture: str | None = None
    quantkit_version: str | None = None


@dataclass(frozen=True)
class PublishedRecord(_Record):
    """Where a variant was pushed."""

    repo: str
    branch: str
    commit: str
