"""Crash anywhere: the harness behind tests/test_crash.py and benchmarks/faults.py.

`quantkit build` of a 3-variant recipe (GPTQ + 2 GGUF) on the tiny model runs as its own
process group and is SIGKILLed, with its llama.cpp children, at a seeded random moment of an
uninterrupted build's duration. The folder is then inspected (nothing partial at a final
path), built again to completion, and compared with the uninterrupted build.

Two kills run side by side (PARALLEL): most of a tiny build is one-threaded Python (imports,
the converter's start, small tensors: 107 % CPU), so two in flight use the 2 cores of a CI
machine nearly twice as well as one (4 builds two at a time: 70.7 s; 2 one after the other:
65.8 s). The reference build's duration, which the kill moments are fractions
of, is measured under the same load: two uninterrupted builds side by side, which must agree.

Determinism: GPTQModel's CPU path gives the same bytes run after run for a fixed number of
torch threads; 1 and 2 threads give different (equally valid) weights, because the float
reductions are split differently. So every run here pins the thread counts (THREAD_ENV).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from quantkit.lock import LOCK_NAME
from quantkit.manifest import State, load_manifest
from quantkit.testing.models import ROOT
VARIANTS = ("gptq-4bit-32g-actorder_True", "gguf-Q4_K_M", "gguf-Q8_0")
THREAD_ENV = {"OMP_NUM_THREADS": "2", "GPTQMODEL_CPU_WORKERS": "2", "QUANTKIT_THREADS": "2"}
# Every build runs with a Hub token in its environment, as a publisher's does: it must not
# end up in any file or log (tests/test_crash.py greps for it).
TOKEN = "hf_crash_harness_token_must_not_leak"
RUN_TIMEOUT = 600
PARALLEL = 2  # builds in flight at once (see the module's docstring)

RECIPE = """[model]
source = "{model}"
name = "tiny"
[calibration]
samples = 8
seq_len = 128
[evaluation]
tokens = 1024
ctx = 128
qa_items = 8
[publish]
owner = "me"
[[variants]]
format = "gptq"
bits = 4
group_size = 32
[[variants]]
format = "gguf"
quant = ["Q4_K_M", "Q8_0"]
"""

# Cards show each variant's quantization seconds (engine table, GGUF notes): the only thing
# that differs between two uninterrupted builds. Masked before comparing.
_SECONDS = (re.compile(r"^(\| [^|]+ \| [^|]+ \| [^|]+ \| )\d+( \| \d+ \|)$", re.M),
            re.compile(r"(quantize_seconds: )[0-9.]+()"))
# Manifest fields that are measured times, not results.
_TIMES = ("seconds", "task_seconds", "peak_ram")  # measured, not results
_NOTE_TIMES = ("quantize_seconds",)


def write_recipe(root: Path, model: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    p = root / "recipe.toml"
    p.write_text(RECIPE.format(model=model), encoding="utf-8")
    return p


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, **THREAD_ENV, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "HF_TOKEN": TOKEN}


def start_build(recipe: Path, out: Path, log: Path) -> subprocess.Popen[bytes]:
    """`quantkit build` in its own process group, output to `log`."""
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "quantkit.cli", "build", str(recipe), "--out", str(out)],
                                stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT, start_new_session=True)


def run_build(recipe: Path, out: Path, log: Path) -> int:
    p = start_build(recipe, out, log)
    try:
        return p.wait(timeout=RUN_TIMEOUT)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


# ---------------------------------------------------------------- what a build left


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def final_files(out: Path) -> dict[str, str]:
    """sha256 of every file at a final path: variant folders, not hidden scratch (.work,
    .NAME.partial, temp files). READMEs with the seconds cells masked."""
    got = {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(folder.rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                data = f.read_bytes()
                if f.name == "README.md":
                    data = _masked(data.decode("utf-8")).encode("utf-8")
                got[f.relative_to(out).as_posix()] = _sha(data)
    return got


def _masked(card: str) -> str:
    for rx in _SECONDS:
        card = rx.sub(r"\1S\2", card)
    return card


def manifest_results(out: Path) -> dict[str, Any]:
    """The manifest without its measured times."""
    doc = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    for rec in doc["variants"].values():
        for k in _TIMES:
            rec.pop(k, None)
        for k in _NOTE_TIMES:
            rec.get("notes", {}).pop(k, None)
    return doc


@dataclass(frozen=True)
class Reference:
    seconds: float  # wall time of the uninterrupted build, process start to exit
    files: dict[str, str]
    manifest: dict[str, Any]


def reference_build(root: Path, model: Path, parallel: int = PARALLEL) -> Reference:
    """`parallel` uninterrupted builds side by side: their mean duration is the one the kills see,
    and each must give the same files and results (the determinism the comparisons rely on)."""
    recipe = write_recipe(root, model)
    names = ["reference", *(f"reference{i}" for i in range(1, parallel))]

    def one(name: str) -> tuple[float, dict[str, str], dict[str, Any]]:
        t0 = time.monotonic()
        rc = run_build(recipe, root / name, root / f"{name}.log")
        assert rc == 0, (root / f"{name}.log").read_text(errors="replace")
        return time.monotonic() - t0, final_files(root / name), manifest_results(root / name)

    with ThreadPoolExecutor(parallel) as pool:
        runs = list(pool.map(one, names))
    for name, (_, files, manifest) in zip(names[1:], runs[1:]):
        assert (files, manifest) == runs[0][1:], f"{name} differs from the first uninterrupted build"
    return Reference(sum(r[0] for r in runs) / len(runs), runs[0][1], runs[0][2])


# ---------------------------------------------------------------- one kill


@dataclass(frozen=True)
class KillResult:
    kill: int
    at: float  # seconds after the build started
    killed: bool  # False: the build had ended before that moment
    lasted: float  # seconds the run lived: to the kill, or to its end when it was not killed
    phase: str  # the last line the build printed before it died
    done_at_kill: tuple[str, ...]  # variants evaluated (finished) at the kill
    built_at_kill: tuple[str, ...]  # variants the manifest recorded as built at the kill
    broken_at_kill: tuple[str, ...]  # final paths holding something an uninterrupted build does not
    lock_left: bool  # the killed run left its lock file
    rerun_rc: int
    rerun_started: tuple[str, ...]  # variants the re-run worked on
    rewritten: tuple[str, ...]  # variants whose files the re-run wrote anew
    took_over_note: bool  # the re-run said it took over a stale lock
    differences: tuple[str, ...]  # final files or manifest vs the uninterrupted build


def _kill_at(recipe: Path, out: Path, log: Path, at: float, group: bool, after: str | None) -> tuple[bool, float]:
    """Kill `at` seconds after the start, or after the build printed a line matching `after`.
    group: the build and the llama.cpp tools it runs (a crash, a closed terminal); else the
    build's own process only (the OOM killer, `kill -9 PID`): its children run on.
    (killed, seconds the run lived)."""
    t0, killed = time.monotonic(), False
    p = start_build(recipe, out, log)
    if after is None or _wait_for_line(p, log, after):
        try:
            p.wait(timeout=at)  # it may end first (a run can be faster than the reference)
        except subprocess.TimeoutExpired:
            killed = True
            if group:
                os.killpg(p.pid, signal.SIGKILL)
            else:
                p.send_signal(signal.SIGKILL)
    p.wait()
    return killed, time.monotonic() - t0


def _state_at_kill(out: Path, ref: Reference) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(done, built, broken): broken lists final paths whose content the reference lacks."""
    broken: list[str] = []
    try:
        m = load_manifest(out) if out.is_dir() else None
    except Exception as e:  # noqa: BLE001 - a manifest that does not load is the finding
        m, broken = None, [f"manifest.json: {e}"]
    files = final_files(out) if out.is_dir() else {}
    broken += [p for p, h in files.items() if ref.files.get(p) != h]
    def at(state: str) -> tuple[str, ...]:
        return tuple(n for n in VARIANTS if m and n in m.variants and m.variants[n].at_least(State(state)))

    return at("evaluated"), at("built"), tuple(broken)


