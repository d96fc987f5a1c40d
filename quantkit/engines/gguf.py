"""GGUF through llama.cpp: convert the source once to a 16-bit GGUF, compute the importance
matrix once from the calibration text, quantize every requested type from that one file,
read each output back before it counts, split a file above `split_max_size` into llama.cpp's
shards (`NAME-00001-of-0000N.gguf`, with llama-gguf-split), and evaluate through the Python
bindings from the first shard, as users load it.

The 16-bit GGUF and the imatrix live in the build's work_dir, keyed by everything that
changes them (source fingerprint, llama.cpp version, calibration hash), so the variants of
one build share them and a different source or calibration never reuses them.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pydantic import field_validator, model_validator

from .. import formats as f
from ..errors import EngineError, EngineUnavailable
from ..records import BuildContext, EngineResult, LogitsFn
from ..sizing import PROCESS_BASE, Estimate, Machine, ModelShape, OutputFiles, Workload, pack_files
from . import llamacpp

if TYPE_CHECKING:
    from ..plan import Variant

FLOAT_TYPES = ("F32", "F16", "BF16")  # written by llama-quantize as a plain conversion
NO_IMATRIX_USE = (*FLOAT_TYPES, "Q8_0")  # llama.cpp ignores an imatrix for these: do not claim one
IMATRIX_CTX = 512  # llama-imatrix's default chunk length; shorter only when the text is short
MIN_FREE_AFTER_FAIL = 64 << 20  # a failed write with less free than this is a full disk
MB = 1 << 20
RAY_CPUS = 4  # cores per GGUF task on a Ray cluster: llama-quantize and scoring use them all

# Llama, needs an importance matrix). Approximate values are llama.cpp's own table.
GGUF_TYPES: dict[str, tuple[float, bool]] = {
    "F32": (32.0, False),
    "F16": (16.0, False),
    "BF16": (16.0, False),
    "Q8_0": (8.5, False),
    "Q6_K": (6.56, False),
    "Q5_K_M": (5.67, False),
    "Q5_K_S": (5.52, False),
    "Q5_1": (6.0, False),
    "Q5_0": (5.5, False),
    "Q4_K_M": (4.83, False),
    "Q4_K_S": (4.58, False),
    "Q4_1": (5.0, False),
    "Q4_0": (4.5, False),
    "Q3_K_L": (4.27, False),
    "Q3_K_M": (3.91, False),
    "Q3_K_S": (3.5, False),
    "Q2_K": (3.35, False),
    "Q2_K_S": (3.0, True),   # llama.cpp refuses it without an imatrix
    "IQ4_NL": (4.5, True),   # IQ* are designed around an imatrix; we require one
    "IQ4_XS": (4.25, True),
    "IQ3_M": (3.66, True),
    "IQ3_S": (3.44, True),
    "IQ3_XS": (3.3, True),
    "IQ3_XXS": (3.06, True),
    "IQ2_M": (2.7, True),
    "IQ2_S": (2.5, True),
    "IQ2_XS": (2.31, True),
    "IQ2_XXS": (2.06, True),
    "IQ1_M": (1.75, True),
    "IQ1_S": (1.56, True),
}


class GGUFParams(f.ParamsModel):
    quant: str
    imatrix: bool = True
    split_max_size: f.SizeSetting = f.SPLIT_DEFAULT  # larger files become llama.cpp shards

    @field_validator("quant")
    @classmethod
    def _known_type(cls, v: str) -> str:
        up = v.upper()
        if up not in GGUF_TYPES:
            raise ValueError(f"unknown GGUF type {v!r}; known: {', '.join(GGUF_TYPES)}")
        return up

    @model_validator(mode="after")
    def _imatrix_needed(self) -> GGUFParams:
        if GGUF_TYPES[self.quant][1] and not self.imatrix:
            raise ValueError(f"{self.quant} needs an importance matrix: set imatrix = true")
        return self


def _uses_imatrix(p: Any) -> bool:
    """Whether llama.cpp used the importance matrix for this type (it ignores it for 8-bit and floats)."""
    return bool(p.get("imatrix")) and p.get("quant") not in NO_IMATRIX_USE


def _suffix(p: GGUFParams) -> str:
    return "" if p.imatrix or p.quant in FLOAT_TYPES else "-noimatrix"


def _gguf_file(row: f.CardRow) -> str:
    return first_shard(e.path for e in row.record.files)


# ---------------------------------------------------------------- shards
# llama.cpp's naming (llama_split_path): PREFIX-00001-of-00003.gguf. llama.cpp, llama-cpp-python
# and the Hub's GGUF tools are given the first part and find the others by this name.

_SHARD = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def shard_name(prefix: str, no: int, count: int) -> str:
    """Part `no` (1-based) of `count`, named as llama-gguf-split names it."""
    return f"{prefix}-{no:05d}-of-{count:05d}.gguf"


def shards(files: Iterable[str]) -> list[str]:
    """A variant's GGUF model files in load order: the one unsplit file, or every shard by number."""
    ggufs = sorted(p for p in files if p.endswith(".gguf"))
    parts = [p for p in ggufs if _SHARD.match(p.rsplit("/", 1)[-1])]
    return sorted(parts, key=lambda p: int(_SHARD.match(p.rsplit("/", 1)[-1])["no"])) if parts else ggufs


def first_shard(files: Iterable[str]) -> str:
    """The file users pass to llama.cpp ("" when there is none)."""
    return next(iter(shards(files)), "")


