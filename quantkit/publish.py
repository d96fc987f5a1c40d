"""Publish built variants: one Hub repo per format, one branch per variant, one commit per branch.

What is published: every evaluated variant within the recipe's quality gate, after the Hub's
file-size limit was checked for all of them. Each goes to its own branch, which starts empty
from the repo's initial commit (never a copy of main); a format whose tools read main
(FormatSpec.ladder_on_main) also gets every variant's files on main. Each branch carries the
card rendered now, with its own row marked; the repos go into the recipe's collection.

Idempotent and resumable: a branch whose files are all on the Hub already gets no commit, and
a re-run with nothing changed uploads nothing. The Hub side (comparing trees, uploads,
retries, the commit with its parent and the lost-answer check) is in hubio.py, which leaves
to huggingface_hub what it already does. Local sha256s are cached by path, size and mtime
(`HashCache`), so multi-GB files are read once.

The token (HF_TOKEN or the `hf auth login` store) is only handed to huggingface_hub; it never
appears in reports, errors, manifests or cards.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import atomic, card
from .errors import GateRefused, PublishError
from .hubio import COMMIT_ATTEMPTS, HashCache, LocalFile, Remote, Retry, git_blob_id
from .hubio import collect, diff, open_api, operations, scrub, token_of, why
from .manifest import Manifest, State, VariantRecord
from .plan import Plan, repo_for
from .recipe import SPECS
from .records import ProgressFn, PublishedRecord
from .variant import Variant

if TYPE_CHECKING:
    from huggingface_hub import HfApi

HASH_CACHE = ".quantkit-hashes.json"  # in the build folder, never uploaded

_sleep: Callable[[float], None] = time.sleep  # the waits between retries; tests replace it


# ---------------------------------------------------------------- reports


@dataclass(frozen=True)
class FileOp:
    path: str
    size: int


@dataclass(frozen=True)
class BranchReport:
    variant: str
    repo: str
    branch: str
    status: str  # "committed" | "unchanged" | "planned" (dry run) | "failed"
    create_branch: bool = False  # the branch was (dry run: would be) created
    added: tuple[FileOp, ...] = ()  # new or changed files, uploaded in the commit
    removed: tuple[str, ...] = ()  # remote files the folder no longer has
    skipped: tuple[FileOp, ...] = ()  # unchanged files
    ignored: tuple[str, ...] = ()  # files in the folder the manifest does not list
    commit: str | None = None  # the commit this run made
    head: str | None = None  # the branch's commit afterwards
    attempts: int = 0  # commit POSTs sent
    error: str | None = None

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.added)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


@dataclass(frozen=True)
class RepoReport:
    repo: str
    private: bool
    created: bool  # created now (dry run: would be)
    error: str | None = None


@dataclass(frozen=True)
class PublishReport:
    endpoint: str
    owner: str | None
    dry_run: bool
    repos: tuple[RepoReport, ...]
    branches: tuple[BranchReport, ...]
    not_ready: tuple[tuple[str, str], ...]  # (variant, why it was left out)
    manifest: Manifest
    hashed_files: int  # files read to hash this run (the rest came from the cache)
    hashed_bytes: int
    seconds: float
    notes: tuple[str, ...] = ()
    gated: tuple[tuple[str, str], ...] = ()  # (variant, why): over the recipe's quality gate
    collection: str | None = None  # the recipe's Hub collection (slug)
    collection_error: str | None = None

    @property
    def ok(self) -> bool:
        return (all(r.error is None for r in self.repos) and all(b.status != "failed" for b in self.branches)
                and not self.gated and self.collection_error is None)

    @property
    def commits(self) -> int:
        return sum(1 for b in self.branches if b.commit)

    @property
    def bytes(self) -> int:
        return sum(b.bytes for b in self.branches)

    def operations(self) -> list[str]:
        """Every operation, one line each, in order (what --dry-run shows)."""
        would = "would " if self.dry_run else ""
        out = [f"{would}create repo {r.repo}" + (" (private)" if r.private else "") for r in self.repos if r.created]
        for b in self.branches:
            at = f"{b.repo}@{b.branch}"
            if b.create_branch:
                out.append(f"{would}create branch {at} (empty, from the initial commit)")
            out += [f"{at}: {would}add {f.path} ({f.size} bytes)" for f in b.added]
            out += [f"{at}: {would}remove {p}" for p in b.removed]
            out += [f"{at}: skip {f.path} (unchanged)" for f in b.skipped]
            out += [f"{at}: ignore {p} (not in the manifest)" for p in b.ignored]
            if b.status == "failed":
                out.append(f"{at}: FAILED: {b.error}")
            elif b.changed:
                out.append(f"{at}: {would}commit {len(b.added)} added, {len(b.removed)} removed, {b.bytes} bytes"
                           + (f" -> {b.commit}" if b.commit else ""))
            else:
                out.append(f"{at}: no commit (nothing changed)")
        out += [f"{name}: not published ({why})" for name, why in self.not_ready]
        out += [f"{name}: refused by the quality gate: {why}" for name, why in self.gated]
        if self.collection:
            out.append(f"collection {self.collection}")
        return out

    def raise_for_errors(self) -> None:
        """Raise PublishError for the first failed repo or branch (after saving the manifest)."""
        for r in self.repos:
            if r.error:
                raise PublishError(r.repo, r.error)
        for b in self.branches:
            if b.status == "failed":
                raise PublishError(b.repo, b.error or "failed", b.branch)
        if self.collection_error:
            raise PublishError("collection", self.collection_error)
        if self.gated:
            raise GateRefused(dict(self.gated))


# ---------------------------------------------------------------- one branch


@dataclass
class _Ctx:
    api: HfApi
    plan: Plan
    out_dir: Path
    cache: HashCache
    readmes: dict[str, str]
    dry_run: bool
    token: str | None
    retry: Retry
    notes: list[str] = field(default_factory=list)


def _variant_files(ctx: _Ctx, v: Variant, rec: VariantRecord) -> list[LocalFile]:
    """The files the manifest lists for a variant (its README aside), as they lie in its folder."""
    folder = ctx.plan.variant_dir(v)
    out: list[LocalFile] = []
    for f in rec.files:
        if f.path == card.README:
            continue
        p = folder / f.path
        if not p.is_file():
            raise PublishError("", f"{p} is missing: the manifest lists it; rebuild {v.name}")
        out.append(LocalFile(f.path, p.stat().st_size, p, functools.partial(ctx.cache.sha256, p), f.sha256 or None))
    return out


def _ladder(ctx: _Ctx, manifest: Manifest, v: Variant, siblings: list[Variant]) -> list[LocalFile]:
    """For a format whose tools read main (FormatSpec.ladder_on_main): the files of the repo's
    other variants, which main holds too. The same name must mean the same bytes."""
    if v.branch != "main" or not SPECS[v.format].ladder_on_main:
        return []
    own = {f.path: f for f in _variant_files(ctx, v, manifest.variants[v.name])}
    out: list[LocalFile] = []
    for s in siblings:
        if s.name == v.name:
            continue
        for f in _variant_files(ctx, s, manifest.variants[s.name]):
            same = own.get(f.path)
            if same is not None and (same.expected or same.sha256()) != (f.expected or f.sha256()):
                raise PublishError("", f"{s.name} and another variant both write {f.path} with different "
                                   "contents; main cannot hold both")
            if same is None:
                own[f.path] = f
                out.append(f)
    return out


def _local_files(ctx: _Ctx, v: Variant, rec: VariantRecord,
                 extra: Sequence[LocalFile] = ()) -> tuple[list[LocalFile], list[str]]:
    """The manifest's files (and `extra`: other variants' files main holds) plus the README
    rendered now; and the folder's unlisted files."""
    folder = ctx.plan.variant_dir(v)
    out = _variant_files(ctx, v, rec) + list(extra)
    text = ctx.readmes[v.name].encode("utf-8")
    out.append(LocalFile(card.README, len(text), text, lambda: hashlib.sha256(text).hexdigest()))
    picture = folder / card.CHART  # the card shows it: it goes where the card goes
    if picture.is_file():
        out.append(LocalFile(card.CHART, picture.stat().st_size, picture, functools.partial(ctx.cache.sha256, picture)))
    listed = {f.path for f in out}
    ignored = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                     if p.is_file() and p.relative_to(folder).as_posix() not in listed) if folder.is_dir() else []
    return out, ignored


