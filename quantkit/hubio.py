"""The Hub side of publish: what huggingface_hub 2.4 does not already do for it.

huggingface_hub retries, by itself, every request of `preupload_lfs_files` (the preupload POST,
the LFS batch, each PUT or part, the completion and the verify) and the paginated GETs
(`list_repo_tree`, `list_repo_commits`): http_backoff on 408/429/5xx, timeouts and dropped
connections, 5 retries, Retry-After honoured. It skips LFS objects the repo already stores
(one upload for a file on main and on a branch), uploads nothing twice for the same
CommitOperationAdd objects, and drops unchanged files from a commit. Those jobs are left to it.

It sends once: whoami, the refs, branch and repo creation, the collection calls, the card's
YAML check and the commit POST. `Retry` sends those again on transient failures; the commit
with `parent_commit`, so a repeat can never fork the branch, and a repeat refused because
the branch moved is checked for a lost answer (`Remote.commit`). Unchanged files are found
here by reading the branch's tree (size, LFS sha256 or git blob id): huggingface_hub's own
check needs the preupload POST on an existing branch, and a dry run or a re-run with nothing
changed sends no write request. Every error text passes through `why`, which hides the token.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import atomic
from .errors import PublishError
from .records import sha256_file

if TYPE_CHECKING:
    from huggingface_hub import HfApi

COMMIT_ATTEMPTS = 5  # tries of one Hub request (a commit POST, ...) before giving up
BACKOFF_SECONDS = 1.0  # first wait; doubles per attempt
BACKOFF_MAX = 30.0
RETRY_AFTER_MAX = 300.0  # a server's Retry-After is honoured up to this
RETRY_STATUS = (408, 429, 500, 502, 503, 504)  # the same list as huggingface_hub's http_backoff
MOVED_STATUS = (409, 412)  # the branch is no longer at parent_commit
KEEP = frozenset({".gitattributes"})  # files of the Hub's initial commit a branch keeps

T = TypeVar("T")


# ---------------------------------------------------------------- local files


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
    from huggingface_hub.utils.sha import git_hash

    return git_hash(data)


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


def same(remote: Any, local: LocalFile) -> bool:
    """A remote tree entry holds the local file's bytes (LFS: its sha256; else its git blob id)."""
    if remote is None or remote.size != local.size:
        return False
    if remote.lfs is not None:
        return bool(remote.lfs.sha256 == local.sha256())
    return bool(remote.blob_id == local.blob_id())


def diff(local: Sequence[LocalFile], remote: dict[str, Any]) -> tuple[list[LocalFile], list[LocalFile], list[str]]:
    """(added or changed, unchanged, remote files to remove) for a branch's tree."""
    added: list[LocalFile] = []
    skipped: list[LocalFile] = []
    for f in local:
        (skipped if same(remote.get(f.path), f) else added).append(f)
    names = {f.path for f in local}
    removed = sorted(p for p in remote if p not in names and p not in KEEP)
    return added, skipped, removed


def operations(added: Sequence[LocalFile], removed: Sequence[str]) -> list[Any]:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ops: list[Any] = []
    for f in added:
        op = CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=f.source if isinstance(f.source, bytes)
                                else str(f.source))
        if not isinstance(f.source, bytes):
            op.upload_info.sha256 = bytes.fromhex(f.sha256())  # hashed once already: no second read
        ops.append(op)
    return ops + [CommitOperationDelete(path_in_repo=p) for p in removed]


# ---------------------------------------------------------------- the client, the token, errors


def open_api(api: HfApi | None) -> HfApi:
    if api is not None:
        return api
    from huggingface_hub import HfApi

    # HF_ENDPOINT is read at import by huggingface_hub; read it again in case it was set later.
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)


def token_of(api: HfApi) -> str | None:
    from huggingface_hub import get_token

    tok = api.token if isinstance(api.token, str) else None
    return tok or get_token()


def scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _status(e: BaseException) -> int | None:
    resp = getattr(e, "response", None)
    return getattr(resp, "status_code", None)


def why(e: BaseException, token: str | None) -> str:
    """One line for a report: the error, its HTTP status and server message, its cause; no token."""
    if isinstance(e, PublishError):
        return scrub(e.reason, token)

    def line(x: BaseException) -> str:
        first = next((ln for ln in str(x).strip().splitlines() if ln.strip()), "")
        return f"{type(x).__name__}: {first}" if first else type(x).__name__

    status = _status(e)
    text = line(e) + (f" (HTTP {status})" if status and str(status) not in line(e) else "")
    said = getattr(e, "server_message", None)
    if said and said not in text:
        text += f": {said.strip()}"
    cause = e.__cause__ or e.__context__
    if cause is not None:
        text += f" (caused by {line(cause)})"
    return scrub(text, token)


# ---------------------------------------------------------------- retries


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


@dataclass(frozen=True)
class Retry:
    """Sends an idempotent request that huggingface_hub sends only once again on transient
    failures, waiting the server's Retry-After (also 0) or backing off 1, 2, 4 ... s."""

    sleep: Callable[[float], None] = time.sleep
    attempts: int = COMMIT_ATTEMPTS

    def __call__(self, call: Callable[[], T], tries: list[int] | None = None) -> T:
        """`tries` gets one entry per attempt."""
        for attempt in range(1, self.attempts + 1):
            if tries is not None:
                tries.append(attempt)
            try:
                return call()
            except Exception as e:
                if not _transient(e) or attempt == self.attempts:
                    raise
                self.sleep(_backoff(e, attempt))
        raise AssertionError("unreachable")


