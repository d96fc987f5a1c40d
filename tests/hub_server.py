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
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# What the Hub writes into every new repo's initial commit (abridged to the patterns that
# matter here): these paths go through LFS whatever their size.
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib",
    "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
    "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
    "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip",
    "*.zst", "*tfevents*"))
LFS_SIZE = 10 * 1024 * 1024  # larger files go through LFS even without a pattern
PIPELINE_TAGS = {"text-generation", "text2text-generation", "feature-extraction", "fill-mask",
                 "question-answering", "text-classification", "token-classification",
                 "translation", "summarization", "sentence-similarity", "conversational"}
LICENSES = {"apache-2.0", "mit", "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3",
            "gemma", "openrail", "bigscience-openrail-m", "creativeml-openrail-m",
            "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0", "gpl-3.0",
            "agpl-3.0", "bsd-3-clause", "afl-3.0", "unknown", "other"}
RELATIONS = {"adapter", "merge", "quantized", "finetune"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_YAML_BLOCK = re.compile(r"^(\s*---\r?\n)([\S\s]*?)(\r?\n---[ \t]*(\r?\n|$))")


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


# ---------------------------------------------------------------- state


@dataclass(frozen=True)
class Blob:
    size: int
    oid: str  # git oid: of the content, or of the LFS pointer
    sha256: str | None = None  # LFS files only; their bytes live in Repo.lfs
    data: bytes | None = None  # regular files only

    def entry(self, path: str) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "file", "oid": self.oid, "size": self.size, "path": path}
        if self.sha256:
            d["lfs"] = {"oid": self.sha256, "size": self.size,
                        "pointerSize": len(lfs_pointer(self.sha256, self.size))}
        return d


@dataclass(frozen=True)
class Commit:
    id: str
    parent: str | None
    tree: dict[str, Blob]
    title: str
    message: str = ""
    author: str = "system"
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    type: str  # "model" | "dataset"
    id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name (or refs/convert/...) -> commit
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content

    def resolve(self, rev: str) -> Commit | None:
        cid = self.branches.get(rev) or (rev if rev in self.commits else None)
        if cid is None and len(rev) >= 7:
            cid = next((c for c in self.commits if c.startswith(rev)), None)
        return self.commits.get(cid) if cid else None

    def history(self, commit: Commit) -> Iterator[Commit]:
        c: Commit | None = commit
        while c is not None:
            yield c
            c = self.commits.get(c.parent) if c.parent else None


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str  # without the query
    status: int  # 0: the connection was dropped without an answer
    bytes_in: int  # request body
    bytes_out: int  # response body
    seconds: float


@dataclass
class _Fault:
    method: str
    pattern: re.Pattern[str]
    times: int
    action: str  # "status" | "drop_body" | "drop_response" | "echo_auth"
    status: int = 500
    after_bytes: int = 0
    headers: dict[str, str] = field(default_factory=dict)


# What a random fault does (RandomFaults.kinds):
RANDOM_KINDS = (
    "5xx",    # 500/502/503/504 before the request does anything
    "429",    # Too Many Requests with Retry-After; the retry must not come sooner
    "reset",  # connection closed mid-request (half the body read), nothing done
    "slow",   # answered normally after a delay
    "lost",   # the request takes effect, then the connection closes: the answer is lost
)
_REV = re.compile(r"(?<![0-9a-f])[0-9a-f]{40}(?![0-9a-f])")  # commit ids differ from server to server


@dataclass(frozen=True)
class RandomFaults:
    """Each request fails with probability `rate`, in one of `kinds`. Seeded per request: the
    draw depends on (seed, method, path with commit ids blanked, how often that path was
    asked before), so thread interleaving does not change which request fails how."""

    rate: float
    seed: int
    kinds: tuple[str, ...] = RANDOM_KINDS
    retry_after: int = 1  # seconds (integers: what the Retry-After header allows)
    slow: tuple[float, float] = (0.1, 0.5)  # delay range of "slow"

    def draw(self, key: str, n: int) -> tuple[str, random.Random] | None:
        rng = random.Random(f"{self.seed}\0{key}\0{n}")
        if rng.random() >= self.rate:
            return None
        return rng.choice(self.kinds), rng


