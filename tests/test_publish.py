"""Publishing against a local Hub-API server, driven by the real HfApi over HTTP (plain LFS).

Builds are fabricated (real files, made-up weights and quality): see quantkit/testing/fabricate.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.register_assert_rewrite("_hub_fixtures")  # it is also the plugin named below

from quantkit import card, publish  # noqa: E402
from quantkit.manifest import VariantRecord  # noqa: E402
from quantkit.records import PublishedRecord  # noqa: E402
from quantkit.testing.fabricate import DEMO_RECIPE, Build, carded_build, publish_build, rebuild  # noqa: E402
from quantkit.testing.hub_server import HubServer, summarize  # noqa: E402

pytest_plugins = ("_hub_fixtures",)  # the `hub` and `no_backoff` fixtures

# huggingface_hub's own LFS PUT passes a file object as `data=`; httpx2 warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

GPTQ = "quantkit-test/tiny_german-GPTQ"
GGUF = "quantkit-test/tiny_german-GGUF"
BRANCHES = {GPTQ: ["main", "gptq-4bit-32g-actorder_True", "gptq-8bit-32g-actorder_True"],
            GGUF: ["main", "Q8_0"]}


_built, _publish = carded_build, publish_build


def _expected_files(b: Build, name: str) -> dict[str, bytes]:
    folder = b.folder(name)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _distinct_weight_bytes(b: Build) -> int:
    """Bytes of the binary files (weights, importance matrix, and the cards' picture), each distinct
    content counted once per repo."""
    import hashlib

    from quantkit.chart import CHART

    weights = {(v.repo, f.sha256): f.size for v in b.plan.variants for f in b.manifest.variants[v.name].files
               if f.path.endswith((".safetensors", ".gguf", ".imatrix"))}
    pictures = {(v.repo, hashlib.sha256(p.read_bytes()).hexdigest()): p.stat().st_size for v in b.plan.variants
                if (p := b.folder(v.name) / CHART).is_file()}  # one per repo: the picture of its table
    return sum(weights.values()) + sum(pictures.values())


def _heads(hub: HubServer) -> dict[tuple[str, str], str]:
    return {(repo, br): hub.head(repo, br).id for repo, brs in BRANCHES.items() for br in brs}


# ---------------------------------------------------------------- fresh publish and re-runs


def test_fresh_publish_of_three_gptq_branches_and_two_gguf_types(hub: HubServer, tmp_path: Path) -> None:
    b = _built(tmp_path)
    steps: list[tuple[str, int, int | None]] = []
    report = _publish(b, progress=lambda task, done, total: steps.append((task, done, total)))

    assert report.ok and report.owner == hub.user  # no [publish] owner: asked with whoami
    assert [(r.repo, r.created) for r in report.repos] == [(GPTQ, True), (GGUF, True)]
    assert {r.repo: [x.branch for x in report.branches if x.repo == r.repo] for r in report.repos} == BRANCHES
    assert report.commits == 5
    initial = {repo: list(hub.repo(repo).history(hub.head(repo)))[-1].id for repo in BRANCHES}
    for br in report.branches:
        head = hub.head(br.repo, br.branch)
        assert br.status == "committed" and br.commit == head.id and br.attempts == 1
        assert head.parent == initial[br.repo]  # one commit per branch, on the empty initial commit
        files = hub.files(br.repo, br.branch)
        assert files.pop(".gitattributes")
        expected = _expected_files(b, br.variant)  # the folder as it is, README included
        if (br.repo, br.branch) == (GGUF, "main"):  # GGUF tools read main: it holds every type's file
            expected["tiny_german.Q8_0.gguf"] = (b.folder("gguf-Q8_0") / "tiny_german.Q8_0.gguf").read_bytes()
        assert files == expected
        rec = report.manifest.variants[br.variant]
        assert rec.state == "published"
        assert rec.published == PublishedRecord(br.repo, br.branch, head.id)
    # a non-main branch does not start as a copy of main
    assert "model.safetensors" in hub.files(GPTQ, "main")
    assert hub.head(GPTQ, "gptq-4bit-32g-actorder_True").parent != hub.head(GPTQ, "main").id
    assert not hub.repo(GPTQ).private
    assert steps[0] == (f"publish {GPTQ}@main", 0, 5) and steps[-1] == ("publish", 5, 5)
    # one collection for the recipe, holding both repos
    (col,) = hub.collections.values()
    assert report.collection == col["slug"] and [i["id"] for i in col["items"]] == [GPTQ, GGUF]
    # the same GGUF file on main and on its branch was uploaded once (content-addressed)
    assert sum(r.bytes_in for r in hub.requests("PUT")) == _distinct_weight_bytes(b)


def test_rerun_with_nothing_changed_makes_no_commit(hub: HubServer, tmp_path: Path) -> None:
    b = _built(tmp_path)
    _publish(b)
    heads = _heads(hub)
    hub.reset_log()

    again = _publish(b)

    stats = summarize(hub.log)
    assert again.ok and again.commits == 0 and again.bytes == 0
    assert {x.status for x in again.branches} == {"unchanged"}
    assert stats["commits"] == 0 and stats["content_bytes"] == 0, hub.log
    assert stats["requests"] <= 3 * len(again.branches) + 2  # + finding the collection again
    assert not hub.requests("PUT") and [r.status for r in hub.requests("POST")] == [409]  # reads only
    assert again.collection and len(hub.collections) == 1
    assert again.hashed_files == 0  # every sha256 came from the cache
    assert _heads(hub) == heads
    assert all(again.manifest.variants[x.variant].published.commit == x.head for x in again.branches)


def test_one_variant_rebuilt_gives_one_commit_on_its_branch_only(hub: HubServer, tmp_path: Path) -> None:
    b = _built(tmp_path)
    _publish(b)
    heads = _heads(hub)
    rebuild(b, "gptq-8bit-32g-actorder_True")  # new bytes; quality the same to the card's precision
    b.manifest = card.write_cards(b.plan, b.manifest, b.out)
    hub.reset_log()

    report = _publish(b)

    changed = {(x.repo, x.branch) for x in report.branches if x.commit}
    assert changed == {(GPTQ, "gptq-8bit-32g-actorder_True")}
    (br,) = [x for x in report.branches if x.commit]
    weights = b.folder(br.variant) / "model.safetensors"
    assert [f.path for f in br.added] == ["model.safetensors"] and br.bytes == weights.stat().st_size
    assert hub.files(GPTQ, br.branch)["model.safetensors"] == weights.read_bytes()
    assert hub.head(GPTQ, br.branch).parent == heads[(GPTQ, br.branch)]
    assert {k: v for k, v in _heads(hub).items() if k != (GPTQ, br.branch)} == \
        {k: v for k, v in heads.items() if k != (GPTQ, br.branch)}
    assert sum(r.bytes_in for r in hub.requests("PUT")) == weights.stat().st_size
    assert report.hashed_files == 1  # only the rebuilt file was read again


def test_visible_quality_change_updates_every_branch_readme(hub: HubServer, tmp_path: Path) -> None:
    """The table (and its picture) is the same in every branch of a repo: a changed row is a
    card-only commit elsewhere in that repo, and none in the other repo."""
    b = _built(tmp_path)
    _publish(b)
    rebuild(b, "gptq-8bit-32g-actorder_True", keep_quality=False)
    b.manifest = card.write_cards(b.plan, b.manifest, b.out)

    report = _publish(b)

    added = {x.branch: sorted(f.path for f in x.added) for x in report.branches if x.repo == GPTQ}
    assert added == {"main": ["README.md", "quality.png"], "gptq-4bit-32g-actorder_True": ["README.md", "quality.png"],
                     "gptq-8bit-32g-actorder_True": ["README.md", "model.safetensors", "quality.png"]}
    assert all(not x.commit for x in report.branches if x.repo == GGUF)


# ---------------------------------------------------------------- failures and retries


def test_connection_dropped_mid_upload_then_rerun_completes(hub: HubServer, tmp_path: Path,
                                                            no_backoff: list[float]) -> None:
    b = _built(tmp_path, weight_bytes=600_000)
    victim = "gptq-4bit-32g-actorder_True"
    oid = hashlib.sha256((b.folder(victim) / "model.safetensors").read_bytes()).hexdigest()
    hub.faults.drop_upload(oid=oid, after_bytes=100_000, times=100)  # outlasts the client's retries

    first = _publish(b)

    failed = [x for x in first.branches if x.status == "failed"]
    assert [x.variant for x in failed] == [victim] and not first.ok
    assert "upload" in (failed[0].error or "").lower()
    assert oid not in hub.repo(GPTQ).lfs  # no half-written object
    assert hub.commit_count(GPTQ, victim) == 1  # the empty branch, nothing committed on it
    assert b.manifest.variants[victim].state == "carded"
    assert sum(x.status == "committed" for x in first.branches) == 4
    with pytest.raises(publish.PublishError, match=victim):
        first.raise_for_errors()

    hub.faults.clear()
    hub.reset_log()
    second = _publish(b)

    assert second.ok and [x.variant for x in second.branches if x.commit] == [victim]
    assert hub.files(GPTQ, victim)["model.safetensors"] == (b.folder(victim) / "model.safetensors").read_bytes()
    assert b.manifest.variants[victim].state == "published"


def test_connection_dropped_once_is_retried_within_the_run(hub: HubServer, tmp_path: Path,
                                                           no_backoff: list[float]) -> None:
    b = _built(tmp_path, weight_bytes=600_000)
    hub.faults.drop_upload(after_bytes=50_000, times=1)
    report = _publish(b)
    assert report.ok and report.commits == 5
    assert hub.faults.fired == [("drop_body", "PUT", hub.requests("PUT")[0].path)]


@pytest.mark.parametrize("status", [429, 503])
def test_commit_rejected_then_accepted_is_retried_without_forking(hub: HubServer, tmp_path: Path,
                                                                  no_backoff: list[float], status: int) -> None:
    b = _built(tmp_path)
    hub.faults.fail_commit(status=status, times=2, retry_after=0)

    report = _publish(b)

    assert report.ok and report.commits == 5
    first = report.branches[0]
    assert first.attempts == 3 and no_backoff == [0.0, 0.0]  # Retry-After: 0 honoured
    assert all(hub.commit_count(x.repo, x.branch) == 2 for x in report.branches)  # initial + ours
    commits = hub.requests("POST", r"/commit/")
    assert [r.status for r in commits[:3]] == [status, status, 200]
    # content uploaded once, not per attempt (nor per branch)
    assert sum(r.bytes_in for r in hub.requests("PUT")) == _distinct_weight_bytes(b)


def test_commit_backoff_without_retry_after(hub: HubServer, tmp_path: Path, no_backoff: list[float]) -> None:
    b = _built(tmp_path)
    hub.faults.fail_commit(status=429, times=3, retry_after=None)
    assert _publish(b, only=["gguf-Q8_0"]).ok
    assert no_backoff == [1.0, 2.0, 4.0]


def test_lost_commit_answer_is_not_committed_twice(hub: HubServer, tmp_path: Path, no_backoff: list[float]) -> None:
    b = _built(tmp_path)
    hub.faults.drop_commit_response(times=1)

    report = _publish(b)

    assert report.ok
    first = report.branches[0]
    assert first.attempts == 2 and first.commit == hub.head(first.repo, first.branch).id
    assert hub.commit_count(first.repo, first.branch) == 2  # the retry saw the branch moved: no fork
    assert [r.status for r in hub.requests("POST", r"/commit/")][:2] == [0, 412]


def test_commit_keeps_failing_reports_branch_and_goes_on(hub: HubServer, tmp_path: Path,
                                                         no_backoff: list[float]) -> None:
    b = _built(tmp_path)
    hub.faults.fail_commit(status=500, times=publish.COMMIT_ATTEMPTS)
    report = _publish(b)
    (failed,) = [x for x in report.branches if x.status == "failed"]
    assert failed.branch == "main" and failed.repo == GPTQ and failed.attempts == publish.COMMIT_ATTEMPTS
    assert "500" in (failed.error or "") and "README.md" in [f.path for f in failed.added]
    assert hub.commit_count(GPTQ, "main") == 1  # nothing landed
    assert sum(x.status == "committed" for x in report.branches) == 4


# ---------------------------------------------------------------- existing repos, selection, dry run


def test_existing_repo_keeps_foreign_branches(hub: HubServer, tmp_path: Path) -> None:
    b = _built(tmp_path)
    hub.seed(GPTQ, {"notes.md": "someone else's branch\n", "weights.bin": b"\0" * 100}, revision="experiment",
             private=True)
    hub.seed(GPTQ, {"stale.safetensors": b"\0" * 10, "README.md": "old\n"}, revision="gptq-4bit-32g-actorder_True")
    foreign = hub.head(GPTQ, "experiment")

    report = _publish(b)

    assert report.ok and not report.repos[0].created
    assert hub.head(GPTQ, "experiment") == foreign  # untouched
    assert set(hub.files(GPTQ, "experiment")) == {".gitattributes", "notes.md", "weights.bin"}
    ours = next(x for x in report.branches if x.branch == "gptq-4bit-32g-actorder_True")
    assert not ours.create_branch and ours.removed == ("stale.safetensors",)
    files = hub.files(GPTQ, ours.branch)
    assert "stale.safetensors" not in files and ".gitattributes" in files
    assert hub.repo(GPTQ).private  # an existing repo's visibility is not changed


def test_only_publishes_the_named_variants(hub: HubServer, tmp_path: Path) -> None:
    b = _built(tmp_path)
    report = _publish(b, only=["gguf-Q8_0"])
    assert [(x.repo, x.branch) for x in report.branches] == [(GGUF, "Q8_0")]
    assert (hub.repo(GGUF).branches.keys() == {"main", "Q8_0"}) and (("model", GPTQ) not in hub.repos)


def test_only_evaluated_variants_are_published(hub: HubServer, tmp_path: Path) -> None:
    b = _built(tmp_path)
    m = b.manifest
    built = m.variants["gptq-8bit-32g-actorder_True"]
    m = m.with_variant("gptq-8bit-32g-actorder_True", VariantRecord(**{**built.__dict__, "state": "built"}))
    failed = m.variants["gguf-Q8_0"]
    m = m.with_variant("gguf-Q8_0", VariantRecord(**{**failed.__dict__, "state": "failed", "error": "boom"}))
    b.manifest = m

    report = _publish(b)

    assert dict(report.not_ready) == {"gptq-8bit-32g-actorder_True": "state built: only evaluated variants "
                                      "are published", "gguf-Q8_0": "its build failed: boom"}
    assert {x.variant for x in report.branches} == {"gptq-4bit-128g-actorder_True", "gptq-4bit-32g-actorder_True",
                                                    "gguf-Q4_K_M"}
    assert "gptq-8bit-32g-actorder_True" not in hub.repo(GPTQ).branches


def test_dry_run_lists_every_operation_and_changes_nothing(hub: HubServer, tmp_path: Path) -> None:
    b = _built(tmp_path)
    manifest_before = b.manifest
    report = _publish(b, dry_run=True)

    assert report.dry_run and report.ok and report.commits == 0
    assert [(r.repo, r.created) for r in report.repos] == [(GPTQ, True), (GGUF, True)]
    assert {x.status for x in report.branches} == {"planned"}
    main = report.branches[0]
    assert {f.path for f in main.added} == {"README.md", "config.json", "model.safetensors",
                                            "quantize_config.json", "tokenizer.json", "quality.png"}
    # the README is rendered with the owner resolved now; the folder keeps its own until a real run
    readme = card.render_card(b.plan, b.manifest, main.variant, owner=hub.user,
                              original=card.load_original_card(b.plan.recipe))
    assert main.bytes == len(readme.encode()) + sum(f.size for f in b.manifest.variants[main.variant].files) + \
        (b.folder(main.variant) / "quality.png").stat().st_size
    assert "{owner}" in (b.folder(main.variant) / "README.md").read_text()
    assert not hub.repos and not hub.requests("POST") and not hub.requests("PUT")
    assert report.manifest == manifest_before
    ops = report.operations()
    assert ops[:2] == [f"would create repo {GPTQ}", f"would create repo {GGUF}"]
    assert f"would create branch {GPTQ}@gptq-4bit-32g-actorder_True (empty, from the initial commit)" in ops
    assert any(op.startswith(f"{GPTQ}@main: would add model.safetensors (") for op in ops)

    _publish(b)
    rebuild(b, "gguf-Q8_0")
    (b.folder("gguf-Q8_0") / "extra.txt").write_text("not in the manifest\n")
    hub.reset_log()
    plan = _publish(b, dry_run=True)
    q8 = next(x for x in plan.branches if x.branch == "Q8_0")
    assert [f.path for f in q8.added] == ["tiny_german.Q8_0.gguf"]
    assert [f.path for f in q8.skipped] == ["README.md", "quality.png"]
    assert q8.ignored == ("extra.txt",) and not q8.removed
    assert f"{GGUF}@Q8_0: skip README.md (unchanged)" in plan.operations()
    assert not hub.requests("POST") and not hub.requests("PUT")


def test_private_repos_when_asked(hub: HubServer, tmp_path: Path) -> None:
    b = _built(tmp_path, recipe_text=DEMO_RECIPE + '\n[publish]\nowner = "acme"\nprivate = true\n')
    report = _publish(b)
    assert report.owner == "acme" and not hub.requests("GET", "whoami")
    assert hub.repo("acme/tiny_german-GPTQ").private and hub.repo("acme/tiny_german-GGUF").private


def test_hash_cache_is_keyed_by_path_size_and_mtime(hub: HubServer, tmp_path: Path) -> None:
    b = _built(tmp_path)
    first = _publish(b)
    # each file once: 15 built files and the picture beside each of the 5 cards
    assert first.hashed_files == sum(len(r.files) for r in b.manifest.variants.values()) + 5 == 20
    weights = b.folder("gguf-Q8_0") / "tiny_german.Q8_0.gguf"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    again = _publish(b)
    assert again.hashed_files == 1 and again.commits == 0  # re-read, same content: no commit


def test_file_changed_after_build_is_refused(hub: HubServer, tmp_path: Path) -> None:
    b = _built(tmp_path)
    weights = b.folder("gguf-Q8_0") / "tiny_german.Q8_0.gguf"
    weights.write_bytes(weights.read_bytes()[::-1])
    report = _publish(b)
    failed = [x for x in report.branches if x.status == "failed"]
    # its branch, and main, which holds every GGUF file
    assert [x.variant for x in failed] == ["gguf-Q4_K_M", "gguf-Q8_0"]
    assert all("tiny_german.Q8_0.gguf changed since it was built" in (x.error or "") for x in failed)
    assert "Q8_0" not in hub.repo(GGUF).branches  # refused before anything was created


# ---------------------------------------------------------------- token, environment, protocol


def test_token_never_reaches_reports_manifest_or_cards(hub: HubServer, tmp_path: Path,
                                                       no_backoff: list[float]) -> None:
    b = _built(tmp_path)
    hub.faults.echo_credentials("POST", r"/commit/", status=500, times=publish.COMMIT_ATTEMPTS)
    report = _publish(b)
    failed = [x for x in report.branches if x.status == "failed"]
    assert failed and "you sent Bearer ***" in (failed[0].error or "")
    dumped = repr(report) + json.dumps(report.manifest.to_json())
    dumped += "".join(p.read_text(errors="replace") for p in b.out.rglob("*") if p.is_file() and p.stat().st_size
                      < 1_000_000)
    assert hub.token not in dumped


def test_no_token_is_one_clear_error(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = _built(tmp_path)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(publish.PublishError, match="HF_TOKEN"):
        _publish(b)


def test_token_from_the_login_store(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    Path(constants.HF_TOKEN_PATH).write_text(hub.token)  # what `hf auth login` writes (temp HF_HOME)
    assert _publish(_built(tmp_path)).ok


def test_xet_refused_falls_back_to_plain_lfs(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("hf_xet")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    b = _built(tmp_path)
    report = _publish(b)
    assert report.ok and report.commits == 5
    assert any("plain LFS" in n for n in report.notes)
    assert hub.requests("GET", "xet-write-token") and constants.HF_HUB_DISABLE_XET


def test_env_set_before_import_in_a_fresh_process(hub: HubServer, tmp_path: Path) -> None:
    """The CLI's situation: HF_ENDPOINT, HF_HUB_DISABLE_XET and HF_TOKEN set before import."""
    script = textwrap.dedent(f"""
        from pathlib import Path
        from quantkit.testing.fabricate import fabricate_build
        from quantkit import card, publish
        b = fabricate_build(Path({str(tmp_path / "sub")!r}))
        m = card.write_cards(b.plan, b.manifest, b.out)
        r = publish.publish(b.plan, m, b.out)
        print(r.ok, r.commits, r.endpoint)
    """)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": hub.token,
           "HF_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "5", hub.url]
    assert hub.token not in out.stdout + out.stderr
    assert not hub.requests("GET", "xet-write-token")


def test_readme_per_branch_marks_its_own_row(hub: HubServer, tmp_path: Path) -> None:
    b = _built(tmp_path)
    _publish(b)
    for repo, branches in BRANCHES.items():
        tables = set()
        for br in branches:
            text = hub.files(repo, br)["README.md"].decode()
            marked = [ln for ln in text.splitlines() if "(this branch)" in ln]
            assert len(marked) == 1 and f"| **[{br}](" in marked[0]
            tables.add("\n".join(ln.replace("**", "").replace(" (this branch)", "")
                                 for ln in text.splitlines() if ln.startswith("| [") or ln.startswith("| **[")))
        assert len(tables) == 1  # the same table in every branch


def test_hub_server_serves_dataset_repos(hub: HubServer, tmp_path: Path) -> None:
    """For calibration tests: a dataset repo seeded directly, read through HfApi and hf_hub_download."""
    from huggingface_hub import HfApi, hf_hub_download

    squad = {"data": [{"paragraphs": [{"context": "Berlin ist die Hauptstadt.", "qas": [
        {"question": "Was ist die Hauptstadt?", "answers": [{"text": "Berlin"}]}]}]}]}
    hub.seed("deepset/germanquad", {"GermanQuAD_train.json": json.dumps(squad)}, repo_type="dataset")
    hub.seed("deepset/germanquad", {"default/train/0000.parquet": b"PAR1\0fake"}, repo_type="dataset",
             revision="refs/convert/parquet")
    api = HfApi()
    assert api.list_repo_files("deepset/germanquad", repo_type="dataset") == [".gitattributes",
                                                                             "GermanQuAD_train.json"]
    assert "default/train/0000.parquet" in api.list_repo_files("deepset/germanquad", repo_type="dataset",
                                                                 revision="refs/convert/parquet")
    path = hf_hub_download("deepset/germanquad", "GermanQuAD_train.json", repo_type="dataset")
    assert json.loads(Path(path).read_text()) == squad
    assert [c.name for c in api.list_repo_refs("deepset/germanquad", repo_type="dataset").converts] == ["parquet"]


def test_paginated_trees_and_multipart_uploads(hub: HubServer, tmp_path: Path) -> None:
    """The Hub pages long tree listings and asks for big files in parts: both paths work."""
    hub.page_size = 2
    hub.multipart_chunk = 250_000
    b = _built(tmp_path, weight_bytes=600_000)
    assert _publish(b).ok
    assert len(hub.requests("PUT", r"/\d+$")) == 5 * 3  # 600 kB in parts of 250 kB, per weights file
    assert hub.files(GPTQ, "main")["model.safetensors"] == (b.folder("gptq-4bit-128g-actorder_True")
                                                            / "model.safetensors").read_bytes()
    hub.reset_log()
    again = _publish(b)
    assert again.commits == 0 and len(hub.requests("GET", "/tree/")) > len(again.branches)  # followed the pages


def test_calibration_reads_a_dataset_from_this_hub(hub: HubServer) -> None:
    from quantkit.calibration import load_items

    squad = {"data": [{"paragraphs": [{"context": "Berlin ist die Hauptstadt.", "qas": [
        {"question": "Was ist die Hauptstadt?", "answers": [{"text": "Berlin"}]}]}]}]}
    hub.seed("deepset/germanquad", {"data/train.json": json.dumps(squad)}, repo_type="dataset")
    items, label = load_items("deepset/germanquad", "train")
    assert [it.context for it in items] == ["Berlin ist die Hauptstadt."] and "deepset/germanquad" in label