# ---------------------------------------------------------------- one repo


class Remote:
    """One repo's refs and trees (trees cached by commit id: new branches share one), its
    empty branches, uploads and commits."""

    def __init__(self, api: HfApi, repo: str, retry: Retry):
        self.api, self.repo, self.retry = api, repo, retry
        self.refs: dict[str, str] = {}
        self._trees: dict[str, dict[str, Any]] = {}
        self._initial: str | None = None

    def load_refs(self) -> bool:
        """Read the branches; False when the repo does not exist."""
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            refs = self.retry(lambda: self.api.list_repo_refs(self.repo))  # a single GET in huggingface_hub
        except RepositoryNotFoundError:
            return False
        self.refs = {b.name: b.target_commit for b in refs.branches}
        return True

    def create_repo(self, private: bool) -> None:
        self.retry(lambda: self.api.create_repo(self.repo, private=private, exist_ok=True))  # sent once there

    def tree(self, commit: str) -> dict[str, Any]:
        if commit not in self._trees:  # list_repo_tree pages with huggingface_hub's own retries
            from huggingface_hub.hf_api import RepoFile

            entries = self.api.list_repo_tree(self.repo, revision=commit, recursive=True)
            self._trees[commit] = {e.path: e for e in entries if isinstance(e, RepoFile)}
        return self._trees[commit]

    def create_branch(self, branch: str) -> str:
        """An empty branch from the repo's initial commit; returns its commit id."""
        if self._initial is None:
            self._initial = self.api.list_repo_commits(self.repo, revision="main")[-1].commit_id
        initial, tries = self._initial, list[int]()
        # Sent once by huggingface_hub; exist_ok makes the repeat of a landed attempt harmless.
        self.retry(lambda: self.api.create_branch(self.repo, branch=branch, revision=initial, exist_ok=True), tries)
        if len(tries) > 1:  # an attempt whose answer was lost may have created it: read where it is
            self.load_refs()
            return self.refs.setdefault(branch, initial)
        self.refs[branch] = initial
        return initial

    def upload(self, branch: str, ops: Sequence[Any]) -> str | None:
        """Upload a commit's LFS files before it; huggingface_hub retries each request and skips
        objects the repo has. Returns a note when the endpoint refused Xet."""
        from huggingface_hub import CommitOperationAdd, constants

        adds = [op for op in ops if isinstance(op, CommitOperationAdd)]
        try:
            self.api.preupload_lfs_files(self.repo, additions=adds, revision=branch, free_memory=False)
            return None
        except Exception as e:
            if constants.HF_HUB_DISABLE_XET or "xet" not in f"{type(e).__module__} {e}".lower():
                raise
            # This endpoint has no Xet storage (DESIGN §4): plain LFS from now on, as
            # HF_HUB_DISABLE_XET=1 would have chosen at import.
            constants.HF_HUB_DISABLE_XET = True
            self.api.preupload_lfs_files(self.repo, additions=adds, revision=branch, free_memory=False)
            return f"{self.api.endpoint} refused the Xet upload; switched to plain LFS uploads"

    def commit(self, branch: str, ops: list[Any], parent: str, message: str, local: Sequence[LocalFile],
               tries: list[int]) -> str:
        """Create the commit (its files uploaded already). huggingface_hub sends the POST once:
        retried here with `parent_commit`, so a repeat of a POST that landed fails with 412 and
        is then recognised by the branch holding exactly our files. `tries`: one per POST."""
        def post() -> str:
            try:
                info = self.api.create_commit(self.repo, ops, commit_message=message, revision=branch,
                                              parent_commit=parent)
                return str(info.oid)
            except Exception as e:
                landed = self._landed(branch, local) if _status(e) in MOVED_STATUS and len(tries) > 1 else None
                if landed:
                    return landed  # an earlier attempt landed; its answer was lost
                raise

        commit = self.retry(post, tries)
        self.refs[branch] = commit
        return commit

    def _landed(self, branch: str, local: Sequence[LocalFile]) -> str | None:
        """The branch head if it holds exactly our files, else None."""
        self.load_refs()
        head = self.refs.get(branch)
        if head is None:
            return None
        added, _, removed = diff(local, self.tree(head))
        return head if not added and not removed else None


def collect(api: HfApi, retry: Retry, title: str, namespace: str | None, private: bool,
            repos: Sequence[str]) -> str:
    """Create (or find) a collection and add the repos it lacks; huggingface_hub sends both calls
    once, and `exists_ok` makes a repeat (or a re-run) change nothing. Returns its slug."""
    col = retry(lambda: api.create_collection(title, namespace=namespace, private=private, exists_ok=True))
    have = {i.item_id for i in col.items}
    for repo in repos:
        if repo not in have:
            retry(functools.partial(api.add_collection_item, col.slug, repo, "model", exists_ok=True))
    return str(col.slug)


__all__ = ["COMMIT_ATTEMPTS", "HashCache", "LocalFile", "Remote", "Retry", "collect", "diff", "git_blob_id",
           "open_api", "operations", "scrub", "token_of", "why"]
