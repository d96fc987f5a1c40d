"""A local Hugging Face Hub API server for tests: stdlib http.server, threads, state in memory.

No open-source Hub server that runs offline accepts writes, so tests drive the real `HfApi`
over HTTP against this one. It speaks the endpoints huggingface_hub 2.x uses to create repos
and branches, upload through plain LFS (run the client with HF_HUB_DISABLE_XET=1; the Xet
token route answers 404 like a server without Xet), commit (NDJSON), list trees and download
(model and dataset repos). It counts every request (method, path, status, bytes each way)
and injects faults: scripted ones (a connection dropped mid-upload, an error status on a
route, a commit applied whose response never arrives) and random ones at a set rate, seeded
(`hub.faults.at_random(0.1, seed=3)`: 5xx, 429 with Retry-After, resets, slow and lost answers),
recording whether each 429's Retry-After was waited out.

    with HubServer() as hub:            # hub.url, hub.token, hub.user
        hub.seed("deepset/germanquad", {"data/train.json": b"..."}, repo_type="dataset")
        hub.faults.fail_commit(status=429, times=1)
        ...

The server is split by job: hub_repo (storage: git objects, commits, branches, LFS content),
hub_faults (injected failures), hub_http (routes and the request plumbing), hub_api and
hub_upload (the endpoints), hub_cards (the card metadata check). This module is the entry
point and keeps the public API.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from quantkit.testing.hub_api import ApiEndpoints
from quantkit.testing.hub_cards import LICENSES, PIPELINE_TAGS, RELATIONS, validate_card_metadata
from quantkit.testing.hub_faults import RANDOM_KINDS, Faults, RandomFaults
from quantkit.testing.hub_http import ROUTES
from quantkit.testing.hub_repo import (
    GITATTRIBUTES,
    LFS_SIZE,
    Blob,
    Commit,
    HubError,
    Repo,
    RequestRecord,
    git_blob_oid,
    lfs_pointer,
)
from quantkit.testing.hub_upload import UploadEndpoints


class HubServer:
    """The Hub on a loopback port, state in memory; `with HubServer() as hub:` serves meanwhile."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, token: str = "hf_test_token_not_secret",
                 user: str = "quantkit-test", page_size: int = 1000, multipart_chunk: int | None = None):
        self.token, self.user, self.page_size = token, user, page_size
        self.multipart_chunk = multipart_chunk  # LFS uploads above this size go in parts
        self.repos: dict[tuple[str, str], Repo] = {}
        self.collections: dict[str, dict[str, Any]] = {}  # slug -> the Hub's collection JSON
        self.faults = Faults()
        self.log: list[RequestRecord] = []
        self.lock = threading.RLock()
        self._counter = 0
        self._parts: dict[tuple[str, int], bytes] = {}  # (oid, part) -> bytes of a multipart upload
        self._httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host.decode() if isinstance(host, bytes) else host}:{port}"

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ helpers for tests

    def reset_log(self) -> None:
        with self.lock:
            self.log.clear()

    def requests(self, method: str | None = None, pattern: str | None = None) -> list[RequestRecord]:
        with self.lock:
            return [r for r in self.log if (method is None or r.method == method)
                    and (pattern is None or re.search(pattern, r.path))]

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def head(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> Commit:
        r = self.repo(repo_id, repo_type)
        return r.commits[r.branches[branch]]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The branch's files with their content, for assertions."""
        r = self.repo(repo_id, repo_type)
        c = r.resolve(revision)
        assert c is not None, f"no revision {revision} in {repo_id}"
        return {p: (b.data if b.data is not None else r.lfs[b.sha256 or ""]) for p, b in c.tree.items()}

    def commit_count(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> int:
        r = self.repo(repo_id, repo_type)
        return sum(1 for _ in r.history(self.head(repo_id, branch, repo_type)))

    def seed(self, repo_id: str, files: dict[str, bytes | str], *, repo_type: str = "model",
             revision: str = "main", message: str = "seed", private: bool = False) -> str:
        """Put files into a repo directly (creating repo and branch as needed); return the commit id."""
        with self.lock:
            repo = self.repos.get((repo_type, repo_id)) or self._create(repo_type, repo_id, private)
            if revision not in repo.branches:
                repo.branches[revision] = self._initial(repo).id
            head = repo.commits[repo.branches[revision]]
            tree = dict(head.tree)
            for path, data in files.items():
                raw = data.encode() if isinstance(data, str) else data
                tree[path] = self._blob(repo, path, raw, head)
            return self._commit(repo, revision, head, tree, message, author=self.user).id

    # ------------------------------------------------------------ state changes (under lock)

    def _new_id(self, *parts: str) -> str:
        self._counter += 1
        return hashlib.sha1("\0".join((*parts, str(self._counter), repr(time.time()))).encode()).hexdigest()

    def _create(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_type, repo_id, private)
        ga = GITATTRIBUTES.encode()
        first = Commit(self._new_id(repo_id, "initial"), None,
                       {".gitattributes": Blob(len(ga), git_blob_oid(ga), data=ga)}, "initial commit")
        repo.commits[first.id] = first
        repo.branches["main"] = first.id
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def _initial(self, repo: Repo) -> Commit:
        return list(repo.history(repo.commits[repo.branches["main"]]))[-1]

    def _is_lfs(self, repo: Repo, commit: Commit | None, path: str, size: int, sample: bytes) -> bool:
        ga = commit.tree.get(".gitattributes") if commit else None
        patterns = [ln.split()[0] for ln in (ga.data or b"").decode().splitlines()
                    if ga and "filter=lfs" in ln] if ga else []
        name = path.rsplit("/", 1)[-1]
        return (size >= LFS_SIZE or b"\0" in sample
                or any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns))

    def _blob(self, repo: Repo, path: str, data: bytes, head: Commit | None) -> Blob:
        if data and self._is_lfs(repo, head, path, len(data), data[:512]):
            sha = hashlib.sha256(data).hexdigest()
            repo.lfs[sha] = data
            return Blob(len(data), git_blob_oid(lfs_pointer(sha, len(data))), sha256=sha)
        return Blob(len(data), git_blob_oid(data), data=data)

    def _commit(self, repo: Repo, branch: str, parent: Commit, tree: dict[str, Blob], title: str,
                message: str = "", author: str | None = None) -> Commit:
        c = Commit(self._new_id(repo.id, branch, parent.id, title), parent.id, tree, title, message,
                   author or self.user)
        repo.commits[c.id] = c
        repo.branches[branch] = c.id
        return c


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    # http.server makes a handler per request from the class alone: the class carries the server.
    class Handler(ApiEndpoints, UploadEndpoints):
        server_state = hub

    return Handler


@contextmanager
def use_hub(hub: HubServer, *, home: str | None = None, env: dict[str, str] | None = None) -> Iterator[HubServer]:
    """Point an already-imported huggingface_hub at `hub` (plain LFS, the hub's token), then restore.

    huggingface_hub reads HF_ENDPOINT, HF_HUB_DISABLE_XET and HF_HOME at import time, so the
    module constants are patched too; a process started meanwhile sees the environment
    variables. With `home`, caches and the token file live there instead of ~/.cache.
    """
    import os

    from huggingface_hub import constants

    patch: dict[str, Any] = {"ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": True,
                             "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}"}
    new_env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": hub.token, **(env or {})}
    if home is not None:
        patch.update({"HF_HOME": home, "HF_HUB_CACHE": os.path.join(home, "hub"),
                      "HF_ASSETS_CACHE": os.path.join(home, "assets"), "HF_XET_CACHE": os.path.join(home, "xet"),
                      "HF_TOKEN_PATH": os.path.join(home, "token"),
                      "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
                      "AGENT_HARNESSES_PATH": os.path.join(home, ".agent_harnesses.json")})
        new_env["HF_HOME"] = home
    saved = {k: getattr(constants, k) for k in patch if hasattr(constants, k)}
    saved_env = {k: os.environ.get(k) for k in new_env}
    for k, v in patch.items():
        setattr(constants, k, v)
    os.environ.update(new_env)
    try:
        yield hub
    finally:
        for k in patch:
            if k in saved:
                setattr(constants, k, saved[k])
        for k, old in saved_env.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


def summarize(records: list[RequestRecord]) -> dict[str, Any]:
    """Counts for reports: requests, bytes each way, and file content uploaded (LFS PUTs + commits)."""
    content = sum(r.bytes_in for r in records if r.method == "PUT" or r.path.rsplit("/", 2)[-2] == "commit")
    return {"requests": len(records), "bytes_in": sum(r.bytes_in for r in records),
            "bytes_out": sum(r.bytes_out for r in records), "content_bytes": content,
            "commits": sum(1 for r in records if "/commit/" in r.path and r.method == "POST" and r.status == 200),
            "by_route": _by_route(records)}


def _by_route(records: list[RequestRecord]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        key = f"{r.method} {_route_name(r.method, r.path)}"
        out[key] = out.get(key, 0) + 1
    return out


def _route_name(method: str, path: str) -> str:
    return next((name for m, rx, name in ROUTES if m == method and rx.match(path)), "unknown")


__all__ = ["HubServer", "Faults", "RandomFaults", "RANDOM_KINDS", "RequestRecord", "use_hub", "summarize",
           "validate_card_metadata", "git_blob_oid", "lfs_pointer", "Blob", "Commit", "Repo", "HubError",
           "GITATTRIBUTES", "LFS_SIZE", "LICENSES", "PIPELINE_TAGS", "RELATIONS"]
