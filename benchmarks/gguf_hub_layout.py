"""A GGUF ladder published the way the ecosystem reads it, against the local Hub stand-in.

    .venv/bin/python benchmarks/gguf_hub_layout.py --out BUILD [--recipe recipes/smollm2-gguf-ladder.toml]

BUILD: the folder `quantkit build RECIPE --out BUILD` left. Runs, against one server: a publish
with the recipe's quality gate (variants over it are refused, the others publish); the same
with --force; a re-run with nothing changed. Prints per run the commits, requests, file bytes
sent and seconds; the files on main and on each branch; the bytes uploaded against the sum of
the distinct files (content addressing: each sent once); and the Hub's quant-label rule applied
to main's files for every `REPO:TYPE` the cards name.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from quantkit.testing import table
from quantkit.testing.hub_server import HubServer, summarize  # stdlib only, no huggingface_hub yet

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "smollm2-gguf-ladder.toml")
    ap.add_argument("--out", type=Path, required=True, help="the build folder of the recipe")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="quantkit-gguf-hub-"))
    with HubServer(user="quantkit-demo") as hub:
        os.environ.update({"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": hub.token,
                           "HF_HOME": str(home / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"})
        from quantkit import card, publish
        from quantkit.engines.gguf import hub_quant_label
        from quantkit.manifest import load_manifest
        from quantkit.plan import make_plan
        from quantkit.recipe import load_recipe

        out = home / "build"
        shutil.copytree(args.out, out)  # publish rewrites READMEs: leave the original alone
        plan = make_plan(load_recipe(args.recipe, check_source=False), out)
        manifest = card.write_cards(plan, load_manifest(out), out)
        rows, put_bytes = [], 0
        for label, force in (("publish, quality gate on", False), ("publish --force", True),
                             ("re-run, nothing changed", True)):
            hub.reset_log()
            t0 = time.perf_counter()
            report = publish.publish(plan, manifest, out, force=force)
            seconds = time.perf_counter() - t0
            manifest = report.manifest
            s = summarize(hub.log)
            put_bytes += sum(r.bytes_in for r in hub.requests("PUT"))
            rows.append([label, report.commits, s["requests"], s["content_bytes"], f"{seconds:.2f}",
                         "; ".join(f"{n}: {why}" for n, why in report.gated) or "-"])
        print(f"recipe {args.recipe.name}, build {args.out}; server {hub.url}\n")
        print(table(["run", "commits", "requests", "file bytes sent", "seconds", "refused by the gate"], rows))
        repo = plan.variants[0].repo.replace("{owner}", hub.user)
        print(f"\n{repo}: files per branch (bytes)")
        branches = ["main", *sorted(b for b in hub.repo(repo).branches if b != "main")]
        print(table(["branch", "files"], [[b, ", ".join(f"{p} ({len(c)})" for p, c in sorted(hub.files(repo, b).items())
                                                        if p != ".gitattributes")] for b in branches]))
        distinct = {f.sha256: f.size for v in plan.variants for f in manifest.variants[v.name].files
                    if f.path != "README.md"}
        readmes = sum(len(hub.files(repo, b)["README.md"]) for b in branches)
        print(f"\nLFS uploads over all runs: {put_bytes} bytes; the distinct built files: {sum(distinct.values())} "
              f"bytes (the READMEs, {readmes} bytes over {len(branches)} branches, go inline in the commits)")
        main_files = [p for p in hub.files(repo, "main") if p.endswith(".gguf")]
        resolve = []
        for v in plan.variants:
            text = hub.files(repo, v.branch)["README.md"].decode()
            for tag in sorted(set(re.findall(rf"-hf {re.escape(repo)}:(\S+)", text))):
                hits = [p for p in main_files if hub_quant_label(p) == tag]
                resolve.append([v.branch, f"{repo}:{tag}", ", ".join(hits)])
            for name in re.findall(rf"--hf-repo {re.escape(repo)} --hf-file (\S+)", text)[:1]:
                resolve.append([v.branch, f"--hf-file {name}", "on main" if name in main_files else "MISSING"])
        print("\nthe cards' commands, resolved over main's files by the Hub's label rule")
        print(table(["card of branch", "command names", "main's files it resolves to"], resolve))
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