def _check(local: list[LocalFile]) -> None:
    """The files must be the ones the build measured (hashes come from the cache)."""
    for f in local:
        if f.expected and f.sha256() != f.expected:
            raise PublishError("", f"{f.path} changed since it was built and measured "
                               "(its sha256 differs from the manifest); rebuild the variant")


def _branch(ctx: _Ctx, remote: Remote | None, v: Variant, repo: str, rec: VariantRecord,
            extra: Sequence[LocalFile] = ()) -> BranchReport:
    local, ignored = _local_files(ctx, v, rec, extra)
    _check(local)
    head = remote.refs.get(v.branch) if remote else None
    created = head is None
    if head is None and remote is not None and not ctx.dry_run:
        head = remote.create_branch(v.branch)
    tree = remote.tree(head) if (remote is not None and head is not None) else {}
    added, skipped, removed = diff(local, tree)
    report = BranchReport(v.name, repo, v.branch, "planned", create_branch=created, ignored=tuple(ignored),
                          added=tuple(FileOp(f.path, f.size) for f in added), removed=tuple(removed),
                          skipped=tuple(FileOp(f.path, f.size) for f in skipped), head=head)
    if ctx.dry_run:
        return report
    assert remote is not None and head is not None
    if not report.changed:
        return replace(report, status="unchanged")
    tries: list[int] = []
    try:
        ops = operations(added, removed)
        note = remote.upload(v.branch, ops)
        if note:
            ctx.notes.append(note)
        message = f"{v.name}: {len(added)} file(s) added or changed, {len(removed)} removed"
        commit = remote.commit(v.branch, ops, head, message, local, tries)
    except Exception as e:  # noqa: BLE001 - the report keeps what was planned and why it failed
        return replace(report, status="failed", error=why(e, ctx.token), attempts=len(tries))
    return replace(report, status="committed", commit=commit, head=commit, attempts=len(tries))


