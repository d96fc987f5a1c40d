"""Checks on a local source model folder before any work starts.

A damaged source otherwise fails minutes into a build, deep inside transformers or an
engine, with a traceback. These checks read only config.json and the safetensors headers
(a few KB per file), so they cost nothing next to a build.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from .errors import SourceError
from .recipe import Recipe, resolve_local_source

# Any one of these lets AutoTokenizer load: fast tokenizer, SentencePiece, BPE, WordPiece.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def check_recipe_source(recipe: Recipe) -> None:
    """Check the recipe's source when it is a local folder (Hub sources are checked on download)."""
    local = resolve_local_source(recipe)
    if local is not None:
        check_source_folder(local, recipe.model.source)


def check_source_folder(folder: Path, source_id: str) -> None:
    """Raise SourceError naming the first problem: config.json, tokenizer, weight files."""
    _config(folder, source_id)
    _tokenizer(folder, source_id)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not any(folder.glob("*.bin")):
        raise SourceError(source_id, f"no weight files (*.safetensors) in {folder}")
    for f in weights:
        _safetensors(f, source_id)
    _index(folder, source_id)


def _config(folder: Path, sid: str) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise SourceError(sid, f"no config.json in {folder}")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise SourceError(sid, f"{path} is not UTF-8 text (byte {e.start})") from None
    except ValueError as e:
        raise SourceError(sid, f"{path} is not valid JSON ({e}); copy it again from the original model") from None
    if not isinstance(cfg, dict):
        raise SourceError(sid, f"{path} is not a JSON object")
    return cfg


def _tokenizer(folder: Path, sid: str) -> None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise SourceError(sid, f"no tokenizer in {folder} (none of {', '.join(TOKENIZER_FILES)}); "
                          "copy the tokenizer files from the original model")


def _safetensors(f: Path, sid: str) -> None:
    """Header readable, and the file exactly as long as the header says: catches truncation."""
    size = f.stat().st_size
    damaged = f"{f.name} is truncated or damaged"
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise SourceError(sid, f"{damaged}: {size} bytes, shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise SourceError(sid, f"{damaged}: its header claims {n} bytes, the file has {size}")
        try:
            header = json.loads(fh.read(n))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise SourceError(sid, f"{damaged}: unreadable header ({e})") from None
    if size != 8 + n + end:
        raise SourceError(sid, f"{damaged}: it should hold {8 + n + end} bytes, it has {size}; "
                          "copy or download it again")


def _index(folder: Path, sid: str) -> None:
    """Every shard a model.safetensors.index.json names must be there."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SourceError(sid, f"{index.name} is damaged ({e})") from None
    missing = sorted(s for s in shards if not (folder / s).is_file())
    if missing:
        raise SourceError(sid, f"{index.name} names {len(missing)} missing shard(s), e.g. {missing[0]}")
