"""llama.cpp's own row quantizers, called in-process (ctypes on libggml-base), for measuring what
a type does to a sample of a tensor's rows without writing a whole file per type.

`ggml_quantize_chunk` is the function llama-quantize calls on each chunk of rows, with the same
importance-matrix slice (sums / counts), so a sampled row comes out byte for byte as it does in
the file (tests compare the two). The library is the toolchain's when it was built shared, else
the pinned llama-cpp-python's (the same llama.cpp source).
"""

from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path

import numpy as np

from ...errors import EngineUnavailable

_LIB = "libggml-base.so"

# llama.cpp's shape fallbacks (llama-quant.cpp tensor_type_fallback): a 256-block type on a row
# length it does not divide becomes this block-32 type; F16 when even that does not divide.
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
            **dict.fromkeys(("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"), "IQ4_NL")}


def block_size(gtype: str) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[gtype]][0]


def row_bytes(gtype: str, n: int) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[gtype]]
    return n // block * size


def stored_type(gtype: str, row_len: int) -> str:
    """The type llama-quantize writes when asked for `gtype` on rows of `row_len` values."""
    if row_len % block_size(gtype) == 0:
        return gtype
    fb = FALLBACK.get(gtype, gtype)
    return fb if row_len % block_size(fb) == 0 else "F16"


def tensor_bytes(gtype: str, dims: tuple[int, ...]) -> int:
    return row_bytes(gtype, dims[0]) * math.prod(dims[1:])


@functools.lru_cache(maxsize=4)
def _load(tools_dir: Path) -> ctypes.CDLL:
    for candidate in _candidates(tools_dir):
        if candidate.is_file():
            lib = ctypes.CDLL(str(candidate))
            lib.ggml_quantize_chunk.restype = ctypes.c_size_t
            lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            return lib
    raise EngineUnavailable("gguf", f"{_LIB} not found beside {tools_dir} nor in llama-cpp-python: "
                            "a tuned mix measures the types with it")


def _candidates(tools_dir: Path) -> list[Path]:
    found = [tools_dir / _LIB, tools_dir.parent / "lib" / _LIB]
    try:
        import llama_cpp

        found.append(Path(llama_cpp.__file__).parent / "lib" / _LIB)
    except ImportError:
        pass
    return found


def quantize_rows(tools_dir: Path, gtype: str, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    """`rows` (float32 [n, row_len]) in ggml type `gtype`: the raw blocks, uint8 [n, row bytes]."""
    from gguf.constants import GGMLQuantizationType

    lib = _load(tools_dir)
    src = np.ascontiguousarray(rows, dtype=np.float32)
    n, width = src.shape
    dst = np.empty((n, row_bytes(gtype, width)), dtype=np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    size = lib.ggml_quantize_chunk(int(GGMLQuantizationType[gtype]), src.ctypes.data, dst.ctypes.data, 0, n, width,
                                   None if im is None else im.ctypes.data)
    if size != dst.size:
        raise EngineUnavailable("gguf", f"ggml wrote {size} bytes for {n} rows of {gtype}, expected {dst.size}")
    return dst


def dequantize_rows(raw: np.ndarray, gtype: str, width: int) -> np.ndarray:
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    return np.asarray(dequantize(raw, GGMLQuantizationType[gtype]), dtype=np.float32).reshape(len(raw), width)
