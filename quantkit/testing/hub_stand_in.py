"""The local Hub stand-in (hub_server.py) as a process of its own, for shell scripts.

    python -m quantkit.testing.hub_stand_in --info INFO.json --state STATE.json [--port 0]

Listens on 127.0.0.1 (a container reaches it with `--network host`), writes
`{"url", "token", "user"}` to INFO.json once it listens, serves until SIGTERM or SIGINT, then
writes what it holds to STATE.json: per repo its branches and their files with sizes, and the
request counts. Needs only the standard library.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from quantkit.testing.hub_server import HubServer, summarize


def state(hub: HubServer) -> dict[str, Any]:
    repos: dict[str, Any] = {}
    for (kind, repo_id), repo in sorted(hub.repos.items()):
        repos[repo_id] = {branch: {path: len(data) for path, data in sorted(hub.files(repo_id, branch, kind).items())}
                          for branch in sorted(repo.branches)}
    return {"repos": repos, "requests": summarize(hub.log)}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--info", type=Path, required=True)
    ap.add_argument("--state", type=Path, required=True)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with HubServer(port=args.port) as hub:
        tmp = args.info.with_suffix(".tmp")
        tmp.write_text(json.dumps({"url": hub.url, "token": hub.token, "user": hub.user}))
        tmp.rename(args.info)  # readers never see half a file
        stop.wait()
        args.state.write_text(json.dumps(state(hub), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
