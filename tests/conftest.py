"""Shared fixtures: models built here (no downloads), a temp HF_HOME, GPU skipping.

Models are built once and cached under $QUANTKIT_CACHE/test-models (default
~/.cache/quantkit), keyed by a version string, so later runs, CI and the benchmarks reuse
them (quantkit.testing.models builds them).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# pytest-xdist's workers start with COLUMNS=80, and the CLI honours COLUMNS: its tables (and
# those of the builds tests start) would wrap at 80 instead of piped output's 160. No test
# depends on the terminal it was started from.
os.environ.pop("COLUMNS", None)

from quantkit.testing.models import CALIB_DIR, build_smollm2, build_tiny_llama, cached, smollm2_name  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # the long files first (a stable sort keeps every file's own order); xdist's loadfile then
    # deals files out by how many tests they hold, and this order decides among equals
    items.sort(key=lambda it: "long" not in it.keywords)
    if any("gpu" in it.keywords for it in items) and not _cuda():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for it in items:
            if "gpu" in it.keywords:
                it.add_marker(skip)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the user's Hub cache or token."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    """A random Llama (hidden 256, intermediate 768, 2 layers) with a German SentencePiece tokenizer."""
    return cached("tiny-llama-v1", build_tiny_llama)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real pretrained SmolLM2-135M-Instruct (30 layers), bf16."""
    return cached(smollm2_name(), build_smollm2)


@pytest.fixture(scope="session")
def smollm2_2l() -> Path:
    """SmolLM2-135M-Instruct cut to its first two layers (real weights)."""
    return cached(smollm2_name(2), lambda out: build_smollm2(out, layers=2))


@pytest.fixture(scope="session")
def german_sample() -> Path:
    return CALIB_DIR
