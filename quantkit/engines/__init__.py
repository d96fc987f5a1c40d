"""The engines, one module per format, in one explicit table."""

from __future__ import annotations

from typing import Any

from .awq import AWQEngine
from .base import Engine
from .compressed_tensors import CTEngine
from .exl2 import EXL2Engine
from .gguf import GGUFEngine
from .gptq import GPTQEngine
from .mlx import MLXEngine

# Format -> engine. Modules import their heavy libraries lazily, inside methods. Engines keep no
# state between calls, so one object serves every build of the process.
ENGINES: dict[str, Engine[Any]] = {
    "gptq": GPTQEngine(),  # GPTQModel (AutoGPTQ's successor); auto-gptq optional
    "awq": AWQEngine(),  # GPTQModel's AWQ (GEMM); autoawq optional
    "gguf": GGUFEngine(),  # llama.cpp converter + llama-quantize / llama-imatrix
    "exl2": EXL2Engine(),  # exllamav2, CUDA only
    "mlx": MLXEngine(),  # mlx-lm's affine format; GPTQ/AWQ by GPTQModel, repacked
    "compressed-tensors": CTEngine(),  # vLLM's own format, by llm-compressor (W4A16, FP8, NVFP4)
}

__all__ = ["ENGINES", "Engine"]
