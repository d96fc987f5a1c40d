"""MLX engine: real mlx-lm conversion and GPTQModel quantization repacked to MLX, read back
through mlx_lm.load and through the float32 torch scorer quantization is measured with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from quantkit.engines import _gptqmodel as gm
from quantkit.records import file_entries
from quantkit.engines.mlx import MLXEngine, MLXParams, mlx_bytes, pack_mlx, unpack_words
from quantkit.errors import EngineUnavailable
from quantkit.evaluate import score
from quantkit.hfmodel import hf_logits
from quantkit.plan import Variant
from quantkit.sizing import Machine, ModelShape, Workload
from quantkit.testing.engine_bench import Bench, make_bench

MLX = MLXEngine()
needs_gptqmodel = pytest.mark.skipif(not gm.is_installed("gptqmodel"), reason="needs the [gptq] extra (GPTQModel)")


@pytest.fixture(scope="module")
def mlx_lm():
    pytest.importorskip("mlx.core", reason="needs mlx: pip install 'mlx[cpu]' mlx-lm")
    return pytest.importorskip("mlx_lm", reason="needs mlx-lm: pip install 'mlx[cpu]' mlx-lm")


def variant(name: str, **params) -> Variant:
    return Variant(name, "mlx", "test/x-MLX", name, MLXParams(**params), 0)


def build(bench: Bench, out: Path, **params) -> tuple[Path, dict]:
    out.mkdir(parents=True)
    notes = MLX.build(variant("-".join(f"{v}" for v in params.values()) or "default", **params),
                      bench.context(), out, {}).note_dict()
    return out, notes


@pytest.fixture(scope="module")
def tiny(mlx_lm, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Bench:
    return make_bench(tiny_llama, tmp_path_factory.mktemp("mlx-tiny"))


@pytest.fixture(scope="module")
def smol2(mlx_lm, smollm2_2l: Path, tmp_path_factory: pytest.TempPathFactory) -> Bench:
    """The first two layers of SmolLM2 (real weights, RoPE theta 100000)."""
    return make_bench(smollm2_2l, tmp_path_factory.mktemp("mlx-smol2"), samples=8, seq_len=128)


@pytest.fixture(scope="module")
def smol2_rtn(smol2: Bench, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return build(smol2, tmp_path_factory.mktemp("mlx-rtn") / "out", method="rtn", bits=4, group_size=64)


def check_scorer(folder: Path, ids: np.ndarray) -> float:
    """max |Δlogit| between the torch scorer and mlx_lm.load's own (float32) forward."""
    from quantkit.engines.mlx import mlx_lm_logits, torch_scorer

    with torch_scorer(folder) as fn:
        mine = fn(ids)
    theirs = mlx_lm_logits(folder, ids)
    assert mine.shape == theirs.shape == (len(ids), mine.shape[1])
    assert (mine.argmax(-1) == theirs.argmax(-1)).all()
    return float(np.abs(mine - theirs).max())


# ---------------------------------------------------------------- rtn


def test_rtn_folder_is_what_mlx_lm_writes_and_loads(smol2_rtn: tuple[Path, dict], smol2: Bench, mlx_lm) -> None:
    folder, notes = smol2_rtn
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "README.md" not in names  # card.py writes the card
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    src = json.loads((smol2.source / "config.json").read_text())
    assert "rope_theta" not in src  # transformers 5 writes only rope_parameters ...
    assert cfg["rope_theta"] == src["rope_parameters"]["rope_theta"] == 100000.0  # ... mlx-lm reads this
    model, tok = mlx_lm.load(str(folder))
    assert model.model.layers[0].self_attn.q_proj.bits == 4
    assert model.model.embed_tokens.group_size == 64  # embeddings quantized too, as mlx_lm.convert does
    assert model.args.rope_theta == 100000.0
    assert notes["method"] == "rtn (mlx_lm.convert)" and notes["quantizer"].startswith("mlx-lm ")
    assert notes["rope_theta"] == 100000.0


