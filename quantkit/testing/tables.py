"""What the benchmark scripts print and compare: markdown tables, and a hash of the tensors
GPTQ packs (to tell whether two GPTQ outputs hold the same quantized weights)."""

from __future__ import annotations

from pathlib import Path


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# The tensors GPTQ writes per quantized Linear; embeddings and norms are left out because
# GPTQModel called directly keeps them in its compute dtype where quantkit stores fp16.
PACKED = ("qweight", "qzeros", "scales", "g_idx")


def packed_sha(folder: Path, *, with_dtype: bool = True) -> str:
    """Hash of the quantized tensors alone, to compare two GPTQ outputs."""
    import hashlib

    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sorted(sf.keys()):
                if k.rsplit(".", 1)[-1] in PACKED:
                    t = sf.get_tensor(k).contiguous()
                    h.update(k.encode() + (str(t.dtype).encode() if with_dtype else b""))
                    h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