def _mtimes(out: Path) -> dict[str, int]:
    return {f.relative_to(out).as_posix(): f.stat().st_mtime_ns
            for n in VARIANTS if (out / n).is_dir() for f in (out / n).rglob("*") if f.is_file()}


def _differences(out: Path, ref: Reference) -> tuple[str, ...]:
    got, diffs = final_files(out), []
    diffs += [f"{p}: missing" for p in ref.files if p not in got]
    diffs += [f"{p}: differs" for p in got if p in ref.files and got[p] != ref.files[p]]
    diffs += [f"{p}: extra" for p in got if p not in ref.files]
    if manifest_results(out) != ref.manifest:
        diffs.append("manifest.json: results differ")
    return tuple(diffs)


def _wait_for_line(p: subprocess.Popen[bytes], log: Path, pattern: str) -> bool:
    """True once the build printed a line matching `pattern`; False if it ended without."""
    rx = re.compile(pattern, re.M)
    while not rx.search(log.read_text(errors="replace")):
        if p.poll() is not None:
            return False
        time.sleep(0.02)
    return True


def crash_once(root: Path, recipe: Path, ref: Reference, kill: int, at: float, *, group: bool = True,
               after: str | None = None) -> KillResult:
    """One kill (at `at` s, or `at` s after a line matching `after`) and the re-run."""
    out, log = root / f"kill{kill}", root / f"kill{kill}.log"
    killed, lasted = _kill_at(recipe, out, log, at, group, after)
    lines = log.read_text(errors="replace").strip().splitlines()
    done, built, broken = _state_at_kill(out, ref)
    lock_left = (out / LOCK_NAME).exists()
    before = _mtimes(out)
    rerun_log = root / f"kill{kill}.rerun.log"
    rc = run_build(recipe, out, rerun_log)
    text = rerun_log.read_text(errors="replace")
    started = tuple(n for n in VARIANTS if re.search(rf"^▶ {re.escape(n)} ", text, re.M))
    now = _mtimes(out)
    rewritten = tuple(sorted({p.split("/")[0] for p, t in before.items()
                              if not p.endswith("README.md") and now.get(p) != t}))
    return KillResult(kill, round(at, 2), killed, round(lasted, 2), lines[-1].strip() if lines else "", done, built,
                      broken, lock_left, rc, started, rewritten, "note: took over the lock" in text,
                      _differences(out, ref) if rc == 0 else ("re-run failed: " + text[-500:],))


