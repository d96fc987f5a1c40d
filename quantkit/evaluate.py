"""One evaluation protocol for every format: perplexity, KL divergence (its mean and its tail)
and top-1 agreement against the unquantized model, on the same held-out German token chunks.

Chunks follow llama-perplexity: `ctx` tokens with BOS first, only the second half scored, so
every scored token has at least ctx/2 tokens of context. The tail metrics are llama-perplexity's
`--kl-divergence` statistics from the same per-token values: median, 99 % and 99.9 % KLD; Δp, the
variant's probability of the true next token minus the original's, as RMS and 1 % / 99 %
percentiles; percentiles interpolated linearly, as llama.cpp and numpy do.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import answers, logprobs
from .answers import Flips, QASet
from .errors import EvalError
from .hfmodel import hf_logits
from .records import LogitsFn

ChunkProgress = Callable[[int, int], None]


@dataclass(frozen=True, eq=False)
class EvalSet:
    chunks: np.ndarray  # [n, ctx] int64 token ids, BOS first when the tokenizer has one
    sha256: str

    @property
    def ctx(self) -> int:
        return int(self.chunks.shape[1])

    @property
    def first_scored(self) -> int:
        return self.ctx // 2

    @property
    def n_scored(self) -> int:
        return len(self.chunks) * (self.ctx - 1 - self.first_scored)


@dataclass(frozen=True)
class Quality:
    ppl: float
    ref_ppl: float
    delta_ppl_pct: float
    kld: float  # mean over the scored tokens
    top1: float  # share of scored tokens whose argmax equals the reference's ("same top p")
    tokens: int
    kld_median: float = 0.0
    kld_p99: float = 0.0
    kld_p999: float = 0.0
    rms_dp: float = 0.0  # Δp = p_variant(true token) - p_reference(true token), as a fraction
    dp_p01: float = 0.0  # 1 % percentile of Δp (the drops)
    dp_p99: float = 0.0
    qa: Flips | None = None  # answer flips on the held-out questions (None: not measured)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: getattr(self, k) for k in ("ppl", "ref_ppl", "delta_ppl_pct", "kld", "top1", "kld_median",
                                           "kld_p99", "kld_p999", "rms_dp", "dp_p01", "dp_p99")}
        if self.qa is not None:
            d.update(qa_items=self.qa.items, qa_ref_acc=self.qa.ref_acc, qa_acc=self.qa.acc, qa_flips=self.qa.flips)
        return d


@dataclass(frozen=True, eq=False)
class Baseline:
    """What every variant is scored against: the held-out chunks with the original's
    log-probabilities, and the multiple-choice items with the original's answer scores."""

    eval_set: EvalSet
    reference: Reference
    qa: QASet | None = None
    qa_scores: np.ndarray | None = None  # [items, choices] of the original


def evaluate(base: Baseline, fn: LogitsFn, progress: ChunkProgress | None = None) -> Quality:
    """Every metric of one variant through its logits function: the chunks, then the answers."""
    q = score(base.eval_set, base.reference, fn, progress)
    if base.qa is None or base.qa_scores is None or not len(base.qa):
        return q
    total = len(base.eval_set.chunks) + len(base.qa)
    mine = answers.score(base.qa, fn, lambda d, t: progress(len(base.eval_set.chunks) + d, total) if progress else None)
    return replace(q, qa=answers.compare(base.qa, base.qa_scores, mine))


