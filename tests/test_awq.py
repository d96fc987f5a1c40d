"""AWQ engine: GPTQModel's AWQ (GEMM, zero point) on the tiny Llama, read back through transformers.

AWQ's scale search is slow on CPU (about 2 minutes per SmolLM2 layer), so these tests use
the tiny model with a small calibration set.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from quantkit.engines import ENGINES
from quantkit.engines import _gptqmodel as gm
from quantkit.errors import EngineUnavailable
from quantkit.testing.engine_bench import Bench, build, make_bench, quality, variant_of

pytestmark = pytest.mark.skipif(not gm.is_installed("gptqmodel"), reason="needs the [gptq] extra")

AWQ = ENGINES["awq"]


@pytest.fixture(scope="module")
def bench(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Bench:
    return make_bench(tiny_llama, tmp_path_factory.mktemp("awq-work"), samples=4, seq_len=128)


@pytest.fixture(scope="module")
def built(bench: Bench, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list]:
    folder = tmp_path_factory.mktemp("awq") / "out"
    notes = build(AWQ, variant_of(bench.source, 'format = "awq"\nbits = 4\ngroup_size = 64'), bench, folder)
    return folder, notes, list(bench.events)


def test_writes_awq_gemm_with_zero_point(built: tuple, bench: Bench) -> None:
    folder, notes, events = built
    assert {p.name for p in folder.iterdir()} == {
        "config.json", "quantize_config.json", "model.safetensors", "generation_config.json",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json"}
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "version", "zero_point", "bits", "group_size")} == \
        {"quant_method": "awq", "version": "gemm", "zero_point": True, "bits": 4, "group_size": 64}
    assert "offload_to_disk_path" not in (folder / "config.json").read_text()
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"  # computed in bf16
    assert (folder / "tokenizer.model").read_bytes() == (bench.source / "tokenizer.model").read_bytes()
    assert notes["quantizer"].startswith("gptqmodel ") and notes["calibration_tokens"] == 4 * 128
    assert [(d, t) for task, d, t in events if task == "quantize layers"] == [(0, 2), (1, 2), (2, 2)]


def test_reloads_through_transformers_with_sane_quality(built: tuple, bench: Bench) -> None:
    q = quality(AWQ, built[0], bench)
    assert 0 < q.kld < 0.02 and q.top1 > 0.6 and abs(q.delta_ppl_pct) < 2


def test_autoawq_engine_without_autoawq(monkeypatch: pytest.MonkeyPatch, bench: Bench, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "awq", None)
    v = variant_of(bench.source, 'format = "awq"\nengine = "autoawq"\ngroup_size = 64')
    with pytest.raises(EngineUnavailable, match=r"quantkit-workbench\[autoawq\]"):
        AWQ.build(v, bench.context(), tmp_path, {})


def test_version_names_gptqmodel() -> None:
    assert AWQ.version().startswith("gptqmodel 7.")


@pytest.mark.slow
def test_awq_beats_rtn_on_real_weights(smollm2_2l: Path, tmp_path: Path) -> None:
    """Two real SmolLM2 layers (about a minute of AWQ on 2 cores): AWQ beats plain rounding
    with the same zero points (asymmetric RTN)."""
    bench = make_bench(smollm2_2l, tmp_path / "work", samples=4, seq_len=128)
    build(AWQ, variant_of(smollm2_2l, 'format = "awq"\nbits = 4\ngroup_size = 64'), bench, tmp_path / "awq")
    gm.run(gm.QuantJob("rtn", smollm2_2l, "RTNConfig", {"bits": 4, "group_size": 64, "sym": False},
                       None, "cpu"), tmp_path / "rtn", lambda *a: None, None)
    q_awq, q_rtn = quality(AWQ, tmp_path / "awq", bench), quality(AWQ, tmp_path / "rtn", bench)
    assert q_awq.kld < 0.8 * q_rtn.kld, (q_awq, q_rtn)
