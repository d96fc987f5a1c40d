"""One run per output folder: a second build/publish exits with one line (exit 5); a lock left
by a killed run is taken over, with a line saying so."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.errors import BusyError, QuantkitError
from quantkit.lock import LOCK_NAME, acquire, hold
from quantkit.manifest import save_manifest
from quantkit.testing.fabricate import fabricate_build

pytest.register_assert_rewrite("_hub_fixtures")

pytest_plugins = ("_hub_fixtures",)

# A second process that takes the lock the way quantkit does, says so, and sleeps.
HOLDER = """
import sys, time
from pathlib import Path
from quantkit.lock import acquire
lk = acquire(Path(sys.argv[1]), sys.argv[2])
print("locked", flush=True)
time.sleep(float(sys.argv[3]))
lk.release()
"""


def _holder(out: Path, command: str = "build", seconds: float = 60) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), command, str(seconds)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


def test_lock_file_names_pid_host_and_command_and_goes_away(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    with hold(out, "build") as lk:
        d = json.loads((out / LOCK_NAME).read_text())
        assert (d["pid"], d["host"], d["command"]) == (os.getpid(), socket.gethostname(), "build")
        assert lk.took_over is None
    assert not (tmp_path / "a").exists()  # the folders made for the lock alone are removed too


def test_second_run_is_refused_while_the_first_holds_the_lock(tmp_path: Path) -> None:
    p = _holder(tmp_path, "build")
    try:
        with pytest.raises(BusyError) as e:
            acquire(tmp_path, "publish")
        assert f"quantkit build (pid {p.pid} on {socket.gethostname()}" in str(e.value)
        t0 = time.monotonic()
        with pytest.raises(BusyError):
            acquire(tmp_path, "publish", wait=1.0)  # waits, then gives up
        assert time.monotonic() - t0 >= 1.0
    finally:
        p.kill()
        p.wait()


def test_waiting_run_gets_the_lock_when_the_first_ends(tmp_path: Path) -> None:
    p = _holder(tmp_path, "build", seconds=1)
    t0 = time.monotonic()
    with hold(tmp_path, "publish", wait=30) as lk:
        assert lk.took_over is None  # released properly: not a takeover
        assert time.monotonic() - t0 >= 0.5
    assert p.wait() == 0


def test_lock_of_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    p = _holder(tmp_path, "build")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == p.pid  # left behind
    with hold(tmp_path, "build") as lk:
        assert lk.took_over is not None and lk.took_over.pid == p.pid
        with pytest.raises(ProcessLookupError):
            os.kill(p.pid, 0)  # a dead pid
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_publish_cli_exits_5_with_one_line_while_a_build_runs(tmp_path: Path) -> None:
    b = fabricate_build(tmp_path)
    p = _holder(b.out, "build")
    try:
        res = CliRunner().invoke(app, ["publish", str(tmp_path / "recipe.toml"), "--out", str(b.out)])
    finally:
        p.kill()
        p.wait()
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 5 and len(lines) == 1, res.output
    assert lines[0].startswith(f"error: {b.out / LOCK_NAME}: quantkit build (pid {p.pid} on ")
    assert "wait for it to finish" in lines[0]


def test_output_folder_that_is_a_file_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(QuantkitError, match="cannot create the output folder"):
        acquire(tmp_path / "out", "build")


def test_cli_says_when_it_takes_over_a_stale_lock(tmp_path: Path) -> None:
    b = fabricate_build(tmp_path)
    save_manifest(b.out, b.manifest)
    p = _holder(b.out, "build")
    p.send_signal(signal.SIGKILL)
    p.wait()
    res = CliRunner().invoke(app, ["card", str(tmp_path / "recipe.toml"), "--out", str(b.out)])
    assert res.exit_code == 0, res.output
    assert f"note: took over the lock of quantkit build (pid {p.pid} on {socket.gethostname()}" in res.stderr
    assert not (b.out / LOCK_NAME).exists()
