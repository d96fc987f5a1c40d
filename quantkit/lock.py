"""One run per output folder: a lock file holding pid, host and command.

`build`, `eval`, `card` and `publish` all change the manifest and the variant folders, so
two of them on one folder would interleave. The lock is an flock on `<out>/.quantkit.lock`:
the kernel drops it when its process dies, however it dies, so a lock left by a killed run
is known to be stale and is taken over (the caller reports who held it). The pid and host
in the file are for the messages.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BusyError, QuantkitError

LOCK_NAME = ".quantkit.lock"
POLL_SECONDS = 0.5  # how often a waiting run tries again


@dataclass(frozen=True)
class Holder:
    """Who wrote a lock file."""

    pid: int
    host: str
    command: str
    started: float  # unix time

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"quantkit {self.command} (pid {self.pid} on {self.host}, started {since})"


@dataclass
class OutputLock:
    path: Path
    took_over: Holder | None  # the stale lock this one replaced, if any
    _fd: int
    _created: list[Path] = field(default_factory=list)  # folders made for the lock, outermost last

    def release(self) -> None:
        """Remove the lock file (while still holding it), then the folders made for it if empty:
        a run that wrote nothing leaves nothing."""
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = -1
        _remove_empty(self._created)


def acquire(out_dir: Path, command: str, *, wait: float = 0.0) -> OutputLock:
    """Lock `out_dir` for `command`; wait up to `wait` seconds for another run, then raise BusyError."""
    out_dir = Path(out_dir)
    try:
        created = _make_dirs(out_dir)
    except OSError as e:
        raise QuantkitError(f"{out_dir}: cannot create the output folder ({e.strerror or e})") from None
    path = out_dir / LOCK_NAME
    deadline = time.monotonic() + wait
    while True:
        try:
            got = _try_lock(path)
        except OSError as e:
            _remove_empty(created)
            raise QuantkitError(f"{path}: cannot create the lock file ({e.strerror or e})") from None
        if isinstance(got, int):
            previous = _read(got)
            _write(got, Holder(os.getpid(), socket.gethostname(), command, time.time()))
            return OutputLock(path, previous, got, created)
        if time.monotonic() >= deadline:
            _remove_empty(created)
            who = got.describe() if got else "another quantkit run"
            raise BusyError(str(path), who, "wait for it to finish (or stop it) and run this again")
        time.sleep(POLL_SECONDS)


@contextlib.contextmanager
def hold(out_dir: Path, command: str, *, wait: float = 0.0) -> Iterator[OutputLock]:
    lock = acquire(out_dir, command, wait=wait)
    try:
        yield lock
    finally:
        lock.release()


def _try_lock(path: Path) -> int | Holder | None:
    """The locked fd, or (when another live run holds it) that run's Holder, None if unknown."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            return holder
        # The holder we waited for may have unlinked the file just before we locked it: then
        # this fd is an orphan inode, and a third run could lock a new file. Start over.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _read(fd: int) -> Holder | None:
    try:
        d = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return Holder(int(d["pid"]), str(d["host"]), str(d["command"]), float(d["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # empty (just created) or being written


def _write(fd: int, h: Holder) -> None:
    data = json.dumps({"pid": h.pid, "host": h.host, "command": h.command, "started": h.started}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data + b"\n", 0)
    os.fsync(fd)


def _make_dirs(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it made, innermost first."""
    made = []
    p = folder.absolute()
    while not p.exists():
        made.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return made


def _remove_empty(folders: list[Path]) -> None:
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return  # not empty: the run wrote something there, keep it and its parents
