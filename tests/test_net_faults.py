"""Publishing through a faulty network (random 5xx, 429 + Retry-After, resets mid-upload, slow
and lost answers, seeded), and the token never showing up anywhere. Real HfApi, local Hub."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.register_assert_rewrite("_hub_fixtures", "quantkit.testing.net_faults")

from quantkit import card, publish  # noqa: E402
from quantkit.manifest import load_manifest, save_manifest  # noqa: E402
from quantkit.testing.fabricate import fabricate_build  # noqa: E402
from quantkit.testing.hub_server import RANDOM_KINDS, HubServer  # noqa: E402
from quantkit.testing.net_faults import compare, publish_run  # noqa: E402

pytest_plugins = ("_hub_fixtures",)
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

RATE = 0.1


@pytest.fixture(scope="module")
def fault_free(tmp_path_factory: pytest.TempPathFactory):
    return publish_run(tmp_path_factory.mktemp("ref"), rate=0.0, seed=0)


def _check(run, ref) -> None:
    assert compare(run, ref) == []  # same branches, files, commits per branch, stored commits, LFS objects
    assert max(ref.state.commits.values()) == 2  # one commit per change: the publish, the rebuilt variant
    assert run.retry_after_early == 0, "a request came back before its Retry-After had passed"
    assert all(w >= 1.0 for w in run.retry_after_waits)


def test_publish_under_random_faults_ends_like_a_fault_free_publish(tmp_path: Path, fault_free) -> None:
    """M = 3 seeded runs at 10 %; between them every kind of fault fires (checked, so a change
    in the request sequence cannot silently stop exercising one)."""
    fired: set[str] = set()
    for seed in (1, 2, 3):
        run = publish_run(tmp_path / str(seed), rate=RATE, seed=seed)
        assert sum(run.faults.values()) >= 5, run.faults
        _check(run, fault_free)
        fired |= set(run.faults)
    assert fired == set(RANDOM_KINDS)


@pytest.mark.slow
@pytest.mark.parametrize("rate", [0.05, 0.2])
def test_more_rates_and_seeds(tmp_path: Path, fault_free, rate: float) -> None:
    for seed in range(4, 8):
        run = publish_run(tmp_path / str(seed), rate=rate, seed=seed)
        _check(run, fault_free)


@pytest.mark.parametrize("route, method", [(r"/branch/", "POST"), (r"^/api/repos/create$", "POST"),
                                           (r"/refs$", "GET")])
def test_lost_answers_to_requests_the_client_sends_once(hub: HubServer, tmp_path: Path, no_backoff: list[float],
                                                        route: str, method: str) -> None:
    """huggingface_hub does not retry these; publish does, and a repeat that finds the branch
    or repo already made by the lost attempt goes on from there."""
    b = fabricate_build(tmp_path)
    b.manifest = card.write_cards(b.plan, b.manifest, b.out)
    hub.faults.add(method, route, times=2, action="drop_response")
    report = publish.publish(b.plan, b.manifest, b.out)
    assert report.ok and report.commits == 5, [x.error for x in report.branches]
    assert [a for a, _, _ in hub.faults.fired] == ["drop_response"] * 2 and no_backoff  # publish retried
    assert all(hub.commit_count(x.repo, x.branch) == 2 for x in report.branches)  # initial + ours


# ---------------------------------------------------------------- the token


def _cli_publish(root: Path, hub: HubServer) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": hub.token,
           "HF_HOME": str(root / "hf_home"), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "quantkit.cli", "publish", str(root / "recipe.toml"),
                           "--out", str(root / "build")], env=env, capture_output=True, text=True, timeout=300)


def test_token_appears_nowhere_after_failed_and_good_publishes(hub: HubServer, tmp_path: Path) -> None:
    """A careless server quotes the Authorization header in its errors, on every kind of request
    the publish makes; a run then succeeds. Every output line and every file under the folder
    (build, manifest, cards, hash cache, HF_HOME) is searched for the token."""
    b = fabricate_build(tmp_path)
    save_manifest(b.out, card.write_cards(b.plan, b.manifest, b.out))
    runs = []
    hub.faults.echo_credentials("GET", r"/api/whoami", status=401)
    runs.append(_cli_publish(tmp_path, hub))  # whoami fails: nothing published
    hub.faults.clear()
    hub.faults.echo_credentials("POST", r"/preupload/", status=400)
    hub.faults.echo_credentials("POST", r"/commit/", status=400)
    hub.faults.echo_credentials("GET", r"/refs$", status=403)
    runs.append(_cli_publish(tmp_path, hub))  # some branches fail
    hub.faults.clear()
    hub.faults.at_random(0.1, seed=5)
    runs.append(_cli_publish(tmp_path, hub))
    hub.faults.clear()
    runs.append(_cli_publish(tmp_path, hub))

    assert [r.returncode != 0 for r in runs[:2]] == [True, True] and runs[-1].returncode == 0, runs[-1].stderr
    assert "you sent Bearer ***" in runs[1].stderr  # the server's echo reached the message, scrubbed
    assert all(r.state == "published" for r in load_manifest(b.out).variants.values())
    output = "".join(r.stdout + r.stderr for r in runs)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 20
    leaks = [str(p) for p in files if hub.token.encode() in p.read_bytes()]
    assert hub.token not in output and leaks == []
