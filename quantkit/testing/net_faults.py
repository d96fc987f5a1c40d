"""Publishing through a faulty network: the harness behind tests/test_net_faults.py and
benchmarks/faults.py.

A fabricated build (real files, see fabricate.py) is published to a local Hub that fails
requests at random (hub_server.RandomFaults: 5xx, 429 with Retry-After, resets mid-upload,
slow and lost answers), re-run until a run succeeds; then one variant is rebuilt and published
the same way. The Hub's state is then compared with the same two steps done without faults.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit import card, publish
from quantkit.manifest import save_manifest
from quantkit.testing.fabricate import Build, fabricate_build, rebuild
from quantkit.testing.hub_server import HubServer, summarize, use_hub

MAX_RUNS = 12  # publish runs per step before the harness gives up
CHANGED = "gptq-8bit-32g-actorder_True"  # the variant rebuilt in the second step


@dataclass(frozen=True)
class HubState:
    """What a user can see: repos, branches, each branch's files and commit count, LFS objects."""

    branches: dict[str, dict[str, str]]  # "repo@branch" -> {path: sha256 of the content}
    commits: dict[str, int]  # "repo@branch" -> commits after the repo's initial one
    stored_commits: dict[str, int]  # repo -> commits the server holds (a duplicate would show)
    lfs_objects: dict[str, int]  # repo -> LFS objects stored


@dataclass(frozen=True)
class NetRun:
    rate: float
    seed: int
    runs: tuple[int, ...]  # publish runs each step needed
    faults: dict[str, int]  # kind -> injected
    requests: int
    content_bytes: int  # file content sent: LFS PUT and commit bodies, every attempt
    retry_after_waits: tuple[float, ...]  # seconds the client waited after each 429
    retry_after_early: int  # retries sent before Retry-After had passed
    errors: tuple[str, ...]  # the failed runs' errors, one line each
    state: HubState


def hub_state(hub: HubServer) -> HubState:
    branches, commits, stored, lfs = {}, {}, {}, {}
    for (_, repo_id), repo in sorted(hub.repos.items()):
        stored[repo_id] = len(repo.commits)
        lfs[repo_id] = len(repo.lfs)
        for b in sorted(repo.branches):
            key = f"{repo_id}@{b}"
            branches[key] = {p: hashlib.sha256(data).hexdigest() for p, data in sorted(hub.files(repo_id, b).items())}
            commits[key] = hub.commit_count(repo_id, b) - 1
    return HubState(branches, commits, stored, lfs)


def _publish_until_ok(b: Build) -> tuple[int, list[str]]:
    """Publish, save the manifest, and run again while a branch failed (what a user does)."""
    errors: list[str] = []
    for run in range(1, MAX_RUNS + 1):
        report = publish.publish(b.plan, b.manifest, b.out)
        b.manifest = report.manifest
        save_manifest(b.out, b.manifest)
        if report.ok:
            return run, errors
        errors += [f"{x.repo}@{x.branch}: {x.error}" for x in report.branches if x.error]
        errors += [f"{r.repo}: {r.error}" for r in report.repos if r.error]
    raise AssertionError(f"still failing after {MAX_RUNS} runs: {errors[-3:]}")


def _two_steps(b: Build) -> tuple[list[int], list[str]]:
    """A fresh publish; then one variant rebuilt (one change) and published again."""
    runs, errors = _publish_until_ok(b)
    rebuild(b, CHANGED)
    b.manifest = card.write_cards(b.plan, b.manifest, b.out)
    runs2, errors2 = _publish_until_ok(b)
    return [runs, runs2], errors + errors2


def publish_run(root: Path, *, rate: float, seed: int, weight_bytes: int = 300_000) -> NetRun:
    """The two steps against a fresh Hub that fails `rate` of its requests (seeded)."""
    b = fabricate_build(root, weight_bytes=weight_bytes)
    b.manifest = card.write_cards(b.plan, b.manifest, b.out)
    with HubServer() as hub, use_hub(hub, home=str(root / "hf_home")):
        if rate > 0:
            hub.faults.at_random(rate, seed)
        runs, errors = _two_steps(b)
        hub.faults.clear()
        stats = summarize(hub.log)
        return NetRun(rate, seed, tuple(runs), dict(Counter(k for k, _, _ in hub.faults.fired)), stats["requests"],
                      stats["content_bytes"], tuple(w for _, w in hub.faults.waited),
                      len(hub.faults.early), tuple(errors), hub_state(hub))


def compare(run: NetRun, ref: NetRun) -> list[str]:
    """Every way the faulty run's Hub differs from the fault-free one (empty: equal)."""
    out = []
    a, b = run.state, ref.state
    if a.branches != b.branches:
        diff = sorted(k for k in set(a.branches) | set(b.branches) if a.branches.get(k) != b.branches.get(k))
        out.append(f"branch contents differ: {diff}")
    out += [f"{k}: {a.commits.get(k)} commits, fault-free {n}" for k, n in b.commits.items() if a.commits.get(k) != n]
    if a.stored_commits != b.stored_commits:
        out.append(f"commits stored {a.stored_commits}, fault-free {b.stored_commits}")
    if a.lfs_objects != b.lfs_objects:
        out.append(f"LFS objects {a.lfs_objects}, fault-free {b.lfs_objects}")
    return out


def fault_table(rates: list[float], seeds: list[int]) -> list[dict[str, Any]]:
    """One row per (rate, seed): what benchmarks/faults.py prints and the slow test checks."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="quantkit-net-") as tmp:
        ref = publish_run(Path(tmp) / "ref", rate=0.0, seed=0)
        for rate in rates:
            for seed in seeds:
                run = publish_run(Path(tmp) / f"r{rate}-s{seed}", rate=rate, seed=seed)
                rows.append(row(run, ref))
    return rows


def row(run: NetRun, ref: NetRun) -> dict[str, Any]:
    diffs = compare(run, ref)
    return {"rate": run.rate, "seed": run.seed, "runs": "+".join(map(str, run.runs)),
            "faults": sum(run.faults.values()), "kinds": " ".join(f"{k}:{n}" for k, n in sorted(run.faults.items())),
            "max commits/branch": max(run.state.commits.values()),
            "fault-free max": max(ref.state.commits.values()),
            "bytes re-sent": run.content_bytes - ref.content_bytes,
            "Retry-After early": run.retry_after_early,
            "min wait after 429 s": round(min(run.retry_after_waits), 2) if run.retry_after_waits else "-",
            "final state equal": "yes" if not diffs else "NO: " + "; ".join(diffs)}
