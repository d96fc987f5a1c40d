"""GPTQ engine: real GPTQModel quantization of the tiny Llama, read back through transformers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from quantkit.engines import ENGINES
from quantkit.engines import _gptqmodel as gm
from quantkit.errors import EngineUnavailable
from quantkit.testing.engine_bench import Bench, build, make_bench, quality, variant_of

pytestmark = pytest.mark.skipif(not gm.is_installed("gptqmodel"), reason="needs the [gptq] extra")

GPTQ = ENGINES["gptq"]
SIDE_FILES = {"generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def bench(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Bench:
    return make_bench(tiny_llama, tmp_path_factory.mktemp("gptq-work"))


@pytest.fixture(scope="module")
def built(bench: Bench, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """4-bit and 8-bit variants, built once for the tests below."""
    out = {}
    for name, body in {"4bit": "bits = 4\ngroup_size = 64", "8bit": "bits = 8\ngroup_size = 64\nseq_len = 128"}.items():
        folder = tmp_path_factory.mktemp(f"gptq-{name}") / "out"
        notes = build(GPTQ, variant_of(bench.source, f'format = "gptq"\n{body}'), bench, folder)
        out[name] = (folder, notes, list(bench.events))
    return out


def test_writes_gptq_v1_with_source_tokenizer(built: dict, bench: Bench) -> None:
    folder, notes, _ = built["4bit"]
    assert {p.name for p in folder.iterdir()} == {"config.json", "quantize_config.json",
                                                  "model.safetensors", *SIDE_FILES}
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "checkpoint_format", "bits", "group_size", "desc_act", "sym")} \
        == {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "group_size": 64,
            "desc_act": True, "sym": True}
    assert qc["meta"]["damp_percent"] == 0.1 and qc["meta"]["true_sequential"] is True
    qfile = json.loads((folder / "quantize_config.json").read_text())
    assert qfile["checkpoint_format"] == "gptq" and qfile["bits"] == 4
    for f in ("config.json", "quantize_config.json"):  # no machine-local temp paths published
        assert "offload_to_disk_path" not in (folder / f).read_text()
    for f in SIDE_FILES:  # copied from the source as they are, not re-saved by GPTQModel
        assert (folder / f).read_bytes() == (bench.source / f).read_bytes(), f
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "float16"
    # transformers-4 readers (AutoGPTQ, ExLlama, older vLLM/TGI) need the flat RoPE key
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"]
    assert float_dtypes(folder / "model.safetensors") == {"F16"}  # computed in fp32 here, saved fp16
    assert notes["quantizer"].startswith("gptqmodel ") and notes["device"] == "cpu"
    assert notes["calibration_samples"] == 8 and notes["calibration_seq_len"] == 256
    assert notes["quantized_modules"] == 14  # 7 Linear layers x 2 decoder layers
    assert (bench.work / "gptq-4bit-64g-actorder_True.quant_log.csv").is_file()


def test_legacy_rope_keys_for_transformers_4_readers() -> None:
    """Llama-3-style scaling: the flat keys transformers 4 reads, next to rope_parameters."""
    from transformers import LlamaConfig

    rp = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = gm.with_legacy_rope({"model_type": "llama", "rope_parameters": rp})
    assert cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"] == {k: v for k, v in rp.items() if k != "rope_theta"}
    assert LlamaConfig(**cfg).rope_parameters == rp  # transformers 5 reads the same settings back
    assert gm.with_legacy_rope({"model_type": "x"}) == {"model_type": "x"}


def float_dtypes(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        kinds = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    return kinds - {"I32", "I64", "I16", "I8", "U8"}


def test_compute_dtype_avoids_fp16_on_cpu(tmp_path: Path) -> None:
    for dtype, cpu in (("bfloat16", "bfloat16"), ("float32", "float32"), ("float16", "float32")):
        (tmp_path / "config.json").write_text(json.dumps({"dtype": dtype}))
        assert gm.compute_dtype(tmp_path, "cpu") == cpu
        assert gm.compute_dtype(tmp_path, "cuda") == "float16"


def test_reports_each_layer(built: dict) -> None:
    _, _, events = built["4bit"]
    layers = [(d, t) for task, d, t in events if task == "quantize layers"]
    assert layers == [(0, 2), (1, 2), (2, 2)]


def test_seq_len_truncates_calibration(built: dict) -> None:
    _, notes, _ = built["8bit"]
    assert notes["calibration_seq_len"] == 128 and notes["calibration_tokens"] == 8 * 128


def test_quality_through_transformers(built: dict, bench: Bench) -> None:
    q4 = quality(GPTQ, built["4bit"][0], bench)
    q8 = quality(GPTQ, built["8bit"][0], bench)
    # top-1 on a random model is near-ties: 123 of 127 here on one machine, 124+ on others
    assert q8.kld < 1e-4 and q8.top1 > 0.95 and abs(q8.delta_ppl_pct) < 0.1
    assert q4.kld > 5 * q8.kld
    assert q4.kld < 0.02 and q4.top1 > 0.6


@pytest.mark.parametrize("body", [
    "bits = 3\ngroup_size = 32\nact_order = false\nsym = false",
    "bits = 2\ngroup_size = -1\ntrue_sequential = false\ndamp = 0.05",
])
def test_other_settings_reload(body: str, bench: Bench, tmp_path: Path) -> None:
    v = variant_of(bench.source, f'format = "gptq"\n{body}')
    build(GPTQ, v, bench, tmp_path / "out")
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    p = v.params
    assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == (p.bits, p.group_size, p.act_order, p.sym)
    with GPTQ.open_model(tmp_path / "out", bench.context()) as fn:
        logits = fn(bench.eval_set.chunks[0][:32])
    assert logits.shape == (32, 1024) and np.isfinite(logits).all()


def test_calibration_examples_cut_to_seq_len() -> None:
    w = np.arange(12, dtype=np.int32).reshape(2, 6)
    ex = gm.calibration_examples(w, 4)
    assert ex == [{"input_ids": [0, 1, 2, 3], "attention_mask": [1] * 4},
                  {"input_ids": [6, 7, 8, 9], "attention_mask": [1] * 4}]
    assert len(gm.calibration_examples(w, 100)[0]["input_ids"]) == 6  # longer: windows as they are


def test_log_notes_do_not_depend_on_the_order_modules_finished(tmp_path: Path) -> None:
    """GPTQModel's CPU workers log modules as they finish; a rebuild must write the same card."""
    # 14 modules whose np.mean differs in the last digits between these orders
    losses = [0.00013523, 0.00084759, 0.00076401, 0.00025581, 0.00049594, 0.00045004, 0.00065194,
              0.00078893, 9.477e-05, 2.932e-05, 0.00083593, 0.00043333, 0.00076252, 3.1e-06]
    notes = []
    for order in (losses, losses[::-1], sorted(losses)):
        log = tmp_path / "log.csv"
        log.write_text("layer,module,loss,damp\n" + "".join(f"0,m{i},{x!r},0.01\n" for i, x in enumerate(order)))
        notes.append(gm._log_notes(log))
    assert notes[0] == notes[1] == notes[2]
    assert notes[0]["mean_module_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert notes[0]["quantized_modules"] == len(losses)


def test_version_names_gptqmodel() -> None:
    assert GPTQ.version().startswith("gptqmodel 7.")


def test_version_without_gptqmodel_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    gm.gptqmodel_version.cache_clear()
    monkeypatch.setitem(sys.modules, "gptqmodel", None)  # import raises ImportError
    try:
        with pytest.raises(EngineUnavailable, match=r"quantkit-workbench\[gptq\]"):
            GPTQ.version()
    finally:
        monkeypatch.undo()
        gm.gptqmodel_version.cache_clear()


def test_auto_gptq_engine_without_auto_gptq(monkeypatch: pytest.MonkeyPatch, bench: Bench, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "auto_gptq", None)
    v = variant_of(bench.source, 'format = "gptq"\nbits = 4\ngroup_size = 64\nengine = "auto-gptq"')
    with pytest.raises(EngineUnavailable, match=r"quantkit-workbench\[auto-gptq\]") as e:
        GPTQ.build(v, bench.context(), tmp_path, {})
    assert e.value.variant == v.name
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_gptq_beats_rtn_on_real_weights(smollm2_2l: Path, tmp_path: Path) -> None:
    """Two real SmolLM2 layers: GPTQ's error correction must beat plain rounding (RTN)."""
    bench = make_bench(smollm2_2l, tmp_path / "work", samples=16, seq_len=256)
    v = variant_of(smollm2_2l, 'format = "gptq"\nbits = 4\ngroup_size = 64')
    build(GPTQ, v, bench, tmp_path / "gptq")
    rtn = tmp_path / "rtn"
    gm.run(gm.QuantJob("rtn", smollm2_2l, "RTNConfig", {"bits": 4, "group_size": 64, "sym": True},
                       None, "cpu"), rtn, lambda *a: None, None)
    q_gptq, q_rtn = quality(GPTQ, tmp_path / "gptq", bench), quality(GPTQ, rtn, bench)
    assert q_gptq.kld < 0.8 * q_rtn.kld, (q_gptq, q_rtn)


@pytest.mark.gpu
def test_gptq_on_cuda(tiny_llama: Path, tmp_path: Path) -> None:
    bench = make_bench(tiny_llama, tmp_path / "work")
    bench_ctx = bench.context()
    from dataclasses import replace

    ctx = replace(bench_ctx, device="cuda")
    v = variant_of(tiny_llama, 'format = "gptq"\nbits = 4\ngroup_size = 64')
    (tmp_path / "out").mkdir()
    notes = GPTQ.build(v, ctx, tmp_path / "out", {}).note_dict()
    assert notes["device"] == "cuda"
    with GPTQ.open_model(tmp_path / "out", ctx) as fn:
        logits = fn(bench.eval_set.chunks[0])
    assert np.isfinite(logits).all()
