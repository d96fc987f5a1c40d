"""What the GGUF path needs of a machine: RAM, disk and time of converting, computing the
importance matrix, quantizing and scoring, and the memory llama.cpp needs to run a file.

What each step holds in anonymous memory beside the 16-bit GGUF it memory-maps (the mapped
file is page cache, given back under pressure), and how fast it goes. Fitted to
benchmarks/scale.py on random Llamas at 7B widths (2-core CI machine, 2026-12-01).
"""

from __future__ import annotations

from ...sizing import PROCESS_BASE, Estimate, Machine, ModelShape, OutputFiles, Workload, pack_files
from .params import GGUF_TYPES
from .split import split_budget

MB = 1 << 20
IMATRIX_CTX = 512  # llama-imatrix's default chunk length; shorter only when the text is short
LLAMA_BATCH = 512  # llama.cpp's default n_ubatch: one batch's tensors make the compute buffer
CONVERT_BASE = 0.2e9  # the converter's Python, torch and gguf-py
CONVERT_PER_ELEMENT = 8  # bytes per element of the largest tensor: its f32 copy and the rounding
IMATRIX_BASE = 0.1e9  # llama-imatrix's compute graph besides the logits of one chunk
QUANT_BASE = 0.15e9  # llama-quantize besides its f32 copy of the tensor it works on
SCORE_BASE = 0.45e9  # llama-cpp-python's context besides the logits and the KV cache
CONVERT_BYTES_PER_S = 120e6  # reading safetensors, writing the 16-bit GGUF
QUANT_BYTES_PER_S = {"F16": 400e6, "BF16": 400e6, "F32": 400e6, "Q8_0": 150e6}  # of the 16-bit input
KQUANT_BYTES_PER_S = 20e6  # K-/IQ-quants with an importance matrix search their scales: slow
# Header bytes per vocabulary entry (token text, score, type; merges): SmolLM2's Q8_0 header is
# 1.79 MB for 49152 tokens (36 a token, measured); the rest of the header is small.
HEADER_PER_TOKEN = 40


def imatrix_ctx(tokens: int) -> int:
    """512 when the text allows two chunks (llama-imatrix needs 2 x ctx tokens), else shorter."""
    n = IMATRIX_CTX
    while n > 32 and tokens < 2 * n:
        n //= 2
    return n


def expected_bytes(quant: str, n_params: int) -> int:
    return int(n_params * GGUF_TYPES[quant][0] / 8 * 1.1) + 16 * MB


def convert_estimate(shape: ModelShape, work: Workload, machine: Machine) -> Estimate:
    """The converter: one tensor in f32 and its rounding; the disk is the 16-bit GGUF (removed
    after the build unless [build] keep_intermediate)."""
    ram = PROCESS_BASE + CONVERT_BASE + CONVERT_PER_ELEMENT * shape.largest_tensor
    return Estimate(int(ram), 0, shape.bf16_bytes, shape.bf16_bytes / CONVERT_BYTES_PER_S, "convert")


def imatrix_estimate(shape: ModelShape, work: Workload, machine: Machine) -> Estimate:
    """llama-imatrix: one chunk's logits beside the memory-mapped 16-bit GGUF."""
    ram = PROCESS_BASE + IMATRIX_BASE + imatrix_ctx(work.calib_tokens) * shape.vocab * 4
    return Estimate(int(ram), 0, 0, 2 * shape.params * work.calib_tokens / machine.cpu_flops, "imatrix")


def variant_estimate(quant: str, shape: ModelShape, work: Workload, machine: Machine) -> Estimate:
    """One type: llama-quantize (an f32 copy of its largest tensor), then scoring through
    llama-cpp-python (logits of every position, KV cache). A variant's peak includes the
    shared steps it waits for."""
    quantize = PROCESS_BASE + QUANT_BASE + 4 * shape.largest_tensor
    score = PROCESS_BASE + SCORE_BASE + shape.kv_bytes(work.eval_ctx) + 2 * work.eval_ctx * shape.vocab * 4
    rate = QUANT_BYTES_PER_S.get(quant, KQUANT_BYTES_PER_S) * machine.cores / 2
    seconds = shape.bf16_bytes / rate + 2 * shape.params * work.eval_tokens / machine.cpu_flops
    ram, stage = max((quantize, "quantize"), (score, "reload and score"))
    for shared in (convert_estimate(shape, work, machine), imatrix_estimate(shape, work, machine)):
        if shared.ram > ram:
            ram, stage = shared.ram, shared.stage
    return Estimate(int(ram), 0, int(shape.params * GGUF_TYPES[quant][0] / 8), seconds, stage)


