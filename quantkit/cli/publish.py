"""`quantkit publish`: push built variants to the Hub, one branch each."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..errors import ManifestError
from .common import OnlyOpt, OutOpt, RecipeArg, err, load_plan, locked, out, run, size


def publish(recipe: RecipeArg, out_dir: OutOpt = None, only: OnlyOpt = None,
            dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be uploaded.")] = False,
            force: Annotated[bool, typer.Option("--force", help="Publish variants over the recipe's "
                                                "quality gate too.")] = False) -> None:
    """Push built variants to the Hub, one branch each; uploads only what changed."""
    report = run(lambda: publish_one(recipe, out_dir, only, dry_run, force))
    print_publish(report, dry_run)
    run(report.raise_for_errors)


def publish_one(recipe: Path, out_dir: Path | None, only: list[str] | None, dry_run: bool,
                force: bool = False) -> Any:
    from .. import publish as pub
    from ..manifest import load_manifest, save_manifest

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retry warnings; ours say more
    p = load_plan(recipe, out_dir)
    # A dry run writes nothing, so it may look at a folder another run is working on.
    with nullcontext() if dry_run else locked(p.out_dir, "publish"):
        m = load_manifest(p.out_dir)
        if m is None:
            raise ManifestError(str(p.out_dir / "manifest.json"), "not built yet: run `quantkit build` first")
        report = pub.publish(p, m, p.out_dir, dry_run=dry_run, only=only, force=force)
        if not dry_run:
            save_manifest(p.out_dir, report.manifest)
    return report


def print_publish(report: Any, dry_run: bool) -> None:
    if dry_run:
        for line in report.operations():
            out.print(line, highlight=False, markup=False)
    t = Table(title="publish (dry run)" if dry_run else "publish")
    for col in ("repo", "branch", "status", "added", "removed", "skipped", "bytes", "commit"):
        t.add_column(col, no_wrap=col != "repo")
    for b in report.branches:
        t.add_row(b.repo, b.branch, b.status, str(len(b.added)), str(len(b.removed)), str(len(b.skipped)),
                  size(b.bytes), (b.commit or "-")[:12])
    out.print(t)
    for variant, why in ([] if dry_run else report.not_ready):  # a dry run lists them already
        err.print(f"[yellow]not published:[/yellow] {variant}: {why}", highlight=False)
    for note in report.notes:
        err.print(f"note: {note}", highlight=False, markup=False)
    if report.collection:
        out.print(f"collection: {report.collection}", highlight=False)
