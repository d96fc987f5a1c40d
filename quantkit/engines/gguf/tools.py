"""Running llama.cpp's programs: one subprocess each, its output kept for a one-line reason when
it fails, killed with the build; and the disk and thread checks around them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import EngineError, EngineUnavailable

MB = 1 << 20
MIN_FREE_AFTER_FAIL = 64 << 20  # a failed write with less free than this is a full disk


@dataclass(frozen=True)
class Result:
    returncode: int
    log: str


def run(cmd: Sequence[str | Path], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> Result:
    """Run one llama.cpp program; keep its combined output for error messages."""
    lines: list[str] = []
    try:
        p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, errors="replace", env=env, cwd=cwd, preexec_fn=_die_with_parent)
    except OSError as e:
        raise EngineUnavailable("gguf", f"cannot run {cmd[0]}: {e.strerror}") from None
    with p:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line.rstrip())
        # all of it: a statistics block (llama-perplexity's) may sit before many later lines
        return Result(p.wait(), "\n".join(lines))


def _libc_prctl() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").prctl
    except (OSError, AttributeError):  # not glibc Linux
        return None


_PRCTL = _libc_prctl()  # bound before any fork: the child only calls it


def _die_with_parent() -> None:
    """In the child before exec: a killed build takes its llama.cpp tools with it."""
    if _PRCTL is not None:
        _PRCTL(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


# llama.cpp output lines that explain a failure, most specific first.
_UNSUPPORTED = "llama.cpp's converter does not support architecture {0}"
_FAILURE_PATTERNS = (
    (re.compile(r"Model (\S+) is not supported"), _UNSUPPORTED),
    (re.compile(r"Architecture '?([^'\s]+)'? not supported"), _UNSUPPORTED),
    (re.compile(r"BPE pre-tokenizer was not recognized"),
     "llama.cpp's converter does not know this tokenizer's pre-tokenizer"),
    (re.compile(r"No space left on device"), "disk full"),
    (re.compile(r"(?:error|Error|ERROR)[:!] ?(.+)"), "{0}"),
    (re.compile(r"(\w+Error: .+)"), "{0}"),
    (re.compile(r"failed to quantize: (.+)"), "{0}"),
    (re.compile(r"(you need at least \d+ tokens.*)"), "{0}"),
)


def explain(res: Result, what: str, out_dir: Path) -> str:
    """One line for a failed tool run: a known cause, a full disk, or the tool's last error."""
    for pat, msg in _FAILURE_PATTERNS[:4]:
        if m := pat.search(res.log):
            reason = msg.format(*m.groups())
            return f"{reason} ({what}, free {free_bytes(out_dir) // MB} MiB)" if reason == "disk full" else reason
    if free_bytes(out_dir) < MIN_FREE_AFTER_FAIL:
        return f"disk full while {what} in {out_dir} ({free_bytes(out_dir) // MB} MiB free)"
    for line in reversed(res.log.splitlines()):
        for pat, msg in _FAILURE_PATTERNS[4:]:
            if m := pat.search(line):
                return f"{what} failed: {msg.format(*m.groups()).strip()[:300]}"
    return f"{what} failed (exit {res.returncode})"


def free_bytes(path: Path) -> int:
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def need_space(where: Path, need: int, what: str, variant: str | None) -> None:
    free = free_bytes(where)
    if free < need:
        raise EngineError("gguf", f"disk full: {what} needs about {need // MB} MiB in {where}, "
                          f"{free // MB} MiB free", variant)


def llama_threads() -> int:
    """Threads per llama.cpp process: QUANTKIT_THREADS, else the cores we may use. On a busy
    machine fewer threads can be faster (ggml's threads spin-wait for each other)."""
    env = os.environ.get("QUANTKIT_THREADS", "")
    return max(1, int(env)) if env.isdigit() else cores()


def cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
