"""The shape of format knowledge: one FormatSpec per format, defined in the format's own module
(quantkit/engines/<fmt>.py) and registered in the ENGINES table. recipe.py, plan.py, card.py
and cli.py read every format difference from the specs; none of them names a format.

This module is neutral: it imports only the records below it (records, variant, sizing, manifest),
so format modules and stages both use it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator

from .manifest import VariantRecord
from .records import FileEntry, QualityRecord
from .sizing import ModelShape, RunMemory
from .variant import ParamsModel, Variant

__all__ = ["ParamsModel", "FormatSpec", "CardRow", "Column", "Runtime"]

README = "README.md"
GROUP_SIZES = (-1, 32, 64, 128, 256, 1024)  # -1: one group per row (GPTQ's "no grouping")


# ---------------------------------------------------------------- file size limits
# The Hub refuses files over 50 GB and advises keeping each under about 20 GB. Every format
# that writes weights takes one setting for it, `split_max_size`: the largest file it writes
# (GGUF: split with llama-gguf-split; safetensors: shards plus an index, as transformers does).
# Decimal units, as llama.cpp's --split-max-size and the Hub count them.

HUB_FILE_LIMIT = 50 * 10**9  # bytes; the Hub refuses a larger file
SPLIT_DEFAULT = "20G"
SIZE_UNITS = {"K": 10**3, "M": 10**6, "G": 10**9}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG])B?\s*$", re.I)


def parse_size(text: str) -> int:
    """'20G' -> 20_000_000_000; K/M/G (optionally with B), decimal; ValueError otherwise."""
    m = _SIZE.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a size: a positive number with K, M or G, e.g. \"20G\" or \"500M\"")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])


def _size_setting(v: str) -> str:
    parse_size(v)
    m = _SIZE.match(v)
    assert m is not None
    return f"{m.group(1)}{m.group(2).upper()}"  # one spelling: "20G", whatever was written


# A settings field: `split_max_size: f.SizeSetting = f.SPLIT_DEFAULT`.
SizeSetting = Annotated[str, AfterValidator(_size_setting)]


def one_of(v: Any, allowed: tuple[Any, ...]) -> Any:
    """For field validators: a value from a fixed list, with the list in the message."""
    if v not in allowed:
        raise ValueError(f"must be one of {', '.join(map(str, allowed))}")
    return v


def _damp(v: float) -> float:
    if not 0 < v < 1:
        raise ValueError("must be between 0 and 1 (exclusive), e.g. 0.1 for 10 %")
    return v


# Settings fields the GPTQ-style formats share: `group_size: f.GroupSize = 128`, `damp: f.Damp = 0.1`.
GroupSize = Annotated[int, AfterValidator(lambda v: one_of(v, GROUP_SIZES))]
Damp = Annotated[float, AfterValidator(_damp)]  # GPTQ's dampening, a fraction of the Hessian's mean diagonal


# ---------------------------------------------------------------- card pieces


@dataclass(frozen=True)
class CardRow:
    """One variant in its repo's provided-files table (quantkit.card builds these)."""

    variant: Variant
    record: VariantRecord
    params: Mapping[str, Any]  # the recipe's settings plus what the engine recorded
    link: str  # the branch on the Hub
    current: bool  # the row of the card's own branch
    architecture: str | None  # config.json's architectures[0]
    describe: str  # the spec's words for the params
    remarks: tuple[str, ...] = ()  # measured superlatives: "smallest download", "lowest KLD"
    dataset: str = ""  # the calibration data, as a Markdown cell
    seq_len: int | None = None
    run: RunMemory | None = None  # memory to run it at 4k context; None: the model's shape is unknown

    @property
    def quality(self) -> QualityRecord | None:
        return self.record.quality

    @property
    def description(self) -> str:
        return "; ".join((self.describe, *self.remarks))


@dataclass(frozen=True)
class Column:
    title: str
    value: Callable[[CardRow], str]


@dataclass(frozen=True)
class Runtime:
    """A row of the card's compatibility table."""

    name: str
    works: Callable[[Mapping[str, Any], str | None], bool | None]  # (params, architecture); None: unknown
    how: str  # how to load it there; "{fmt}" becomes the format's name


def always(p: Mapping[str, Any], arch: str | None) -> bool | None:
    return True


# text-generation-webui loads every format we write (a loader per format).
TEXTGEN_WEBUI = Runtime("text-generation-webui", always, "`REPO:BRANCH` in Download")


def files_size(files: tuple[FileEntry, ...], fallback: int = 0) -> int:
    """Bytes of the built files; the README is not one of them (it shows this number)."""
    built = [f for f in files if f.path != README]
    return sum(f.size for f in built) if built else fallback


