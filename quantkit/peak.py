"""The peak anonymous memory (RssAnon) of this process and its children while a task runs: what
decides whether a machine runs out (memory-mapped weights are page cache, given back under
pressure). Sampled by a background thread; the figure the plan's RAM estimate is compared with."""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType

EVERY_S = 0.2  # sampling period: llama.cpp tools and GPTQModel layers last seconds, not milliseconds


def rss_anon(pid: int) -> int:
    """RssAnon of one process in bytes (0 when it is gone or not Linux)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def tree_rss_anon(pid: int | None = None) -> int:
    """RssAnon of a process and all its descendants."""
    import psutil

    pid = pid or os.getpid()
    try:
        kids = [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        kids = []
    return sum(rss_anon(p) for p in (pid, *kids))


class PeakRss:
    """`with PeakRss() as peak: ...`, then `peak.bytes`: the largest tree RssAnon seen."""

    def __init__(self, every: float = EVERY_S):
        self.every, self.bytes = every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="quantkit-peak-rss", daemon=True)

    def _sample(self) -> None:
        while True:
            self.bytes = max(self.bytes, tree_rss_anon())
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> PeakRss:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self.started
