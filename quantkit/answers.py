"""Answer flips on held-out German QA (Dutta et al. 2024, "Accuracy is not all you need"): a
quantized model can keep its accuracy and still change many answers, and users notice the
changes. From the held-out questions (contexts never used for calibration) we build
multiple-choice items: the paragraph of the context that holds the answer, the question, the
true answer and three answers of other questions (of the same context when it has enough, else
of the whole set), picked with a fixed seed; each item shows the sentences around the answer
(up to PASSAGE_TOKENS), so that four forward passes per item stay cheap. Each choice is scored by the model's log-likelihood
of the answer tokens divided by the answer's length in characters (lm-evaluation-harness's
`acc_norm`), through the same logits function as every other metric: so it works for every
format. For the original and each variant: accuracy, and the share of items whose choice changed.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .records import LogitsFn
from .streaming import GROUP_TOKENS  # the reference's own group size: its memory bound holds here too

CHOICES = 4
PROMPT = "{paragraph}\n\nFrage: {question}\nAntwort:"  # the choice follows after a space
MAX_TOKENS = 1024  # an item longer than this (prompt and answer) is left out
PASSAGE_TOKENS = 128  # the text around the answer each item shows (its sentence, and neighbours that fit)


@dataclass(frozen=True, eq=False)
class QASet:
    """Token ids of every item's prompt and choices; `correct`: the true choice's index."""

    prompts: tuple[np.ndarray, ...]  # BOS first
    choices: tuple[tuple[np.ndarray, ...], ...]  # the answer tokens of each choice
    chars: tuple[tuple[int, ...], ...]  # each choice's length in characters (acc_norm)
    correct: tuple[int, ...]
    sha256: str

    def __len__(self) -> int:
        return len(self.prompts)


def paragraph_of(context: str, answer: str) -> str:
    """The paragraph that holds the answer (GermanQuAD's answers are spans of their context);
    the whole context when none does. Keeps items short: one paragraph, not an article."""
    parts = [p.strip() for p in context.split("\n\n") if p.strip()]
    return next((p for p in parts if answer in p), context.strip())


_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-ZÄÖÜ0-9„\"(])")


def passage(context: str, answer: str, count: Callable[[str], int], budget: int = PASSAGE_TOKENS) -> str:
    """The sentences around the answer's, within `budget` tokens: each item's text is short
    (the cost of four forward passes per item grows with it) yet holds what the question asks."""
    sents = [s for s in _SENTENCE.split(paragraph_of(context, answer)) if s.strip()]
    at = next((i for i, s in enumerate(sents) if answer in s), 0)
    lo = hi = at
    while True:
        grew = False
        for cand in ((lo - 1, hi), (lo, hi + 1)):
            if 0 <= cand[0] and cand[1] < len(sents) and count(" ".join(sents[cand[0]:cand[1] + 1])) <= budget:
                lo, hi, grew = cand[0], cand[1], True
        if not grew:
            return " ".join(sents[lo:hi + 1])


def make_items(tokenizer: Any, items: Sequence[tuple[str, str, str]], n: int, seed: int = 0) -> QASet:
    """Up to n multiple-choice items from (context, question, answer) triples, seeded."""
    rng = random.Random(seed)
    pool = list(dict.fromkeys(a.strip() for _, _, a in items if a.strip()))
    by_context: dict[str, list[str]] = {}
    for c, _, a in items:
        by_context.setdefault(c, []).append(a.strip())
    order = list(range(len(items)))
    rng.shuffle(order)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    built: list[tuple[np.ndarray, tuple[np.ndarray, ...], tuple[int, ...], int]] = []
    for i in order:
        if len(built) == n:
            break
        got = _item(tokenizer, bos, items[i], _distractors(items[i][2].strip(), by_context[items[i][0]], pool, rng),
                    rng)
        if got is not None:
            built.append(got)
    h = hashlib.sha256()
    for p, cs, _, k in built:
        h.update(p.tobytes() + b"".join(c.tobytes() for c in cs) + bytes([k]))
    return QASet(tuple(b[0] for b in built), tuple(b[1] for b in built), tuple(b[2] for b in built),
                 tuple(b[3] for b in built), h.hexdigest())


def _distractors(answer: str, same_context: list[str], pool: list[str], rng: random.Random) -> list[str]:
    """Three other answers: of the same context first, then of the whole set; none equal to the
    true answer (ignoring case) or to each other."""
    seen = {answer.lower()}
    out: list[str] = []
    for source in (same_context, pool):
        cands = [a for a in source if a.lower() not in seen]
        rng.shuffle(cands)
        for a in cands:
            if len(out) < CHOICES - 1 and a.lower() not in seen:
                out.append(a)
                seen.add(a.lower())
    return out


def _item(tokenizer: Any, bos: int | None, item: tuple[str, str, str], wrong: list[str], rng: random.Random
          ) -> tuple[np.ndarray, tuple[np.ndarray, ...], tuple[int, ...], int] | None:
    """Prompt ids and each answer's ids, split as lm-eval splits them: the whole text encoded, the
    answer being what follows the prompt's tokens (shared by all four choices)."""
    context, question, answer = item
    if len(wrong) < CHOICES - 1:
        return None
    answers = [answer.strip(), *wrong]
    rng.shuffle(answers)
    text = passage(context, answer.strip(), lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"]))
    prompt = PROMPT.format(paragraph=text, question=question.strip())
    head = [bos] if bos is not None else []
    p_ids = head + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    wholes = [head + tokenizer(f"{prompt} {a}", add_special_tokens=False)["input_ids"] for a in answers]
    cut = min(_common_prefix(p_ids, w) for w in wholes)
    if cut < 2 or any(len(w) <= cut or len(w) > MAX_TOKENS for w in wholes):
        return None
    return (np.asarray(p_ids[:cut], dtype=np.int64), tuple(np.asarray(w[cut:], dtype=np.int64) for w in wholes),
            tuple(len(a) for a in answers), answers.index(answer.strip()))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---------------------------------------------------------------- scoring


def _continuation_ll(logits: np.ndarray, start: int, cont: np.ndarray) -> float:
    """Sum of log p(cont[j] | everything before it); `start`: the position of cont[0]."""
    rows = logits[start - 1:start - 1 + len(cont)].astype(np.float64)
    rows = rows - rows.max(axis=-1, keepdims=True)
    lp = rows - np.log(np.exp(rows).sum(axis=-1, keepdims=True))
    return float(lp[np.arange(len(cont)), cont].sum())


def score(qa: QASet, fn: LogitsFn, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """[items, choices] acc_norm scores: log-likelihood of the answer tokens per character."""
    out = np.zeros((len(qa), CHOICES))
    for i, (p, cs, chars) in enumerate(zip(qa.prompts, qa.choices, qa.chars)):
        for j, c in enumerate(cs):
            logits = np.asarray(fn(np.concatenate([p, c])))
            out[i, j] = _continuation_ll(logits, len(p), c) / max(chars[j], 1)
        if progress:
            progress(i + 1, len(qa))
    return out


def reference_scores(qa: QASet, path: Path, *, dtype: str = "float32", device: str = "cpu",
                     group_tokens: int = GROUP_TOKENS) -> np.ndarray:
    """The same scores from the unquantized checkpoint, one block of weights in memory at a time:
    sequences right-padded into groups (a causal model's logits before the padding are those of
    the sequence alone)."""
    from .streaming import streamed_logits

    seqs = [(i, j, np.concatenate([p, c])) for i, (p, cs) in enumerate(zip(qa.prompts, qa.choices))
            for j, c in enumerate(cs)]
    out = np.zeros((len(qa), CHOICES))
    for group in _groups(seqs, group_tokens):
        width = max(len(s) for _, _, s in group)
        ids = np.zeros((len(group), width), dtype=np.int64)
        for k, (_, _, s) in enumerate(group):
            ids[k, :len(s)] = s
        # only the positions that predict an answer token: the logits of a whole group over the
        # vocabulary would be the largest thing in memory at 7B widths
        first = min(len(qa.prompts[i]) for i, _, _ in group) - 1
        for (i, j, s), logits in zip(group, streamed_logits(path, ids, width - first, dtype=dtype, device=device,
                                                          group_tokens=len(group) * width)):
            out[i, j] = _continuation_ll(logits, len(qa.prompts[i]) - first, qa.choices[i][j]) / max(qa.chars[i][j], 1)
    return out


def _groups(seqs: list[tuple[int, int, np.ndarray]], budget: int) -> list[list[tuple[int, int, np.ndarray]]]:
    """Sequences of similar length together (sorted), up to `budget` padded tokens a group."""
    out: list[list[tuple[int, int, np.ndarray]]] = []
    for s in sorted(seqs, key=lambda x: len(x[2])):
        if out and (len(out[-1]) + 1) * len(s[2]) <= budget:
            out[-1].append(s)
        else:
            out.append([s])
    return out


@dataclass(frozen=True)
class Flips:
    items: int
    ref_acc: float
    acc: float
    flips: float  # share of items whose chosen answer differs from the original's


def compare(qa: QASet, ref: np.ndarray, var: np.ndarray) -> Flips:
    """Accuracy of both, and how often the variant's choice differs from the original's."""
    r, v, truth = ref.argmax(1), var.argmax(1), np.asarray(qa.correct)
    n = max(len(qa), 1)
    return Flips(len(qa), float((r == truth).sum() / n), float((v == truth).sum() / n), float((r != v).sum() / n))
