"""Evaluation a publisher can trust: the tail of the KLD distribution, Δp, answer flips on
held-out German questions, the gate on the tail, and old manifests still loading."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from _hub_fixtures import hub  # noqa: F401 - the local Hub server fixture
from quantkit import answers
from quantkit.evaluate import EvalSet, compute_reference, score
from quantkit.records import QualityRecord


def _eval_set(n: int = 3, ctx: int = 16, vocab: int = 50, seed: int = 0) -> tuple[EvalSet, np.ndarray]:
    rng = np.random.default_rng(seed)
    chunks = rng.integers(0, vocab, size=(n, ctx))
    logits = rng.normal(0, 3, size=(n, ctx, vocab)).astype(np.float32)
    return EvalSet(chunks, "x"), logits


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """numpy's, in float64: the oracle for quantkit.logprobs' torch kernels."""
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_tail_metrics_are_llama_perplexity_s_from_the_same_tokens(tmp_path: Path) -> None:
    """Per token: KL(ref || variant), Δp = p_variant(true) - p_ref(true); mean, median, p99, p99.9
    of KLD, RMS and 1 % / 99 % of Δp, as numpy's linear percentiles over exactly the scored tokens."""
    es, ref_logits = _eval_set()
    rng = np.random.default_rng(1)
    var_logits = ref_logits + rng.normal(0, 0.7, size=ref_logits.shape).astype(np.float32)
    ref = compute_reference(es, lambda ids: ref_logits[int(np.where((es.chunks == ids).all(1))[0][0])],
                            tmp_path / "ref.npy")
    q = score(es, ref, lambda ids: var_logits[int(np.where((es.chunks == ids).all(1))[0][0])])
    klds, dps = [], []
    for i in range(len(es.chunks)):
        rows = slice(es.first_scored, es.ctx - 1)
        p = np.asarray(ref.logprobs[i], dtype=np.float32)  # the fp16 reference, as stored
        v = _log_softmax(var_logits[i][rows])
        t = es.chunks[i, es.first_scored + 1:]
        klds += list((np.exp(p) * (p - v)).sum(-1))
        dps += list(np.exp(v[np.arange(len(t)), t]) - np.exp(p[np.arange(len(t)), t]))
    k, d = np.array(klds), np.array(dps)
    assert q.tokens == len(k) == es.n_scored
    assert q.kld == pytest.approx(k.mean(), rel=1e-5)
    assert (q.kld_median, q.kld_p99, q.kld_p999) == pytest.approx(tuple(np.percentile(k, [50, 99, 99.9])), rel=1e-5)
    assert q.rms_dp == pytest.approx(np.sqrt((d * d).mean()), rel=1e-5)
    assert (q.dp_p01, q.dp_p99) == pytest.approx(tuple(np.percentile(d, [1, 99])), rel=1e-5, abs=1e-7)
    assert q.kld_median <= q.kld_p99 <= q.kld_p999 and q.dp_p01 < 0 < q.dp_p99


def _tiny_items(tiny_llama: Path) -> tuple[object, answers.QASet]:
    from transformers import AutoTokenizer

    from quantkit.calibration import build_calibration
    from quantkit.recipe import parse_recipe

    r = parse_recipe(f'[model]\nsource = "{tiny_llama}"\n[calibration]\nsamples = 4\nseq_len = 128\n'
                     '[[variants]]\nformat = "gguf"\nquant = "Q8_0"\n', check_source=False)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    return tok, answers.make_items(tok, build_calibration(r, tok).eval_items, 24, seed=0)


def test_items_are_seeded_four_distinct_answers_from_held_out_questions(tiny_llama: Path) -> None:
    tok, qa = _tiny_items(tiny_llama)
    _, again = _tiny_items(tiny_llama)
    assert len(qa) == 24 and qa.sha256 == again.sha256  # same seed, same items
    for p, cs, chars, k in zip(qa.prompts, qa.choices, qa.chars, qa.correct):
        texts = [tok.decode(c).strip() for c in cs]  # type: ignore[attr-defined]
        assert len(cs) == answers.CHOICES and len({t.lower() for t in texts}) == answers.CHOICES
        assert 0 <= k < answers.CHOICES and all(n > 0 for n in chars)
        assert "Frage:" in tok.decode(p) and tok.decode(p).rstrip().endswith("Antwort:")  # type: ignore[attr-defined]
    assert len(set(qa.correct)) > 1  # the true answer is not always in the same place


