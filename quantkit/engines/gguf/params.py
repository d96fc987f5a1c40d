"""GGUF settings: llama.cpp's file types, which need an importance matrix, and a variant's
validated parameters."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import SerializerFunctionWrapHandler, field_validator, model_serializer, model_validator

from ... import formats as f
from ...errors import EngineError
from ...variant import Variant
from .._autoround import GGUF_TYPES as AUTOROUND_TYPES
from .._autoround import AutoRoundSettings, dump

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


# A tuned mix's budget: a stock type's file size, from Q2_K up (below it the candidate types,
# K-quants, have nothing smaller to give), or bits per weight in that range.
TUNED_TARGETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
TUNED_BPW = (2.8, 8.5)


class GGUFParams(f.ParamsModel):
    quant: str = ""  # the stock type; for a tuned mix the type whose file size is the budget
    imatrix: bool = True
    split_max_size: f.SizeSetting = f.SPLIT_DEFAULT  # larger files become llama.cpp shards
    mix: Literal["stock", "tuned"] = "stock"  # tuned: per-tensor types chosen on the German imatrix
    target_bpw: float | None = None  # a tuned mix's budget in bits per weight, instead of a type
    # autoround: AutoRound tunes each block's rounding on the calibration windows and writes the
    # file with its own packer (its own importance matrix; ours is not used)
    method: Literal["llama.cpp", "autoround"] = "llama.cpp"
    autoround: AutoRoundSettings | None = None  # its settings; None: the "light" preset
    recipe_aliases: ClassVar[tuple[str, ...]] = ("target",)  # a tuned mix's budget type

    @model_validator(mode="before")
    @classmethod
    def _target(cls, data: Any) -> Any:
        """`target` names a tuned mix's budget type: it is `quant` under the name the recipe reads best."""
        if not isinstance(data, dict) or "target" not in data:
            return data
        if data.get("mix") != "tuned":
            raise ValueError('target is the budget of a tuned mix: add mix = "tuned" (or use quant for a stock type)')
        if data.get("quant"):
            raise ValueError("give the budget once: target or quant, not both")
        return {("quant" if k == "target" else k): v for k, v in data.items()}

    @field_validator("quant")
    @classmethod
    def _known_type(cls, v: str) -> str:
        up = v.upper()
        if up and up not in GGUF_TYPES:
            raise ValueError(f"unknown GGUF type {v!r}; known: {', '.join(GGUF_TYPES)}")
        return up

    @model_validator(mode="after")
    def _consistent(self) -> GGUFParams:
        if self.method == "autoround":
            return self._autoround()
        if self.autoround is not None:
            raise ValueError('autoround settings need method = "autoround"')
        if self.mix == "tuned":
            return self._tuned()
        if not self.quant:
            raise ValueError("quant is required: a llama.cpp type such as Q4_K_M")
        if self.target_bpw is not None:
            raise ValueError('target_bpw is the budget of a tuned mix: add mix = "tuned"')
        if GGUF_TYPES[self.quant][1] and not self.imatrix:
            raise ValueError(f"{self.quant} needs an importance matrix: set imatrix = true")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A stock variant dumps as before tuned mixes existed: its cache key, manifest and card
        rows stay the same, so an earlier build resumes instead of rebuilding."""
        d = handler(self)
        if d.get("mix") == "stock":
            d.pop("mix")
            d.pop("target_bpw", None)
        if d.get("method") == "llama.cpp":
            d.pop("method")
            d.pop("autoround", None)
        else:
            d["autoround"] = dump(self.autoround)  # only what the recipe set: defaults may move
        return d

    def _autoround(self) -> GGUFParams:
        if self.mix == "tuned" or self.target_bpw is not None:
            raise ValueError('method = "autoround" writes a stock type\'s mix: drop mix = "tuned" / target_bpw')
        if self.quant not in AUTOROUND_TYPES:
            raise ValueError(f"AutoRound's GGUF packer writes {', '.join(AUTOROUND_TYPES)}; not {self.quant or 'no type'}"
                             + (" (its 2-bit K type is Q2_K_S)" if self.quant == "Q2_K" else ""))
        return self

    def _tuned(self) -> GGUFParams:
        if (self.target_bpw is None) == (not self.quant):
            raise ValueError("a tuned mix needs one budget: target = a type such as \"Q4_K_M\", or target_bpw")
        if self.quant and self.quant not in TUNED_TARGETS:
            raise ValueError(f"a tuned mix's target is one of {', '.join(TUNED_TARGETS)} (got {self.quant})")
        lo, hi = TUNED_BPW
        if self.target_bpw is not None and not lo <= self.target_bpw <= hi:
            raise ValueError(f"target_bpw must be between {lo} and {hi} (got {self.target_bpw})")
        if not self.imatrix:
            raise ValueError("a tuned mix is weighed by the importance matrix: set imatrix = true")
        return self


def autoround(p: Any) -> bool:
    d = p if isinstance(p, dict) else p.model_dump()
    return d.get("method") == "autoround"


def tuned(p: Any) -> bool:
    d = p if isinstance(p, dict) else p.model_dump()
    return d.get("mix") == "tuned"


def ftype(p: Any) -> str:
    """The llama.cpp type a file is made and labelled as: the stock type, a tuned mix's target,
    or for a bits-per-weight budget the K-quant mix nearest below it."""
    d = p if isinstance(p, dict) else p.model_dump()
    if d.get("quant"):
        return str(d["quant"])
    bpw = float(d["target_bpw"])
    return max((t for t in TUNED_TARGETS if GGUF_TYPES[t][0] <= bpw), key=lambda t: GGUF_TYPES[t][0],
               default=TUNED_TARGETS[0])


def label(p: Any) -> str:
    """What names the variant, its branch and its file: Q4_K_M, Q4_K_M-noimatrix, Q4_K_M_tuned, tuned-3.50bpw.
    A tuned file reads to the Hub's label rule as its own tag (Q4_K_M_TUNED), never as the stock type's."""
    d = p if isinstance(p, dict) else p.model_dump()
    if d.get("method") == "autoround":
        return f"{d['quant']}_autoround"
    if d.get("mix") == "tuned":
        return f"{d['quant']}_tuned" if d.get("quant") else f"tuned-{float(d['target_bpw']):.2f}bpw"
    return f"{d['quant']}{suffix_of(d)}"


def uses_imatrix(p: Any) -> bool:
    """Whether llama.cpp used the importance matrix for this type (it ignores it for 8-bit and
    floats). `p`: the params model or their dict (the card's rows)."""
    d = p if isinstance(p, dict) else p.model_dump()
    return bool(d.get("imatrix")) and d.get("quant") not in NO_IMATRIX_USE and d.get("method") != "autoround"


def suffix_of(d: dict[str, Any]) -> str:
    """A plain variant of a type that also has an imatrix one needs its own name on main."""
    return "" if d.get("imatrix") or d.get("quant") in FLOAT_TYPES else "-noimatrix"


def check_params(v: Variant[GGUFParams], raise_: bool = True) -> tuple[str, bool]:
    """(type, use imatrix); IQ* and Q2_K_S without an imatrix stop here, with the fix."""
    quant = ftype(v.params).upper()
    if quant not in GGUF_TYPES:
        if raise_:
            raise EngineError("gguf", f"unknown GGUF type {quant}", v.name)
        return quant, False
    if autoround(v.params):  # AutoRound weighs rounding by its own imatrix, from the same windows
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