def test_torch_scorer_matches_mlx_lm_load(smol2_rtn: tuple[Path, dict], smol2: Bench,
                                          record_property: pytest.RecordProperty) -> None:
    """Dequantized weights with float32 scales in torch = MLX's own forward; with the wrong
    RoPE theta (rope_theta missing) they would differ by whole logits."""
    d = check_scorer(smol2_rtn[0], smol2.eval_set.chunks[0, :64])
    record_property("max_dlogit", d)
    print(f"rtn 4-bit g64, 2-layer SmolLM2: max |Δlogit| torch scorer vs mlx_lm.load = {d:.2e}")
    assert d < 2e-3


def test_rtn_8bit_close_to_source(tiny: Bench, tmp_path: Path) -> None:
    from quantkit.engines.mlx import torch_scorer

    folder, _ = build(tiny, tmp_path / "out", method="rtn", bits=8, group_size=64)
    ids = tiny.eval_set.chunks[0]
    with torch_scorer(folder) as fn:
        q = score(tiny.eval_set, tiny.reference, fn)
        mine = fn(ids)
    with hf_logits(tiny.source) as fn:
        src = fn(ids)
    d = float(np.abs(mine - src).max())
    print(f"rtn 8-bit g64, tiny Llama: KLD {q.kld:.2e}, top-1 {q.top1:.3f}, max |Δlogit| vs source {d:.3f}")
    # a random model has near-flat logits: KLD is the measure, top-1 flips on near ties
    assert q.kld < 1e-4 and q.top1 > 0.9 and abs(q.delta_ppl_pct) < 1
    assert d < 0.1
    assert check_scorer(folder, ids[:32]) < 1e-3
    # the size the estimate predicts (all matrices at 8 bits + a bf16 scale and bias per group)
    shape = ModelShape.from_config(json.loads((tiny.source / "config.json").read_text()))
    weights = sum(f.size for f in file_entries(folder) if f.path.endswith(".safetensors"))
    assert abs(weights - mlx_bytes(shape, 8, 64)) / weights < 0.05


# ---------------------------------------------------------------- calibrated: GPTQModel -> MLX


@needs_gptqmodel
def test_gptq_repacked_exactly_and_beats_rtn(smol2: Bench, smol2_rtn: tuple[Path, dict], tmp_path: Path,
                                             mlx_lm) -> None:
    import dataclasses

    from quantkit.engines.mlx import _read_quantized, dequantized_state, gptq_groups, torch_scorer

    bench = dataclasses.replace(smol2, work=tmp_path / "work")
    ctx = dataclasses.replace(bench.context(), keep_intermediate=True)
    out = tmp_path / "out"
    out.mkdir()
    notes = MLX.build(variant("gptq", method="gptq", bits=4, group_size=64), ctx, out, {}).note_dict()
    assert notes["method"].startswith("gptq (GPTQModel ") and "repacked to MLX affine" in notes["method"]
    assert notes["repacked_modules"] == 14 and notes["calibration_samples"] == len(smol2.calib.windows)
    mlx_lm.load(str(out))
    # GPTQModel's codes, zeros and scales decode to its own dequantized weights ...
    from gptqmodel import GPTQModel

    mods, _, fmt = _read_quantized(ctx.work_dir / "gptq.gptq")
    assert fmt == "gptq"
    with gm.engine_output(tmp_path / "load.log"):
        ref = GPTQModel.load(str(ctx.work_dir / "gptq.gptq"), device="cpu")
    stored = dequantized_state(out)
    for name, m in ref.model.named_modules():
        if name not in mods:
            continue
        m.scales.data = m.scales.data.float()
        theirs = m.dequantize_weight().T.float().numpy()  # rounded to 16 bits inside GPTQModel
        q, s, b = gptq_groups(mods[name], 4, 64, fmt)
        mine = (q.reshape(q.shape[0], -1, 64) * s[..., None] + b[..., None]).reshape(q.shape)
        assert np.all(np.abs(theirs - mine) <= 2**-7 * np.abs(mine) + 1e-4), name
        # ... and the MLX file holds them up to bf16 storage of scale and bias (the source's
        # dtype, as mlx_lm.convert keeps it): measured max 0.09, mean 0.011 of a step
        err = np.abs(stored[f"{name}.weight"].numpy() - mine) / np.repeat(s, 64, axis=1)
        assert err.max() < 0.1 and err.mean() < 0.02, name
    del ref
    with torch_scorer(out) as fn:
        q_gptq = score(smol2.eval_set, smol2.reference, fn)
    with torch_scorer(smol2_rtn[0]) as fn:
        q_rtn = score(smol2.eval_set, smol2.reference, fn)
    print(f"2-layer SmolLM2 4-bit g64: KLD gptq {q_gptq.kld:.4f} vs rtn {q_rtn.kld:.4f}")
    assert q_gptq.kld < 0.9 * q_rtn.kld
    assert check_scorer(out, smol2.eval_set.chunks[0, :32]) < 2e-3


