"""The end of benchmarks/docker_check.sh: what the run in the image left, checked and tabled.

Reads the work folder (the build volume's manifests, the Hub stand-in's final state), prints
the figures and the checks, optionally writes them as JSON, and exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from quantkit.testing import table

DEMO = "SmolLM2-135M-Instruct"  # recipes/demo-smollm2.toml's model name
BROKEN = "broken-demo"  # the broken recipe docker_check.sh writes


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def checks(a: argparse.Namespace, manifest: dict[str, Any], hub: dict[str, Any]) -> list[tuple[str, bool]]:
    states = {name: v["state"] for name, v in manifest.get("variants", {}).items()}
    return [
        ("batch exits 1 (one recipe broken)", a.batch_rc == 1),
        ("demo built and published: every variant", bool(states) and set(states.values()) == {"published"}),
        ("broken recipe built nothing", not (a.work / "build" / BROKEN).exists()),
        ("Hub stand-in holds the demo's repos", any(DEMO in repo for repo in hub.get("repos", {}))),
        ("publish again exits 0", a.publish_rc == 0),
        ("every file on the host volume owned by the caller", a.foreign == 0),
    ]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--image", required=True)
    for name in ("size-mb", "build-s", "doctor-s", "info-s", "batch-s", "batch-rc", "publish-s", "publish-rc",
                 "foreign"):
        ap.add_argument(f"--{name}", type=int, required=True)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    manifest = _load(a.work / "build" / DEMO / "manifest.json")
    hub = _load(a.work / "hub-state.json")
    results = checks(a, manifest, hub)
    figures = {"image": a.image, "image_mb": a.size_mb, "build_s": a.build_s, "doctor_s": a.doctor_s,
               "info_run_s": a.info_s, "batch_s": a.batch_s, "batch_rc": a.batch_rc, "publish_s": a.publish_s,
               "publish_rc": a.publish_rc}
    print(table(list(figures), [list(figures.values())]))
    branches = [[repo, branch, len(files)] for repo, bs in hub.get("repos", {}).items() for branch, files in bs.items()]
    print("\n" + table(["Hub repo", "branch", "files"], branches or [["-", "-", 0]]))
    print("\n" + table(["check", "ok"], [[name, "yes" if ok else "NO"] for name, ok in results]))
    if a.json:
        Path(a.json).write_text(json.dumps({**figures, "hub": hub.get("repos", {}),
                                            "checks": dict(results)}, indent=2))
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