class Faults:
    """Scripted failures, each matching a method and a path regex, each firing `times` times;
    and random ones at a set rate (`at_random`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self.fired: list[tuple[str, str, str]] = []  # (action, method, path)
        self.random: RandomFaults | None = None
        self._seen: dict[str, int] = {}  # normalized "METHOD path" -> requests so far
        self._not_before: dict[str, float] = {}  # key -> when a 429's Retry-After ends
        self.early: list[tuple[str, float]] = []  # (key, seconds too early): Retry-After ignored
        self.waited: list[tuple[str, float]] = []  # (key, seconds waited after a 429)

    def at_random(self, rate: float, seed: int, **kw: Any) -> RandomFaults:
        with self._lock:
            self.random = RandomFaults(rate, seed, **kw)
            self._seen.clear()
            return self.random

    def draw(self, method: str, path: str) -> tuple[str, random.Random] | None:
        """The random fault for this request, if any; also checks it against an earlier 429."""
        key = f"{method} {_REV.sub('<rev>', path)}"
        with self._lock:
            self._check_retry_after(key)
            if self.random is None:
                return None
            n = self._seen.get(key, 0)
            self._seen[key] = n + 1
            got = self.random.draw(key, n)
            if got is not None:
                self.fired.append((got[0], method, path))
                if got[0] == "429":
                    self._not_before[key] = time.monotonic() + self.random.retry_after
            return got

    def _check_retry_after(self, key: str) -> None:
        until = self._not_before.pop(key, None)
        if until is None:
            return
        now = time.monotonic()
        assert self.random is not None
        self.waited.append((key, self.random.retry_after + now - until))
        if now < until:
            self.early.append((key, until - now))

    def add(self, method: str, path_regex: str, *, times: int = 1, action: str = "status",
            status: int = 500, after_bytes: int = 0, headers: dict[str, str] | None = None) -> None:
        with self._lock:
            self._faults.append(_Fault(method, re.compile(path_regex), times, action, status,
                                       after_bytes, headers or {}))

    def drop_upload(self, *, times: int = 1, after_bytes: int = 65536, oid: str | None = None) -> None:
        """Close the connection after reading `after_bytes` of an LFS upload (PUT), no answer."""
        self.add("PUT", rf"^/_lfs/.*{oid or ''}", times=times, action="drop_body", after_bytes=after_bytes)

    def fail_commit(self, *, status: int = 429, times: int = 1, retry_after: float | None = 0) -> None:
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        self.add("POST", r"^/api/\w+s/.+/commit/", times=times, status=status, headers=headers)

    def drop_commit_response(self, *, times: int = 1) -> None:
        """Apply the commit, then close the connection before answering."""
        self.add("POST", r"^/api/\w+s/.+/commit/", times=times, action="drop_response")

    def echo_credentials(self, method: str, path_regex: str, *, status: int = 500, times: int = 1) -> None:
        """Answer with an error that quotes the request's Authorization header."""
        self.add(method, path_regex, times=times, action="echo_auth", status=status)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self.random = None

    def take(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for f in self._faults:
                if f.method == method and f.pattern.search(path) and f.times > 0:
                    f.times -= 1
                    self.fired.append((f.action, method, path))
                    return f
        return None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None,
                 body: dict[str, Any] | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.body = body or {"error": message}
        self.headers = headers or {}


class _Drop(Exception):
    """Close the connection without an answer."""


# ---------------------------------------------------------------- server


class HubServer:
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
        return f"http://{host}:{port}"

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


# ---------------------------------------------------------------- request handling

_T = r"(?P<t>models|datasets)"
_ID = r"(?P<repo>[^/]+/[^/]+?)"
_PFX = r"(?:(?P<t>datasets)/)?"


def _route_table() -> list[tuple[str, re.Pattern[str], str]]:
    """(method, path regex, handler name). Order matters: specific routes first."""
    rows = [
        ("GET", r"^/api/whoami-v2$", "whoami"),
        ("GET", r"^/api/agent-harnesses$", "harnesses"),  # the client's once-a-day telemetry list
        ("POST", r"^/api/repos/create$", "create_repo"),
        ("DELETE", r"^/api/repos/delete$", "delete_repo"),
        ("POST", r"^/api/validate-yaml$", "validate_yaml"),
        ("GET", rf"^/api/{_T}/{_ID}/refs$", "refs"),
        ("GET", rf"^/api/{_T}/{_ID}/commits/(?P<rev>[^/]+)$", "commits"),
        ("POST", rf"^/api/{_T}/{_ID}/branch/(?P<branch>.+)$", "create_branch"),
        ("DELETE", rf"^/api/{_T}/{_ID}/branch/(?P<branch>.+)$", "delete_branch"),
        ("GET", rf"^/api/{_T}/{_ID}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$", "tree"),
        ("POST", rf"^/api/{_T}/{_ID}/paths-info/(?P<rev>[^/]+)$", "paths_info"),
        ("POST", rf"^/api/{_T}/{_ID}/preupload/(?P<rev>[^/]+)$", "preupload"),
        ("POST", rf"^/api/{_T}/{_ID}/commit/(?P<rev>[^/]+)$", "commit"),
        ("GET", rf"^/api/{_T}/{_ID}(?:/revision/(?P<rev>[^/]+))?$", "info"),
        ("POST", rf"^/{_PFX}{_ID}\.git/info/lfs/objects/batch$", "lfs_batch"),
        ("PUT", r"^/_lfs/(?P<t>\w+)/(?P<repo>[^/]+/[^/]+)/(?P<oid>[0-9a-f]{64})(?:/(?P<part>\d+))?$", "lfs_put"),
        ("POST", r"^/_lfs/(?P<t>\w+)/(?P<repo>[^/]+/[^/]+)/(?P<oid>[0-9a-f]{64})/complete$", "lfs_complete"),
        ("POST", r"^/_lfs/(?P<t>\w+)/(?P<repo>[^/]+/[^/]+)/verify$", "lfs_verify"),
        ("GET", rf"^/{_PFX}{_ID}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve"),
        ("POST", r"^/api/collections$", "create_collection"),
        ("GET", r"^/api/collections/(?P<slug>[^/]+/[^/]+)$", "get_collection"),
        ("POST", r"^/api/collections/(?P<slug>[^/]+/[^/]+)/items$", "add_collection_item"),
        ("HEAD", rf"^/{_PFX}{_ID}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve"),
    ]
    return [(m, re.compile(p), h) for m, p, h in rows]


ROUTES = _route_table()


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        server_state = hub

    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub
    server_state: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        pass

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without this, delayed ACKs cost 40 ms a request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ------------------------------------------------------------ plumbing

    def _dispatch(self, method: str) -> None:
        t0 = time.perf_counter()
        split = urlsplit(self.path)
        path, self.query = split.path, parse_qs(split.query)
        self.bytes_in = 0
        try:
            status, payload, headers = self._answer(method, path)
        except _Drop:
            self._log(method, path, 0, b"", t0)  # logged before the client can see anything
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        except HubError as e:
            status, payload = e.status, e.body
            headers = {**e.headers, "X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
        data, headers = self._encode(payload, headers)
        self._log(method, path, status, b"" if method == "HEAD" else data, t0)
        self._send(status, data, headers, head=method == "HEAD")

    def _answer(self, method: str, path: str) -> tuple[int, Any, dict[str, str]]:
        hub = self.server_state
        drawn = hub.faults.draw(method, path)
        if drawn is not None:
            return self._random_fault(method, path, *drawn)
        fault = hub.faults.take(method, path)
        if fault and fault.action == "drop_body":
            self._read_body(limit=fault.after_bytes)
            raise _Drop()
        body = self._read_body()
        if fault and fault.action == "status":
            raise HubError(fault.status, f"injected {fault.status}", headers=fault.headers)
        if fault and fault.action == "echo_auth":  # a careless server quoting the credentials
            said = f"injected {fault.status}; you sent {self.headers.get('Authorization')}"
            raise HubError(fault.status, said, body={"error": said}, headers=fault.headers)
        answer = self._handle(method, path, body)
        if fault and fault.action == "drop_response":
            raise _Drop()
        return answer

    def _random_fault(self, method: str, path: str, kind: str, rng: random.Random) -> tuple[int, Any, dict[str, str]]:
        rf = self.server_state.faults.random
        assert rf is not None
        if kind == "reset":
            self._read_body(limit=self._body_length() // 2)
            raise _Drop()
        if kind == "slow":
            time.sleep(rng.uniform(*rf.slow))
            return self._handle(method, path, self._read_body())
        if kind == "lost":
            self._handle(method, path, self._read_body())
            raise _Drop()
        self._read_body()
        if kind == "429":
            raise HubError(429, "injected: too many requests", headers={"Retry-After": str(rf.retry_after)})
        status = rng.choice((500, 502, 503, 504))
        raise HubError(status, f"injected {status}")

    def _handle(self, method: str, path: str, body: bytes) -> tuple[int, Any, dict[str, str]]:
        handler, groups = self._route(method, path)
        with self.server_state.lock:
            return getattr(self, "h_" + handler)(body, **groups)

    def _body_length(self) -> int:
        """Bytes the request announced (a chunked body: treated as 64 KiB)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return 65536
        return int(self.headers.get("Content-Length") or 0)

    def _log(self, method: str, path: str, status: int, out: bytes, t0: float) -> None:
        hub = self.server_state
        with hub.lock:
            hub.log.append(RequestRecord(method, path, status, self.bytes_in, len(out), time.perf_counter() - t0))

    def _route(self, method: str, path: str) -> tuple[str, dict[str, str]]:
        for m, rx, name in ROUTES:
            match = rx.match(path)
            if m == method and match:
                return name, {k: unquote(v) if v is not None else v
                              for k, v in match.groupdict().items()}
        raise HubError(404, f"no route for {method} {path}")

    def _read_body(self, limit: int | None = None) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked(limit)
        n = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(min(n, limit) if limit is not None else n)
        self.bytes_in += len(data)
        return data

    def _read_chunked(self, limit: int | None) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.rfile.readline()
                break
            parts.append(self.rfile.read(size))
            self.rfile.readline()
            self.bytes_in += size
            if limit is not None and self.bytes_in >= limit:
                break
        return b"".join(parts)

    @staticmethod
    def _encode(payload: Any, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        headers = dict(headers)
        if isinstance(payload, bytes):
            headers.setdefault("Content-Type", "application/octet-stream")
            return payload, headers
        headers.setdefault("Content-Type", "application/json")
        return json.dumps(payload).encode(), headers

    def _send(self, status: int, data: bytes, headers: dict[str, str], *, head: bool = False) -> None:
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _base(self) -> str:
        return f"http://{self.headers.get('Host')}"

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.server_state.token}"

    def _need_auth(self) -> None:
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, t: str | None, repo: str, *, write: bool = False) -> Repo:
        kind = "dataset" if t in ("datasets", "dataset") else "model"
        r = self.server_state.repos.get((kind, repo))
        if write:
            self._need_auth()
        if r is None or (r.private and not self._authorized()):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return r

    def _rev(self, repo: Repo, rev: str) -> Commit:
        c = repo.resolve(rev)
        if c is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return c

    def _json(self, body: bytes) -> Any:
        try:
            return json.loads(body or b"{}")
        except ValueError:
            raise HubError(400, "body is not JSON") from None

    # ------------------------------------------------------------ account and repos

    def h_whoami(self, body: bytes) -> tuple[int, Any, dict[str, str]]:
        self._need_auth()
        return 200, {"type": "user", "name": self.server_state.user, "fullname": "Test User", "orgs": [],
                     "auth": {"type": "access_token",
                              "accessToken": {"displayName": "tests", "role": "write"}}}, {}

    def h_harnesses(self, body: bytes) -> tuple[int, Any, dict[str, str]]:
        return 200, {"standardEnvVars": [], "harnesses": {}}, {}

    def h_create_repo(self, body: bytes) -> tuple[int, Any, dict[str, str]]:
        self._need_auth()
        d = self._json(body)
        repo_id = f"{d.get('organization') or self.server_state.user}/{d['name']}"
        kind = d.get("type") or "model"
        if not _REPO_ID.match(repo_id):
            raise HubError(400, f"invalid repo name {repo_id!r}")
        if (kind, repo_id) in self.server_state.repos:
            raise HubError(409, "You already created this model repo", body={"error": "You already created "
                           "this model repo", "url": f"{self._base()}/{repo_id}"})
        private = d.get("private") or d.get("visibility") == "private"
        self.server_state._create(kind, repo_id, bool(private))
        prefix = "" if kind == "model" else f"{kind}s/"
        return 200, {"url": f"{self._base()}/{prefix}{repo_id}", "name": repo_id, "id": repo_id}, {}

    # -- collections: a title is unique per owner (409 with the slug, as the Hub answers)

    def h_create_collection(self, body: bytes) -> tuple[int, Any, dict[str, str]]:
        self._need_auth()
        d, hub = self._json(body), self.server_state
        owner = d.get("namespace") or hub.user
        with hub.lock:
            old = next((c for c in hub.collections.values()
                        if c["owner"]["name"] == owner and c["title"] == d["title"]), None)
            if old is not None:
                raise HubError(409, "Collection already exists", body={"error": "Collection already exists",
                                                                      "slug": old["slug"]})
            words = re.sub(r"[^a-z0-9]+", "-", d["title"].lower()).strip("-")
            slug = f"{owner}/{words}-{hub._new_id(owner, d['title'])[:24]}"
            hub.collections[slug] = {"slug": slug, "title": d["title"], "owner": {"name": owner, "type": "user"},
                                     "items": [], "lastUpdated": _now(), "position": 0,
                                     "private": bool(d.get("private")), "theme": "indigo", "upvotes": 0,
                                     "description": d.get("description")}
        return 200, hub.collections[slug], {}

    def h_get_collection(self, body: bytes, slug: str) -> tuple[int, Any, dict[str, str]]:
        c = self.server_state.collections.get(slug)
        if c is None:
            raise HubError(404, "Collection not found")
        return 200, c, {}

    def h_add_collection_item(self, body: bytes, slug: str) -> tuple[int, Any, dict[str, str]]:
        self._need_auth()
        hub, item = self.server_state, self._json(body)["item"]
        with hub.lock:
            c = hub.collections.get(slug)
            if c is None:
                raise HubError(404, "Collection not found")
            if (item["type"], item["id"]) not in hub.repos:
                raise HubError(404, f"{item['type']} {item['id']} not found")
            if any(i["id"] == item["id"] and i["type"] == item["type"] for i in c["items"]):
                raise HubError(409, "Item already in the collection")
            c["items"].append({"_id": hub._new_id(slug, item["id"])[:24], "id": item["id"], "type": item["type"],
                               "position": len(c["items"])})
            c["lastUpdated"] = _now()
        return 200, c, {}

    def h_delete_repo(self, body: bytes) -> tuple[int, Any, dict[str, str]]:
        self._need_auth()
        d = self._json(body)
        repo_id = f"{d.get('organization') or self.server_state.user}/{d['name']}"
        if self.server_state.repos.pop((d.get("type") or "model", repo_id), None) is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return 200, {}, {}

    def h_info(self, body: bytes, t: str, repo: str, rev: str | None) -> tuple[int, Any, dict[str, str]]:
        r = self._repo(t, repo)
        c = self._rev(r, rev or "main")
        return 200, {"id": r.id, "_id": r.id, "author": r.id.split("/")[0], "sha": c.id,
                     "private": r.private, "gated": False, "disabled": False, "downloads": 0,
                     "likes": 0, "tags": [], "lastModified": c.date, "createdAt": c.date,
                     "siblings": [{"rfilename": p} for p in sorted(c.tree)]}, {}

    def h_refs(self, body: bytes, t: str, repo: str) -> tuple[int, Any, dict[str, str]]:
        r = self._repo(t, repo)

        def ref(name: str) -> dict[str, str]:
            full = name if name.startswith("refs/") else f"refs/heads/{name}"
            return {"name": name.removeprefix("refs/convert/"), "ref": full, "targetCommit": r.branches[name]}

        return 200, {"branches": [ref(b) for b in r.branches if not b.startswith("refs/")],
                     "converts": [ref(b) for b in r.branches if b.startswith("refs/convert/")],
                     "tags": [], "pullRequests": []}, {}

    def h_commits(self, body: bytes, t: str, repo: str, rev: str) -> tuple[int, Any, dict[str, str]]:
        r = self._repo(t, repo)
        return 200, [{"id": c.id, "title": c.title, "message": c.message, "date": c.date,
                      "authors": [{"user": c.author}]} for c in r.history(self._rev(r, rev))], {}

    def h_create_branch(self, body: bytes, t: str, repo: str, branch: str) -> tuple[int, Any, dict[str, str]]:
        r = self._repo(t, repo, write=True)
        if branch in r.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        start = self._json(body).get("startingPoint") or "main"
        r.branches[branch] = self._rev(r, start).id
        return 200, {}, {}

    def h_delete_branch(self, body: bytes, t: str, repo: str, branch: str) -> tuple[int, Any, dict[str, str]]:
        r = self._repo(t, repo, write=True)
        if branch == "main" or r.branches.pop(branch, None) is None:
            raise HubError(404 if branch != "main" else 403, f"cannot delete branch {branch}")
        return 200, {}, {}

    # ------------------------------------------------------------ reading trees and files

    def h_tree(self, body: bytes, t: str, repo: str, rev: str, path: str | None) -> tuple[int, Any, dict[str, str]]:
        r = self._repo(t, repo)
        c = self._rev(r, rev)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries = _listing(c.tree, (path or "").strip("/"), recursive)
        if path and not entries and path.strip("/") not in c.tree:
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        start = int(self.query.get("cursor", ["0"])[0])
        size = self.server_state.page_size
        page, headers = entries[start:start + size], {}
        if start + size < len(entries):
            url = f"{self._base()}{urlsplit(self.path).path}?recursive={str(recursive).lower()}&cursor={start + size}"
            headers["Link"] = f'<{url}>; rel="next"'
        return 200, page, headers

    def h_paths_info(self, body: bytes, t: str, repo: str, rev: str) -> tuple[int, Any, dict[str, str]]:
        r = self._repo(t, repo)
        c = self._rev(r, rev)
        form = parse_qs(body.decode())
        out = []
        for p in form.get("paths", []):
            p = p.strip("/")
            if p in c.tree:
                out.append(c.tree[p].entry(p))
            elif any(k.startswith(p + "/") for k in c.tree):
                out.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p})
        return 200, out, {}

    def h_resolve(self, body: bytes, t: str | None, repo: str, rev: str, path: str) -> tuple[int, Any, dict[str, str]]:
        r = self._repo(t, repo)
        c = self._rev(r, rev)
        blob = c.tree.get(path)
        if blob is None:
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        data = blob.data if blob.data is not None else r.lfs[blob.sha256 or ""]
        headers = {"X-Repo-Commit": c.id, "ETag": f'"{blob.sha256 or blob.oid}"', "Accept-Ranges": "bytes"}
        if blob.sha256:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        rng = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if rng:
            lo, hi = int(rng.group(1)), int(rng.group(2) or len(data) - 1)
            headers["Content-Range"] = f"bytes {lo}-{hi}/{len(data)}"
            return 206, data[lo:hi + 1], headers
        return 200, data, headers

    # ------------------------------------------------------------ writing

    def h_validate_yaml(self, body: bytes) -> tuple[int, Any, dict[str, str]]:
        d = self._json(body)
        errors, warnings = validate_card_metadata(d.get("content", ""), d.get("repoType") or "model")
        payload = {"errors": [{"message": m} for m in errors], "warnings": [{"message": m} for m in warnings]}
        if errors:
            raise HubError(400, "; ".join(errors), body=payload)
        return 200, payload, {}

    def h_preupload(self, body: bytes, t: str, repo: str, rev: str) -> tuple[int, Any, dict[str, str]]:
        r = self._repo(t, repo, write=True)
        c = self._rev(r, rev)
        out = []
        for f in self._json(body).get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = self.server_state._is_lfs(r, c, f["path"], int(f["size"]), sample)
            old = c.tree.get(f["path"])
            oid = (old.sha256 if lfs else (None if old is None or old.sha256 else old.oid)) if old else None
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False, "oid": oid})
        return 200, {"files": out, "commitOid": c.id}, {}

    def h_lfs_batch(self, body: bytes, t: str | None, repo: str) -> tuple[int, Any, dict[str, str]]:
        kind = "datasets" if t else "models"
        r = self._repo(kind, repo, write=True)
        hub, base = self.server_state, self._base()
        objects = []
        for o in self._json(body).get("objects", []):
            oid, size = o["oid"], int(o["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in r.lfs:
                href = f"{base}/_lfs/{kind}/{repo}/{oid}"
                upload: dict[str, Any] = {"href": href, "header": {}}
                if hub.multipart_chunk and size > hub.multipart_chunk:
                    n = -(-size // hub.multipart_chunk)
                    upload = {"href": f"{href}/complete", "header": {
                        "chunk_size": str(hub.multipart_chunk), **{str(i): f"{href}/{i}" for i in range(1, n + 1)}}}
                entry["actions"] = {"upload": upload, "verify": {"href": f"{base}/_lfs/{kind}/{repo}/verify"}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}

    def _upload_target(self, t: str, repo: str) -> Repo:
        """Upload URLs are pre-signed (like S3's): no Authorization header comes with them."""
        r = self.server_state.repos.get(("dataset" if t == "datasets" else "model", repo))
        if r is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return r

    def h_lfs_put(self, body: bytes, t: str, repo: str, oid: str, part: str | None) -> tuple[int, Any, dict[str, str]]:
        r = self._upload_target(t, repo)
        if part is not None:
            self.server_state._parts[(oid, int(part))] = body
            return 200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}  # noqa: S324 - an etag
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "content does not match its sha256")
        r.lfs[oid] = body
        return 200, b"", {}

    def h_lfs_complete(self, body: bytes, t: str, repo: str, oid: str) -> tuple[int, Any, dict[str, str]]:
        r = self._upload_target(t, repo)
        parts = self._json(body).get("parts", [])
        data = b"".join(self.server_state._parts.pop((oid, p["partNumber"]), b"") for p in parts)
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "parts do not add up to the announced sha256")
        r.lfs[oid] = data
        return 200, {}, {}

    def h_lfs_verify(self, body: bytes, t: str, repo: str) -> tuple[int, Any, dict[str, str]]:
        r = self._repo(t, repo)
        d = self._json(body)
        if d.get("oid") not in r.lfs or len(r.lfs[d["oid"]]) != d.get("size"):
            raise HubError(404, "object not found")
        return 200, {}, {}

    def h_commit(self, body: bytes, t: str, repo: str, rev: str) -> tuple[int, Any, dict[str, str]]:
        r = self._repo(t, repo, write=True)
        if rev not in r.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(ln) for ln in body.decode().splitlines() if ln.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first line must be the header")
        header = lines[0]["value"]
        head = r.commits[r.branches[rev]]
        parent = header.get("parentCommit")
        if parent and not head.id.startswith(parent):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        tree = _apply(r, dict(head.tree), lines[1:])
        c = self.server_state._commit(r, rev, head, tree, header.get("summary", ""), header.get("description", ""))
        prefix = "" if r.type == "model" else f"{r.type}s/"
        return 200, {"success": True, "commitOid": c.id, "commitUrl": f"{self._base()}/{prefix}{r.id}/commit/{c.id}",
                     "hookOutput": "", "pullRequestUrl": None}, {}


def _apply(repo: Repo, tree: dict[str, Blob], ops: list[dict[str, Any]]) -> dict[str, Blob]:
    for op in ops:
        key, v = op.get("key"), op.get("value", {})
        if key == "file":
            data = base64.b64decode(v["content"])
            tree[v["path"]] = Blob(len(data), git_blob_oid(data), data=data)
        elif key == "lfsFile":
            sha, size = v["oid"], v.get("size")
            if sha not in repo.lfs or (size is not None and len(repo.lfs[sha]) != size):
                raise HubError(422, f"LFS object {sha} for {v['path']} was never uploaded")
            tree[v["path"]] = Blob(len(repo.lfs[sha]), git_blob_oid(lfs_pointer(sha, len(repo.lfs[sha]))), sha256=sha)
        elif key == "deletedFile":
            if tree.pop(v["path"], None) is None:
                raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
        elif key == "deletedFolder":
            for p in [p for p in tree if p.startswith(v["path"].rstrip("/") + "/")]:
                del tree[p]
        else:
            raise HubError(400, f"unknown commit operation {key!r}")
    return tree


def _listing(tree: dict[str, Blob], path: str, recursive: bool) -> list[dict[str, Any]]:
    prefix = f"{path}/" if path else ""
    out: dict[str, dict[str, Any]] = {}
    for p, blob in tree.items():
        if not p.startswith(prefix):
            continue
        rest = p[len(prefix):].split("/")
        for i in range(1, len(rest)):  # folders on the way
            d = prefix + "/".join(rest[:i])
            if recursive or i == 1:
                out.setdefault(d, {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(),
                                   "size": 0, "path": d})
        if recursive or len(rest) == 1:
            out[p] = blob.entry(p)
    return [out[k] for k in sorted(out)]


def validate_card_metadata(content: str, repo_type: str = "model") -> tuple[list[str], list[str]]:
    """A subset of the Hub's model-card metadata rules: the fields quantkit writes."""
    import yaml

    m = _YAML_BLOCK.search(content)
    if not m:
        return [], ["Empty or missing yaml metadata in repo card"]
    try:
        meta = yaml.safe_load(m.group(2))
    except yaml.YAMLError as e:
        return [f"YAML metadata is not valid YAML: {e}"], []
    if meta is None:
        return [], ["Empty or missing yaml metadata in repo card"]
    if not isinstance(meta, dict):
        return ["YAML metadata must be a mapping"], []
    errors: list[str] = []

    def strings(key: str) -> list[Any]:
        v = meta.get(key)
        vals = v if isinstance(v, list) else [v]
        if v is not None and not all(isinstance(x, str) for x in vals):
            errors.append(f'"{key}" must be a string or a list of strings')
        return [x for x in vals if isinstance(x, str)] if v is not None else []

    for lic in strings("license"):
        if lic not in LICENSES:
            errors.append(f'"license" must be one of the Hub\'s license ids, not {lic!r}')
    if "other" in strings("license") and not meta.get("license_name"):
        errors.append('"license_name" is required when "license" is other')
    for lang in strings("language"):
        if not re.fullmatch(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*", lang):
            errors.append(f'"language" must be ISO 639 codes, not {lang!r}')
    for tag in strings("pipeline_tag"):
        if tag not in PIPELINE_TAGS:
            errors.append(f'"pipeline_tag" must be a known task, not {tag!r}')
    for bm in strings("base_model"):
        if not _REPO_ID.match(bm):
            errors.append(f'"base_model" must be a Hub model id, not {bm!r}')
    rel = meta.get("base_model_relation")
    if rel is not None and (rel not in RELATIONS or "base_model" not in meta):
        errors.append(f'"base_model_relation" must be one of {sorted(RELATIONS)} and needs "base_model"')
    for key in ("tags", "datasets", "library_name", "quantized_by", "model_creator", "model_name",
                "prompt_template"):
        strings(key)
    return errors, []


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
           "validate_card_metadata", "git_blob_oid", "lfs_pointer"]