@pytest.mark.slow
@needs_gptqmodel
def test_awq_repacked_exactly_with_its_folded_norms(smol2: Bench, tmp_path: Path, mlx_lm) -> None:
    """AWQ folds its scales into the RMSNorm weights: those must come from GPTQModel's output."""
    import dataclasses

    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
    from safetensors import safe_open

    from quantkit.engines.mlx import _read_quantized, dequantized_state, gptq_groups

    bench = dataclasses.replace(smol2, work=tmp_path / "work",
                                calib=dataclasses.replace(smol2.calib, windows=smol2.calib.windows[:4]))
    ctx = dataclasses.replace(bench.context(), keep_intermediate=True)
    out = tmp_path / "out"
    out.mkdir()
    notes = MLX.build(variant("awq", method="awq", bits=4, group_size=64), ctx, out, {}).note_dict()
    assert notes["method"].startswith("awq (GPTQModel ") and notes["repacked_modules"] == 14
    mods, rest, fmt = _read_quantized(ctx.work_dir / "awq.awq")
    assert fmt == "awq"
    stored = dequantized_state(out)
    for name, t in mods.items():
        theirs = dequantize_gemm(t["qweight"], t["qzeros"], t["scales"].float(), 4, 64).T.float().numpy()
        q, s, b = gptq_groups(t, 4, 64, fmt)
        mine = (q.reshape(q.shape[0], -1, 64) * s[..., None] + b[..., None]).reshape(q.shape)
        np.testing.assert_array_equal(theirs, mine)
        err = np.abs(stored[f"{name}.weight"].numpy() - mine) / np.repeat(s, 64, axis=1)
        assert err.max() < 0.1 and err.mean() < 0.02, name
    norm = "model.layers.0.input_layernorm.weight"
    with safe_open(str(smol2.source / "model.safetensors"), "pt") as sf:
        source_norm = sf.get_tensor(norm).float().numpy()
    assert not np.allclose(rest[norm].float().numpy(), source_norm)  # AWQ changed it ...
    np.testing.assert_allclose(stored[norm].numpy(), rest[norm].float().numpy(), rtol=1e-2)  # ... we took it
    assert check_scorer(out, smol2.eval_set.chunks[0, :32]) < 2e-3


# ---------------------------------------------------------------- units


def test_pack_matches_mx_quantize_layout(mlx_lm) -> None:
    import mlx.core as mx

    rng = np.random.default_rng(0)
    for bits in (2, 4, 8):
        q = rng.integers(0, 2**bits, size=(8, 128), dtype=np.uint32)
        words = pack_mlx(q, bits)
        ones = mx.ones((8, 2), dtype=mx.float32)
        w = mx.dequantize(mx.array(words), ones, mx.zeros((8, 2)), group_size=64, bits=bits)
        np.testing.assert_array_equal(np.array(w), q.astype(np.float32))
        # GPTQ packs along rows: unpack(rows) of the transposed words gives the codes back
        np.testing.assert_array_equal(unpack_words(words.view(np.int32).T, bits, axis=0).T, q)


