"""GGUF through llama.cpp, as a package by job: settings (params), file and shard names (files),
reading files back (header), running the tools (tools), splitting (split), resource estimates
(estimate), the format's spec (spec) and the engine itself (engine)."""

from __future__ import annotations

from .engine import BASE, IMATRIX, SENSITIVITY, Built, GGUFEngine, LlamaRunner, base_type, quantize
from .estimate import expected_bytes, imatrix_ctx, llama_cpp_overhead, output_files
from .files import (file_name, first_shard, hub_quant_label, imatrix_file, include_pattern, missing_shards,
                    model_name, shard_name, shards)
from .header import check, file_type_of, imatrix_info, read_back, read_header
from .params import FLOAT_TYPES, GGUF_TYPES, NO_IMATRIX_USE, GGUFParams, check_params, use_case, uses_imatrix
from .spec import SPEC
from .split import check_shards, split_budget, split_file
from .tools import llama_threads

__all__ = ["BASE", "IMATRIX", "SENSITIVITY", "Built", "GGUFEngine", "LlamaRunner", "base_type", "quantize", "expected_bytes",
           "imatrix_ctx", "llama_cpp_overhead", "output_files", "file_name", "first_shard", "hub_quant_label",
           "imatrix_file", "include_pattern", "missing_shards", "model_name", "shard_name", "shards", "check",
           "file_type_of", "imatrix_info", "read_back", "read_header", "FLOAT_TYPES", "GGUF_TYPES",
           "NO_IMATRIX_USE", "GGUFParams", "check_params", "use_case", "uses_imatrix", "SPEC", "check_shards",
           "split_budget", "split_file", "llama_threads"]
