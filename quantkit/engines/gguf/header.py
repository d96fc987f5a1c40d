"""Reading a written GGUF back: its metadata and tensor table, and the checks a file must pass
before it counts.

gguf-py's GGUFReader parses every vocabulary string into numpy views: 2–4 s per SmolLM2 file
on a quiet 2-core machine (49 s with a compile beside it), more than llama-quantize itself
takes. The same header is read here with struct in 0.08 s, using gguf-py's own enums and type
sizes; tests compare the two readers field by field.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import EngineError

_SHORT_ARRAY = 64  # arrays up to this length are returned; longer ones (vocab) only skipped


def _scalar_formats() -> dict[Any, str]:
    from gguf.constants import GGUFValueType as T

    return {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I", T.INT32: "<i",
            T.FLOAT32: "<f", T.BOOL: "<?", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT64: "<d"}


class _Cursor:
    """Walks the header of a memory-mapped GGUF file."""

    def __init__(self, mm: Any):
        from gguf.constants import GGUFValueType

        self.mm, self.off, self.types, self.scalars = mm, 0, GGUFValueType, _scalar_formats()

    def take(self, fmt: str) -> tuple[Any, ...]:
        got = struct.unpack_from(fmt, self.mm, self.off)
        self.off += struct.calcsize(fmt)
        return got

    def string(self) -> str:
        (n,) = self.take("<Q")
        s = bytes(self.mm[self.off:self.off + n]).decode("utf-8", "replace")
        self.off += n
        return s

    def value(self, vtype: Any) -> Any:
        if vtype == self.types.STRING:
            return self.string()
        if vtype != self.types.ARRAY:
            return self.take(self.scalars[vtype])[0]
        itype, n = self.take("<IQ")
        itype = self.types(itype)
        if itype in self.scalars and n > _SHORT_ARRAY:  # skip long numeric arrays without reading
            self.off += n * struct.calcsize(self.scalars[itype])
            return None
        items = []
        for _ in range(n):  # strings have no fixed size: read each, keep them for short arrays
            item = self.value(itype)
            if n <= _SHORT_ARRAY:
                items.append(item)
        return items if n <= _SHORT_ARRAY else None


def read_header(path: Path) -> dict[str, Any]:
    """Metadata (long arrays as None), tensor infos and whether the file holds all tensor data."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise ValueError("no GGUF magic")
        c = _Cursor(mm)
        c.off = 4
        _version, n_tensors, n_kv = c.take("<IQQ")
        kv = {}
        for _ in range(n_kv):
            key = c.string()
            kv[key] = c.value(GGUFValueType(c.take("<I")[0]))
        tensors, sizes, infos = [], [], []
        for _ in range(n_tensors):
            name = c.string()
            (nd,) = c.take("<I")
            dims = c.take(f"<{nd}Q")
            ttype, toff = c.take("<IQ")
            qtype = GGMLQuantizationType(ttype)
            block, size = GGML_QUANT_SIZES[qtype]
            sizes.append(math.prod(dims) // block * size)
            tensors.append((name, qtype.name, toff + sizes[-1]))
            infos.append(TensorInfo(name, qtype.name, tuple(dims), toff, sizes[-1]))
        align = int(kv.get("general.alignment") or 32)
        data_start = c.off + (-c.off % align)
        end = data_start + max((t[2] for t in tensors), default=0)
        return {"kv": kv, "tensors": tensors, "complete": mm.size() >= end, "data_start": data_start,
                "sizes": sizes, "infos": [i.at(data_start) for i in infos]}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: its type, ggml dims (ne0, the row length, first) and where its
    bytes are."""

    name: str
    type: str  # GGMLQuantizationType name: "Q4_K", "F16", ...
    dims: tuple[int, ...]
    offset: int  # in the file, once `at` has added the data section's start
    nbytes: int

    def at(self, data_start: int) -> TensorInfo:
        return TensorInfo(self.name, self.type, self.dims, data_start + self.offset, self.nbytes)


def tensor(path: Path, info: TensorInfo, rows: np.ndarray | None = None) -> np.ndarray:
    """One tensor as float32 [rows, ne0], dequantized with gguf-py from a memory map; `rows`:
    only these rows (indices), read without touching the others."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
    qtype = GGMLQuantizationType[info.type]
    n = math.prod(info.dims[1:]) if len(info.dims) > 1 else 1
    blocks = raw.reshape(n, -1) if rows is None else raw.reshape(n, -1)[rows]
    width = info.dims[0]
    if qtype == GGMLQuantizationType.F32:
        return np.frombuffer(np.ascontiguousarray(blocks), dtype=np.float32).reshape(-1, width)
    if qtype == GGMLQuantizationType.F16:
        return np.frombuffer(np.ascontiguousarray(blocks), dtype=np.float16).astype(np.float32).reshape(-1, width)
    return np.asarray(dequantize(blocks, qtype), dtype=np.float32).reshape(-1, width)


def read_back(path: Path) -> dict[str, Any]:
    """Architecture, tensor count, file type and tensor types of a written GGUF."""
    h = read_header(path)
    kv, types = h["kv"], dict[str, int]()
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


def imatrix_info(path: Path) -> dict[str, Any]:
    kv = read_header(path)["kv"]
    ds = kv.get("imatrix.datasets")
    return {"dataset": ds[0] if isinstance(ds, list) and ds else ds,
            "chunks": kv.get("imatrix.chunk_count"), "chunk_size": kv.get("imatrix.chunk_size")}
