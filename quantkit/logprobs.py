"""Next-token distributions compared row by row: what evaluation scores every variant with and
what the tuned GGUF mixes' probes measure, one implementation for both.

In torch: its fused, multi-threaded log-softmax and reductions take a fraction of the time of
numpy's single-threaded passes over [tokens, vocab] (a 49k vocabulary: 12.5 M values a chunk).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class RowStats:
    kld: np.ndarray  # KL(reference || variant) per row, float64
    q_true: np.ndarray  # the variant's log-probability of the true next token, float64
    p_true: np.ndarray  # the reference's
    same_top: int  # rows whose argmax agrees


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-probabilities over the last axis."""
    import torch

    with torch.inference_mode():
        return torch.log_softmax(_tensor(logits), dim=-1).numpy()


def compare(ref_lp: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> RowStats:
    """Rows of reference log-probabilities against the variant's logits for the same positions.
    A GGUF vocabulary may be padded: both are cut to the shorter."""
    import torch

    vocab = min(ref_lp.shape[-1], logits.shape[-1])
    with torch.inference_mode():
        x = _tensor(logits[:, :vocab])
        q = torch.log_softmax(x, dim=-1)
        p = _tensor(ref_lp[:, :vocab])
        kld = torch.nn.functional.kl_div(q, p, reduction="none", log_target=True).sum(-1, dtype=torch.float64)
        rows, t = torch.arange(len(targets)), torch.as_tensor(np.asarray(targets, dtype=np.int64))
        # the variant's top token from its logits: log-softmax's rounding can tie near-equal ones
        same = int((p.argmax(-1) == x.argmax(-1)).sum())
        return RowStats(kld.numpy(), q[rows, t].double().numpy(), p[rows, t].double().numpy(), same)


def _tensor(a: np.ndarray) -> Any:
    """float32 torch view of `a` where it already is contiguous float32 (no copy), else a copy."""
    import torch

    return torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32))
