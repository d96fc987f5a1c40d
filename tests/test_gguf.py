"""GGUF engine: convert once, imatrix once, quantize, read back, evaluate; and its failures.

Needs the llama.cpp toolchain, found the way the product finds it (LLAMA_CPP_DIR, PATH,
then the cache that `quantkit toolchain` fills); skipped without.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from quantkit import toolchain as llamacpp
from quantkit.engines import gguf as gguf_engine
from quantkit.engines.gguf import BASE, IMATRIX, GGUFParams
from quantkit.errors import EngineError, EngineUnavailable
from quantkit.pipeline import product
from quantkit.records import BuildContext, SourceModel
from quantkit.steps import StepFailed
from quantkit.variant import Variant


@pytest.fixture(scope="module")
def toolchain():
    try:
        return llamacpp.find_toolchain()
    except EngineUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def bindings():
    if llamacpp.bindings_version() is None:
        pytest.skip(f"llama-cpp-python not installed: run `{llamacpp.BUILD_COMMAND}`")


def _n_params(folder: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "np") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return n


def make_ctx(model: Path, work: Path, *, samples: int = 4, seq_len: int = 256, name: str | None = None):
    from transformers import AutoTokenizer

    from quantkit.calibration import build_calibration
    from quantkit.recipe import parse_recipe

    recipe = parse_recipe(f'[model]\nsource = "{model}"\n[calibration]\nsamples = {samples}\n'
                          f'seq_len = {seq_len}\n[[variants]]\nformat = "gguf"\nquant = "Q4_K_M"\n',
                          check_source=False)
    tok = AutoTokenizer.from_pretrained(model)
    calib = build_calibration(recipe, tok)
    src = SourceModel(str(model), model, "local", f"test-{model.name}", _n_params(model), "LlamaForCausalLM")
    events: list[tuple[str, int, int | None]] = []
    ctx = BuildContext(src, calib, work, "cpu", lambda t, d, n: events.append((t, d, n)))
    if name:
        object.__setattr__(ctx, "model_name", name)
    return ctx, tok, events


def variant(quant: str, imatrix: bool = True) -> Variant:
    # model_construct: the engine must refuse what the recipe would (IQ* without imatrix)
    params = GGUFParams.model_construct(quant=quant, imatrix=imatrix)
    suffix = "" if imatrix or quant in ("F16", "BF16") else "-noimatrix"
    return Variant(f"gguf-{quant}{suffix}", "gguf", "{owner}/m-GGUF", quant, params, 0)


def run_steps(eng, vs, ctx) -> dict:
    """The engine's shared steps for these variants, each once, as an executor runs them."""
    made: dict = {}
    for s in eng.shared_steps(vs):
        try:
            made[s.key] = s.run(ctx, {k: made[k] for k in s.deps})
        except Exception as e:  # noqa: BLE001 - what the executors hand the variants
            made[s.key] = StepFailed(s.key, e)
    return made


def build(eng, v, ctx, out: Path, made: dict | None = None):
    """One variant's task: its shared steps' products (made now unless given), then build()."""
    made = run_steps(eng, [v], ctx) if made is None else made
    return eng.build(v, ctx, out, {k: product(made, k, v) for k in eng.needs(v, [v])})


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory, toolchain):
    ctx, tok, events = make_ctx(tiny_llama, tmp_path_factory.mktemp("work"), name="tiny-llama")
    return ctx, tok, events, tmp_path_factory.mktemp("out")


def _eval_ids(tok, ctx, n: int = 128) -> np.ndarray:
    ids = tok("\n\n".join(ctx.calib.eval_texts), add_special_tokens=False)["input_ids"][:n - 1]
    return np.asarray([tok.bos_token_id, *ids], dtype=np.int64)


