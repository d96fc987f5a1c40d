"""GGUF file names: the model's files, llama.cpp's shard names, and the quant type the Hub reads
from a name."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from ...records import BuildContext


def model_name(ctx: BuildContext) -> str:
    """File and general.name: the recipe's model name when the pipeline passes it."""
    name = ctx.model_name or ctx.source.id.rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def quantized_by(ctx: BuildContext) -> str:
    return ctx.quantized_by or "quantkit"


def file_name(ctx: BuildContext, quant: str) -> str:
    return f"{model_name(ctx)}.{quant}.gguf"


def imatrix_file(ctx: BuildContext) -> str:
    """The importance matrix as published beside the files it steered (bartowski's name: no
    .gguf suffix, so tools listing GGUF models do not offer it as one)."""
    return f"{model_name(ctx)}.imatrix"


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")[:80] or "calibration"


# ---------------------------------------------------------------- shards
# llama.cpp's naming (llama_split_path): PREFIX-00001-of-00003.gguf. llama.cpp, llama-cpp-python
# and the Hub's GGUF tools are given the first part and find the others by this name.

_SHARD = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def shard_name(prefix: str, no: int, count: int) -> str:
    """Part `no` (1-based) of `count`, named as llama-gguf-split names it."""
    return f"{prefix}-{no:05d}-of-{count:05d}.gguf"


def _shard_no(path: str) -> int:
    m = _SHARD.match(path.rsplit("/", 1)[-1])
    return int(m["no"]) if m else 0


def shards(files: Iterable[str]) -> list[str]:
    """A variant's GGUF model files in load order: the one unsplit file, or every shard by number."""
    ggufs = sorted(p for p in files if p.endswith(".gguf"))
    parts = [p for p in ggufs if _SHARD.match(p.rsplit("/", 1)[-1])]
    return sorted(parts, key=_shard_no) if parts else ggufs


def first_shard(files: Iterable[str]) -> str:
    """The file users pass to llama.cpp ("" when there is none)."""
    return next(iter(shards(files)), "")


def include_pattern(files: Iterable[str]) -> str:
    """A glob that selects exactly this variant's model files, for `hf download REPO --include`."""
    first = first_shard(files)
    m = _SHARD.match(first)
    return f"{m['prefix']}-*-of-{m['count']}.gguf" if m else first


def missing_shards(names: list[str]) -> list[str]:
    """Parts a split file's name promises that the list lacks (or extra parts it has)."""
    m = _SHARD.match(names[0]) if names else None
    if not m:
        return [] if len(names) == 1 else [f"{len(names)} unsplit .gguf files"]
    want = [shard_name(m["prefix"], i, int(m["count"])) for i in range(1, int(m["count"]) + 1)]
    return sorted(set(want) ^ set(names))


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def shard_files(prefix: Path) -> tuple[Path, ...]:
    found = [p.name for p in prefix.parent.glob(f"{glob_escape(prefix.name)}-*-of-*.gguf")]
    return tuple(prefix.parent / n for n in shards(found))


def remove_shards(prefix: Path) -> None:
    for p in shard_files(prefix):
        p.unlink(missing_ok=True)


# ---------------------------------------------------------------- the Hub's label rule
# The Hub's rule for a GGUF file's quant type (huggingface.js `parseGGUFQuantLabel`): the last
# match, in the upper-cased file name, of a file-type name from its GGMLFileQuantizationType
# list (in that order: the regex takes the first alternative that matches at a place),
# optionally followed by "_" and a size letter group. `llama-cli -hf REPO:TYPE`, `ollama run
# hf.co/REPO:TYPE` and the Hub's panels pick main's files by it.
_HUB_TYPES = ("F32 F16 Q4_0 Q4_1 Q4_1_SOME_F16 Q4_2 Q4_3 Q8_0 Q5_0 Q5_1 Q2_K Q3_K_S Q3_K_M Q3_K_L Q4_K_S Q4_K_M "
              "Q5_K_S Q5_K_M Q6_K IQ2_XXS IQ2_XS Q2_K_S IQ3_XS IQ3_XXS IQ1_S IQ4_NL IQ3_S IQ3_M IQ2_S IQ2_M IQ4_XS "
              "IQ1_M BF16 Q4_0_4_4 Q4_0_4_8 Q4_0_8_8 TQ1_0 TQ2_0 MXFP4_MOE NVFP4 Q1_0 Q2_K_XL Q3_K_XL Q4_K_XL "
              "Q5_K_XL Q6_K_XL Q8_K_XL").split()
_HUB_LABEL = re.compile(f"(UD-)?({'|'.join(_HUB_TYPES)})(_[A-Z]+)?")


def hub_quant_label(file_name: str) -> str | None:
    """The quant type the Hub and the tools reading main see in a file name."""
    found = [m.group(0) for m in _HUB_LABEL.finditer(file_name.upper())]
    return found[-1] if found else None
