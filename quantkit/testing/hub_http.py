"""The local Hub's HTTP plumbing: the route table, and the request handler's dispatch (faults
first, then the endpoint under the server's lock), body reading (chunked too), answers and the
request log. The endpoints themselves are in hub_api and hub_upload.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import time
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from quantkit.testing.hub_repo import Commit, HubError, Repo, RequestRecord

if TYPE_CHECKING:
    from quantkit.testing.hub_server import HubServer

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


class Drop(Exception):
    """Close the connection without an answer."""


class BaseHandler(BaseHTTPRequestHandler):
    """Routing, fault injection, bodies in and out, auth: the endpoints (hub_api, hub_upload)
    are the `h_<route name>` methods of its subclasses."""

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
        except Drop:
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
            raise Drop()
        body = self._read_body()
        if fault and fault.action == "status":
            raise HubError(fault.status, f"injected {fault.status}", headers=fault.headers)
        if fault and fault.action == "echo_auth":  # a careless server quoting the credentials
            said = f"injected {fault.status}; you sent {self.headers.get('Authorization')}"
            raise HubError(fault.status, said, body={"error": said}, headers=fault.headers)
        answer = self._handle(method, path, body)
        if fault and fault.action == "drop_response":
            raise Drop()
        return answer

    def _random_fault(self, method: str, path: str, kind: str, rng: random.Random) -> tuple[int, Any, dict[str, str]]:
        rf = self.server_state.faults.random
        assert rf is not None
        if kind == "reset":
            self._read_body(limit=self._body_length() // 2)
            raise Drop()
        if kind == "slow":
            time.sleep(rng.uniform(*rf.slow))
            return self._handle(method, path, self._read_body())
        if kind == "lost":
            self._handle(method, path, self._read_body())
            raise Drop()
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

    def _route(self, method: str, path: str) -> tuple[str, dict[str, Any]]:
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