def test_quantized_file_reads_back_with_metadata(tiny, toolchain):
    ctx, _, events, out = tiny
    eng = gguf_engine.GGUFEngine()
    made = run_steps(eng, [variant("Q4_K_M")], ctx)
    notes = build(eng, variant("Q4_K_M"), ctx, out / "q4km", made).note_dict()
    path = out / "q4km" / "tiny-llama.Q4_K_M.gguf"
    # the file, and the importance matrix that steered it (published beside it, as on the Hub)
    assert notes["file"] == path.name and sorted(p.name for p in (out / "q4km").iterdir()) == [
        path.name, "tiny-llama.imatrix"]
    assert (out / "q4km" / "tiny-llama.imatrix").read_bytes() == made[IMATRIX][0].read_bytes()
    got = gguf_engine.read_back(path)
    base, base_info = made[BASE]
    assert got["architecture"] == "llama" and got["tensors"] == base_info["tensors"] == 21
    assert got["file_type"] == gguf_engine.file_type_of("Q4_K_M") == 15
    assert got["name"] == "tiny-llama" and got["quantized_by"] == "quantkit"
    assert got["imatrix_dataset"].endswith(".txt") and "/" not in got["imatrix_dataset"]
    assert got["imatrix_chunks"] >= 1 and notes["imatrix_chunks"] == got["imatrix_chunks"]
    assert {"Q4_K", "Q6_K"} <= set(got["tensor_types"])
    assert base.name == "tiny-llama.F16.gguf" and base.parent.parent == ctx.work_dir / "gguf"
    assert [t for t, *_ in events].count("convert to F16 GGUF") == 2  # start and end, once


def test_header_reader_agrees_with_gguf_reader(tiny, toolchain, tmp_path):
    """The check's fast header reader sees what gguf.GGUFReader sees; a cut file fails it."""
    from gguf import GGUFReader

    ctx, _, _, out = tiny
    eng = gguf_engine.GGUFEngine()
    made = run_steps(eng, [variant("Q4_K_M")], ctx)
    notes = build(eng, variant("Q4_K_M"), ctx, out / "hdr", made).note_dict()
    path = out / "hdr" / notes["file"]
    r = GGUFReader(path)
    mine = gguf_engine.read_back(path)
    types: dict[str, int] = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    assert mine["tensor_types"] == types and mine["tensors"] == len(r.tensors) and mine["complete"]
    for key in ("general.architecture", "general.file_type", "general.name", "general.quantized_by",
                "quantize.imatrix.dataset", "quantize.imatrix.chunks_count"):
        assert gguf_engine.read_header(path)["kv"][key] == r.fields[key].contents(), key
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(EngineError, match="read back wrong: complete False"):
        gguf_engine.check(cut, "Q4_K_M", made[BASE][1], "v")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(EngineError, match="does not read back as GGUF"):
        gguf_engine.check(tmp_path / "junk.gguf", "Q4_K_M", made[BASE][1], "v")


def test_shared_steps_find_their_files_again_and_are_keyed(tiny, toolchain):
    """A step that runs again (a resumed build, a Ray task on the same disk) reads its files
    back instead of making them again; another source gets other files."""
    ctx, *_ = tiny
    eng = gguf_engine.GGUFEngine()
    assert [s.key for s in eng.shared_steps([variant("Q4_0", False)])] == [BASE]
    assert [s.key for s in eng.shared_steps([variant("Q4_0", False), variant("Q4_K_M")])] == [BASE, IMATRIX]
    made = run_steps(eng, [variant("Q4_K_M")], ctx)
    (base, _), (im, info) = made[BASE], made[IMATRIX]
    mtimes = base.stat().st_mtime_ns, im.stat().st_mtime_ns
    again = run_steps(eng, [variant("Q4_K_M")], ctx)
    assert again[BASE][0] == base and again[IMATRIX][0] == im
    assert (base.stat().st_mtime_ns, im.stat().st_mtime_ns) == mtimes
    assert info["chunks"] >= 1 and info["dataset"].endswith(".txt")
    other = BuildContext(ctx.source.__class__(**{**ctx.source.__dict__, "fingerprint": "other"}),
                         ctx.calib, ctx.work_dir / "other", "cpu", ctx.progress)
    assert run_steps(eng, [variant("Q4_0", False)], other)[BASE][0].parent.name != base.parent.name


def test_float_variant_is_a_plain_copy(tiny, toolchain):
    ctx, _, _, out = tiny
    eng = gguf_engine.GGUFEngine()
    notes = build(eng, variant("F16"), ctx, out / "f16").note_dict()
    got = gguf_engine.read_back(out / "f16" / notes["file"])
    assert got["tensor_types"] == {"F16": 16, "F32": 5} and not notes["imatrix"]
    assert got["imatrix_dataset"] is None


