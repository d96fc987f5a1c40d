"""`quantkit build`, `eval`, `card` and `batch`: the commands that make and score variants, here
or on a Ray cluster (`--ray`)."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from ..errors import BuildFailed, ManifestError, QuantkitError
from ..events import Event, Reporter, VariantEvent
from .common import OnlyOpt, OutOpt, RecipeArg, err, fail, load_plan, locked, out, quiet_libraries, run
from .publish import print_publish, publish_one
from .capture import BuildLog, logged, tee
from .views import ClusterView, progress_view, summary

NoPreflightOpt = Annotated[bool, typer.Option("--no-preflight", help="Build even when the resource plan says "
                                              "this machine lacks the RAM or disk.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show the libraries' own output (warnings, "
                                          "banners, log lines) too; without it they go to <out>/build.log only.")]
RayOpt = Annotated[str | None, typer.Option(
    "--ray", metavar="[ADDRESS]", show_default=False,
    help="Build the variants as Ray tasks: on the cluster at ADDRESS ('auto': the one `ray start` "
         "runs on this machine; 'ray://HOST:10001'), or, with no ADDRESS or 'local', on a cluster "
         "started on this machine for this run.")]


def build(recipe: RecipeArg, out_dir: OutOpt = None, only: OnlyOpt = None, no_preflight: NoPreflightOpt = False,
          ray: RayOpt = None, verbose: VerboseOpt = False) -> None:
    """Calibrate, quantize, evaluate, size and write cards for every variant."""
    p, res = run(lambda: build_one(recipe, out_dir, only, not no_preflight, ray, verbose))
    out.print(summary(res.manifest, p, [v.name for v in p.select(only)]))
    out.print(f"manifest: {p.out_dir / 'manifest.json'}")
    if res.failed:
        raise fail(BuildFailed(res.failed))


def build_one(recipe: Path, out_dir: Path | None, only: list[str] | None, preflight: bool = True,
              ray: str | None = None, verbose: bool = False) -> tuple[Any, Any]:
    from .. import pipeline
    from ..source_check import check_recipe_source

    p = load_plan(recipe, out_dir)
    check_recipe_source(p.recipe)
    with locked(p.out_dir, "build"), logged(p.out_dir, f"build {recipe}", verbose) as log:  # a refused run prints only why
        if p.recipe.calibration.dataset is None:
            err.print("• calibration: the German sample shipped in calibration/ (no \\[calibration] dataset set)")
        quiet_libraries()
        if ray is not None:
            return p, _build_on_ray(p, only, ray, preflight, log)
        with progress_view() as rep:
            return p, pipeline.build(p, only=only, report=tee(rep, log.event), preflight=preflight)


def _build_on_ray(p: Any, only: list[str] | None, address: str, preflight: bool, log: BuildLog) -> Any:
    from .. import cluster

    view = ClusterView()
    with cluster.connect(address), Live(console=err, get_renderable=view.table, refresh_per_second=4,
                                        redirect_stdout=False, redirect_stderr=False) as live:
        view.live = live
        return cluster.build(p, only=only, report=tee(view, log.event), preflight=preflight)


def eval_(recipe: RecipeArg, out_dir: OutOpt = None, only: OnlyOpt = None, verbose: VerboseOpt = False) -> None:
    """Evaluate built variants again against the unquantized model (builds nothing)."""
    from .. import pipeline
    from ..source_check import check_recipe_source

    def go() -> tuple[Any, Any]:
        p = load_plan(recipe, out_dir)
        check_recipe_source(p.recipe)
        with locked(p.out_dir, "eval"), logged(p.out_dir, f"eval {recipe}", verbose) as log, progress_view() as rep:
            quiet_libraries()
            return p, pipeline.reevaluate(p, only=only, report=tee(rep, log.event))

    p, res = run(go)
    out.print(summary(res.manifest, p, [v.name for v in p.select(only)]))
    if res.failed:
        raise fail(BuildFailed(res.failed))


def card(recipe: RecipeArg, out_dir: OutOpt = None) -> None:
    """Write the model cards (README.md per variant) again from the manifest."""
    from .. import card as cards
    from ..manifest import load_manifest, save_manifest

    def go() -> tuple[Any, Any]:
        p = load_plan(recipe, out_dir)
        with locked(p.out_dir, "card"):
            m = load_manifest(p.out_dir)
            if m is None:
                raise ManifestError(str(p.out_dir / "manifest.json"), "not built yet: run `quantkit build` first")
            m = cards.write_cards(p, m, p.out_dir)
            save_manifest(p.out_dir, m)
        return p, m

    p, m = run(go)
    for name, rec in m.variants.items():
        if (p.out_dir / name / "README.md").is_file():
            out.print(f"{p.out_dir / name / 'README.md'} ({rec.state})")


def batch(recipes: Annotated[list[Path], typer.Argument(help="Recipe files.")],
          out_dir: Annotated[Path, typer.Option("--out", help="Each recipe builds into OUT/<model name>/.")
                             ] = Path("build"),
          do_publish: Annotated[bool, typer.Option("--publish", help="Publish each after building.")] = False,
          ray: RayOpt = None, verbose: VerboseOpt = False) -> None:
    """Build (and publish) many recipes, going on past a failed one."""
    if ray is not None:  # one cluster, every recipe in flight at once; with --publish, workers push
        results = _batch_on_ray(recipes, out_dir, do_publish, ray, verbose)
    else:
        results = [(str(r), _batch_one(r, out_dir, do_publish, verbose)) for r in recipes]
    t = Table(title="batch")
    t.add_column("recipe", no_wrap=True)  # a path folded across lines cannot be pasted back
    t.add_column("result")
    for name, res in results:
        t.add_row(name, res)
    out.print(t)
    if any(res != "ok" for _, res in results):
        raise typer.Exit(1)


def _batch_on_ray(recipes: list[Path], out_dir: Path, do_publish: bool, address: str,
                  verbose: bool = False) -> list[tuple[str, str]]:
    """Every recipe's variants on one cluster, recipes overlapping (cluster.build_many)."""
    from .. import cluster
    from ..recipe import load_recipe
    from ..source_check import check_recipe_source

    why: dict[Path, str] = {}
    plans = []
    with ExitStack() as stack:
        log = stack.enter_context(logged(out_dir, f"batch --ray {' '.join(map(str, recipes))}", verbose))
        quiet_libraries()
        for r in recipes:
            try:
                p = load_plan(r, out_dir / load_recipe(r).model.model_name)
                check_recipe_source(p.recipe)
                stack.enter_context(locked(p.out_dir, "batch"))
                plans.append((r, p))
            except QuantkitError as e:
                err.print(f"[red]error:[/red] {escape(f'{r}: {e}')}", highlight=False)
                why[r] = f"failed: {e}"
        view = ClusterView()
        run(lambda: stack.enter_context(cluster.connect(address)))
        with Live(console=err, get_renderable=view.table, refresh_per_second=4, redirect_stdout=False,
                  redirect_stderr=False) as live:
            view.live = live
            got = cluster.build_many([p for _, p in plans], publish=do_publish,
                                     reports=[tee(_labelled(view, p.recipe.model.model_name), log.event)
                                              for _, p in plans])
    for (r, _), res in zip(plans, got):
        failed = res.failed if not isinstance(res, QuantkitError) else {"recipe": str(res)}
        why[r] = "failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()) if failed else "ok"
    return [(str(r), why[r]) for r in recipes]


def _labelled(view: Reporter, name: str) -> Reporter:
    """Rows read model/variant: recipes share variant names."""
    def report(e: Event) -> None:
        view(replace(e, variant=f"{name}/{e.variant}") if isinstance(e, VariantEvent) else e)

    return report


def _batch_one(recipe: Path, out_dir: Path, do_publish: bool, verbose: bool = False) -> str:
    try:
        from ..recipe import load_recipe

        name = load_recipe(recipe).model.model_name
        p, res = build_one(recipe, out_dir / name, None, verbose=verbose)
        if res.failed:
            return "failed: " + "; ".join(f"{k}: {v}" for k, v in res.failed.items())
        if do_publish:
            report = publish_one(recipe, out_dir / name, None, False)
            print_publish(report, False)
            report.raise_for_errors()
        return "ok"
    except QuantkitError as e:
        err.print(f"[red]error:[/red] {escape(f'{recipe}: {e}')}", highlight=False)
        return f"failed: {e}"