# ---------------------------------------------------------------- the whole plan


def _owner(plan: Plan, api: HfApi, token: str | None, variants: list[Variant], retry: Retry) -> str | None:
    """The recipe's owner; else, when a repo name needs one, whom the token belongs to."""
    if plan.recipe.publish.owner:
        return plan.recipe.publish.owner
    if not any("{owner}" in v.repo for v in variants):
        return None
    if not token:
        raise PublishError(variants[0].repo, "no [publish] owner and no Hub token to ask for one: "
                           "set HF_TOKEN or run `hf auth login`")
    try:
        return str(retry(lambda: api.whoami(token=token))["name"])  # a single GET in huggingface_hub
    except Exception as e:  # noqa: BLE001 - one message whatever the cause
        raise PublishError(variants[0].repo, scrub(f"cannot ask the Hub who the token belongs to: {e}",
                                                   token)) from None


def _gate(plan: Plan, manifest: Manifest, ready: list[Variant], force: bool
          ) -> tuple[list[Variant], list[tuple[str, str]]]:
    """Split off the variants whose measured quality is over the recipe's limits (`force`: none)."""
    if force:
        return ready, []
    passed, gated = [], []
    for v in ready:
        failures = plan.recipe.publish.gate(v.format).failures(manifest.variants[v.name].quality)
        (gated.append((v.name, "; ".join(failures))) if failures else passed.append(v))
    return passed, gated


