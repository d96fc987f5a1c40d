"""Probes: what a group of tensors at a low type really costs, in KL divergence on calibration
text, to calibrate the importance-weighted error (mix.py) that ranks tensors within a group.

The weighted error Σ imp_j ΔW_ij² is the error a tensor adds to its own output; what reaches
the next-token distribution differs by class and depth by two orders of magnitude (measured on
SmolLM2: attn_q's error barely moves the KLD, early attn_v's moves it most; residual streams
grow with depth, so the same error matters less in late layers). So one probe per tensor class
and third of the layers: that group at the low type, every other tensor at Q8_0, against the
16-bit GGUF, with llama.cpp's own `llama-perplexity --kl-divergence` on the calibration text
(the held-out text stays unseen). Its KLD above the all-Q8_0 file, divided by the group's
predicted error, scales the errors of the group's tensors.

Probe files are assembled, not quantized: the tensor bytes of one all-Q8_0 and one all-low file
(two `llama-quantize --pure` runs) copied under the Q8_0 file's metadata, so a probe costs a
file write and one scoring run.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Mapping
from pathlib import Path

from ...errors import EngineError
from ...toolchain import Toolchain
from .header import TensorInfo, _Cursor, read_header
from .tools import explain, llama_threads, run

PROBE_CTX = 512  # llama-perplexity's chunk: it scores the second half of each
PROBE_CHUNKS = 2  # chunks of calibration text per probe (paired: every probe reads the same tokens)
LOW = "Q2_K"  # the type a probe puts its group at (llama.cpp falls back where rows need it)
_MEAN_KLD = re.compile(r"^Mean\s+KLD\s*:\s*(\S+)", re.M)


def assemble(out: Path, template: Path, sources: Mapping[str, Path]) -> None:
    """A GGUF with `template`'s metadata and tensors, except that each tensor `sources` names
    takes its type and bytes from that file (same shapes, other types)."""
    with open(template, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        kv = _kv_bytes(mm)
    head = read_header(template)
    align = int(head["kv"].get("general.alignment") or 32)
    others = {p: {i.name: i for i in read_header(p)["infos"]} for p in set(sources.values())}
    chosen = [(sources.get(i.name, template), others[sources[i.name]][i.name] if i.name in sources else i)
              for i in head["infos"]]
    tmp = out.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(kv)
        offset = 0
        for _, info in chosen:
            f.write(_tensor_info(info, offset))
            offset += _padded(info.nbytes, align)
        f.write(b"\0" * (-f.tell() % align))
        for path, info in chosen:
            with open(path, "rb") as src:
                src.seek(info.offset)
                f.write(src.read(info.nbytes))
            f.write(b"\0" * (-info.nbytes % align))
    tmp.replace(out)


def _kv_bytes(mm: mmap.mmap) -> bytes:
    """Magic, version, counts and the metadata section, as the file has them."""
    from gguf.constants import GGUFValueType

    c = _Cursor(mm)
    c.off = 4
    _, _, n_kv = c.take("<IQQ")
    for _ in range(n_kv):
        c.string()
        c.value(GGUFValueType(c.take("<I")[0]))
    return bytes(mm[:c.off])


def _tensor_info(info: TensorInfo, offset: int) -> bytes:
    from gguf.constants import GGMLQuantizationType

    name = info.name.encode()
    return (struct.pack("<Q", len(name)) + name + struct.pack("<I", len(info.dims))
            + struct.pack(f"<{len(info.dims)}Q", *info.dims)
            + struct.pack("<IQ", int(GGMLQuantizationType[info.type]), offset))


def _padded(n: int, align: int) -> int:
    return n + (-n % align)


def pure(tc: Toolchain, base: Path, imatrix: Path, out: Path, ftype: str) -> Path:
    """Every quantizable tensor at `ftype`'s base type (llama.cpp's fallbacks where rows need it)."""
    res = run([tc.quantize, "--pure", "--imatrix", imatrix.resolve(), base.resolve(), out.resolve(), ftype,
               str(llama_threads())])
    if res.returncode != 0 or not out.is_file():
        raise EngineError("gguf", explain(res, f"quantizing a {ftype} probe", out.parent))
    return out


def probe_ctx(tokens: int) -> int:
    """PROBE_CTX, halved until PROBE_CHUNKS chunks fit in 80 % of the calibration text's tokens
    (llama.cpp's tokenizer may count a few fewer than ours)."""
    n = PROBE_CTX
    while n > 32 and PROBE_CHUNKS * n > 0.8 * tokens:
        n //= 2
    return n


def kld(tc: Toolchain, model: Path, text: Path, base_logits: Path, *, ctx: int = PROBE_CTX, base: bool = False) -> float:
    """Mean KLD of `model` against the logits in `base_logits` (written first, with base=True)."""
    cmd: list[str | Path] = [tc.perplexity, "-m", model.resolve(), "-c", str(ctx), "-b", str(ctx),
                             "-t", str(llama_threads()), "--kl-divergence-base", base_logits.resolve(), "-ngl", "0"]
    cmd += ["-f", text.resolve(), "--chunks", str(PROBE_CHUNKS)] if base else ["--kl-divergence"]
    res = run(cmd)
    if res.returncode != 0:
        raise EngineError("gguf", explain(res, "scoring a probe", model.parent))
    if base:
        return 0.0
    m = _MEAN_KLD.search(res.log)
    if m is None:
        tail = " | ".join(ln.strip() for ln in res.log.splitlines()[-6:] if ln.strip())
        raise EngineError("gguf", f"llama-perplexity printed no mean KLD for a probe (ctx {ctx}; it ended: {tail[:400]})")
    return float(m.group(1))
