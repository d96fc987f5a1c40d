"""Calibration and evaluation text: load a German QA dataset, format it, cut token windows.

Sources: a Hub dataset id (GermanQuAD's raw files or its parquet conversion), or a local
SQuAD-style JSON, JSONL, parquet or plain-text file, or a folder of those. Contexts are
deduplicated (GermanQuAD repeats one for each of its questions), and the evaluation text
never shares a context with the calibration text.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import atomic
from .errors import CalibrationError
from .recipe import CalibrationSpec, Recipe
from .records import CalibrationSet

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "calibration"
SHIPPED_NAME = "quantkit German QA sample (calibration/, GermanQuAD schema)"
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")
HELD_OUT_EVERY = 5  # without [evaluation] dataset: every 5th context (by hash) is held out

# Frequent German function words: in German prose they are a quarter or more of all words,
# in English text almost none. Calibrating in the wrong language silently costs quality.
GERMAN_WORDS = frozenset("""der die das und ist nicht ein eine einen einem einer es den dem des zu
mit sich auf für von im in als auch an wird werden wurde sind bei oder aus nach wie noch
über so dass kann nur vor zum zur durch bis sie er wir ihr man sein seine ihre""".split())
GERMAN_MIN_SHARE = 0.10


@dataclass(frozen=True)
class QAItem:
    context: str
    question: str = ""
    answer: str = ""


# ---------------------------------------------------------------- loading


def load_items(dataset: str | None, split: str, *, revision: str | None = None) -> tuple[list[QAItem], str]:
    """Items from the shipped sample, a local path, or a Hub dataset; and a source label."""
    if dataset is None:
        return _load_path(SHIPPED_DIR, split=None), SHIPPED_NAME
    path = Path(dataset).expanduser()
    if path.exists():
        return _load_path(path, split=None), str(path)
    if path.suffix in DATA_SUFFIXES:  # a file name, not a Hub id: do not ask the Hub for it
        raise CalibrationError(dataset, "no such file")
    return _load_hub(dataset, split, revision), f"{dataset} ({split})"


def _load_path(path: Path, split: str | None) -> list[QAItem]:
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and (split is None or split in p.name))
    if not files:
        raise CalibrationError(str(path), f"no {', '.join(DATA_SUFFIXES)} files found")
    items: list[QAItem] = []
    for f in files:
        items += _load_file(f)
    if not items:
        raise CalibrationError(str(path), "no text found")
    return items


def _load_file(f: Path) -> list[QAItem]:
    """One file's items; anything unreadable or of the wrong shape is one CalibrationError."""
    try:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            return [_from_record(r, f) for r in pq.read_table(f).to_pylist()]
        text = _text(f)
        if f.suffix == ".json":
            return _from_json(json.loads(text), f)
        if f.suffix == ".jsonl":
            return [_from_record(json.loads(s), f) for s in text.splitlines() if s.strip()]
        return [QAItem(p.strip()) for p in text.split("\n\n") if p.strip()]
    except json.JSONDecodeError as e:
        raise CalibrationError(str(f), f"is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (ValueError, OSError) as e:
        raise CalibrationError(str(f), f"cannot read: {e}") from None


def _text(f: Path) -> str:
    data = f.read_bytes()
    if not data.strip():
        raise CalibrationError(str(f), "is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(str(f), f"is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                               "convert it, e.g. iconv -f latin1 -t utf-8") from None


def _from_json(doc: Any, f: Path) -> list[QAItem]:
    """SQuAD/GermanQuAD: data[].paragraphs[].{context, qas[].{question, answers[].text}}."""
    if isinstance(doc, list):
        return [_from_record(r, f) for r in doc]
    if not isinstance(doc, dict) or "data" not in doc:
        raise CalibrationError(str(f), "JSON is neither SQuAD-style ({'data': [...]}) nor a list of records")
    try:
        return [it for article in doc["data"] for it in _paragraph_items(article)]
    except (KeyError, TypeError, AttributeError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise CalibrationError(str(f), f"is not SQuAD-style JSON: {what} "
                               "(expected data[].paragraphs[].context and qas[].question)") from None


def _paragraph_items(article: dict[str, Any]) -> list[QAItem]:
    items = []
    for para in article.get("paragraphs", []):
        for qa in para.get("qas") or [{}]:
            answers = qa.get("answers") or [{}]
            items.append(QAItem(_str(para["context"], "context"), _str(qa.get("question", ""), "question"),
                                _str(answers[0].get("text", ""), "answer text")))
    return items


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise TypeError(f"a {what} is {type(v).__name__}, not text")
    return v


def _from_record(r: Any, f: Path) -> QAItem:
    """JSONL/parquet rows: context/question/answers (HF squad layout) or a plain `text`."""
    if not isinstance(r, dict):
        raise CalibrationError(str(f), f"a record is {type(r).__name__}, not an object with 'context' or 'text'")
    if isinstance(r.get("context"), str):
        ans = r.get("answers") or {}
        text = ans.get("text") if isinstance(ans, dict) else [a.get("text", "") for a in ans if isinstance(a, dict)]
        if isinstance(text, str):
            text = [text]
        first = (list(text or []) or [""])[0]
        return QAItem(r["context"], str(r.get("question") or ""), first if isinstance(first, str) else "")
    if isinstance(r.get("text"), str):
        return QAItem(r["text"])
    raise CalibrationError(str(f), f"a record has neither 'context' nor 'text' as text (keys: {sorted(r)})")


def _load_hub(repo: str, split: str, revision: str | None) -> list[QAItem]:
    """GermanQuAD's loading script cannot run in modern `datasets`: read its files directly."""
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi()
    for rev in (revision, "refs/convert/parquet"):
        try:
            files = api.list_repo_files(repo, repo_type="dataset", revision=rev)
        except Exception as e:  # noqa: BLE001 - any Hub failure becomes one message
            last = e
            continue
        wanted = [f for f in files if f.endswith(DATA_SUFFIXES) and split in Path(f).as_posix()]
        if wanted:
            local = [Path(hf_hub_download(repo, f, repo_type="dataset", revision=rev)) for f in wanted]
            return [it for p in local for it in _load_file(p)]
        last = CalibrationError(repo, f"no {split!r} files at revision {rev}")
    raise CalibrationError(repo, f"cannot load split {split!r} from the Hub: {last}")


# ---------------------------------------------------------------- formatting and windows


def dedup_contexts(items: Iterable[QAItem]) -> dict[str, list[QAItem]]:
    """Context -> its items, in first-seen order."""
    out: dict[str, list[QAItem]] = {}
    for it in items:
        out.setdefault(it.context.strip(), []).append(it)
    return out


def _held_out(context: str) -> bool:
    return int(hashlib.sha256(context.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


def split_contexts(calib: dict[str, list[QAItem]], evald: dict[str, list[QAItem]] | None
                   ) -> tuple[dict[str, list[QAItem]], list[str]]:
    """Calibration contexts and evaluation texts, never sharing a context."""
    if evald is None:
        eval_texts = [c for c in calib if _held_out(c)]
    else:
        eval_texts = list(evald)
    held = set(eval_texts)
    return {c: v for c, v in calib.items() if c not in held}, eval_texts


def template_for(recipe: Recipe, tokenizer: Any = None) -> str:
    """The recipe's calibration template, else its prompt template, else the chat template."""
    if recipe.calibration.template:
        return recipe.calibration.template
    pt = recipe.model.prompt_template
    if pt and "{prompt}" in pt:
        return pt.replace("{prompt}", "{context}\n\n{question}") + " {answer}"
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": "\x00C\n\n\x00Q"}, {"role": "assistant", "content": "\x00A"}]
        try:
            rendered = tokenizer.apply_chat_template(msgs, tokenize=False)
            return rendered.replace("{", "{{").replace("}", "}}").replace(
                "\x00C", "{context}").replace("\x00Q", "{question}").replace("\x00A", "{answer}")
        except Exception:  # noqa: BLE001 - a broken chat template falls back to plain text
            pass
    return "{context}\n\n{question}\n{answer}"


def format_item(template: str, item: QAItem) -> str:
    return template.format(context=item.context, question=item.question, answer=item.answer).strip()


def build_calibration(recipe: Recipe, tokenizer: Any) -> CalibrationSet:
    spec, espec = recipe.calibration, recipe.evaluation
    items, label = load_items(_resolve(recipe, spec.dataset), spec.split)
    evald = None
    if espec.dataset is not None:
        eitems, _ = load_items(_resolve(recipe, espec.dataset), espec.split)
        evald = dedup_contexts(eitems)
    every = dedup_contexts(items)
    contexts, eval_texts = split_contexts(every, evald)
    held = evald if evald is not None else every
    eval_items = tuple((it.context, it.question, it.answer) for c in eval_texts for it in held.get(c, [])
                       if it.question and it.answer)
    if not contexts:
        raise CalibrationError(label, "no calibration context left after holding out evaluation text")
    rng = random.Random(spec.seed)
    # One question per context, chosen by seed; contexts shuffled so windows mix topics.
    chosen = [rng.choice(v) for v in contexts.values()]
    rng.shuffle(chosen)
    texts = [format_item(template_for(recipe, tokenizer), it) for it in chosen]
    windows, used, available = _windows(texts, tokenizer, spec)
    return CalibrationSet(windows=windows, texts=tuple(texts[:used]), eval_texts=tuple(eval_texts),
                          sha256=_sha(windows), source=label, n_items=used,
                          n_contexts=len(contexts), tokens_available=available, eval_items=eval_items)


def _resolve(recipe: Recipe, dataset: str | None) -> str | None:
    """Relative local paths resolve against the recipe's folder, then the cwd."""
    if dataset is None:
        return None
    p = Path(dataset).expanduser()
    if not p.is_absolute() and (Path(recipe.base_dir) / p).exists():
        return str(Path(recipe.base_dir) / p)
    return dataset


def _windows(texts: list[str], tokenizer: Any, spec: CalibrationSpec) -> tuple[np.ndarray, int, int]:
    """Concatenate items (EOS between) and cut `samples` windows of `seq_len`, BOS first.

    Tokenizes in batches and stops once enough tokens are there, so a 14k-item file
    costs only what the windows need.
    """
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    body = spec.seq_len - (1 if bos is not None else 0)
    need = spec.samples * body
    stream: list[int] = []
    used = 0
    for start in range(0, len(texts), 256):
        batch = texts[start:start + 256]
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            stream += ids + ([eos] if eos is not None else [])
            used += 1
            if len(stream) >= need:
                break
        if len(stream) >= need:
            break
    n = len(stream) // body
    if n == 0:
        raise CalibrationError("calibration", f"{len(stream)} tokens of text, fewer than one window "
                               f"of {spec.seq_len}: lower [calibration] seq_len or add text")
    n = min(n, spec.samples)
    rows: np.ndarray = np.asarray(stream[:n * body], dtype=np.int32).reshape(n, body)
    if bos is not None:
        rows = np.concatenate([np.full((n, 1), bos, dtype=np.int32), rows], axis=1)
    return rows, used, len(stream)


def _sha(windows: np.ndarray) -> str:
    h = hashlib.sha256(str(windows.shape).encode())
    h.update(np.ascontiguousarray(windows, dtype=np.int32).tobytes())
    return h.hexdigest()



def german_share(texts: Iterable[str]) -> float:
    """Share of words that are common German function words (German prose: about 0.25+)."""
    words = [w.strip(".,;:!?()\"'").lower() for t in texts for w in t.split()]
    return sum(w in GERMAN_WORDS for w in words) / max(len(words), 1)


def language_warning(c: CalibrationSet) -> str | None:
    share = german_share(c.texts)
    if share >= GERMAN_MIN_SHARE:
        return None
    return (f"the calibration text does not look German ({share:.0%} German function words); "
            "a set in the wrong language costs quality on German text")
