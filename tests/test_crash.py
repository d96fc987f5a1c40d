"""Crash anywhere: `quantkit build` SIGKILLed at seeded random moments, then run again; the
harness is quantkit/testing/crash.py (benchmarks/faults.py prints its table)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.register_assert_rewrite("quantkit.testing.crash")
from quantkit.testing.crash import (  # noqa: E402
    AFTER_VARIANT,
    TOKEN,
    VARIANTS,
    Reference,
    crash_once,
    problems,
    random_kills,
    reference_build,
    start_build,
)

from quantkit.lock import LOCK_NAME  # noqa: E402

pytestmark = pytest.mark.long


@pytest.fixture(scope="module")
def reference(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Reference]:
    root = tmp_path_factory.mktemp("crash")
    return root, reference_build(root, tiny_llama)


def _kills(root: Path, ref: Reference, n: int, seed: int, first: int) -> None:
    results = random_kills(root, ref, n, seed, first=first)
    bad = {r.kill: problems(r) for r in results if problems(r)}
    assert bad == {}, "\n".join(f"kill {r.kill} at {r.at} s ({r.phase}): {problems(r)}" for r in results)
    # a moment is retried on the new duration when a build ended first: the load can change twice
    assert sum(r.killed for r in results) >= n * 3 // 4, [(r.kill, r.at, r.lasted) for r in results]


def test_build_killed_at_5_random_moments_resumes_to_the_same_files(reference) -> None:
    root, ref = reference
    _kills(root, ref, 5, seed=14, first=0)


@pytest.mark.slow
def test_build_killed_at_20_random_moments_resumes_to_the_same_files(reference) -> None:
    root, ref = reference
    _kills(root, ref, 20, seed=2026, first=20)  # folders apart from the 5 kills'


@pytest.mark.slow
@pytest.mark.parametrize("done", [1, 2])
def test_build_killed_right_after_a_variant_finished_builds_only_the_rest(reference, done: int) -> None:
    """The moments between variants last a fraction of a second: random draws rarely hit them."""
    root, ref = reference
    r = crash_once(root, root / "recipe.toml", ref, 100 + done, 0.0, after=AFTER_VARIANT[done - 1])
    assert r.killed and len(r.done_at_kill) == done and problems(r) == []
    assert r.rerun_started == VARIANTS[done:]


def test_second_build_on_the_same_folder_is_refused(reference, tmp_path: Path) -> None:
    """While one build runs, a second on the same folder exits 5 with one line; the first
    finishes unharmed."""
    root, ref = reference
    recipe, out = root / "recipe.toml", tmp_path / "out"
    first = start_build(recipe, out, tmp_path / "first.log")
    try:
        t0 = time.monotonic()
        while not (out / LOCK_NAME).exists():
            assert first.poll() is None and time.monotonic() - t0 < 120, (tmp_path / "first.log").read_text()
            time.sleep(0.05)
        second = start_build(recipe, out, tmp_path / "second.log")
        assert second.wait(timeout=120) == 5
    finally:
        rc = first.wait(timeout=600)
    errors = [ln for ln in (tmp_path / "second.log").read_text().splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: {out / LOCK_NAME}: quantkit build (pid {first.pid}")
    assert rc == 0 and not (out / LOCK_NAME).exists()


def test_builds_leave_the_hub_token_nowhere(reference) -> None:
    """The builds of this module ran with HF_TOKEN set: no file they left (folders, manifests, cards,
    .work scratch, GPTQModel logs, the runs' output) holds it."""
    root, _ = reference
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) > 10 and any(p.name.endswith(".gptqmodel.log") for p in files)
    assert [str(p) for p in files if TOKEN.encode() in p.read_bytes()] == []
