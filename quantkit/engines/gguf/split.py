"""Splitting a GGUF above `split_max_size` into llama.cpp's shards with llama-gguf-split, and
checking the shards before they count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import EngineError
from ...toolchain import Toolchain
from .files import missing_shards, remove_shards, shard_files
from .header import read_header
from .tools import explain, run

# What a shard's header may hold beyond the unsplit file's: the three split.* keys and padding.
SPLIT_HEADER_SLACK = 4096


def split_budget(header: int, limit: int) -> int:
    """Tensor bytes per shard for llama-gguf-split (whole MB, its unit), so that no shard,
    header included, exceeds `limit`; the tool counts only tensor data against its limit."""
    return (limit - header - SPLIT_HEADER_SLACK) // 10**6 * 10**6


def split_file(tc: Toolchain, src: Path, prefix: Path, limit: int, variant: str | None = None) -> tuple[Path, ...]:
    """Split src into PREFIX-0000i-of-0000N.gguf beside prefix, each at most `limit` bytes.
    llama-gguf-split copies header and tensors as they are: the same input gives the same bytes."""
    h = read_header(src)
    budget = split_budget(h["data_start"], limit)
    largest = max((n + (-n % 32) for n in h["sizes"]), default=0)
    if budget < largest:
        raise EngineError("gguf", f"split_max_size {limit / 1e6:.0f} MB is too small: the largest tensor "
                          f"needs {largest / 1e6:.1f} MB and the metadata {h['data_start'] / 1e6:.1f} MB", variant)
    remove_shards(prefix)  # left by a killed run
    res = run([tc.splitter(), "--split", "--split-max-size", f"{budget // 10**6}M", src.resolve(),
               prefix.resolve()])
    parts = shard_files(prefix)
    if res.returncode != 0 or not parts:
        remove_shards(prefix)
        raise EngineError("gguf", explain(res, f"splitting {src.name}", prefix.parent), variant)
    return parts


def check_shards(parts: tuple[Path, ...], quant: str, base: dict[str, Any], limit: int,
                 variant: str | None = None) -> dict[str, Any]:
    """Shards count only if they are complete, named and numbered as llama.cpp expects, each
    within the limit, and together hold the base's tensors in the requested type."""
    names = [p.name for p in parts]
    bad = missing_shards(names)
    heads = [read_header(p) for p in parts]
    count = heads[0]["kv"].get("split.count")
    bad += [f"{n}: {p.stat().st_size} bytes, over split_max_size" for n, p in zip(names, parts)
            if p.stat().st_size > limit]
    bad += [f"{n}: split.no {h['kv'].get('split.no')}" for i, (n, h) in enumerate(zip(names, heads))
            if h["kv"].get("split.no") != i or h["kv"].get("split.count") != count]
    bad += [f"{n}: cut short" for n, h in zip(names, heads) if not h["complete"]]
    if count != len(parts):
        bad.append(f"split.count {count}, {len(parts)} files")
    n_tensors = sum(len(h["tensors"]) for h in heads)
    if n_tensors != base["tensors"]:
        bad.append(f"{n_tensors} tensors in all (expected {base['tensors']})")
    if bad:
        raise EngineError("gguf", f"shards of {quant} read back wrong: {'; '.join(bad)}", variant)
    return {"shards": len(parts), "largest_shard": max(p.stat().st_size for p in parts)}