def make_eval_set(tokenizer: Any, texts: list[str] | tuple[str, ...], tokens: int, ctx: int) -> EvalSet:
    """Tokenize the held-out text once and cut it into BOS-led chunks of ctx tokens."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    body = ctx - 1 if bos is not None else ctx
    n = min(tokens, len(ids)) // body
    if n < 1:
        raise EvalError("reference", f"evaluation text has {len(ids)} tokens, fewer than one "
                        f"chunk of {ctx}; lower [evaluation] ctx or add text")
    rows = [([bos] if bos is not None else []) + ids[i * body:(i + 1) * body] for i in range(n)]
    chunks = np.asarray(rows, dtype=np.int64)
    return EvalSet(chunks, hashlib.sha256(chunks.tobytes()).hexdigest())


def chunk_rows(es: EvalSet, fn: LogitsFn) -> Iterator[np.ndarray]:
    """Logits of the scored positions of every chunk, from a per-chunk logits function. A
    function with a `rows(ids, first)` method (the GGUF runner) computes only those positions."""
    rows = getattr(fn, "rows", None)
    for i in range(len(es.chunks)):
        if rows is not None:
            yield np.asarray(rows(es.chunks[i], es.first_scored))[:-1]
            continue
        logits = np.asarray(fn(es.chunks[i]))
        if logits.shape[0] != es.ctx:
            raise EvalError("model", f"logits for {logits.shape[0]} positions, expected {es.ctx}")
        yield logits[es.first_scored:es.ctx - 1]


def streamed_rows(es: EvalSet, path: Path, *, dtype: str = "float32", device: str = "cpu") -> Iterator[np.ndarray]:
    """The same rows from the unquantized checkpoint, one block of weights in memory at a time."""
    from .errors import SourceError
    from .streaming import streamed_logits

    rows = streamed_logits(path, es.chunks, es.ctx - es.first_scored, dtype=dtype, device=device)
    try:
        first = next(rows)
    except SourceError:
        # Checkpoint names transformers renames on load: only the whole model maps them.
        with hf_logits(path, dtype=dtype, device=device) as fn:
            yield from chunk_rows(es, fn)
        return
    yield first[:-1]  # the last position predicts past the chunk: not scored
    for logits in rows:
        yield logits[:-1]


@dataclass(frozen=True, eq=False)
class Reference:
    """Log-probabilities of the unquantized model at every scored position (fp16 on disk)."""

    logprobs: np.ndarray  # memmap [n_chunks, scored, vocab] float16
    ppl: float


def compute_reference(es: EvalSet, rows: LogitsFn | Iterable[np.ndarray], cache: Path,
                      progress: ChunkProgress | None = None) -> Reference:
    """Run the reference once per eval set; the cache file is keyed by the caller.
    `rows`: a logits function, or the scored rows of every chunk (chunk_rows, streamed_rows)."""
    if cache.is_file():
        lp = np.load(cache, mmap_mode="r")
        return Reference(lp, _ppl(es, lp))
    tmp = cache.with_suffix(".partial.npy")
    cache.parent.mkdir(parents=True, exist_ok=True)
    out = None
    for i, logits in enumerate(chunk_rows(es, rows) if callable(rows) else rows):
        lp = logprobs.log_softmax(logits)
        if out is None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                            shape=(len(es.chunks), *lp.shape))
        out[i] = lp
        if progress:
            progress(i + 1, len(es.chunks))
    if out is None or i + 1 != len(es.chunks):
        raise EvalError("reference", f"logits for {0 if out is None else i + 1} of {len(es.chunks)} chunks")
    out.flush()
    del out
    tmp.replace(cache)
    lp = np.load(cache, mmap_mode="r")
    return Reference(lp, _ppl(es, lp))


def _targets(es: EvalSet, i: int) -> np.ndarray:
    return es.chunks[i, es.first_scored + 1:es.ctx]


def _ppl(es: EvalSet, lp: np.ndarray) -> float:
    nll = 0.0
    for i in range(len(es.chunks)):
        t = _targets(es, i)
        nll -= float(lp[i][np.arange(len(t)), t].astype(np.float64).sum())
    return math.exp(nll / es.n_scored)


def score(es: EvalSet, ref: Reference, fn: LogitsFn, progress: ChunkProgress | None = None) -> Quality:
    """Perplexity, KL(reference || variant) per token (mean and tail), top-1 agreement and Δp
    over the scored tokens, in one pass over each chunk's logits."""
    nll, klds, dps, agree = 0.0, [], [], 0
    for i, logits in enumerate(chunk_rows(es, fn)):
        t = _targets(es, i)
        r = logprobs.compare(ref.logprobs[i], logits, t)
        nll -= float(r.q_true.sum())
        klds.append(r.kld)
        dps.append(np.exp(r.q_true) - np.exp(r.p_true))
        agree += r.same_top
        if progress:
            progress(i + 1, len(es.chunks))
    n = es.n_scored
    ppl = math.exp(nll / n)
    kld, dp = np.concatenate(klds), np.concatenate(dps)
    k50, k99, k999 = np.percentile(kld, [50, 99, 99.9])
    d01, d99 = np.percentile(dp, [1, 99])
    return Quality(ppl=ppl, ref_ppl=ref.ppl, delta_ppl_pct=100 * (ppl / ref.ppl - 1), kld=float(kld.mean()),
                   top1=agree / n, tokens=n, kld_median=float(k50), kld_p99=float(k99), kld_p999=float(k999),
                   rms_dp=float(np.sqrt((dp * dp).mean())), dp_p01=float(d01), dp_p99=float(d99))
