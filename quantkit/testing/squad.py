"""SQuAD-format calibration documents of any size, made from the shipped German sample: for
the calibration tests and benchmarks/calib.py."""

from __future__ import annotations

import random


def squad_doc(n_contexts: int, questions_per: int, seed: int = 0) -> dict:
    """A SQuAD-format document whose contexts are new mixes of the shipped sample's sentences."""
    sentences = [s.strip() + "." for s in _shipped_text().split(".") if len(s.split()) > 4]
    rng = random.Random(seed)
    data = []
    for i in range(n_contexts):
        ctx = f"Abschnitt {i}\n\n" + " ".join(rng.sample(sentences, 12))
        qas = [{"id": f"{i}-{q}", "question": f"Worum geht es in Abschnitt {i}, Frage {q}?",
                "answers": [{"text": f"Abschnitt {i}", "answer_start": 0}], "is_impossible": False}
               for q in range(questions_per)]
        data.append({"title": f"T{i}", "paragraphs": [{"context": ctx, "qas": qas}]})
    return {"version": "test", "data": data}


def _shipped_text() -> str:
    from quantkit.calibration import dedup_contexts, load_items

    items, _ = load_items(None, "train")
    return " ".join(dedup_contexts(items))
