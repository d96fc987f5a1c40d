"""Quiet by default: while a command works, everything the libraries print (warnings, log
lines, banners, progress bars, C libraries writing to the file descriptors) goes to the build's
log file, `<out>/build.log`; the terminal shows our own lines and errors. `-v` shows the
libraries' output on the terminal as well. The log also gets a line for each of our events, so
it alone tells what happened."""

from __future__ import annotations

import io
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .. import events as ev
from ..errors import BusyError, CalibrationError, ManifestError, RecipeError, ResourceError, SourceError
from .common import err, out

LOG_NAME = "build.log"
# Errors that refuse a run before it changes anything (bad recipe, data, source or manifest; a
# machine too small; a busy folder): a log this run started is removed with them.
REFUSALS = (RecipeError, CalibrationError, SourceError, ResourceError, ManifestError, BusyError)


class BuildLog:
    """The log file, and our events written into it as plain lines."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file: IO[str] = open(path, "a", encoding="utf-8", errors="replace", buffering=1)  # noqa: SIM115

    def line(self, text: str) -> None:
        self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} quantkit: {text}\n")

    def event(self, e: ev.Event) -> None:
        """Our events, as the terminal shows them (progress only when a task ends)."""
        match e:
            case ev.Stage(text=t) | ev.StepDone(text=t):
                self.line(f"• {t}")
            case ev.Warn(message=m):
                self.line(f"warning: {m}")
            case ev.Started(variant=v, message=m):
                self.line(f"▶ {v} {m}")
            case ev.Progress(variant=v, task=t, done=d, total=n) if n and d == n:
                self.line(f"  {v} {t} {d}/{n}")
            case ev.Done(variant=v, message=m):
                self.line(f"✓ {v} {m}")
            case ev.Skipped(variant=v, message=m):
                self.line(f"= {v} {m}")
            case ev.Failed(variant=v, message=m):
                self.line(f"✗ {v} {m}")

    def close(self) -> None:
        self.file.close()


def _real_fd(stream: Any) -> int | None:
    try:
        return int(stream.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None  # an in-memory stream (a test's CliRunner): swap the Python objects only


@contextmanager
def captured(log: BuildLog, verbose: bool = False) -> Iterator[None]:
    """Library output into `log` (unless verbose); our consoles keep writing to the terminal."""
    if verbose:
        yield
        return
    handler = logging.StreamHandler(log.file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root, saved_handlers = logging.getLogger(), _stream_handlers()
    for lg, h in saved_handlers:
        lg.removeHandler(h)
    root.addHandler(handler)
    logging.captureWarnings(True)
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # each warning once per place, into the log
        with _streams(log.file):
            try:
                yield
            finally:
                logging.captureWarnings(False)
                root.removeHandler(handler)
                for lg, h in saved_handlers:
                    lg.addHandler(h)


def _stream_handlers() -> list[tuple[logging.Logger, logging.Handler]]:
    """Handlers the libraries put on their loggers that write to the terminal (torch's, for one)."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                     if isinstance(lg, logging.Logger))]
    return [(lg, h) for lg in loggers for h in list(lg.handlers)
            if type(h) is logging.StreamHandler and getattr(h, "stream", None) in (sys.stdout, sys.stderr,
                                                                                  sys.__stdout__, sys.__stderr__)]


@contextmanager
def _streams(log: IO[str]) -> Iterator[None]:
    """stdout and stderr into the log, at the file descriptors when they are real (C libraries
    and subprocesses write there) and as Python objects; our consoles get the terminal's."""
    saved = sys.stdout, sys.stderr, out._file, err._file  # None: the console follows sys.stdout/err
    fds = _real_fd(sys.stdout), _real_fd(sys.stderr)
    copies: list[int] = []
    try:
        if None not in fds:
            sys.stdout.flush()
            sys.stderr.flush()
            copies = [os.dup(fd) for fd in fds]  # type: ignore[arg-type]
            out.file = os.fdopen(copies[0], "w", buffering=1, closefd=False)
            err.file = os.fdopen(copies[1], "w", buffering=1, closefd=False)
            for fd in fds:
                os.dup2(log.fileno(), fd)  # type: ignore[arg-type]
        else:
            out.file, err.file = saved[0], saved[1]
        sys.stdout = sys.stderr = log
        yield
    finally:
        sys.stdout, sys.stderr = saved[0], saved[1]
        if copies:
            log.flush()
            for fd, copy in zip(fds, copies):
                os.dup2(copy, fd)  # type: ignore[arg-type]
                os.close(copy)
        out._file, err._file = saved[2], saved[3]


@contextmanager
def logged(out_dir: Path, what: str, verbose: bool = False) -> Iterator[BuildLog]:
    """`<out>/build.log` opened for this run (a header line says which), libraries captured."""
    from .. import __version__

    new = not (out_dir / LOG_NAME).exists()
    log = BuildLog(out_dir / LOG_NAME)
    log.line(f"=== quantkit {__version__}: {what} (pid {os.getpid()})")
    try:
        with captured(log, verbose):
            yield log
    except BaseException as e:
        log.line(f"ended by {type(e).__name__}: {e}")
        log.close()
        if new and isinstance(e, REFUSALS):  # bad input writes nothing: its one line says it all
            log.path.unlink(missing_ok=True)
        raise
    finally:
        log.close()


def tee(view: ev.Reporter, *more: ev.Reporter) -> ev.Reporter:
    """One reporter that hands each event to the view and to the others (the log)."""
    def report(e: ev.Event) -> None:
        for r in (view, *more):
            r(e)

    return report
