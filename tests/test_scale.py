"""The GGUF path's memory bound at 7B widths (issue 9), measured the way benchmarks/scale.py
measures it (quantkit.testing.scale): a random Llama with 7B widths and 4 layers, built by the
pipeline in a child process whose whole process tree (llama.cpp tools included) is sampled
for RssAnon."""

from __future__ import annotations

import argparse

import pytest

pytestmark = pytest.mark.long


@pytest.fixture(scope="module")
def scale():
    from quantkit.testing import scale

    return scale


@pytest.fixture(scope="module")
def toolchain_ready():
    from quantkit import toolchain as llamacpp
    from quantkit.errors import EngineUnavailable

    try:
        llamacpp.find_toolchain()
    except EngineUnavailable as e:
        pytest.skip(str(e))
    if llamacpp.bindings_version() is None:
        pytest.skip(f"llama-cpp-python not installed: run `{llamacpp.BUILD_COMMAND}`")


@pytest.mark.slow
def test_gguf_ladder_at_7b_widths_stays_within_a_quarter_of_the_weights_plus_2_gb(scale, toolchain_ready,
                                                                                  tmp_path):
    args = argparse.Namespace(out=tmp_path, no_tools_alone=True, keep=False)
    r = scale.run_one("gguf", 4, args, scale.LIGHT)
    assert r["rc"] == 0, r["fails"]
    bound = 0.25 * r["weights"] + 2e9
    stages = {k: round(v["peak"] / 1e9, 2) for k, v in r["stages"].items()}
    assert r["peak_anon"] <= bound, f"peak {r['peak_anon'] / 1e9:.2f} GB > {bound / 1e9:.2f} GB: {stages}"
    assert {"convert", "imatrix", "quantize", "reference", "reload and score"} <= set(stages)
    # the plan's estimate is the figure `build` refuses by: it must not be far below the truth
    assert r["estimate"]["ram"] >= 0.75 * r["peak_anon"], (r["estimate"], stages)