def human_size(n: int) -> str:
    """Decimal units, as the Hub shows file sizes."""
    for unit, step in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= step:
            return f"{n / step:.2f} {unit}"
    return f"{n} B"


def yes(v: bool | None) -> str:
    return {True: "Yes", False: "No", None: "Unknown"}[v]


# Digits the card shows; Δp and the answers' shares are fractions shown as percent.
QUALITY_FORMAT = {"delta_ppl_pct": "+.2f", "kld": ".4f", "ppl": ".3f", "kld_median": ".4f", "kld_p99": ".4f",
                  "kld_p999": ".4f", "rms_dp": ".2%", "dp_p01": "+.2%", "dp_p99": "+.2%", "qa_ref_acc": ".1%",
                  "qa_acc": ".1%", "qa_flips": ".1%", "top1": ".1%"}


def quality_cell(q: QualityRecord | None, key: str) -> str:
    v = None if q is None else getattr(q, key)
    return "n/a" if v is None else format(v, QUALITY_FORMAT[key])


def group_size_cell(p: Mapping[str, Any]) -> str:
    return "None" if p.get("group_size") == -1 else str(p.get("group_size"))


def _branch_cell(row: CardRow) -> str:
    cell = f"[{row.variant.branch}]({row.link})"
    return f"**{cell}** (this branch)" if row.current else cell


# Columns every format's table uses; a spec puts them where its users expect them.
BRANCH = Column("Branch", _branch_cell)
BITS = Column("Bits", lambda r: str(r.params.get("bits")))
GROUP_SIZE = Column("GS", lambda r: group_size_cell(r.params))
DATASET = Column("Dataset", lambda r: r.dataset)
SEQ_LEN = Column("Seq Len", lambda r: str(r.seq_len or "n/a"))
SIZE = Column("Size", lambda r: human_size(files_size(r.record.files, r.record.size_bytes)))
QUALITY = (Column("ΔPPL %", lambda r: quality_cell(r.quality, "delta_ppl_pct")),
           Column("KLD", lambda r: quality_cell(r.quality, "kld")),
           # the tail: the KLD of the worst 0.1 % of tokens, where a quant breaks
           Column("KLD p99.9", lambda r: quality_cell(r.quality, "kld_p999")))
DESCRIPTION = Column("Description", lambda r: r.description)
TOP1 = Column("Top-1", lambda r: "n/a" if r.quality is None or r.quality.top1 is None
              else f"{100 * r.quality.top1:.1f} %")


def memory_column(device: str) -> Column:
    """TheBloke's "Max RAM required": the files, the KV cache at 4k context and the runtime's buffers."""
    return Column(f"Max {device} required", lambda r: human_size(r.run.total) if r.run else "n/a")


# ---------------------------------------------------------------- the spec


@dataclass(frozen=True)
class FormatSpec:
    """Everything that differs between formats, outside the engine's build and load code."""

    name: str  # `format = "..."` in a recipe; also the name of its defaults table ([name])
    repo_suffix: str  # the repo is {model}-{repo_suffix}, as TheBloke named them
    params: type[ParamsModel]  # the settings of one variant, validated at the recipe's door
    variant_name: Callable[[Any], str]  # params -> the variant's name (also its folder)
    branch_name: Callable[[Any], str]  # params -> its Hub branch when it is not the repo's main
    name_keys: frozenset[str]  # settings the variant name already shows (tables skip them)
    columns: tuple[Column, ...]  # the card's provided-files table
    describe: Callable[[Mapping[str, Any]], str]  # params -> a few words for the table
    use: str  # what the repo is for, in the card's "Repositories available"
    tags: tuple[str, ...]  # card metadata
    library_name: str | None  # card metadata; None: the Hub detects it from the files
    runtimes: tuple[Runtime, ...]  # the card's compatibility table
    example: Mapping[str, Any]  # the settings of one typical variant (docs, tests, `quantkit init`)
    # Memory to run a variant (the cards' column, `quantkit plan`): where it lives, and the
    # runtime's own buffers besides the weights and the KV cache (quantkit.sizing.run_memory).
    run_device: str = "VRAM"
    run_overhead: Callable[[ModelShape], int] = lambda shape: 0
    ladder_on_main: bool = False  # main holds every variant's files (tools list main's files)
    # Extra names for the format's template partial, from the card's own row (e.g. a file name).
    # (the card's own row, every row of its repo) -> names for the partial.
    card_context: Callable[[CardRow, list[CardRow]], dict[str, Any]] | None = None

    @property
    def defaults_table(self) -> str:
        return self.name

    @property
    def partial(self) -> str:
        """The template with the card's format-specific sections (jinja macros)."""
        return f"formats/{self.name}.md.j2"

    def extra_context(self, row: CardRow, rows: list[CardRow]) -> dict[str, Any]:
        return self.card_context(row, rows) if self.card_context else {}
