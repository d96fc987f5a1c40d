"""Probes: what a group of tensors at a low type really costs, in KL divergence on calibration
text, to calibrate the importance-weighted error (mix.py) that ranks tensors within a group.

The weighted error Σ imp_j ΔW_ij² is the error a tensor adds to its own output; what reaches
the next-token distribution differs by class and depth by two orders of magnitude (measured on
SmolLM2: attn_q's error barely moves the KLD, early attn_v's moves it most; residual streams
grow with depth, so the same error matters less in late layers). So one probe per tensor class
and third of the layers: that group at the low type, every other tensor as the 16-bit GGUF has
it, scored by llama.cpp in-process on the calibration text against the 16-bit GGUF (the
held-out text stays unseen). Its KLD, divided by the group's predicted error, scales the errors
of the group's tensors. Everything else being the base's own bytes, the probe's KLD is the
group's alone: there is no floor to score and subtract.

Probes are linked, not quantized: the 16-bit GGUF and one all-low file (one `llama-quantize
--pure` run) are split once into shards, a group's tensors to a shard, and a probe is a folder of
links to one version of each shard, which llama.cpp loads as one split model: a probe costs one
scoring run and no copy of the weights.
"""

from __future__ import annotations

import mmap
import shutil
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ...errors import EngineError
from ...logprobs import compare, log_softmax
from ...toolchain import Toolchain
from .header import TensorInfo, _Cursor, read_header
from .runner import LlamaRunner
from .tools import explain, llama_threads, run

# Tokens a chunk. The probes' forward passes are most of a tuned mix's extra time; at 256 tokens
# (224 scored) instead of 512 the per-group KLD per unit error of a 2-layer 7B-width model moved
# by under 10 % for the groups that matter most (first layer) and by up to 40 % for the
# least sensitive ones, and the calibration took half the time (benchmarks/tuned_mix.py shows
# the mixes it gives).
PROBE_CTX = 256
PROBE_CHUNKS = 1  # chunks of calibration text per probe (paired: every probe reads the same tokens)
# Scored from an eighth of the chunk on. What a probe measures is a group's KLD relative to the
# others on the same tokens; the first ctx / 8 give every scored token some context.
SCORE_FROM = 8
# The type a probe puts its group at, quantized without the importance matrix. Q2_K with it (the
# first choice) quantizes at 5 M weights/s a thread, so the all-low file cost as much as the
# ladder's own Q4_K_M; Q4_0 without it runs at 600 M/s. A probe needs an error large enough to
# move the KLD, in the range the budgets trade in, and a predicted error of the same
# quantization (mix.probe_errors).
LOW = "Q4_0"  # also the llama-quantize file type whose --pure file has the other tensors at it
# ffn_down goes lower: the low budgets trade it between Q2_K and Q4_K, and its KLD per unit of
# error, read at Q4_0, let the Q3_K_M budget move it down too far. On the de-gridded SmolLM2
# (benchmarks/tuned_mix.py, one machine) Q2_K ffn_down probes gave 0.732 / 0.785 / 0.610x stock
# KLD at Q4_K_M / Q3_K_M / Q2_K size against 0.76 / 0.81 / 0.61 with Q4_0 ones. Q2_K without the
# importance matrix runs at 9 M weights/s a thread; ffn_down is a fifth of a Llama's decoder.
LOWER = {"ffn_down": "Q2_K"}


