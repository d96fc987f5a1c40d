"""Publish built variants: one Hub repo per format, one branch per variant, one commit per branch.

Idempotent and resumable. Each branch's remote tree is compared with the variant's folder
first: files whose remote LFS sha256 (or git blob id, for small files) equals the local one are
skipped, so a re-run with nothing changed makes no commit and uploads nothing. Local sha256s
are cached by path, size and mtime, so multi-GB files are read once. Non-main branches start
empty from the repo's initial commit, never as a copy of main. The commit POST is retried on
429/5xx with backoff (or the server's Retry-After) and `parent_commit`, so a retry can never
fork the branch; when an attempt landed but its answer was lost, the retry sees the branch
moved, finds our files there and takes that commit. The other requests huggingface_hub sends
only once (refs, branch and repo creation, whoami) and the LFS upload are idempotent and
retried the same way.

The token (HF_TOKEN or the `hf auth login` store) is only handed to huggingface_hub; it never
appears in reports, errors, manifests or cards.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import atomic, card
from .records import ProgressFn, PublishedRecord, sha256_file
from .errors import GateRefused, PublishError
from .manifest import Manifest, VariantRecord
from .plan import Plan, Variant, repo_for
from .recipe import SPECS

if TYPE_CHECKING:
    from huggingface_hub import HfApi

COMMIT_ATTEMPTS = 5  # tries of one Hub request (a commit POST, ...) before giving up
BACKOFF_SECONDS = 1.0  # first wait; doubles per attempt
BACKOFF_MAX = 30.0
RETRY_AFTER_MAX = 300.0  # a server's Retry-After is honoured up to this
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
MOVED_STATUS = (409, 412)  # the branch is no longer at parent_commit
KEEP = frozenset({".gitattributes"})  # files of the Hub's initial commit a branch keeps
HASH_CACHE = ".quantkit-hashes.json"  # in the build folder, never uploaded

_sleep: Callable[[float], None] = time.sleep  # tests replace it
T = TypeVar("T")


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


# ---------------------------------------------------------------- hashing


class HashCache:
    """sha256 of local files keyed by path, size and mtime: a multi-GB file is read once."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, list[Any]] = {}
        self.dirty = False
        self.hashed_files = 0
        self.hashed_bytes = 0
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            self.entries = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            self.entries = {}

    def sha256(self, f: Path) -> str:
        st = f.stat()
        key = str(f.resolve())
        hit = self.entries.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return str(hit[2])
        digest = sha256_file(f)
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        self.dirty, self.hashed_files, self.hashed_bytes = True, self.hashed_files + 1, self.hashed_bytes + st.st_size
        return digest

    def save(self) -> None:
        if not self.dirty:
            return
        atomic.write_text(self.path, json.dumps(self.entries))
        self.dirty = False