def include_pattern(files: Iterable[str]) -> str:
    """A glob that selects exactly this variant's model files, for `hf download REPO --include`."""
    first = first_shard(files)
    m = _SHARD.match(first)
    return f"{m['prefix']}-*-of-{m['count']}.gguf" if m else first


def _missing_shards(names: list[str]) -> list[str]:
    """Parts a split file's name promises that the list lacks (or extra parts it has)."""
    m = _SHARD.match(names[0]) if names else None
    if not m:
        return [] if len(names) == 1 else [f"{len(names)} unsplit .gguf files"]
    want = [shard_name(m["prefix"], i, int(m["count"])) for i in range(1, int(m["count"]) + 1)]
    return sorted(set(want) ^ set(names))


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


# What each family of types is for, in our words (TheBloke's "Use case" column).
_USE = (
    (("F32", "F16", "BF16"), "unquantized; a source for other conversions"),
    (("Q8_0",), "nearly lossless; large, for when memory is no concern"),
    (("Q6_K",), "very close to the original; large"),
    (("Q5_",), "close to the original; a good choice when it fits"),
    (("Q4_K_M",), "the usual default: balanced size and quality"),
    (("Q4_", "IQ4_"), "smaller than Q4_K_M, with a little more loss"),
    (("Q3_", "IQ3_"), "small, with noticeable loss"),
    (("Q2_", "IQ2_"), "smallest usable; large loss, for when nothing larger fits"),
    (("IQ1_",), "extreme compression; for experiments"),
)


def use_case(quant: str) -> str:
    return next((text for prefixes, text in _USE if quant.startswith(prefixes)), "")


def _file_link(r: f.CardRow) -> str:
    """The file on main, where every GGUF file of the repo lies."""
    name = _gguf_file(r)
    return f"[{name}]({r.link.rsplit('/tree/', 1)[0]}/blob/main/{name})"


def _quant_method(r: f.CardRow) -> str:
    return str(r.params.get("quant")) + (", imatrix" if _uses_imatrix(r.params) else "")


LLAMA_BATCH = 512  # llama.cpp's default n_ubatch: one batch's tensors make the compute buffer


def _card_names(row: f.CardRow, rows: list[f.CardRow]) -> dict[str, Any]:
    """The file, and the type tag `-hf REPO:TAG` resolves by; no tag when another file on main
    has the same one (a plain and an imatrix file of one type): then the card names the file."""
    name = _gguf_file(row)
    tag = hub_quant_label(name) or ""
    shared = sum(hub_quant_label(_gguf_file(r)) == tag for r in rows) > 1
    files = [e.path for e in row.record.files]
    # gguf_files: the model's files in load order (one, or every shard); gguf_include: a glob for
    # `hf download REPO --include` that fetches exactly those.
    return {"gguf_file": name, "quant_tag": "" if shared else tag, "file_tag": tag,
            "gguf_files": shards(files), "gguf_include": include_pattern(files)}


def llama_cpp_overhead(shape: ModelShape) -> int:
    """llama.cpp's compute and output buffers on the CPU. The compute graph's largest live
    tensors are one batch's logits (or, in wide FFNs, its two intermediate activations) next
    to a few hidden states, in f32; the output buffer holds one token's logits. Checked by
    benchmarks/run_memory.py against llama.cpp's own report (SmolLM2: 104.2 MB estimated,
    99.6 MiB = 104.4 MB reported)."""
    widest = max(shape.vocab, 2 * shape.intermediate)
    return LLAMA_BATCH * 4 * (widest + 3 * shape.hidden) + shape.vocab * 4


SPEC = f.FormatSpec(
    name="gguf", repo_suffix="GGUF", params=GGUFParams,
    variant_name=lambda p: f"gguf-{p.quant}{_suffix(p)}", branch_name=lambda p: f"{p.quant}{_suffix(p)}",
    name_keys=frozenset({"quant"}),
    # TheBloke's GGUF table (Name, Quant method, Bits, Size, Max RAM required, Use case) plus
    # measured quality and the variant's own branch.
    columns=(f.Column("Name", _file_link), f.Column("Quant method", _quant_method),
             f.Column("Bits", lambda r: f"{r.record.bits_per_weight:.2f}"), f.SIZE, f.memory_column("RAM"),
             f.Column("Use case", lambda r: use_case(str(r.params.get("quant")))), *f.QUALITY, f.TOP1, f.BRANCH),
    describe=lambda p: f"llama.cpp {p['quant']}" + (", with importance matrix" if _uses_imatrix(p) else ""),
    use="CPU and CPU+GPU inference with llama.cpp and the apps built on it",
    tags=("gguf", "quantized", "quantkit"), library_name=None,  # the Hub recognises .gguf files itself
    runtimes=(
        f.TEXTGEN_WEBUI,
        # GGUF is llama.cpp's format; everything that embeds llama.cpp reads it.
        f.Runtime("llama.cpp", f.always, "`llama-cli -hf REPO:TYPE`"),
        f.Runtime("llama-cpp-python", f.always, "`Llama.from_pretrained(REPO, FILE)`"),
        f.Runtime("Ollama", f.always, "`ollama run hf.co/REPO:TYPE`"),
        f.Runtime("LM Studio, KoboldCpp", f.always, "open or import the .gguf file"),
    ),
    example={"quant": "Q4_K_M"},
    run_device="RAM", run_overhead=llama_cpp_overhead, ladder_on_main=True,
    card_context=lambda row, rows: _card_names(row, rows),
)