def test_params_validation() -> None:
    assert MLXParams().method == "gptq" and (MLXParams().bits, MLXParams().group_size) == (4, 64)
    cases = {
        "bits": ({"bits": 5}, "must be one of 2, 3, 4, 6, 8"),
        "group_size": ({"group_size": 16}, "must be one of 32, 64, 128"),
        "method": ({"method": "hqq"}, "must be one of rtn, awq, gptq, dwq, dynamic"),
        "dwq": ({"method": "dwq"}, "'dwq' is not supported"),
        "dynamic": ({"method": "dynamic", "target_bpw": 4.5}, "'dynamic' is not supported"),
        "target_bpw": ({"method": "rtn", "target_bpw": 4.5}, 'target_bpw applies only to method = "dynamic"'),
        "gptq bits": ({"method": "gptq", "bits": 3}, 'method = "gptq" supports bits 2, 4, 8'),
        "awq bits": ({"method": "awq", "bits": 8}, 'method = "awq" supports bits 4'),
        "extra": ({"sym": True}, "Extra inputs are not permitted"),
    }
    for what, (kw, msg) in cases.items():
        with pytest.raises(ValidationError, match=msg):
            MLXParams(**kw)
    for bits in (2, 3, 4, 6, 8):
        MLXParams(method="rtn", bits=bits)
    with pytest.raises(ValidationError):
        MLXParams().bits = 8  # frozen


def test_dwq_refusal_says_why() -> None:
    with pytest.raises(ValidationError) as e:
        MLXParams(method="dwq")
    assert "CPU backend" in str(e.value) and "46 s (measured)" in str(e.value)


def test_version_without_mlx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlx_lm", None)  # import mlx_lm -> ImportError
    with pytest.raises(EngineUnavailable, match=r"pip install 'mlx\[cpu\]' mlx-lm"):
        MLX.version()


def test_import_is_cheap() -> None:
    code = ("import sys, quantkit.engines.mlx; "
            "print([m for m in ('mlx', 'mlx_lm', 'torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_estimate_orders_methods() -> None:
    cfg = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "vocab_size": 49152,
           "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True}
    shape = ModelShape.from_config(cfg)
    work = Workload(calib_tokens=78 * 512, eval_tokens=16384, eval_ctx=512)
    machine = Machine("ci", 2, 16 * 10**9)
    est = {m: MLX.estimate(variant(m, method=m), shape, work, machine) for m in ("rtn", "gptq", "awq")}
    assert est["rtn"].seconds < est["gptq"].seconds < est["awq"].seconds
    assert est["rtn"].disk == mlx_bytes(shape, 4, 64)
    assert 60e6 < est["rtn"].disk < 90e6  # 4.5 bits x 135M parameters: ~76 MB
    assert all(e.ram > shape.bf16_bytes for e in est.values())


def test_group_size_must_divide_widths(smollm2_2l: Path) -> None:
    from quantkit.engines.mlx import check_widths
    from quantkit.errors import EngineError

    check_widths(smollm2_2l, 64)
    with pytest.raises(EngineError, match="group size 128 does not divide the input width of hidden_size 576"):
        check_widths(smollm2_2l, 128)


def test_mlx_variants_through_quantkit_build(tiny_llama: Path, tmp_path: Path) -> None:
    """The whole pipeline: recipe -> MLX folders -> scores -> cards with MLX's own usage."""
    from quantkit.cli import app
    from quantkit.manifest import load_manifest
    from typer.testing import CliRunner

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[model]\nsource = "{tiny_llama}"\nname = "tiny"\n[calibration]\nsamples = 8\n'
                      'seq_len = 128\n[evaluation]\ntokens = 1024\nctx = 128\nqa_items = 8\n[publish]\nowner = "me"\n'
                      '[[variants]]\nformat = "mlx"\nbits = [4, 8]\ngroup_size = 64\nmethod = "rtn"\n')
    out = tmp_path / "build"
    res = CliRunner().invoke(app, ["build", str(recipe), "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = load_manifest(out)
    assert m is not None and set(m.variants) == {"mlx-4bit-64g-rtn", "mlx-8bit-64g-rtn"}
    q4, q8 = m.variants["mlx-4bit-64g-rtn"].quality, m.variants["mlx-8bit-64g-rtn"].quality
    assert q4 is not None and q8 is not None and q8.kld < q4.kld
    card = (out / "mlx-8bit-64g-rtn" / "README.md").read_text()
    assert "library_name: mlx" in card and "me/tiny-MLX" in card
    assert 'load("me/tiny-MLX", revision="mlx-8bit-64g-rtn")' in card and "| Max RAM required |" in card
