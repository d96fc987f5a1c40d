"""GGUF settings: llama.cpp's file types, which need an importance matrix, and a variant's
validated parameters."""

from __future__ import annotations

from typing import Any

from pydantic import field_validator, model_validator

from ... import formats as f
from ...errors import EngineError
from ...variant import Variant

FLOAT_TYPES = ("F32", "F16", "BF16")  # written by llama-quantize as a plain conversion
NO_IMATRIX_USE = (*FLOAT_TYPES, "Q8_0")  # llama.cpp ignores an imatrix for these: do not claim one

# llama.cpp file type -> (approximate bits per weight on a 7B Llama, needs an importance
# matrix). Approximate values are llama.cpp's own table.
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


def uses_imatrix(p: Any) -> bool:
    """Whether llama.cpp used the importance matrix for this type (it ignores it for 8-bit and
    floats). `p`: the params model or their dict (the card's rows)."""
    d = p if isinstance(p, dict) else p.model_dump()
    return bool(d.get("imatrix")) and d.get("quant") not in NO_IMATRIX_USE


def suffix(p: GGUFParams) -> str:
    """A plain variant of a type that also has an imatrix one needs its own name on main."""
    return "" if p.imatrix or p.quant in FLOAT_TYPES else "-noimatrix"


def check_params(v: Variant[GGUFParams], raise_: bool = True) -> tuple[str, bool]:
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