def test_f16_gguf_matches_hf_logits(tiny, toolchain, bindings, tiny_llama):
    """A missing q/k permutation moves PPL a little but max |Δlogit| a lot: compare logits."""
    from quantkit.hfmodel import hf_logits

    ctx, tok, _, out = tiny
    eng = gguf_engine.GGUFEngine()
    build(eng, variant("F16"), ctx, out / "f16-logits")
    ids = _eval_ids(tok, ctx)
    with hf_logits(tiny_llama) as hf:
        ref = hf(ids)
    with eng.open_model(out / "f16-logits", ctx) as fn:
        got = fn(ids)
        again = fn(ids[:64])  # a fresh sequence: no state carried over from the first
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got - ref).max() < 0.02  # measured 0.0013
    np.testing.assert_allclose(again, got[:64], atol=1e-3)
    # The tolerance is tight enough to see a GGUF without the permutation (measured 0.11).
    assert np.abs(_hf_logits_unpermuted(tiny_llama, ids) - ref).max() > 0.05


def _hf_logits_unpermuted(model: Path, ids: np.ndarray) -> np.ndarray:
    """HF logits as a GGUF without llama.cpp's q/k permutation would give them."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    heads = (m.config.num_attention_heads, m.config.num_key_value_heads)
    with torch.no_grad():
        for layer in m.model.layers:
            for proj, n in zip((layer.self_attn.q_proj, layer.self_attn.k_proj), heads):
                w = proj.weight
                w.copy_(w.reshape(n, w.shape[0] // n // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape))
        return m(torch.as_tensor(ids)[None]).logits[0].numpy()


def test_imatrix_changes_the_quantization(tiny, toolchain, bindings):
    from quantkit.logprobs import log_softmax as _log_softmax

    ctx, tok, _, out = tiny
    eng = gguf_engine.GGUFEngine()
    ids = _eval_ids(tok, ctx)
    logits = {}
    for v in (variant("F16"), variant("Q2_K"), variant("Q2_K", imatrix=False)):
        build(eng, v, ctx, out / f"im-{v.name}")
        with eng.open_model(out / f"im-{v.name}", ctx) as fn:
            logits[v.name] = _log_softmax(fn(ids))
    p = logits["gguf-F16"]
    kld = {k: float((np.exp(p) * (p - q)).sum(-1).mean()) for k, q in logits.items() if k != "gguf-F16"}
    assert kld["gguf-Q2_K"] != kld["gguf-Q2_K-noimatrix"] and all(v > 0 for v in kld.values())


def test_every_type_quantizes_from_the_one_conversion(tiny, toolchain):
    """Three types from one set of shared steps: one conversion, then one llama-quantize each."""
    ctx, _, events, out = tiny
    eng = gguf_engine.GGUFEngine()
    vs = [variant("Q8_0"), variant("Q4_0"), variant("Q3_K_M")]
    before = [t for t, *_ in events].count("convert to F16 GGUF")
    made = run_steps(eng, vs, ctx)
    for v in vs:
        notes = build(eng, v, ctx, out / f"p-{v.name}", made).note_dict()
        assert (out / f"p-{v.name}" / notes["file"]).is_file() and notes["quant"] == v.params.quant
    assert [t for t, *_ in events].count("convert to F16 GGUF") == before  # converted earlier, read back
    assert {t for t, *_ in events} >= {"quantize Q8_0", "quantize Q4_0", "quantize Q3_K_M"}


def test_iq_without_imatrix_is_refused_others_kept(tiny, toolchain):
    ctx, _, _, out = tiny
    eng = gguf_engine.GGUFEngine()
    bad, good = variant("IQ4_XS", imatrix=False), variant("Q4_0", imatrix=False)
    made = run_steps(eng, [bad, good], ctx)
    with pytest.raises(EngineError) as e:
        build(eng, bad, ctx, out / "iq", made)
    assert str(e.value) == ("gguf-IQ4_XS-noimatrix: gguf: IQ4_XS needs an importance matrix: "
                            "set imatrix = true (or pick a K-quant such as Q4_K_M)")
    assert not (out / "iq").exists()
    # a plain file has a name of its own: main holds it beside an imatrix one of the same type
    assert build(eng, good, ctx, out / "q40", made).notes["file"] == "tiny-llama.Q4_0-noimatrix.gguf"


def test_iq_with_imatrix_builds(tiny, toolchain):
    ctx, _, _, out = tiny
    notes = build(gguf_engine.GGUFEngine(), variant("IQ4_XS"), ctx, out / "iq4xs").note_dict()
    assert notes["imatrix"] and notes["tensor_types"].get("IQ4_XS", 0) > 0


def test_unknown_architecture_is_one_line(tiny_llama, tmp_path, toolchain):
    model = tmp_path / "weird"
    shutil.copytree(tiny_llama, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(architectures=["WeirdLMForCausalLM"], model_type="weirdlm")
    (model / "config.json").write_text(json.dumps(cfg))
    ctx, *_ = make_ctx(model, tmp_path / "work")
    eng = gguf_engine.GGUFEngine()
    made = run_steps(eng, [variant("Q4_K_M"), variant("Q8_0")], ctx)
    assert isinstance(made[BASE], StepFailed) and isinstance(made[IMATRIX], StepFailed)
    for v in (variant("Q4_K_M"), variant("Q8_0")):
        with pytest.raises(EngineError) as e:
            build(eng, v, ctx, tmp_path / "out", made)
        assert str(e.value) == (f"{v.name}: gguf: llama.cpp's converter does not support architecture "
                                "WeirdLMForCausalLM")


def test_imatrix_failure_fails_only_the_variants_that_need_it(tiny_llama, tmp_path, toolchain, monkeypatch):
    ctx, *_ = make_ctx(tiny_llama, tmp_path / "work", name="tiny-llama")
    calls = []

    def broken(*a):
        calls.append(1)
        raise EngineError("gguf", "computing the importance matrix failed: boom")

    monkeypatch.setattr(gguf_engine.engine, "_compute_imatrix", broken)
    eng = gguf_engine.GGUFEngine()
    vs = [variant("Q4_K_M"), variant("IQ4_XS"), variant("Q8_0"), variant("Q4_0", False)]
    made = run_steps(eng, vs, ctx)
    for v in vs[:2]:
        with pytest.raises(EngineError) as e:
            build(eng, v, ctx, tmp_path / v.name, made)
        assert str(e.value) == f"{v.name}: gguf: computing the importance matrix failed: boom"
    assert calls == [1]  # tried once, reported by each variant that needs it
    assert build(eng, vs[2], ctx, tmp_path / "q8", made).notes["file"] == "tiny-llama.Q8_0.gguf"
    assert build(eng, vs[3], ctx, tmp_path / "q4", made).notes["file"] == "tiny-llama.Q4_0-noimatrix.gguf"


def test_full_disk_fails_that_variant_only(tiny, toolchain, monkeypatch):
    ctx, _, _, out = tiny
    eng = gguf_engine.GGUFEngine()
    made = run_steps(eng, [variant("Q8_0"), variant("Q4_0")], ctx)
    real_free = gguf_engine.tools.free_bytes
    q8_dir = out / "disk-q8"
    monkeypatch.setattr(gguf_engine.tools, "free_bytes", lambda p: 5 << 20 if p == q8_dir else real_free(p))
    with pytest.raises(EngineError) as e:
        build(eng, variant("Q8_0"), ctx, q8_dir, made)
    assert str(e.value).startswith("gguf-Q8_0: gguf: disk full: Q8_0 needs")
    assert build(eng, variant("Q4_0"), ctx, out / "disk-q40", made).notes["file"] == "tiny-llama.Q4_0.gguf"


def test_write_error_on_a_full_disk_is_named(tiny, toolchain, monkeypatch, tmp_path):
    """llama-quantize only says `iostream error`; with no space left the message says disk full."""
    ctx, *_ = tiny
    eng = gguf_engine.GGUFEngine()
    made = run_steps(eng, [variant("Q8_0")], ctx)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "tiny-llama.Q8_0.partial").symlink_to("/dev/full")  # writes fail: ENOSPC
    monkeypatch.setattr(gguf_engine.engine, "need_space", lambda *a: None)
    monkeypatch.setattr(gguf_engine.tools, "free_bytes", lambda p: 0)
    with pytest.raises(EngineError) as e:
        build(eng, variant("Q8_0"), ctx, tmp_path / "full", made)
    assert str(e.value).startswith("gguf-Q8_0: gguf: disk full while quantizing to Q8_0 in ")
    assert not (tmp_path / "full" / "tiny-llama.Q8_0.partial").exists()


def test_missing_toolchain_is_one_line(tiny, monkeypatch, tmp_path):
    ctx, *_ = tiny
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    eng = gguf_engine.GGUFEngine()
    with pytest.raises(EngineUnavailable) as e:
        eng.version()
    assert llamacpp.BUILD_COMMAND in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(EngineUnavailable):
        build(eng, variant("Q4_K_M"), ctx, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smollm2_f16_matches_hf_and_imatrix_helps(smollm2_2l, tmp_path, toolchain, bindings):
    """Real weights (SmolLM2's first two layers): F16 logits match HF; the German imatrix
    lowers KLD at Q2_K on held-out German text."""
    from quantkit.logprobs import log_softmax as _log_softmax
    from quantkit.hfmodel import hf_logits

    ctx, tok, _ = make_ctx(smollm2_2l, tmp_path / "work", samples=8, seq_len=512)
    eng = gguf_engine.GGUFEngine()
    ids = _eval_ids(tok, ctx, 256)
    with hf_logits(smollm2_2l) as hf:
        ref = hf(ids)
    out = {}
    for v in (variant("BF16"), variant("Q2_K"), variant("Q2_K", imatrix=False)):
        build(eng, v, ctx, tmp_path / v.name)
        with eng.open_model(tmp_path / v.name, ctx) as fn:
            out[v.name] = fn(ids)
    assert np.abs(out["gguf-BF16"] - ref).max() < 1.0  # measured 0.28; without the q/k permutation 35
    p = _log_softmax(ref)
    kld = {k: float((np.exp(p) * (p - _log_softmax(q))).sum(-1).mean()) for k, q in out.items()}
    assert kld["gguf-Q2_K"] < kld["gguf-Q2_K-noimatrix"]


def test_answers_sharing_a_question_reuse_its_evaluation(tiny, toolchain, bindings):
    """The four answers of a QA item share context and question: the runner evaluates that start
    once (KV cache kept) and gives the logits a fresh evaluation gives; a start shorter than
    REUSE_MIN is evaluated again."""
    ctx, _, _, out = tiny
    eng = gguf_engine.GGUFEngine()
    made = run_steps(eng, [variant("Q8_0")], ctx)
    build(eng, variant("Q8_0"), ctx, out / "reuse", made)
    path = out / "reuse" / "tiny-llama.Q8_0.gguf"
    rng = np.random.default_rng(3)
    start = rng.integers(3, 200, 60)
    a, b = (np.concatenate([start, rng.integers(3, 200, k)]) for k in (7, 11))
    warm, cold = gguf_engine.LlamaRunner(path), gguf_engine.LlamaRunner(path)
    try:
        warm(a)
        assert warm._shared([int(t) for t in b]) == 60
        got = warm(b)
        assert warm.llm.n_tokens == len(b)
        want = cold(b)
        assert np.allclose(got, want, atol=1e-3), float(np.abs(got - want).max())
        assert cold._shared([int(t) for t in a[:20]] + [1]) == 0  # 20 shared tokens: below REUSE_MIN
    finally:
        warm.close()
        cold.close()


def test_the_runner_computes_only_the_scored_positions_and_gives_their_logits(tiny, toolchain, bindings):
    """`rows(ids, first)` asks llama.cpp for the logits of positions first.. only (llama-perplexity's
    way): the same values as a full evaluation's rows, and the next full call starts afresh."""
    ctx, _, _, out = tiny
    eng = gguf_engine.GGUFEngine()
    made = run_steps(eng, [variant("Q8_0")], ctx)
    build(eng, variant("Q8_0"), ctx, out / "rows", made)
    runner = gguf_engine.LlamaRunner(out / "rows" / "tiny-llama.Q8_0.gguf")
    ids = np.random.default_rng(4).integers(3, 200, 96)
    try:
        full = np.array(runner(ids))
        part = runner.rows(ids, 48)
        assert part.shape == (48, full.shape[1])
        assert np.allclose(part, full[48:], atol=1e-3), float(np.abs(part - full[48:]).max())
        assert runner._shared([int(t) for t in ids]) == 0  # no stale history after rows()
        assert np.allclose(runner(ids), full, atol=1e-3)
    finally:
        runner.close()