@dataclass(frozen=True)
class Built:
    """One quantized model, checked: one file or its shards in order; `notes` become card lines."""

    paths: tuple[Path, ...]
    notes: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.paths[0]


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_name(ctx: BuildContext) -> str:
    """File and general.name: the recipe's model name when the pipeline passes it."""
    name = getattr(ctx, "model_name", None) or ctx.source.id.rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def quantized_by(ctx: BuildContext) -> str:
    return getattr(ctx, "quantized_by", None) or "quantkit"


def file_name(ctx: BuildContext, quant: str) -> str:
    return f"{model_name(ctx)}.{quant}.gguf"


def imatrix_file(ctx: BuildContext) -> str:
    """The importance matrix as published beside the files it steered (bartowski's name: no
    .gguf suffix, so tools listing GGUF models do not offer it as one)."""
    return f"{model_name(ctx)}.imatrix"


def _copy_imatrix(src: Path, dest: Path) -> None:
    """A hard link when the file system allows (same bytes, no copy), else a copy."""
    dest.unlink(missing_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def base_type(source: Path) -> str:
    """BF16 for bf16 checkpoints (lossless), else F16, as llama.cpp's `--outtype auto` picks."""
    try:
        cfg = json.loads((source / "config.json").read_text())
    except (OSError, ValueError):
        return "F16"
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or cfg.get("text_config", {}).get("dtype", ""))
    return "BF16" if "bfloat16" in dtype else "F16"


def _free(path: Path) -> int:
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def _need_space(where: Path, need: int, what: str, variant: str | None) -> None:
    free = _free(where)
    if free < need:
        raise EngineError("gguf", f"disk full: {what} needs about {need // MB} MiB in {where}, "
                          f"{free // MB} MiB free", variant)


def expected_bytes(quant: str, n_params: int) -> int:
    return int(n_params * GGUF_TYPES[quant][0] / 8 * 1.1) + 16 * MB


# ---------------------------------------------------------------- running the tools


@dataclass(frozen=True)
class _Result:
    returncode: int
    log: str


def _run(cmd: Sequence[str | Path], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> _Result:
    """Run one llama.cpp program; keep its combined output for error messages."""
    lines: list[str] = []
    try:
        p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, errors="replace", env=env, cwd=cwd, preexec_fn=_die_with_parent)
    except OSError as e:
        raise EngineUnavailable("gguf", f"cannot run {cmd[0]}: {e.strerror}") from None
    assert p.stdout is not None
    for line in p.stdout:
        lines.append(line.rstrip())
    return _Result(p.wait(), "\n".join(lines[-400:]))


def _libc_prctl() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").prctl
    except (OSError, AttributeError):  # not glibc Linux
        return None


_PRCTL = _libc_prctl()  # bound before any fork: the child only calls it