# Moments uniform draws rarely hit: right after one and after two variants finished.
AFTER_VARIANT = (rf"^✓ {VARIANTS[0]} ", r"^✓ gguf-Q4_K_M ")


def kill_fractions(n: int, seed: int) -> list[float]:
    """One seeded random fraction of the build's duration in each n-th: random, yet spread
    over every stage (uniform draws bunch up and miss the short last stages)."""
    rng = random.Random(seed)
    # 90 % of the duration: a moment at the very end kills nothing.
    return [(i + rng.random()) * 0.9 / n for i in range(n)]


RETRY = 1000  # folder number offset of a kill tried again


def random_kills(root: Path, ref: Reference, n: int, seed: int, *, first: int = 0, group: bool = True,
                 done: Callable[[KillResult], None] = lambda r: None, parallel: int = PARALLEL) -> list[KillResult]:
    """n kills at seeded moments, each into its own folder (kill<first + i>) and re-run,
    `parallel` at a time. A build that ended before its moment measured how long builds take
    now (a shared machine's load changes between the reference and the kills): that moment is
    tried again, once, on the new duration (folder kill<first + i + RETRY>). `done` sees the
    results in kill order."""
    recipe, seconds = root / "recipe.toml", [ref.seconds]

    def one(i: int, f: float) -> KillResult:
        r = crash_once(root, recipe, ref, first + i, f * seconds[0], group=group)
        if not r.killed:
            seconds[0] = r.lasted
            r = crash_once(root, recipe, ref, first + i + RETRY, f * seconds[0], group=group)
        return r

    out = []
    with ThreadPoolExecutor(parallel) as pool:
        for r in pool.map(one, *zip(*enumerate(kill_fractions(n, seed)))):
            out.append(r)
            done(r)
    return out


def problems(r: KillResult) -> list[str]:
    """What a kill and its re-run got wrong (empty: all good)."""
    out = []
    if r.broken_at_kill:
        out.append(f"partial or unknown files at final paths: {r.broken_at_kill}")
    if r.rerun_rc != 0:
        out.append(f"the re-run exited {r.rerun_rc}")
    unfinished = tuple(n for n in VARIANTS if n not in r.done_at_kill)
    if r.rerun_started != unfinished:
        out.append(f"the re-run worked on {r.rerun_started}, unfinished were {unfinished}")
    if set(r.rewritten) & set(r.built_at_kill):
        out.append(f"the re-run rewrote finished files of {sorted(set(r.rewritten) & set(r.built_at_kill))}")
    if r.took_over_note != r.lock_left:
        out.append(f"lock left: {r.lock_left}, take-over note: {r.took_over_note}")
    out += list(r.differences)
    return out