def test_flips_through_the_logits_function_and_the_streamed_reference(tiny_llama: Path) -> None:
    """The original scored one sequence at a time equals the streamed, padded reference; the
    same model has no flips; noise in the logits flips answers."""
    from quantkit.hfmodel import hf_logits

    _, qa = _tiny_items(tiny_llama)
    ref = answers.reference_scores(qa, tiny_llama, group_tokens=512)
    with hf_logits(tiny_llama) as fn:
        same = answers.score(qa, fn)
        rng = np.random.default_rng(0)
        noisy = answers.score(qa, lambda ids: fn(ids) + rng.normal(0, 4, size=(len(ids), 1024)).astype(np.float32))
    np.testing.assert_allclose(same, ref, atol=1e-3)
    f = answers.compare(qa, ref, same)
    assert f.flips == 0 and f.acc == f.ref_acc and f.items == len(qa)
    assert answers.compare(qa, ref, noisy).flips > 0


def test_the_gate_refuses_a_variant_on_its_tail_alone(tmp_path: Path) -> None:
    """Mean KLD and ΔPPL within their limits, the 99.9 % KLD over max_kld_p999: refused."""
    from quantkit.recipe import GateSpec

    q = QualityRecord(ppl=21.0, ref_ppl=20.0, delta_ppl_pct=5.0, kld=0.05, top1=0.9, kld_p999=1.7)
    gate = GateSpec(max_kld=0.1, max_delta_ppl_pct=10, max_kld_p999=1.0)
    assert gate.failures(q) == ["KLD p99.9 1.7000 over the limit 1 (max_kld_p999)"]
    assert gate.failures(replace(q, kld_p999=0.9)) == []
    old = replace(q, kld_p999=None)  # a manifest from before the tail was measured
    assert "not measured (max_kld_p999)" in gate.failures(old)[0]
    assert "KLD p99.9 ≤ 1" in gate.limits


def test_publish_refuses_on_the_tail_through_the_cli(tmp_path: Path, hub) -> None:  # noqa: F811 - the fixture
    from typer.testing import CliRunner

    from quantkit.cli import app
    from quantkit.manifest import save_manifest
    from quantkit.testing.fabricate import DEMO_RECIPE, carded_build

    b = carded_build(tmp_path, recipe_text=DEMO_RECIPE + '\n[publish]\nmax_kld_p999 = 1.0\n')
    worst = "gguf-Q8_0"
    for name, rec in b.manifest.variants.items():
        assert rec.quality is not None
        tail = 2.5 if name == worst else 0.5
        b.manifest = b.manifest.with_variant(name, replace(rec, quality=replace(rec.quality, kld_p999=tail)))
    save_manifest(b.out, b.manifest)
    res = CliRunner().invoke(app, ["publish", str(b.plan.recipe.path), "--out", str(b.out)])
    assert res.exit_code == 1
    assert f"{worst} not published: KLD p99.9 2.5000 over the limit 1 (max_kld_p999)" in res.stderr
    plan = CliRunner().invoke(app, ["plan", str(b.plan.recipe.path), "--out", str(b.out)], env={"COLUMNS": "200"})
    assert "gated" in plan.stdout and "KLD p99.9 2.5000" in plan.stdout


def test_an_old_manifest_without_tails_loads_and_its_cards_say_n_a(tmp_path: Path) -> None:
    from quantkit import card
    from quantkit.manifest import load_manifest, save_manifest
    from quantkit.testing.fabricate import fabricate_build

    b = fabricate_build(tmp_path)
    save_manifest(b.out, b.manifest)
    doc = json.loads((b.out / "manifest.json").read_text())
    for rec in doc["variants"].values():  # as written before the tail and the answers existed
        rec["quality"] = {k: rec["quality"][k] for k in ("ppl", "ref_ppl", "delta_ppl_pct", "kld", "top1")}
    (b.out / "manifest.json").write_text(json.dumps(doc))
    m = load_manifest(b.out)
    assert m is not None and all(r.quality is not None and r.quality.kld_p999 is None for r in m.variants.values())
    text = card.write_cards(b.plan, m, b.out) and (b.out / b.plan.variants[0].name / "README.md").read_text()
    assert "| KLD p99.9 |" in text and "n/a" in text and "Answers to held-out questions" not in text


def test_cards_show_the_tail_and_the_flips(tmp_path: Path) -> None:
    from quantkit import card
    from quantkit.testing.fabricate import fabricate_build

    b = fabricate_build(tmp_path)
    for name, rec in b.manifest.variants.items():
        assert rec.quality is not None
        b.manifest = b.manifest.with_variant(name, replace(rec, quality=replace(
            rec.quality, kld_median=0.01, kld_p99=0.2, kld_p999=0.9, rms_dp=0.04, dp_p01=-0.12, dp_p99=0.08,
            qa_items=64, qa_ref_acc=0.625, qa_acc=0.59375, qa_flips=0.09375)))
    card.write_cards(b.plan, b.manifest, b.out)
    text = (b.out / b.plan.variants[0].name / "README.md").read_text()
    assert "| KLD p99.9 |" in text and "| 0.9000 |" in text
    assert "Answers to held-out questions" in text and "| 62.5% | 59.4% | 9.4% |" in text
    assert "-12.00%" in text and "4.00%" in text  # Δp 1 % and RMS, in percentage points