def assemble(out: Path, template: Path, sources: Mapping[str, Path]) -> None:
    """A GGUF with `template`'s metadata and tensors, except that each tensor `sources` names
    takes its type and bytes from that file (same shapes, other types)."""
    with open(template, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        kv, n_kv = _kv_bytes(mm)
    head = read_header(template)
    others = {p: {i.name: i for i in read_header(p)["infos"]} for p in set(sources.values())}
    chosen = [(sources.get(i.name, template), others[sources[i.name]][i.name] if i.name in sources else i)
              for i in head["infos"]]
    _write(out, kv, n_kv, chosen, int(head["kv"].get("general.alignment") or 32))


@dataclass(frozen=True)
class Shards:
    """The probes as one split GGUF of shards: shard 1 holds the metadata and every tensor no
    probe changes, shard k+1 group k's tensors, written twice (as the base has them, and low). A
    probe is a folder of links to one version of each shard: llama.cpp loads the set as one
    model, so a probe costs no copy of the weights (a 7B 16-bit file is 13 GB, and there are 21
    probes)."""

    folder: Path
    groups: int

    def probe(self, low: frozenset[int] = frozenset()) -> Path:
        """The first shard of a probe whose groups in `low` (0-based) are at the low type."""
        where = self.folder / "probe"
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir()
        n = self.groups + 1
        for k in range(n):
            src = "common" if k == 0 else f"g{k}-{'low' if k - 1 in low else 'base'}"
            (where / f"probe-{k + 1:05d}-of-{n:05d}.gguf").symlink_to(self.folder / f"{src}.gguf")
        return where / f"probe-00001-of-{n:05d}.gguf"


def shards(folder: Path, base: Path, low: Path, groups: Sequence[Sequence[str]]) -> Shards:
    """Split `base` (and the grouped tensors of `low`) into the probe shards under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    head = read_header(base)
    align = int(head["kv"].get("general.alignment") or 32)
    lows = {i.name: i for i in read_header(low)["infos"]}
    grouped = {t for g in groups for t in g}
    split = _split_kv(len(groups) + 1, len(head["infos"]))
    with open(base, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        kv, n_kv = _kv_bytes(mm)
    _write(folder / "common.gguf", kv + split(0), n_kv + 3,
           [(base, i) for i in head["infos"] if i.name not in grouped], align)
    # later shards carry only the split keys (what llama.cpp reads of them), and the alignment
    own = {i.name: i for i in head["infos"]}
    extra = _kv("general.alignment", 4, struct.pack("<I", align)) if align != 32 else b""
    for k, members in enumerate(groups, 1):
        for tag, path, infos in (("base", base, own), ("low", low, lows)):
            _write(folder / f"g{k}-{tag}.gguf", split(k) + extra, 3 + bool(extra),
                   [(path, infos[t]) for t in members], align)
    return Shards(folder, len(groups))


def _split_kv(count: int, tensors: int) -> Callable[[int], bytes]:
    """The keys llama-gguf-split writes into every shard: split.no (u16), split.count (u16),
    split.tensors.count (i32, every tensor of the model)."""
    return lambda no: (_kv("split.no", 2, struct.pack("<H", no)) + _kv("split.count", 2, struct.pack("<H", count))
                       + _kv("split.tensors.count", 5, struct.pack("<i", tensors)))


def _kv(key: str, vtype: int, value: bytes) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + value


def _write(out: Path, kv: bytes, n_kv: int, chosen: list[tuple[Path, TensorInfo]], align: int) -> None:
    """A GGUF (version 3) of `n_kv` metadata pairs, as serialized in `kv`, and the given tensors,
    each copied from its file."""
    tmp = out.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<4sIQQ", b"GGUF", 3, len(chosen), n_kv) + kv)
        offset = 0
        for _, info in chosen:
            f.write(_tensor_info(info, offset))
            offset += _padded(info.nbytes, align)
        f.write(b"\0" * (-f.tell() % align))
        for path, info in chosen:
            _copy(path, info, f)
            f.write(b"\0" * (-info.nbytes % align))
    tmp.replace(out)


def _copy(path: Path, info: TensorInfo, out: BinaryIO, block: int = 64 << 20) -> None:
    """A tensor's bytes, in blocks: a 16-bit output matrix of a 70B model is 2 GB."""
    with open(path, "rb") as src:
        src.seek(info.offset)
        for start in range(0, info.nbytes, block):
            out.write(src.read(min(block, info.nbytes - start)))


def _kv_bytes(mm: mmap.mmap) -> tuple[bytes, int]:
    """The metadata pairs as the file has them, and their number."""
    from gguf.constants import GGUFValueType

    c = _Cursor(mm)
    c.off = 4
    _, _, n_kv = c.take("<IQQ")
    for _ in range(n_kv):
        c.string()
        c.value(GGUFValueType(c.take("<I")[0]))
    return bytes(mm[24:c.off]), n_kv


def _tensor_info(info: TensorInfo, offset: int) -> bytes:
    from gguf.constants import GGMLQuantizationType

    name = info.name.encode()
    return (struct.pack("<Q", len(name)) + name + struct.pack("<I", len(info.dims))
            + struct.pack(f"<{len(info.dims)}Q", *info.dims)
            + struct.pack("<IQ", int(GGMLQuantizationType[info.type]), offset))


def _padded(n: int, align: int) -> int:
    return n + (-n % align)


def low_file(tc: Toolchain, base: Path, out: Path) -> Path:
    """The probes' low file: every quantizable tensor at LOW, LOWER's classes at theirs, without
    the importance matrix (llama.cpp's fallbacks where rows need it)."""
    rules = [a for cls, gtype in LOWER.items() for a in ("--tensor-type", f"{cls}={gtype.lower()}")]
    res = run([tc.quantize, "--pure", *rules, base.resolve(), out.resolve(), LOW, str(llama_threads())])
    if res.returncode != 0 or not out.is_file():
        raise EngineError("gguf", explain(res, f"quantizing the {LOW} probe file", out.parent))
    return out


def probe_ctx(tokens: int) -> int:
    """PROBE_CTX, halved until PROBE_CHUNKS chunks fit in 80 % of the calibration text's tokens
    (llama.cpp's tokenizer may count a few fewer than transformers')."""
    n = PROBE_CTX
    while n > 32 and PROBE_CHUNKS * n > 0.8 * tokens:
        n //= 2
    return n


class Scorer:
    """Mean KLD of probe models against a reference model (the 16-bit GGUF), in-process through
    llama.cpp's bindings, on PROBE_CHUNKS chunks of the calibration text (BOS first, as
    evaluation cuts them, scored from ctx / SCORE_FROM on). llama-perplexity computes the same, but its logger runs on a thread
    that the process may exit before it has written the statistics (llama.cpp issue 22142): on
    a loaded machine the mean KLD went missing from some runs."""

    def __init__(self, reference: Path, text: Path, ctx: int):
        self.chunks = _chunks(reference, text, ctx)
        self.first = ctx // SCORE_FROM
        runner = LlamaRunner(reference)
        try:
            self.ref = [log_softmax(runner.rows(c, self.first)[:-1]) for c in self.chunks]
        finally:
            runner.close()

    def kld(self, model: Path) -> float:
        runner = LlamaRunner(model)
        try:
            per_token = [compare(ref, runner.rows(c, self.first)[:-1], c[self.first + 1:]).kld
                         for c, ref in zip(self.chunks, self.ref, strict=True)]
        finally:
            runner.close()
        return float(np.concatenate(per_token).mean())


def _chunks(base: Path, text: Path, ctx: int) -> np.ndarray:
    """The text's first PROBE_CHUNKS chunks of ctx tokens, tokenized by the GGUF's own vocabulary."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(base), vocab_only=True, verbose=False)
    try:
        ids = vocab.tokenize(text.read_bytes(), add_bos=False, special=False)
        bos = vocab.token_bos()
    finally:
        vocab.close()
    body = ctx - 1
    if len(ids) < PROBE_CHUNKS * body:
        raise EngineError("gguf", f"the calibration text has {len(ids)} tokens, fewer than the probes' "
                          f"{PROBE_CHUNKS} chunks of {ctx}")
    return np.array([[bos, *ids[k * body:(k + 1) * body]] for k in range(PROBE_CHUNKS)], dtype=np.int64)
