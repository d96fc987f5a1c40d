"""Publish a built demo to the local Hub-API server (quantkit.testing.hub_server) and count the traffic.

    .venv/bin/python benchmarks/publish.py [--recipe R] [--out BUILD] [--mb 4]

With a build folder that holds a manifest with evaluated variants (what `quantkit build` of
the recipe leaves), that build is published. Otherwise the recipe's variants are fabricated:
real files (random weights of --mb MB, configs, tokenizer), a manifest with their real sizes
and hashes, made-up quality numbers (the benchmark measures the Hub protocol, not quality).

Runs, each against the same server: a fresh publish; the re-run with nothing changed
(target: 0 commits, 0 bytes of file content, at most 3 requests per branch); one variant
rebuilt (target: one commit, that file's bytes). Prints a table per run and the requests by
route. Requests are counted by the server, bytes are HTTP bodies.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from quantkit.testing import table
from quantkit.testing.hub_server import HubServer, summarize  # stdlib only, no huggingface_hub yet

ROOT = Path(__file__).resolve().parent.parent


def fabricate(plan, out: Path, mb: float):  # type: ignore[no-untyped-def]
    """Variant folders with real files and a manifest with their sizes and hashes."""
    from quantkit.records import CalibrationRecord, QualityRecord, file_entries
    from quantkit.manifest import Manifest, VariantRecord

    rng = random.Random(0)
    variants = {}
    for v in plan.variants:
        folder = plan.variant_dir(v)
        folder.mkdir(parents=True, exist_ok=True)
        weights = rng.randbytes(int(mb * 1e6))
        if v.format == "gguf":
            (folder / f"{plan.recipe.model.model_name}.{v.params.quant}.gguf").write_bytes(b"GGUF" + weights)
        else:
            (folder / "model.safetensors").write_bytes(weights)
            (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                            "quantization_config": v.params_dict()}))
            (folder / "tokenizer.json").write_text(json.dumps({"vocab": {f"t{i}": i for i in range(20000)}}))
        files = file_entries(folder)
        variants[v.name] = VariantRecord(v.format, v.branch, v.repo, "evaluated", params=v.params_dict(),
                                         files=files, size_bytes=sum(f.size for f in files), bits_per_weight=4.5,
                                         quality=QualityRecord(21.0, 20.0, 5.0, 0.05, 0.9),
                                         engine="fabricated", engine_version="benchmark",
                                         notes={"benchmark": "fabricated files; quality numbers are placeholders"})
    return Manifest("0" * 64, variants, calibration=CalibrationRecord(source="fabricated", sha256="0" * 64))


def run(label: str, hub: HubServer, plan, manifest, out: Path):  # type: ignore[no-untyped-def]
    from quantkit import publish

    hub.reset_log()
    t0 = time.perf_counter()
    report = publish.publish(plan, manifest, out)
    seconds = time.perf_counter() - t0
    report.raise_for_errors()
    s = summarize(hub.log)
    n = len(report.branches)
    row = [label, n, s["requests"], f"{s['requests'] / n:.1f}", report.commits, s["bytes_in"], s["content_bytes"],
           s["bytes_out"], report.hashed_bytes, f"{seconds:.2f}"]
    return report, row, s["by_route"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "demo-smollm2.toml")
    ap.add_argument("--out", type=Path, default=None, help="a build folder of the recipe to publish")
    ap.add_argument("--mb", type=float, default=4.0, help="weight file size when fabricating, in MB")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="quantkit-bench-"))
    with HubServer() as hub:
        # huggingface_hub reads these at import: set them first, as the CLI's users would.
        os.environ.update({"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": hub.token,
                           "HF_HOME": str(home / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"})
        from quantkit import card
        from quantkit.manifest import load_manifest
        from quantkit.plan import make_plan
        from quantkit.recipe import load_recipe

        recipe = load_recipe(args.recipe, check_source=False)
        manifest = load_manifest(args.out) if args.out else None
        if manifest is not None and any(r.at_least("evaluated") for r in manifest.variants.values()):
            out, source = home / "build", f"build {args.out}"
            shutil.copytree(args.out, out)  # publish rewrites READMEs: leave the original alone
        else:
            out, source = home / "build", f"fabricated, {args.mb:g} MB weights per variant"
        plan = make_plan(recipe, out)
        if manifest is None:
            manifest = fabricate(plan, out, args.mb)
        manifest = card.write_cards(plan, manifest, out)

        rows, routes = [], {}
        report, row, routes["fresh"] = run("fresh publish", hub, plan, manifest, out)
        rows.append(row)
        report, row, routes["re-run"] = run("re-run, nothing changed", hub, plan, report.manifest, out)
        rows.append(row)
        victim = plan.variants[-1]
        weights = next(p for p in plan.variant_dir(victim).iterdir() if p.suffix in (".gguf", ".safetensors"))
        weights.write_bytes(weights.read_bytes()[:4] + random.Random(1).randbytes(weights.stat().st_size - 4))
        m = report.manifest
        from dataclasses import replace

        from quantkit.records import file_entries

        m = m.with_variant(victim.name, replace(m.variants[victim.name], state="evaluated", files=tuple(
            f for f in file_entries(plan.variant_dir(victim)) if f.path != "README.md")))
        m = card.write_cards(plan, m, out)
        report, row, routes["rebuilt"] = run(f"{victim.name} rebuilt", hub, plan, m, out)
        rows.append(row)

        print(f"recipe {args.recipe.name} ({source}); {len(plan.variants)} branches in "
              f"{len({v.repo for v in plan.variants})} repos; server {hub.url}\n")
        print(table(["run", "branches", "requests", "per branch", "commits", "bytes sent", "file content sent",
                     "bytes received", "bytes hashed", "seconds"], rows))
        print()
        names = sorted({k for r in routes.values() for k in r})
        print(table(["requests by route", *routes], [[k, *(r.get(k, 0) for r in routes.values())] for k in names]))
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