def git_blob_id(data: bytes) -> str:
    """The git object id the Hub reports for a small (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 - git's id


@dataclass(frozen=True)
class LocalFile:
    path: str  # in the repo
    size: int
    source: Path | bytes  # file on disk, or content (the README)
    sha256: Callable[[], str]
    expected: str | None = None  # sha256 the manifest recorded at build time

    def blob_id(self) -> str:
        data = self.source if isinstance(self.source, bytes) else self.source.read_bytes()
        return git_blob_id(data)


# ---------------------------------------------------------------- the Hub side


def _api(api: HfApi | None) -> HfApi:
    if api is not None:
        return api
    from huggingface_hub import HfApi

    # HF_ENDPOINT is read at import by huggingface_hub; read it again in case it was set later.
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)


def _token(api: HfApi) -> str | None:
    from huggingface_hub import get_token

    tok = api.token if isinstance(api.token, str) else None
    return tok or get_token()


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _status(e: BaseException) -> int | None:
    resp = getattr(e, "response", None)
    return getattr(resp, "status_code", None)


def _is_transport_error(e: BaseException) -> bool:
    """httpx-family network failures (the client library's HTTP stack), by class name."""
    return any(c.__name__ in ("TransportError", "TimeoutException") for c in type(e).__mro__)


def _retry_after(e: BaseException) -> float | None:
    resp = getattr(e, "response", None)
    try:
        return max(0.0, float(resp.headers.get("Retry-After")))  # type: ignore[union-attr]
    except (AttributeError, TypeError, ValueError):
        return None


def _transient(e: BaseException) -> bool:
    """Worth the same request again: rate limited, a server error, or the network failed."""
    status = _status(e)
    return status in RETRY_STATUS or (status is None and _is_transport_error(e))


def _backoff(e: BaseException, attempt: int) -> float:
    """The server's Retry-After when it sent one, else exponential backoff."""
    wait = _retry_after(e)
    if wait is not None:
        return min(RETRY_AFTER_MAX, wait)
    return min(BACKOFF_MAX, BACKOFF_SECONDS * 2 ** (attempt - 1))


def _retrying(call: Callable[[], T], tries: list[int] | None = None) -> T:
    """Send an idempotent Hub request again on transient failures: the commit, and the requests
    huggingface_hub sends only once (refs, branch and repo creation, whoami). `tries` gets
    one entry per attempt."""
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        if tries is not None:
            tries.append(attempt)
        try:
            return call()
        except Exception as e:
            if not _transient(e) or attempt == COMMIT_ATTEMPTS:
                raise
            _sleep(_backoff(e, attempt))
    raise AssertionError("unreachable")


class _Remote:
    """One repo's refs and trees; trees are cached by commit id (new branches share one)."""

    def __init__(self, api: HfApi, repo: str):
        self.api, self.repo = api, repo
        self.refs: dict[str, str] = {}
        self._trees: dict[str, dict[str, Any]] = {}
        self._initial: str | None = None

    def load_refs(self) -> bool:
        """Read the branches; False when the repo does not exist."""
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            refs = _retrying(lambda: self.api.list_repo_refs(self.repo))
        except RepositoryNotFoundError:
            return False
        self.refs = {b.name: b.target_commit for b in refs.branches}
        return True

    def tree(self, commit: str) -> dict[str, Any]:
        if commit not in self._trees:
            from huggingface_hub.hf_api import RepoFile

            entries = self.api.list_repo_tree(self.repo, revision=commit, recursive=True)
            self._trees[commit] = {e.path: e for e in entries if isinstance(e, RepoFile)}
        return self._trees[commit]

    def create_branch(self, branch: str) -> str:
        """An empty branch from the repo's initial commit; returns its commit id."""
        if self._initial is None:
            self._initial = self.api.list_repo_commits(self.repo, revision="main")[-1].commit_id
        initial, tries = self._initial, []
        _retrying(lambda: self.api.create_branch(self.repo, branch=branch, revision=initial, exist_ok=True), tries)
        if len(tries) > 1:  # an attempt whose answer was lost may have created it: read where it is
            self.load_refs()
            return self.refs.setdefault(branch, initial)
        self.refs[branch] = initial
        return initial


def _same(remote: Any, local: LocalFile) -> bool:
    if remote is None or remote.size != local.size:
        return False
    if remote.lfs is not None:
        return bool(remote.lfs.sha256 == local.sha256())
    return bool(remote.blob_id == local.blob_id())


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
        out.append(LocalFile(f.path, p.stat().st_size, p, lambda p=p: ctx.cache.sha256(p), f.sha256 or None))
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


def _diff(local: list[LocalFile], remote: dict[str, Any]) -> tuple[list[LocalFile], list[LocalFile], list[str]]:
    added, skipped = [], []
    for f in local:
        (skipped if _same(remote.get(f.path), f) else added).append(f)
    names = {f.path for f in local}
    removed = sorted(p for p in remote if p not in names and p not in KEEP)
    return added, skipped, removed


def _operations(added: list[LocalFile], removed: list[str]) -> list[Any]:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ops: list[Any] = []
    for f in added:
        op = CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=f.source if isinstance(f.source, bytes)
                                else str(f.source))
        if not isinstance(f.source, bytes):
            op.upload_info.sha256 = bytes.fromhex(f.sha256())  # hashed once already: no second read
        ops.append(op)
    return ops + [CommitOperationDelete(path_in_repo=p) for p in removed]