def _ready(plan: Plan, manifest: Manifest, only: list[str] | None) -> tuple[list[Variant], list[tuple[str, str]]]:
    ready, left = [], []
    for v in plan.select(only):
        rec = manifest.variants.get(v.name)
        if rec is None:
            left.append((v.name, "not built"))
        elif rec.state == State.FAILED:
            left.append((v.name, f"its build failed: {rec.error or 'see the build log'}"))
        elif not rec.at_least(State.EVALUATED):
            left.append((v.name, f"state {rec.state}: only evaluated variants are published"))
        else:
            ready.append(v)
    return ready, left


def _readmes(ctx: _Ctx, manifest: Manifest, owner: str | None, ready: list[Variant]) -> dict[str, str]:
    """Cards rendered now (the owner is known now); written to the folders unless dry run,
    so a folder keeps holding what its branch holds."""
    original = card.load_original_card(ctx.plan.recipe, out_dir=ctx.out_dir)
    texts = {v.name: card.render_card(ctx.plan, manifest, v.name, owner=owner, original=original) for v in ready}
    if not ctx.dry_run:
        for name, text in texts.items():
            path = ctx.out_dir / name / card.README
            if path.parent.is_dir() and (not path.is_file() or path.read_text(encoding="utf-8") != text):
                atomic.write_text(path, text)
    return texts


def _mark(manifest: Manifest, b: BranchReport) -> Manifest:
    if b.status not in ("committed", "unchanged") or b.head is None:
        return manifest
    rec = manifest.variants[b.variant]
    return manifest.with_variant(b.variant, rec.moved_to(State.PUBLISHED,
                                                    published=PublishedRecord(b.repo, b.branch, b.head)))


def publish(plan: Plan, manifest: Manifest, out_dir: Path, *, dry_run: bool = False,
            only: list[str] | None = None, api: HfApi | None = None,
            progress: ProgressFn | None = None, force: bool = False) -> PublishReport:
    """Push every evaluated variant (or those in `only`) to its repo and branch, and the repos
    to the recipe's collection.

    Returns what was done (or, with dry_run, what would be) and the manifest with each
    published variant's commit; the caller saves it. A failing repo or branch, or a variant
    over the recipe's quality gate (`force` overrides it), does not stop the others: see
    `PublishReport.ok` / `raise_for_errors()`.
    """
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    t0 = time.perf_counter()
    api = open_api(api)
    token = token_of(api)
    retry = Retry(sleep=_sleep)
    ready, left = _ready(plan, manifest, only)
    ready, gated = _gate(plan, manifest, ready, force)
    refuse_oversized(plan, manifest, ready)  # before any Hub request
    if ready and not dry_run and not token:
        raise PublishError(ready[0].repo, "no Hub token: set HF_TOKEN or run `hf auth login`")
    owner = _owner(plan, api, token, ready, retry) if ready else plan.recipe.publish.owner
    ctx = _Ctx(api, plan, Path(out_dir), HashCache(Path(out_dir) / HASH_CACHE), {}, dry_run, token, retry)
    bars_were_off = are_progress_bars_disabled()
    disable_progress_bars()  # the library never prints; the CLI draws progress
    if ready and not card.base_model(plan.recipe):
        ctx.notes.append("the cards have no base_model, so the Hub cannot link these repos to the original: "
                         "set [model] base_model = \"owner/name\" in the recipe")
    collection: tuple[str | None, str | None] = (None, None)
    try:
        ctx.readmes = _readmes(ctx, manifest, owner, ready)
        repos, branches = _publish_all(ctx, manifest, ready, owner, progress)
        if plan.recipe.publish.collection and not dry_run:
            collection = _collect(ctx, owner, [r.repo for r in repos if r.error is None and any(
                b.repo == r.repo and b.status in ("committed", "unchanged") for b in branches)])
    finally:
        if not bars_were_off:
            enable_progress_bars()
        ctx.cache.save()
    for b in branches:
        manifest = _mark(manifest, b)
    return PublishReport(api.endpoint, owner, dry_run, tuple(repos), tuple(branches), tuple(left), manifest,
                         ctx.cache.hashed_files, ctx.cache.hashed_bytes, time.perf_counter() - t0,
                         tuple(ctx.notes), tuple(gated), *collection)