def _die_with_parent() -> None:
    """In the child before exec: a killed build takes its llama.cpp tools with it."""
    if _PRCTL is not None:
        _PRCTL(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


# llama.cpp output lines that explain a failure, most specific first.
_UNSUPPORTED = "llama.cpp's converter does not support architecture {0}"
_FAILURE_PATTERNS = (
    (re.compile(r"Model (\S+) is not supported"), _UNSUPPORTED),
    (re.compile(r"Architecture '?([^'\s]+)'? not supported"), _UNSUPPORTED),
    (re.compile(r"BPE pre-tokenizer was not recognized"),
     "llama.cpp's converter does not know this tokenizer's pre-tokenizer"),
    (re.compile(r"No space left on device"), "disk full"),
    (re.compile(r"(?:error|Error|ERROR)[:!] ?(.+)"), "{0}"),
    (re.compile(r"(\w+Error: .+)"), "{0}"),
    (re.compile(r"failed to quantize: (.+)"), "{0}"),
    (re.compile(r"(you need at least \d+ tokens.*)"), "{0}"),
)


def _explain(res: _Result, what: str, out_dir: Path) -> str:
    """One line for a failed tool run: a known cause, a full disk, or the tool's last error."""
    for pat, msg in _FAILURE_PATTERNS[:4]:
        if m := pat.search(res.log):
            reason = msg.format(*m.groups())
            return f"{reason} ({what}, free {_free(out_dir) // MB} MiB)" if reason == "disk full" else reason
    if _free(out_dir) < MIN_FREE_AFTER_FAIL:
        return f"disk full while {what} in {out_dir} ({_free(out_dir) // MB} MiB free)"
    for line in reversed(res.log.splitlines()):
        for pat, msg in _FAILURE_PATTERNS[4:]:
            if m := pat.search(line):
                return f"{what} failed: {msg.format(*m.groups()).strip()[:300]}"
    return f"{what} failed (exit {res.returncode})"


# ---------------------------------------------------------------- reading back
# gguf.GGUFReader parses every vocabulary string into numpy views: 2-4 s per SmolLM2 file
# here, more than llama-quantize itself. The check reads the same header with struct
# instead (about 50 ms), using gguf's own type tables; tests compare it with GGUFReader.

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",  # GGUFValueType
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_SHORT_ARRAY = 64  # arrays up to this length are returned; longer ones (vocab) only skipped


def _read_str(mm: Any, off: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", mm, off)
    return bytes(mm[off + 8:off + 8 + n]).decode("utf-8", "replace"), off + 8 + n


def _read_value(mm: Any, off: int, vtype: int) -> tuple[Any, int]:
    if vtype == _STRING:
        return _read_str(mm, off)
    if vtype != _ARRAY:
        fmt = _SCALARS[vtype]
        return struct.unpack_from(fmt, mm, off)[0], off + struct.calcsize(fmt)
    itype, n = struct.unpack_from("<IQ", mm, off)
    off += 12
    if itype in _SCALARS and n > _SHORT_ARRAY:
        return None, off + n * struct.calcsize(_SCALARS[itype])
    items = []
    for _ in range(n):
        item, off = _read_value(mm, off, itype)
        if n <= _SHORT_ARRAY:
            items.append(item)
    return (items if n <= _SHORT_ARRAY else None), off


def read_header(path: Path) -> dict[str, Any]:
    """Metadata (long arrays as None), tensor infos and whether the file holds all tensor data."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise ValueError("no GGUF magic")
        _version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
        off, kv = 24, {}
        for _ in range(n_kv):
            key, off = _read_str(mm, off)
            (vtype,) = struct.unpack_from("<I", mm, off)
            kv[key], off = _read_value(mm, off + 4, vtype)
        tensors, sizes = [], []
        for _ in range(n_tensors):
            name, off = _read_str(mm, off)
            (nd,) = struct.unpack_from("<I", mm, off)
            dims = struct.unpack_from(f"<{nd}Q", mm, off + 4)
            ttype, toff = struct.unpack_from("<IQ", mm, off + 4 + 8 * nd)
            off += 4 + 8 * nd + 12
            qtype = GGMLQuantizationType(ttype)
            block, size = GGML_QUANT_SIZES[qtype]
            sizes.append(math.prod(dims) // block * size)
            tensors.append((name, qtype.name, toff + sizes[-1]))
        align = int(kv.get("general.alignment") or 32)
        data_start = off + (-off % align)
        end = data_start + max((t[2] for t in tensors), default=0)
        return {"kv": kv, "tensors": tensors, "complete": mm.size() >= end, "data_start": data_start,
                "sizes": sizes}


def read_back(path: Path) -> dict[str, Any]:
    """Architecture, tensor count, file type and tensor types of a written GGUF."""
    h = read_header(path)
    kv, types = h["kv"], {}
    for _, t, _ in h["tensors"]:
        types[t] = types.get(t, 0) + 1
    return {"architecture": kv.get("general.architecture"), "tensors": len(h["tensors"]),
            "file_type": kv.get("general.file_type"), "name": kv.get("general.name"),
            "quantized_by": kv.get("general.quantized_by"), "tensor_types": types,
            "imatrix_dataset": kv.get("quantize.imatrix.dataset"),
            "imatrix_chunks": kv.get("quantize.imatrix.chunks_count"), "complete": h["complete"]}


def file_type_of(quant: str) -> int:
    from gguf import LlamaFileType

    return int(LlamaFileType["ALL_F32" if quant == "F32" else f"MOSTLY_{quant}"])


def check(path: Path, quant: str, base: dict[str, Any], variant: str | None = None) -> dict[str, Any]:
    """A written file counts only if it reads back as the base's model in the requested type."""
    try:
        got = read_back(path)
    except Exception as e:  # noqa: BLE001 - any parse failure means a broken file
        raise EngineError("gguf", f"{path.name} does not read back as GGUF: {e}", variant) from None
    want = {"architecture": base["architecture"], "tensors": base["tensors"],
            "file_type": file_type_of(quant), "complete": True}
    bad = [f"{k} {got[k]!r} (expected {v!r})" for k, v in want.items() if got[k] != v]
    if bad:
        raise EngineError("gguf", f"{path.name} read back wrong: {', '.join(bad)}", variant)
    return got


# ---------------------------------------------------------------- splitting

# What a shard's header may hold beyond the unsplit file's: the three split.* keys and padding.
SPLIT_HEADER_SLACK = 4096


def split_budget(header: int, limit: int) -> int:
    """Tensor bytes per shard for llama-gguf-split (whole MB, its unit), so that no shard,
    header included, exceeds `limit`; the tool counts only tensor data against its limit."""
    return (limit - header - SPLIT_HEADER_SLACK) // 10**6 * 10**6


def split_file(tc: llamacpp.Toolchain, src: Path, prefix: Path, limit: int, variant: str | None = None
               ) -> tuple[Path, ...]:
    """Split src into PREFIX-0000i-of-0000N.gguf beside prefix, each at most `limit` bytes.
    llama-gguf-split copies header and tensors as they are: the same input gives the same bytes."""
    h = read_header(src)
    budget = split_budget(h["data_start"], limit)
    largest = max((n + (-n % 32) for n in h["sizes"]), default=0)
    if budget < largest:
        raise EngineError("gguf", f"split_max_size {limit / 1e6:.0f} MB is too small: the largest tensor "
                          f"needs {largest / 1e6:.1f} MB and the metadata {h['data_start'] / 1e6:.1f} MB", variant)
    _remove_shards(prefix)  # left by a killed run
    res = _run([tc.splitter(), "--split", "--split-max-size", f"{budget // 10**6}M", src.resolve(),
                prefix.resolve()])
    parts = _shard_files(prefix)
    if res.returncode != 0 or not parts:
        _remove_shards(prefix)
        raise EngineError("gguf", _explain(res, f"splitting {src.name}", prefix.parent), variant)
    return parts


def _shard_files(prefix: Path) -> tuple[Path, ...]:
    found = [p.name for p in prefix.parent.glob(f"{glob_escape(prefix.name)}-*-of-*.gguf")]
    return tuple(prefix.parent / n for n in shards(found))


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _remove_shards(prefix: Path) -> None:
    for p in _shard_files(prefix):
        p.unlink(missing_ok=True)


def check_shards(parts: tuple[Path, ...], quant: str, base: dict[str, Any], limit: int,
                 variant: str | None = None) -> dict[str, Any]:
    """Shards count only if they are complete, named and numbered as llama.cpp expects, each
    within the limit, and together hold the base's tensors in the requested type."""
    names = [p.name for p in parts]
    bad = _missing_shards(names)
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


# ---------------------------------------------------------------- the engine




class GGUFEngine:
    """Engine for `format = "gguf"`; see the module docstring for the flow."""

    name = "gguf"
    spec = SPEC

    def __init__(self, llama_cpp_dir: str | Path | None = None, jobs: int | None = None):
        self.llama_cpp_dir = llama_cpp_dir  # None: LLAMA_CPP_DIR, PATH, then the cache
        self.jobs = jobs  # parallel llama-quantize runs in prepare(); None: from cores and RAM
        self._lock = threading.Lock()
        self._staged: dict[Path, Built | EngineError] = {}
        self._base_info: dict[tuple[Path, int], dict[str, Any]] = {}
        self._failed: dict[Path, EngineError] = {}  # shared inputs that failed in this process

    def toolchain(self) -> llamacpp.Toolchain:
        return llamacpp.find_toolchain(self.llama_cpp_dir)

    def version(self) -> str:
        tc = self.toolchain()
        return f"llama.cpp {tc.version()} / llama-cpp-python {llamacpp.PIN}"

    # -- shared inputs: the 16-bit GGUF and the importance matrix

    def base_gguf(self, ctx: BuildContext, tc: llamacpp.Toolchain | None = None
                  ) -> tuple[Path, dict[str, Any]]:
        """Convert the source once per (source, llama.cpp version, name) into work_dir."""
        tc = tc or self.toolchain()
        btype = base_type(ctx.source.path)
        key = _key(ctx.source.fingerprint, tc.version(), btype, model_name(ctx))
        folder = ctx.work_dir / "gguf" / f"base-{key}"
        out = folder / file_name(ctx, btype)
        with self._lock:
            if not out.is_file():
                self._once(out, lambda: self._convert(ctx, tc, btype, out))
            key = (out, out.stat().st_mtime_ns)
            if key not in self._base_info:
                self._base_info[key] = read_back(out)
        return out, self._base_info[key]

    def _convert(self, ctx: BuildContext, tc: llamacpp.Toolchain, btype: str, out: Path) -> None:
        _need_space(out.parent, expected_bytes(btype, ctx.source.n_params), f"the {btype} GGUF", None)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial")
        ctx.progress(f"convert to {btype} GGUF", 0, 1)
        res = _run([sys.executable, tc.converter, ctx.source.path.resolve(),
                    "--outtype", btype.lower(), "--outfile", tmp.resolve(), "--model-name", model_name(ctx)],
                   env=tc.converter_env())
        if res.returncode != 0 or not tmp.is_file():
            tmp.unlink(missing_ok=True)
            raise EngineError("gguf", _explain(res, f"converting {ctx.source.id} to GGUF", out.parent))
        got = read_back(tmp)
        if not got["tensors"] or not got["architecture"]:
            raise EngineError("gguf", f"the converter wrote an empty GGUF for {ctx.source.id}")
        tmp.replace(out)
        ctx.progress(f"convert to {btype} GGUF", 1, 1)

    def imatrix(self, ctx: BuildContext, tc: llamacpp.Toolchain | None = None) -> tuple[Path, dict[str, Any]]:
        """Importance matrix from the calibration text, once per (base GGUF, calibration)."""
        tc = tc or self.toolchain()
        base, _ = self.base_gguf(ctx, tc)
        folder = ctx.work_dir / "gguf" / f"imatrix-{_key(base.parent.name, ctx.calib.sha256, IMATRIX_CTX)}"
        out = folder / f"{model_name(ctx)}.imatrix.gguf"
        with self._lock:
            if not out.is_file():
                self._once(out, lambda: self._compute_imatrix(ctx, tc, base, out))
        return out, imatrix_info(out)

    def _once(self, out: Path, make: Any) -> None:
        """Make a shared input; a failure is remembered so the other variants report it at once."""
        if out in self._failed:
            raise self._failed[out]
        try:
            make()
        except EngineError as e:
            self._failed[out] = e
            raise

    def _compute_imatrix(self, ctx: BuildContext, tc: llamacpp.Toolchain, base: Path, out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Relative names: they end up in the metadata (quantize.imatrix.dataset), not our paths.
        text = ctx.calib.write_text(out.parent / f"{_slug(ctx.calib.source)}.txt")
        n_ctx = imatrix_ctx(int(ctx.calib.windows.size))
        total = max(1, int(ctx.calib.windows.size) // n_ctx)
        ctx.progress("importance matrix", 0, total)
        tmp = out.with_name("partial.imatrix.gguf")
        res = _run([tc.imatrix, "-m", base.resolve(), "-f", text.name, "-o", tmp.name, "-c", str(n_ctx),
                    "-b", str(n_ctx), "-t", str(llama_threads()), "--no-ppl", "--output-frequency", "1000000",
                    "-ngl", "0"], cwd=out.parent)
        if res.returncode != 0 or not tmp.is_file():
            raise EngineError("gguf", _explain(res, "computing the importance matrix", out.parent))
        tmp.replace(out)
        ctx.progress("importance matrix", total, total)

    # -- quantizing

    def quantize(self, variant: Variant, ctx: BuildContext, out_dir: Path, threads: int | None = None,
                 tc: llamacpp.Toolchain | None = None) -> Built:
        """One type from the shared 16-bit GGUF into out_dir, read back and checked."""
        tc = tc or self.toolchain()
        quant, use_im = _check_params(variant)
        try:
            base, base_info = self.base_gguf(ctx, tc)
            im = self.imatrix(ctx, tc) if use_im else None
        except EngineError as e:
            raise _for_variant(e, variant.name) from None
        limit = f.parse_size(variant.params.split_max_size)
        need = expected_bytes(quant, ctx.source.n_params)
        _need_space(out_dir, 2 * need if need > limit else need, quant, variant.name)  # split: both at once
        out_dir.mkdir(parents=True, exist_ok=True)
        # A plain variant of a type that also has an imatrix one needs its own name on main.
        out = out_dir / file_name(ctx, quant + _suffix(variant.params))
        tmp = out.with_suffix(".partial")
        t0 = time.monotonic()
        cmd: list[str | Path] = [tc.quantize,  # llama.cpp keeps override strings to 127 bytes
                                 "--override-kv", f"general.quantized_by=str:{quantized_by(ctx)[:120]}",
                                 "--override-kv", f"general.name=str:{model_name(ctx)[:120]}"]
        if im:
            cmd += ["--imatrix", im[0].name]  # relative: the path lands in the metadata
        res = _run(cmd + [base.resolve(), tmp.resolve(), quant, str(threads or llama_threads())],
                   cwd=im[0].parent if im else None)
        if res.returncode != 0 or not tmp.is_file():
            tmp.unlink(missing_ok=True)
            raise EngineError("gguf", _explain(res, f"quantizing to {quant}", out_dir), variant.name)
        got = check(tmp, quant, base_info, variant.name)
        paths, split_notes = self._finish(tmp, out, limit, quant, base_info, variant.name, tc)
        seconds = round(time.monotonic() - t0, 2)
        return Built(paths, {**_notes(quant, base, got, im, tc), **split_notes, "quantize_seconds": seconds})

    def _finish(self, tmp: Path, out: Path, limit: int, quant: str, base_info: dict[str, Any],
                variant: str, tc: llamacpp.Toolchain) -> tuple[tuple[Path, ...], dict[str, Any]]:
        """The checked file under its name, or its shards when it is larger than the limit."""
        if tmp.stat().st_size <= limit:
            tmp.replace(out)
            return (out,), {}
        try:
            parts = split_file(tc, tmp, out.with_suffix(""), limit, variant)
            notes = check_shards(parts, quant, base_info, limit, variant)
        except EngineError:
            _remove_shards(out.with_suffix(""))
            raise
        finally:
            tmp.unlink(missing_ok=True)
        return parts, {**notes, "split_max_size": limit}

    def build(self, variant: Variant, ctx: BuildContext, out_dir: Path) -> EngineResult:
        """Write `{name}.{QUANT}.gguf` into out_dir; uses prepare()'s staged file when there."""
        staged = self._take_staged(variant, ctx)
        if isinstance(staged, EngineError):
            raise staged
        if staged is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            for p in staged.paths:
                shutil.move(p, out_dir / p.name)
            built = Built(tuple(out_dir / p.name for p in staged.paths), staged.notes)
        else:
            built = self.quantize(variant, ctx, out_dir)
        notes = {k: v for k, v in built.notes.items() if k != "quantize_seconds"}
        if notes.get("imatrix"):
            _copy_imatrix(self.imatrix(ctx)[0], out_dir / imatrix_file(ctx))
        # prepare() quantized it ahead, in parallel: its own clock, not build()'s, is the time.
        return EngineResult(f"llama.cpp {notes['llama_cpp']}", "cpu", built.notes["quantize_seconds"],
                            {**notes, "file": built.path.name})

    def prepare(self, variants: Sequence[Variant], ctx: BuildContext) -> dict[str, str]:
        """Optional batch step: convert, imatrix, then quantize all GGUF variants in parallel
        (up to cores and RAM) into work_dir; build() then only moves each file. Returns
        variant name → error for those that failed (build() raises the same error)."""
        todo = [v for v in variants if v.format == SPEC.name]
        if not todo:
            return {}
        tc = self.toolchain()
        self._prepare_shared(todo, ctx, tc)
        jobs = self.jobs or parallel_jobs(len(todo), base_bytes=ctx.source.n_params * 2)
        threads = max(1, llama_threads() // jobs)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(lambda v: self._stage(v, ctx, threads, tc), todo))
        results = {v.name: self._staged.get(self._stage_dir(v, ctx)) for v in todo}
        return {name: str(r) for name, r in results.items() if isinstance(r, EngineError)}

    def _prepare_shared(self, todo: list[Variant], ctx: BuildContext, tc: llamacpp.Toolchain) -> None:
        """Base GGUF, then the imatrix, before the parallel part; a failure here is reported
        by the variants that need it (an imatrix failure leaves the others building)."""
        try:
            self.base_gguf(ctx, tc)
            if any(_check_params(v, raise_=False)[1] for v in todo):
                self.imatrix(ctx, tc)
        except EngineError:
            pass

    def _stage_dir(self, v: Variant, ctx: BuildContext) -> Path:
        key = _key(ctx.source.fingerprint, ctx.calib.sha256, v.params_dict(), model_name(ctx),
                   quantized_by(ctx))
        return ctx.work_dir / "gguf" / f"staged-{v.name}-{key}"

    def _stage(self, v: Variant, ctx: BuildContext, threads: int, tc: llamacpp.Toolchain) -> None:
        folder = self._stage_dir(v, ctx)
        shutil.rmtree(folder, ignore_errors=True)
        ctx.progress(f"quantize {v.name}", 0, 1)
        try:
            result: Built | EngineError = self.quantize(v, ctx, folder, threads, tc)
        except EngineError as e:
            result = e
        ctx.progress(f"quantize {v.name}", 1, 1)
        self._staged[folder] = result

    def _take_staged(self, v: Variant, ctx: BuildContext) -> Built | EngineError | None:
        r = self._staged.pop(self._stage_dir(v, ctx), None)
        if isinstance(r, Built) and not all(p.is_file() for p in r.paths):
            return None
        return r

    def release(self, ctx: BuildContext) -> list[Path]:
        """Delete the 16-bit GGUFs and leftover staging folders; the imatrix (small, published
        beside the files) stays. A later build that needs the base converts it again."""
        if ctx.keep_intermediate:
            return []
        gone = [p for pattern in ("base-*", "staged-*") for p in (ctx.work_dir / "gguf").glob(pattern)]
        with self._lock:
            for p in gone:
                shutil.rmtree(p, ignore_errors=True)
            self._base_info.clear()
            self._staged.clear()
        return gone

    # -- on a Ray cluster (quantkit.cluster)

    def ray_resources(self) -> dict[str, float]:
        """One type's task: CPU cores, no GPU (cluster.py clamps to the largest node)."""
        return {"num_cpus": RAY_CPUS}

    def prepare_shared(self, variants: Sequence[Variant], ctx: BuildContext) -> None:
        """Only the shared part of prepare(): convert and imatrix once; the types then fan
        out as separate tasks that find both files in ctx.work_dir."""
        todo = [v for v in variants if v.format == "gguf"]
        if todo:
            self._prepare_shared(todo, ctx, self.toolchain())

    # -- resource estimates (quantkit.resources)

    def shared_estimate(self, shape: ModelShape, work: Workload, machine: Machine) -> Estimate:
        return shared_estimate(shape, work, machine)

    def estimate(self, variant: Variant, shape: ModelShape, work: Workload, machine: Machine) -> Estimate:
        quant = _check_params(variant, raise_=False)[0]
        e = variant_estimate(quant, shape, work, machine)
        if quant not in GGUF_TYPES:
            return e
        return replace(e, files=output_files(quant, shape, f.parse_size(variant.params.split_max_size)))

    # -- evaluating

    @contextmanager
    def open_model(self, folder: Path, ctx: BuildContext) -> Iterator[LogitsFn]:
        """Load the GGUF with llama-cpp-python as users do (a split one from its first shard;
        llama.cpp opens the others); logits for the ids as given (no BOS added)."""
        names = shards(p.name for p in folder.glob("*.gguf"))
        if not names or (bad := _missing_shards(names)):
            raise EngineError("gguf", f"{folder} holds no complete GGUF model: "
                              + (", ".join(bad) if names else "no .gguf file"))
        runner = _LlamaRunner(folder / names[0])
        try:
            yield runner
        finally:
            runner.close()


class _LlamaRunner:
    """Opens the model on first use with a context as long as the chunks it is given."""

    def __init__(self, path: Path):
        llamacpp.require_bindings()
        self.path = path
        self.llm: Any = None
        self.n_ctx = 0

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        n = len(ids)
        if self.llm is None or n > self.n_ctx:
            self._open(n)
        self.llm.reset()
        self.llm.eval([int(i) for i in ids])
        return np.array(self.llm.scores[:n], dtype=np.float32, copy=True)

    def _open(self, n: int) -> None:
        from llama_cpp import Llama

        self.close()
        self.n_ctx = max(n, 16)
        try:
            self.llm = Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_batch=self.n_ctx,
                             n_ubatch=min(self.n_ctx, 512), logits_all=True, n_gpu_layers=0,
                             n_threads=llama_threads(), verbose=False)
        except (ValueError, RuntimeError) as e:
            raise EngineError("gguf", f"llama-cpp-python cannot load {self.path.name}: {e}") from None

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


# ---------------------------------------------------------------- resource estimates
# What each step holds in anonymous memory beside the 16-bit GGUF it memory-maps (the
# mapped file is page cache, given back under pressure), and how fast it goes. Fitted to
# benchmarks/scale.py on random Llamas at 7B widths (2-core CI machine, 2026-12-01).

CONVERT_BASE = 0.2e9  # the converter's Python, torch and gguf-py
CONVERT_PER_ELEMENT = 8  # bytes per element of the largest tensor: its f32 copy and the rounding
IMATRIX_BASE = 0.1e9  # llama-imatrix's compute graph besides the logits of one chunk
QUANT_BASE = 0.15e9  # llama-quantize besides its f32 copy of the tensor it works on
SCORE_BASE = 0.45e9  # llama-cpp-python's context besides the logits and the KV cache
CONVERT_BYTES_PER_S = 120e6  # reading safetensors, writing the 16-bit GGUF
QUANT_BYTES_PER_S = {"F16": 400e6, "BF16": 400e6, "F32": 400e6, "Q8_0": 150e6}  # of the 16-bit input
KQUANT_BYTES_PER_S = 20e6  # K-/IQ-quants with an importance matrix search their scales: slow


def shared_estimate(shape: ModelShape, work: Workload, machine: Machine) -> Estimate:
    """Convert once and compute the imatrix once: the disk is the 16-bit GGUF (removed
    after the build unless [build] keep_intermediate)."""
    convert = PROCESS_BASE + CONVERT_BASE + CONVERT_PER_ELEMENT * shape.largest_tensor
    n_ctx = imatrix_ctx(work.calib_tokens)
    imatrix = PROCESS_BASE + IMATRIX_BASE + n_ctx * shape.vocab * 4
    seconds = shape.bf16_bytes / CONVERT_BYTES_PER_S + 2 * shape.params * work.calib_tokens / machine.cpu_flops
    ram, stage = max((convert, "convert"), (imatrix, "imatrix"))
    return Estimate(int(ram), 0, shape.bf16_bytes, seconds, stage)


def variant_estimate(quant: str, shape: ModelShape, work: Workload, machine: Machine) -> Estimate:
    """One type: llama-quantize (up to MAX_JOBS at once, each with an f32 copy of its largest
    tensor), then scoring through llama-cpp-python (logits of every position, KV cache)."""
    jobs = max(1, min(machine.cores, MAX_JOBS))
    quantize = PROCESS_BASE + jobs * (QUANT_BASE + 4 * shape.largest_tensor)
    score = PROCESS_BASE + SCORE_BASE + shape.kv_bytes(work.eval_ctx) + 2 * work.eval_ctx * shape.vocab * 4
    rate = QUANT_BYTES_PER_S.get(quant, KQUANT_BYTES_PER_S) * machine.cores / 2
    seconds = shape.bf16_bytes / rate + 2 * shape.params * work.eval_tokens / machine.cpu_flops
    ram, stage = max((quantize, "quantize"), (score, "reload and score"))
    shared = shared_estimate(shape, work, machine)
    if shared.ram > ram:
        ram, stage = shared.ram, shared.stage
    return Estimate(int(ram), 0, int(shape.params * GGUF_TYPES[quant][0] / 8), seconds, stage)


# Header bytes per vocabulary entry (token text, score, type; merges): SmolLM2's Q8_0 header is
# 1.79 MB for 49152 tokens (36 a token, measured); the rest of the header is small.
HEADER_PER_TOKEN = 40


def output_files(quant: str, shape: ModelShape, limit: int) -> OutputFiles:
    """The files `quant` writes: llama-gguf-split's packing of the tensors (norms stay f32)."""
    bpw = GGUF_TYPES[quant][0]
    header = shape.vocab * HEADER_PER_TOKEN
    sizes = [4 * n if kind == "norm" else int(n * bpw / 8) for kind, n in shape.tensors()]
    return pack_files(sizes, max(split_budget(header, limit), 10**6), header)  # too small a limit fails the build


# ---------------------------------------------------------------- small helpers


def _check_params(v: Variant, raise_: bool = True) -> tuple[str, bool]:
    """(type, use imatrix); IQ* and Q2_K_S without an imatrix stop here, with the fix."""
    quant = str(v.params.quant).upper()
    if quant not in GGUF_TYPES:
        if raise_:
            raise EngineError("gguf", f"unknown GGUF type {quant}", v.name)
        return quant, False
    use = bool(v.params.imatrix) and quant not in NO_IMATRIX_USE
    if GGUF_TYPES[quant][1] and not use and raise_:
        raise EngineError("gguf", f"{quant} needs an importance matrix: set imatrix = true "
                          "(or pick a K-quant such as Q4_K_M)", v.name)
    return quant, use


def _for_variant(e: EngineError, name: str) -> EngineError:
    """A failure of the shared steps (conversion, imatrix), reported under each variant."""
    return e if e.variant else type(e)(e.engine, e.reason, name)


def imatrix_ctx(tokens: int) -> int:
    """512 when the text allows two chunks (llama-imatrix needs 2 x ctx tokens), else shorter."""
    n = IMATRIX_CTX
    while n > 32 and tokens < 2 * n:
        n //= 2
    return n


def imatrix_info(path: Path) -> dict[str, Any]:
    kv = read_header(path)["kv"]
    ds = kv.get("imatrix.datasets")
    return {"dataset": ds[0] if isinstance(ds, list) and ds else ds,
            "chunks": kv.get("imatrix.chunk_count"), "chunk_size": kv.get("imatrix.chunk_size")}


def _notes(quant: str, base: Path, got: dict[str, Any], im: tuple[Path, dict[str, Any]] | None,
           tc: llamacpp.Toolchain) -> dict[str, Any]:
    return {"quant": quant, "base": base.name.split(".")[-2], "imatrix": im is not None,
            "imatrix_dataset": got["imatrix_dataset"], "imatrix_chunks": got["imatrix_chunks"],
            "tensors": got["tensors"], "tensor_types": got["tensor_types"], "llama_cpp": tc.version()}


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")[:80] or "calibration"


def llama_threads() -> int:
    """Threads per llama.cpp process: QUANTKIT_THREADS, else the cores we may use. On a busy
    machine fewer threads can be faster (ggml's threads spin-wait for each other)."""
    env = os.environ.get("QUANTKIT_THREADS", "")
    return max(1, int(env)) if env.isdigit() else _cores()


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


MAX_JOBS = 2  # llama-quantize threads itself; more jobs only add one f32 tensor copy each


def parallel_jobs(n_types: int, base_bytes: int) -> int:
    """llama-quantize runs at once: at most one per core, MAX_JOBS, and what RAM allows (each
    holds a few tensors in f32 next to the shared, memory-mapped 16-bit file)."""
    try:
        import psutil

        avail = psutil.virtual_memory().available
    except ImportError:  # pragma: no cover - psutil is a dependency
        avail = 8 << 30
    per_job = 512 * MB + base_bytes // 8
    by_ram = max(1, int((avail - base_bytes) // per_job))
    return max(1, min(n_types, _cores(), by_ram, MAX_JOBS))