def _upload(ctx: _Ctx, repo: str, branch: str, ops: list[Any]) -> None:
    """Upload the LFS files of a commit (before it, so a commit retry re-sends no content)."""
    from huggingface_hub import CommitOperationAdd, constants

    adds = [op for op in ops if isinstance(op, CommitOperationAdd)]
    try:
        ctx.api.preupload_lfs_files(repo, additions=adds, revision=branch, free_memory=False)
    except Exception as e:
        if constants.HF_HUB_DISABLE_XET or "xet" not in f"{type(e).__module__} {e}".lower():
            raise
        # This endpoint has no Xet storage (DESIGN §4): plain LFS from now on, as
        # HF_HUB_DISABLE_XET=1 would have chosen at import.
        constants.HF_HUB_DISABLE_XET = True
        ctx.notes.append(f"{ctx.api.endpoint} refused the Xet upload; switched to plain LFS uploads")
        ctx.api.preupload_lfs_files(repo, additions=adds, revision=branch, free_memory=False)


def _commit(ctx: _Ctx, remote: _Remote, branch: str, ops: list[Any], parent: str, message: str,
            local: list[LocalFile], tries: list[int]) -> str:
    """Create the commit; retried on 429/5xx and lost answers without ever forking the branch:
    with `parent_commit`, a repeat of a POST that landed fails with 412. `tries` gets one
    entry per POST sent."""
    def post() -> str:
        try:
            info = ctx.api.create_commit(remote.repo, ops, commit_message=message, revision=branch,
                                         parent_commit=parent)
            return str(info.oid)
        except Exception as e:
            landed = _landed(remote, branch, local) if _status(e) in MOVED_STATUS and len(tries) > 1 else None
            if landed:
                return landed  # an earlier attempt landed; its answer was lost
            raise

    return _retrying(post, tries)


def _landed(remote: _Remote, branch: str, local: list[LocalFile]) -> str | None:
    """The branch head if it holds exactly our files, else None."""
    remote.load_refs()
    head = remote.refs.get(branch)
    if head is None:
        return None
    tree = remote.tree(head)
    names = {f.path for f in local}
    ok = all(_same(tree.get(f.path), f) for f in local) and not (set(tree) - names - KEEP)
    return head if ok else None


def _branch(ctx: _Ctx, remote: _Remote | None, v: Variant, repo: str, rec: VariantRecord,
            extra: Sequence[LocalFile] = ()) -> BranchReport:
    base = BranchReport(v.name, repo, v.branch, "planned")
    local, ignored = _local_files(ctx, v, rec, extra)
    _check(local)
    head = remote.refs.get(v.branch) if remote else None
    created = head is None
    if head is None and remote is not None and not ctx.dry_run:
        head = remote.create_branch(v.branch)
    tree = remote.tree(head) if (remote is not None and head is not None) else {}
    added, skipped, removed = _diff(local, tree)
    report = replace(base, create_branch=created, ignored=tuple(ignored),
                     added=tuple(FileOp(f.path, f.size) for f in added), removed=tuple(removed),
                     skipped=tuple(FileOp(f.path, f.size) for f in skipped), head=head)
    if ctx.dry_run:
        return report
    assert remote is not None and head is not None
    if not report.changed:
        return replace(report, status="unchanged")
    tries: list[int] = []
    try:
        ops = _operations(added, removed)
        # Content-addressed and skipping what already arrived: safe to run again.
        _retrying(lambda: _upload(ctx, repo, v.branch, ops))
        message = f"{v.name}: {len(added)} file(s) added or changed, {len(removed)} removed"
        commit = _commit(ctx, remote, v.branch, ops, head, message, local, tries)
    except Exception as e:  # noqa: BLE001 - the report keeps what was planned and why it failed
        return replace(report, status="failed", error=_why(e, ctx.token), attempts=len(tries))
    remote.refs[v.branch] = commit
    return replace(report, status="committed", commit=commit, head=commit, attempts=len(tries))


# ---------------------------------------------------------------- the whole plan


def _owner(plan: Plan, api: HfApi, token: str | None, variants: list[Variant]) -> str | None:
    """The recipe's owner; else, when a repo name needs one, whom the token belongs to."""
    if plan.recipe.publish.owner:
        return plan.recipe.publish.owner
    if not any("{owner}" in v.repo for v in variants):
        return None
    if not token:
        raise PublishError(variants[0].repo, "no [publish] owner and no Hub token to ask for one: "
                           "set HF_TOKEN or run `hf auth login`")
    try:
        return str(_retrying(lambda: api.whoami(token=token))["name"])
    except Exception as e:  # noqa: BLE001 - one message whatever the cause
        raise PublishError(variants[0].repo, _scrub(f"cannot ask the Hub who the token belongs to: {e}",
                                                    token)) from None