def collection_title(plan: Plan) -> str:
    """One collection per recipe, named after the model (the Hub keeps titles short)."""
    m = plan.recipe.model
    return f"{m.display_name or m.model_name} quantized"[:60]


def _collect(ctx: _Ctx, owner: str | None, repos: list[str]) -> tuple[str | None, str | None]:
    """Create (or find) the recipe's collection and add every repo published; a re-run changes
    nothing. Returns (slug, error)."""
    if not repos:
        return None, None
    try:
        return collect(ctx.api, ctx.retry, collection_title(ctx.plan), owner, ctx.plan.recipe.publish.private,
                       repos), None
    except Exception as e:  # noqa: BLE001 - the branches are published; the report says what failed
        return None, why(e, ctx.token)


def _publish_all(ctx: _Ctx, manifest: Manifest, ready: list[Variant], owner: str | None,
                 progress: ProgressFn | None) -> tuple[list[RepoReport], list[BranchReport]]:
    groups: dict[str, list[Variant]] = {}
    for v in ready:
        groups.setdefault(repo_for(ctx.plan.recipe, v.format, owner), []).append(v)
    repos: list[RepoReport] = []
    branches: list[BranchReport] = []
    for repo, variants in groups.items():
        rr, remote = _open_repo(ctx, repo)
        repos.append(rr)
        for v in variants:
            if progress:
                progress(f"publish {repo}@{v.branch}", len(branches), len(ready))
            if rr.error:
                branches.append(BranchReport(v.name, repo, v.branch, "failed", error=rr.error))
                continue
            try:
                extra = _ladder(ctx, manifest, v, variants)
                branches.append(_branch(ctx, remote, v, repo, manifest.variants[v.name], extra))
            except Exception as e:  # noqa: BLE001 - reported per branch; the others go on
                branches.append(BranchReport(v.name, repo, v.branch, "failed", error=why(e, ctx.token)))
    if progress:
        progress("publish", len(branches), len(ready))
    return repos, branches


def _open_repo(ctx: _Ctx, repo: str) -> tuple[RepoReport, Remote | None]:
    private = ctx.plan.recipe.publish.private
    remote = Remote(ctx.api, repo, ctx.retry)
    try:
        if remote.load_refs():
            return RepoReport(repo, private, created=False), remote
        if ctx.dry_run:
            return RepoReport(repo, private, created=True), None
        remote.create_repo(private)
        if not remote.load_refs():
            return RepoReport(repo, private, True, f"created {repo} but cannot read it back"), None
        return RepoReport(repo, private, created=True), remote
    except Exception as e:  # noqa: BLE001 - every branch of the repo reports it
        return RepoReport(repo, private, created=False, error=why(e, ctx.token)), None


__all__ = ["publish", "PublishReport", "BranchReport", "RepoReport", "FileOp", "HashCache", "git_blob_id",
           "refuse_oversized", "collection_title", "COMMIT_ATTEMPTS", "PublishError"]


# ---------------------------------------------------------------- the Hub's file size limit


def refuse_oversized(plan: Plan, manifest: Manifest, variants: list[Variant]) -> None:
    """The Hub refuses a file over its limit after the upload: refuse the whole publish before
    anything is sent, naming every such file and its size (the size on disk, what would go up)."""
    from .formats import HUB_FILE_LIMIT, human_size

    big = []
    for v in variants:
        folder = plan.variant_dir(v)
        for f in manifest.variants[v.name].files:
            p = folder / f.path
            size = p.stat().st_size if p.is_file() else f.size
            if size > HUB_FILE_LIMIT:
                big.append((v, f"{v.name}/{f.path} ({human_size(size)})"))
    if big:
        names = sorted({v.name for v, _ in big})
        raise PublishError(big[0][0].repo, f"{', '.join(d for _, d in big)}: over the Hub's "
                           f"{human_size(HUB_FILE_LIMIT)} file limit; nothing was uploaded. Set a smaller "
                           f"split_max_size (default 20G) and rebuild {' '.join(names)}")
