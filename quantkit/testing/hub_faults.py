"""Faults the local Hub injects: scripted ones (a connection dropped mid-upload, an error
status on a route, a commit applied whose answer never arrives) and random ones at a set rate,
seeded (5xx, 429 with Retry-After, resets, slow and lost answers), recording whether each
429's Retry-After was waited out.
"""

from __future__ import annotations

import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any


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
                # An LFS verify's URL is the same for every file, and files are verified in
                # parallel: a second file's verify is no early retry. Its wait is not checked.
                if got[0] == "429" and not key.endswith("/verify"):
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