def _gate(plan: Plan, manifest: Manifest, ready: list[Variant], force: bool
          ) -> tuple[list[Variant], list[tuple[str, str]]]:
    """Split off the variants whose measured quality is over the recipe's limits (`force`: none)."""
    if force:
        return ready, []
    passed, gated = [], []
    for v in ready:
        why = plan.recipe.publish.gate(v.format).failures(manifest.variants[v.name].quality)
        (gated.append((v.name, "; ".join(why))) if why else passed.append(v))
    return passed, gated


def _ready(plan: Plan, manifest: Manifest, only: list[str] | None) -> tuple[list[Variant], list[tuple[str, str]]]:
    ready, left = [], []
    for v in plan.select(only):
        rec = manifest.variants.get(v.name)
        if rec is None:
            left.append((v.name, "not built"))
        elif rec.state == "failed":
            left.append((v.name, f"its build failed: {rec.error or 'see the build log'}"))
        elif not rec.at_least("evaluated"):
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
    return manifest.with_variant(b.variant, replace(rec, state="published",
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
    api = _api(api)
    token = _token(api)
    ready, left = _ready(plan, manifest, only)
    ready, gated = _gate(plan, manifest, ready, force)
    refuse_oversized(plan, manifest, ready)  # before any Hub request
    if ready and not dry_run and not token:
        raise PublishError(ready[0].repo, "no Hub token: set HF_TOKEN or run `hf auth login`")
    owner = _owner(plan, api, token, ready) if ready else plan.recipe.publish.owner
    ctx = _Ctx(api, plan, Path(out_dir), HashCache(Path(out_dir) / HASH_CACHE), {}, dry_run, token)
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
    """Create (or find) the recipe's collection and add every repo published; both calls are
    idempotent (`exists_ok`), so a re-run changes nothing. Returns (slug, error)."""
    if not repos:
        return None, None
    try:
        col = _retrying(lambda: ctx.api.create_collection(collection_title(ctx.plan), namespace=owner,
                                                          private=ctx.plan.recipe.publish.private, exists_ok=True))
        have = {i.item_id for i in col.items}
        for repo in repos:
            if repo not in have:
                _retrying(lambda repo=repo: ctx.api.add_collection_item(col.slug, repo, "model", exists_ok=True))
        return col.slug, None
    except Exception as e:  # noqa: BLE001 - the branches are published; the report says what failed
        return None, _why(e, ctx.token)


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
                branches.append(BranchReport(v.name, repo, v.branch, "failed", error=_why(e, ctx.token)))
    if progress:
        progress("publish", len(branches), len(ready))
    return repos, branches


def _open_repo(ctx: _Ctx, repo: str) -> tuple[RepoReport, _Remote | None]:
    private = ctx.plan.recipe.publish.private
    remote = _Remote(ctx.api, repo)
    try:
        if remote.load_refs():
            return RepoReport(repo, private, created=False), remote
        if ctx.dry_run:
            return RepoReport(repo, private, created=True), None
        _retrying(lambda: ctx.api.create_repo(repo, private=private, exist_ok=True))
        if not remote.load_refs():
            return RepoReport(repo, private, True, f"created {repo} but cannot read it back"), None
        return RepoReport(repo, private, created=True), remote
    except Exception as e:  # noqa: BLE001 - every branch of the repo reports it
        return RepoReport(repo, private, created=False, error=_why(e, ctx.token)), None


def _why(e: BaseException, token: str | None) -> str:
    if isinstance(e, PublishError):
        return _scrub(e.reason, token)
    def line(x: BaseException) -> str:
        first = next((ln for ln in str(x).strip().splitlines() if ln.strip()), "")
        return f"{type(x).__name__}: {first}" if first else type(x).__name__

    status = _status(e)
    text = line(e) + (f" (HTTP {status})" if status and str(status) not in line(e) else "")
    said = getattr(e, "server_message", None)
    if said and said not in text:
        text += f": {said.strip()}"
    cause = e.__cause__ or e.__context__
    if cause is not None and not isinstance(e, PublishError):
        text += f" (caused by {line(cause)})"
    return _scrub(text, token)


__all__ = ["publish", "PublishReport", "BranchReport", "RepoReport", "FileOp", "HashCache", "git_blob_id"]


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