SAMPLED_PER_S = 4e6  # elements a sensitivity pass measures per second and core (quantize, dequantize, weigh)
SENSITIVITY_TYPES = 11  # mix.CANDIDATES and the probe type
SENSITIVITY_ROWS = 128  # mix.SAMPLE_ROWS
PROBE_GROUPS = 21  # 7 classes x 3 thirds of the layers; one more pass scores the 16-bit base
PROBE_TOKENS = 256  # probes.PROBE_CHUNKS x PROBE_CTX
WRITE_BYTES_PER_S = 400e6  # splitting the base and the low file into the probes' shards: copying tensor bytes
LOWER_BYTES_PER_S = 35e6  # probes.LOWER's Q2_K without the importance matrix (9 M weights/s a thread), of bf16


def sensitivity_estimate(shape: ModelShape, work: Workload, machine: Machine) -> Estimate:
    """A tuned mix's measurement: each type over a sample of rows of every layer matrix (a few
    tensors at a time), then the probes: a pure Q4_0 file without the importance matrix (as fast
    as Q8_0) but for ffn_down at Q2_K, the base and it split once into shards that each probe
    links (no copy per probe), and per group one scoring run on calibration text. The disk holds the low file, the base's
    shards and the low shards."""
    widths = (shape.hidden, shape.hidden, shape.hidden, shape.hidden, shape.hidden, shape.hidden, shape.intermediate)
    sampled = shape.layers * sum(SENSITIVITY_ROWS * w for w in widths)
    measure = sampled * SENSITIVITY_TYPES / (SAMPLED_PER_S * machine.cores)
    ffn_down = 2 * shape.layers * shape.hidden * shape.intermediate
    quantize = (shape.bf16_bytes / QUANT_BYTES_PER_S["Q8_0"] + ffn_down / LOWER_BYTES_PER_S) / (machine.cores / 2)
    low = expected_bytes("Q4_0", shape.params)
    score = (PROBE_GROUPS + 1) * 2 * shape.params * PROBE_TOKENS / machine.cpu_flops + \
        (shape.bf16_bytes + low) / WRITE_BYTES_PER_S
    ram = max(PROCESS_BASE + machine.cores * 4 * SENSITIVITY_ROWS * max(widths) * 4,
              PROCESS_BASE + SCORE_BASE + shape.kv_bytes(PROBE_TOKENS) + PROBE_TOKENS * shape.vocab * 4 * 2)
    disk = shape.bf16_bytes + 2 * low
    return Estimate(int(ram), 0, disk, measure + quantize + score, "tensor sensitivity")


def output_files(quant: str, shape: ModelShape, limit: int) -> OutputFiles:
    """The files `quant` writes: llama-gguf-split's packing of the tensors (norms stay f32)."""
    bpw = GGUF_TYPES[quant][0]
    header = shape.vocab * HEADER_PER_TOKEN
    sizes = [4 * n if kind == "norm" else int(n * bpw / 8) for kind, n in shape.tensors()]
    return pack_files(sizes, max(split_budget(header, limit), 10**6), header)  # too small a limit fails the build


def llama_cpp_overhead(shape: ModelShape) -> int:
    """llama.cpp's compute and output buffers on the CPU. The compute graph's largest live
    tensors are one batch's logits (or, in wide FFNs, its two intermediate activations) next
    to a few hidden states, in f32; the output buffer holds one token's logits. Checked by
    benchmarks/run_memory.py against llama.cpp's own report (SmolLM2: 104.2 MB estimated,
    99.6 MiB = 104.4 MB reported)."""
    widest = max(shape.vocab, 2 * shape.intermediate)
    return LLAMA_BATCH * 4 * (widest + 3 * shape.hidden) + shape.vocab * 4
