"""The `quantkit` command. The only module that prints, draws progress or exits.

Every command turns library errors into one line per problem and an exit code from
EXIT_CODES; no traceback reaches the user for input mistakes.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__, atomic
from .errors import (BuildFailed, BusyError, CalibrationError, ClusterError, EngineError, EngineUnavailable,
                     EvalError, GateRefused, ManifestError, Problem, PublishError, QuantkitError, RecipeError,
                     ResourceError, SourceError)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize and convert LLMs from one recipe into every format a publisher ships.")
# Piped output (CI logs, files) gets wide tables instead of rich's 80-column default.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

# Error type -> exit code; the first matching row wins, so subclasses come first.
EXIT_CODES: list[tuple[type[QuantkitError], int]] = [
    (RecipeError, 2),  # bad recipe: fix the file
    (CalibrationError, 2),  # bad or missing calibration data
    (SourceError, 2),  # source model missing or unreadable
    (ResourceError, 2),  # the machine cannot hold the build: fewer variants, or another machine
    (EngineUnavailable, 3),  # engine or toolchain not installed here
    (ClusterError, 3),  # ray not installed, or its cluster cannot be reached
    (PublishError, 4),  # the Hub refused or could not be reached
    (BusyError, 5),  # another run holds the output folder: try again later
    (BuildFailed, 1),  # some variants failed; the others are kept
    (GateRefused, 1),  # variants over the quality gate were not published; the others were
    (EngineError, 1),
    (EvalError, 1),
    (ManifestError, 1),
    (QuantkitError, 1),
]

RecipeArg = Annotated[Path, typer.Argument(help="Recipe TOML file.", show_default=False)]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Build folder (default: build/<model name>/).")]
OnlyOpt = Annotated[list[str] | None, typer.Option("--only", help="Only this variant (repeatable).")]

T = TypeVar("T")


def _fail(e: QuantkitError) -> typer.Exit:
    code = next(c for t, c in EXIT_CODES if isinstance(e, t))
    lines = [f"{e.file}: {p}" for p in e.problems] if isinstance(e, RecipeError) else [str(e)]
    if isinstance(e, BuildFailed):
        lines = [f"{name} failed: {why}" for name, why in e.failures.items()]
    if isinstance(e, GateRefused):
        lines = [f"{name} not published: {why} (--force publishes it)" for name, why in e.refused.items()]
    for line in lines:
        err.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _run(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except QuantkitError as e:
        raise _fail(e) from None


@contextmanager
def _locked(out_dir: Path, command: str) -> Iterator[None]:
    """One run per output folder; a lock left by a killed run is taken over, and we say so."""
    from .lock import hold

    with hold(out_dir, command) as lk:
        if lk.took_over:
            err.print(f"note: took over the lock of {lk.took_over.describe()}, which ended without "
                      "releasing it", highlight=False, markup=False)
        yield


def _plan(recipe: Path, out_dir: Path | None = None):
    from .plan import make_plan
    from .recipe import load_recipe

    return make_plan(load_recipe(recipe), out_dir)


# ---------------------------------------------------------------- plan


MachineOpt = Annotated[str, typer.Option("--machine", help="Estimate for: 'this' machine, or 'h100' "
                                                           "(one H100 80GB server).")]


@app.command()
def plan(recipe: RecipeArg,
         as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
         machine: MachineOpt = "this", out_dir: OutOpt = None) -> None:
    """Show the variants a recipe expands to and what building them needs, without doing any work
    (after a build, the quality-gate column says which variants publish would refuse)."""
    p = _run(lambda: _plan(recipe, out_dir))
    rp, why = _resources(p, machine)
    if as_json:
        res = rp.as_dict() if rp else None
        rows = [{"name": v.name, "format": v.format, "repo": v.repo, "branch": v.branch,
                 "params": v.params_dict(), **({"resources": res["variants"][v.name]} if res else {})}
                for v in p.variants]
        print(json.dumps({"variants": rows, "resources": res and {k: res[k] for k in res if k != "variants"},
                          "warnings": _file_warnings(rp)}, indent=2))
        return
    out.print(f"{p.recipe.model.model_name}: {len(p.variants)} variants → {p.out_dir}")
    done = _manifest_if_built(p)
    for repo in dict.fromkeys(v.repo for v in p.variants):
        t = Table(title=repo)
        cols = ("variant", "branch", "other settings", "peak RAM", "GPU mem", "disk", "time", "files", "to run",
                "quality gate")
        for col in cols:
            t.add_column(col, no_wrap=col not in ("other settings", "quality gate"), overflow="fold",
                         justify="right" if col in cols[3:9] else "left")
        for v in (v for v in p.variants if v.repo == repo):
            e = rp.variants[v.name] if rp else None
            t.add_row(v.name, v.branch, _other_settings(v), *_resource_cells(e), _files_cell(e),
                      _run_cell(rp, v.name), _gate_cell(p, v, done))
        out.print(t)
    for name, line in _file_warnings(rp).items():
        err.print(f"[yellow]warning:[/yellow] {escape(name)}: {escape(line)}", highlight=False, soft_wrap=True)
    _print_build_estimate(rp, why)


def _manifest_if_built(p: Any) -> Any:
    """The build's manifest when there is one (the plan then marks measured gate failures)."""
    from .manifest import load_manifest

    try:
        return load_manifest(p.out_dir)
    except QuantkitError:
        return None


def _run_cell(rp: Any, name: str) -> str:
    if rp is None or name not in rp.run:
        return "?"
    device, mem = rp.run[name]
    return f"{_size(mem.total)} {device}"


def _gate_cell(p: Any, v: Any, manifest: Any) -> str:
    """The variant's quality limits; after a build, whether its measured quality passes them."""
    gate = p.recipe.publish.gate(v.format)
    if not gate.limits:
        return "-"
    rec = manifest.variants.get(v.name) if manifest is not None else None
    if rec is None or rec.quality is None:
        return gate.limits
    why = gate.failures(rec.quality)
    return f"[red]gated[/red]: {escape('; '.join(why))}" if why else f"passes ({gate.limits})"


def _file_warnings(rp: Any) -> dict[str, str]:
    from .resources import file_warnings

    return file_warnings(rp) if rp else {}


def _files_cell(e: Any) -> str:
    """Weight files the variant writes: a count, and the largest when there are several."""
    f = getattr(e, "files", None)
    if f is None:
        return "?" if e is None else "-"
    return str(f.count) if f.count == 1 else f"{f.count} (≤ {_size(f.largest)})"


def _resources(p: Any, machine: str) -> tuple[Any, str]:
    """The resource plan, or None and why not (an unreadable config does not stop `plan`)."""
    from .resources import MACHINES, plan_resources

    if machine != "this" and machine not in MACHINES:
        raise _fail(RecipeError("quantkit plan", [Problem("--machine", f"unknown machine {machine!r}; "
                                                       f"known: this, {', '.join(MACHINES)}")]))
    try:
        return plan_resources(p, MACHINES.get(machine)), ""
    except (QuantkitError, KeyError, ValueError) as e:
        return None, str(e)


def _resource_cells(e: Any) -> tuple[str, ...]:
    if e is None:
        return ("?",) * 4
    return (_size(e.ram), _size(e.vram) if e.vram else "-", _size(e.disk), _duration(e.seconds))


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


def _print_build_estimate(rp: Any, why: str) -> None:
    if rp is None:
        err.print(f"• resources: not estimated ({escape(why)})")
        return
    b, m = rp.build, rp.machine
    out.print(f"build on {m.name} ({m.cores} cores, {m.ram / 1e9:.0f} GB RAM+swap"
              + (f", {m.gpu}" if m.gpu else "") + f"): peak RAM {_size(b.ram)} ({b.stage}), "
              + (f"GPU memory {_size(b.vram)}, " if b.vram else "") + f"disk {_size(b.disk)}, "
              f"time {_duration(b.seconds)}; model {rp.shape.params / 1e9:.2f}B parameters, "
              f"{_size(rp.shape.bf16_bytes)} in bf16")


def _other_settings(v: Any) -> str:
    """The settings its name does not show already (the format's spec knows which it shows)."""
    items = v.params_dict().items()
    return " ".join(f"{k}={val}" for k, val in items if k not in v.spec.name_keys and val is not None)


# ---------------------------------------------------------------- build


class _Progress:
    """Draws pipeline events: one bar per running task, a line per finished variant."""

    def __init__(self, progress: Progress):
        self.p = progress
        self.tasks: dict[tuple[str, str], Any] = {}

    def __call__(self, ev) -> None:
        if ev.kind == "stage":
            self.p.console.print(f"[bold]•[/bold] {ev.task}")
        elif ev.kind == "warn":
            self.p.console.print(f"[yellow]warning:[/yellow] {escape(ev.message)}", highlight=False)
        elif ev.kind == "start":
            self.p.console.print(f"[bold cyan]▶ {ev.variant}[/bold cyan] {ev.message}")
        elif ev.kind == "task":
            self._task(ev)
        elif ev.kind in ("done", "skip"):
            self._close(ev.variant)
            mark = "✓" if ev.kind == "done" else "="
            self.p.console.print(f"[green]{mark} {ev.variant}[/green] {ev.message}")
        elif ev.kind == "fail":
            self._close(ev.variant)
            self.p.console.print(f"[red]✗ {ev.variant}[/red] {escape(ev.message)}", highlight=False)

    def _task(self, ev) -> None:
        key = (ev.variant, ev.task)
        if key not in self.tasks:
            self.tasks[key] = self.p.add_task(f"{ev.variant} {ev.task}", total=ev.total)
        self.p.update(self.tasks[key], completed=ev.done, total=ev.total)

    def _close(self, variant: str) -> None:
        for key in [k for k in self.tasks if k[0] in (variant, "reference")]:
            self.p.remove_task(self.tasks.pop(key))


@contextmanager
def _progress() -> Iterator[_Progress]:
    cols = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn())
    with Progress(*cols, console=err, transient=True) as p:
        yield _Progress(p)


def _summary(manifest, plan: Any, names: list[str] | None = None) -> Table:
    """One row per variant; a variant over the recipe's quality gate is marked (publish refuses it)."""
    t = Table(title="variants")
    for col in ("variant", "branch", "state", "size", "bpw", "ΔPPL %", "KLD", "top-1", "seconds"):
        t.add_column(col, justify="right" if col not in ("variant", "branch", "state") else "left",
                     no_wrap=True)
    for name, r in manifest.variants.items():
        if names is not None and name not in names:
            continue
        q = r.quality
        gated = q is not None and plan.recipe.publish.gate(r.format).failures(q)
        state = "[red]failed[/red]" if r.state == "failed" else r.state + (" [red](gated)[/red]" if gated else "")
        t.add_row(name, r.branch, state, _size(r.size_bytes), f"{r.bits_per_weight:.2f}",
                  f"{q.delta_ppl_pct:+.2f}" if q else "-", f"{q.kld:.4f}" if q else "-",
                  f"{q.top1:.3f}" if q else "-", f"{r.seconds:.0f}")
    return t


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _quiet_libraries() -> None:
    """The engines log and draw their own bars; our progress display replaces them."""
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        import torch  # noqa: F401 - torch sets its loggers' levels on import: quiet them after
    except ImportError:
        pass
    for name in ("transformers", "tokenicer", "gptqmodel", "accelerate", "huggingface_hub", "torchao", "torch",
                 "httpx", "httpx2"):  # GPTQModel's logging set-up turns on their request lines
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


def _build_one(recipe: Path, out_dir: Path | None, only: list[str] | None, preflight: bool = True,
               ray: str | None = None):
    from . import pipeline
    from .source_check import check_recipe_source

    _quiet_libraries()
    p = _plan(recipe, out_dir)
    check_recipe_source(p.recipe)
    with _locked(p.out_dir, "build"):  # first: a refused run prints only why
        if p.recipe.calibration.dataset is None:
            err.print("• calibration: the German sample shipped in calibration/ (no \\[calibration] dataset set)")
        if ray is not None:
            return p, _build_on_ray(p, only, ray)
        with _progress() as rep:
            res = pipeline.build(p, only=only, report=rep, preflight=preflight)
    return p, res


NoPreflightOpt = Annotated[bool, typer.Option("--no-preflight", help="Build even when the resource plan says "
                                              "this machine lacks the RAM or disk.")]


# ---------------------------------------------------------------- --ray (quantkit.cluster)

RayOpt = Annotated[str | None, typer.Option(
    "--ray", metavar="[ADDRESS]", show_default=False,
    help="Build the variants as Ray tasks: on the cluster at ADDRESS ('auto': the one `ray start` "
         "runs on this machine; 'ray://HOST:10001'), or, with no ADDRESS or 'local', on a cluster "
         "started on this machine for this run.")]


def _ray_argv(argv: list[str]) -> list[str]:
    """A bare `--ray` (last, or before an option or a recipe file) means `--ray=local`:
    typer's parser has no options with an optional value."""
    def bare(i: int) -> bool:
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        return nxt is None or nxt.startswith("-") or nxt.endswith(".toml") or Path(nxt).is_file()

    return ["--ray=local" if a == "--ray" and bare(i) else a for i, a in enumerate(argv)]


class _ClusterView:
    """One live table on the driver: each variant's state, the node it runs on, its step."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, str]] = {}
        self.live: Any = None

    def __call__(self, ev) -> None:
        if ev.kind in ("stage", "warn"):
            line = f"[bold]•[/bold] {escape(ev.task)}" if ev.kind == "stage" else \
                f"[yellow]warning:[/yellow] {escape(ev.message)}"
            self.live.console.print(line, highlight=False)
            return
        row = self.rows.setdefault(ev.variant, {"state": "", "node": "", "runs": "0", "step": "", "note": ""})
        if ev.kind == "queued":
            row.update(state="queued", note=ev.message)
        elif ev.kind == "node":  # a task began on a node; a second time means Ray retried it
            runs = int(row["runs"]) + 1
            row.update(state="running" if runs == 1 else f"retry {runs - 1}", node=ev.message, runs=str(runs),
                       step="", note="")
        elif ev.kind == "start":
            row["note"] = ev.message
        elif ev.kind == "task":
            row["step"] = f"{ev.task} {ev.done}/{ev.total}" if ev.total else ev.task
        elif ev.kind in ("done", "skip", "fail"):
            row.update(state={"done": "[green]done[/green]", "skip": "skipped", "fail": "[red]failed[/red]"}[ev.kind],
                       step="", note=ev.message)

    def table(self) -> Table:
        t = Table(title="variants on the Ray cluster")
        for col in ("variant", "state", "node", "step", "note"):
            t.add_column(col, no_wrap=col != "note", overflow="fold")
        for name, r in self.rows.items():
            t.add_row(name, r["state"], r["node"], r["step"], escape(r["note"]))
        return t


def _build_on_ray(p: Any, only: list[str] | None, address: str):
    from rich.live import Live

    from . import cluster

    view = _ClusterView()
    with cluster.connect(address), Live(console=err, get_renderable=view.table, refresh_per_second=4) as live:
        view.live = live
        return cluster.build(p, only=only, report=view)


@app.command()
def build(recipe: RecipeArg, out_dir: OutOpt = None, only: OnlyOpt = None, no_preflight: NoPreflightOpt = False,
          ray: RayOpt = None) -> None:
    """Calibrate, quantize, evaluate, size and write cards for every variant."""
    p, res = _run(lambda: _build_one(recipe, out_dir, only, not no_preflight, ray))
    out.print(_summary(res.manifest, p, [v.name for v in p.select(only)]))
    out.print(f"manifest: {p.out_dir / 'manifest.json'}")
    if res.failed:
        raise _fail(BuildFailed(res.failed))


@app.command(name="eval")
def eval_(recipe: RecipeArg, out_dir: OutOpt = None, only: OnlyOpt = None) -> None:
    """Evaluate built variants again against the unquantized model (builds nothing)."""
    from . import pipeline
    from .source_check import check_recipe_source

    def run():
        _quiet_libraries()
        p = _plan(recipe, out_dir)
        check_recipe_source(p.recipe)
        with _locked(p.out_dir, "eval"), _progress() as rep:
            return p, pipeline.reevaluate(p, only=only, report=rep)

    p, res = _run(run)
    out.print(_summary(res.manifest, p, [v.name for v in p.select(only)]))
    if res.failed:
        raise _fail(BuildFailed(res.failed))


@app.command()
def card(recipe: RecipeArg, out_dir: OutOpt = None) -> None:
    """Write the model cards (README.md per variant) again from the manifest."""
    from . import card as cards
    from .manifest import load_manifest, save_manifest

    def run():
        p = _plan(recipe, out_dir)
        with _locked(p.out_dir, "card"):
            m = load_manifest(p.out_dir)
            if m is None:
                raise ManifestError(str(p.out_dir / "manifest.json"), "not built yet: run `quantkit build` first")
            m = cards.write_cards(p, m, p.out_dir)
            save_manifest(p.out_dir, m)
        return p, m

    p, m = _run(run)
    for name, rec in m.variants.items():
        if (p.out_dir / name / "README.md").is_file():
            out.print(f"{p.out_dir / name / 'README.md'} ({rec.state})")


# ---------------------------------------------------------------- publish and batch


@app.command()
def publish(recipe: RecipeArg, out_dir: OutOpt = None, only: OnlyOpt = None,
            dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be uploaded.")] = False,
            force: Annotated[bool, typer.Option("--force", help="Publish variants over the recipe's "
                                                "quality gate too.")] = False) -> None:
    """Push built variants to the Hub, one branch each; uploads only what changed."""
    report = _run(lambda: _publish_one(recipe, out_dir, only, dry_run, force))
    _print_publish(report, dry_run)
    _run(report.raise_for_errors)


def _publish_one(recipe: Path, out_dir: Path | None, only: list[str] | None, dry_run: bool,
                 force: bool = False):
    from . import publish as pub
    from .errors import ManifestError
    from .manifest import load_manifest, save_manifest

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retry warnings; ours say more
    p = _plan(recipe, out_dir)
    # A dry run writes nothing, so it may look at a folder another run is working on.
    with nullcontext() if dry_run else _locked(p.out_dir, "publish"):
        m = load_manifest(p.out_dir)
        if m is None:
            raise ManifestError(str(p.out_dir / "manifest.json"), "not built yet: run `quantkit build` first")
        report = pub.publish(p, m, p.out_dir, dry_run=dry_run, only=only, force=force)
        if not dry_run:
            save_manifest(p.out_dir, report.manifest)
    return report


def _print_publish(report: Any, dry_run: bool) -> None:
    if dry_run:
        for line in report.operations():
            out.print(line, highlight=False, markup=False)
    t = Table(title="publish (dry run)" if dry_run else "publish")
    for col in ("repo", "branch", "status", "added", "removed", "skipped", "bytes", "commit"):
        t.add_column(col, no_wrap=col != "repo")
    for b in report.branches:
        t.add_row(b.repo, b.branch, b.status, str(len(b.added)), str(len(b.removed)), str(len(b.skipped)),
                  _size(b.bytes), (b.commit or "-")[:12])
    out.print(t)
    for variant, why in ([] if dry_run else report.not_ready):  # a dry run lists them already
        err.print(f"[yellow]not published:[/yellow] {variant}: {why}", highlight=False)
    for note in report.notes:
        err.print(f"note: {note}", highlight=False, markup=False)
    if report.collection:
        out.print(f"collection: {report.collection}", highlight=False)


@app.command()
def batch(recipes: Annotated[list[Path], typer.Argument(help="Recipe files.")],
          out_dir: Annotated[Path, typer.Option("--out", help="Each recipe builds into OUT/<model name>/.")
                             ] = Path("build"),
          do_publish: Annotated[bool, typer.Option("--publish", help="Publish each after building.")] = False,
          ray: RayOpt = None) -> None:
    """Build (and publish) many recipes, going on past a failed one."""
    if ray is not None:  # one cluster, every recipe in flight at once; with --publish, workers push
        results = _batch_on_ray(recipes, out_dir, do_publish, ray)
    else:
        results = [(str(r), _batch_one(r, out_dir, do_publish)) for r in recipes]
    t = Table(title="batch")
    t.add_column("recipe")
    t.add_column("result")
    for name, res in results:
        t.add_row(name, res)
    out.print(t)
    if any(res != "ok" for _, res in results):
        raise typer.Exit(1)


def _batch_on_ray(recipes: list[Path], out_dir: Path, do_publish: bool, address: str) -> list[tuple[str, str]]:
    """Every recipe's variants on one cluster, recipes overlapping (cluster.build_many)."""
    from contextlib import ExitStack
    from dataclasses import replace

    from rich.live import Live

    from . import cluster
    from .recipe import load_recipe
    from .source_check import check_recipe_source

    _quiet_libraries()
    why: dict[Path, str] = {}
    plans = []
    with ExitStack() as stack:
        for r in recipes:
            try:
                p = _plan(r, out_dir / load_recipe(r).model.model_name)
                check_recipe_source(p.recipe)
                stack.enter_context(_locked(p.out_dir, "batch"))
                plans.append((r, p))
            except QuantkitError as e:
                err.print(f"[red]error:[/red] {escape(f'{r}: {e}')}", highlight=False)
                why[r] = f"failed: {e}"
        view = _ClusterView()

        def labelled(name: str) -> Any:  # rows read model/variant: recipes share variant names
            return lambda ev: view(replace(ev, variant=f"{name}/{ev.variant}") if ev.variant else ev)

        _run(lambda: stack.enter_context(cluster.connect(address)))
        with Live(console=err, get_renderable=view.table, refresh_per_second=4) as live:
            view.live = live
            got = cluster.build_many([p for _, p in plans], reports=[labelled(p.recipe.model.model_name)
                                                                     for _, p in plans], publish=do_publish)
    for (r, _), res in zip(plans, got):
        failed = res.failed if not isinstance(res, QuantkitError) else {"recipe": str(res)}
        why[r] = "failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()) if failed else "ok"
    return [(str(r), why[r]) for r in recipes]


def _batch_one(recipe: Path, out_dir: Path, do_publish: bool) -> str:
    try:
        from .recipe import load_recipe

        name = load_recipe(recipe).model.model_name
        p, res = _build_one(recipe, out_dir / name, None)
        if res.failed:
            return "failed: " + "; ".join(f"{k}: {v}" for k, v in res.failed.items())
        if do_publish:
            report = _publish_one(recipe, out_dir / name, None, False)
            _print_publish(report, False)
            report.raise_for_errors()
        return "ok"
    except QuantkitError as e:
        err.print(f"[red]error:[/red] {escape(f'{recipe}: {e}')}", highlight=False)
        return f"failed: {e}"


# ---------------------------------------------------------------- calib, init, doctor


@app.command()
def calib(recipe: RecipeArg) -> None:
    """Build the calibration set and show what it holds."""
    t0 = time.perf_counter()
    c, label = _run(lambda: _calib(recipe))
    secs = time.perf_counter() - t0
    t = Table(title=f"calibration set: {label}")
    t.add_column("")
    t.add_column("value", justify="right")
    rows = [("contexts available", c.n_contexts), ("items used", c.n_items),
            ("tokens in items used", c.tokens_available),
            ("mean tokens per item", f"{c.tokens_available / max(c.n_items, 1):.1f}"),
            ("windows x seq_len", f"{c.windows.shape[0]} x {c.windows.shape[1]}"),
            ("held-out evaluation texts", len(c.eval_texts)),
            ("German function-word share", f"{c.german_share:.0%}"), ("sha256", c.sha256),
            ("seconds", f"{secs:.2f}")]
    for k, v in rows:
        t.add_row(k, str(v))
    out.print(t)


def _calib(recipe: Path):
    from transformers import AutoTokenizer

    from .calibration import build_calibration, language_warning
    from .recipe import load_recipe, resolve_local_source
    from .source_check import check_recipe_source

    r = load_recipe(recipe)
    check_recipe_source(r)
    local = resolve_local_source(r)
    tok = AutoTokenizer.from_pretrained(str(local) if local else r.model.source,
                                        revision=None if local else r.model.revision)
    c = build_calibration(r, tok)
    if warning := language_warning(c):
        err.print(f"[yellow]warning:[/yellow] {warning}")
    if c.windows.shape[0] < r.calibration.samples:
        err.print(f"[yellow]warning:[/yellow] only {c.windows.shape[0]} of {r.calibration.samples} "
                  f"windows of {r.calibration.seq_len} tokens: the data is too short")
    return c, c.source


@app.command()
def init(model: Annotated[str, typer.Argument(help="Hub id or local folder of the source model.")],
         output: Annotated[Path | None, typer.Option("--output", "-o", help="Recipe file to write.")] = None,
         force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False) -> None:
    """Write a starter recipe with TheBloke's GPTQ/AWQ/GGUF ladder for MODEL."""
    from .starter import starter_recipe

    name = model.rstrip("/").split("/")[-1]
    path = output or Path("recipes") / f"{name}.toml"
    if path.exists() and not force:
        raise _fail(QuantkitError(f"{path} exists; use --force to overwrite it"))
    atomic.write_text(path, starter_recipe(model))
    out.print(f"wrote {path}")


@app.command()
def doctor() -> None:
    """Python, torch, GPU, engines and toolchains found here, with versions."""
    from .engines import ENGINES

    _quiet_libraries()
    t = Table(title="quantkit doctor")
    t.add_column("component")
    t.add_column("status")
    t.add_row("quantkit", __version__)
    t.add_row("python", f"{platform.python_version()} ({sys.executable})")
    t.add_row("torch / GPU", _torch_status())
    for fmt, engine in ENGINES.items():
        try:
            t.add_row(f"engine {fmt}", f"[green]{engine.version()}[/green]")
        except QuantkitError as e:
            t.add_row(f"engine {fmt}", f"[yellow]unavailable[/yellow]: {escape(str(e))}")
    for k, v in _toolchain_rows():
        t.add_row(k, v)
    out.print(t)


def _torch_status() -> str:
    try:
        import torch
    except ImportError:
        return "torch not installed"
    if torch.cuda.is_available():
        return f"torch {torch.__version__}, CUDA {torch.version.cuda}: {torch.cuda.get_device_name(0)}"
    return f"torch {torch.__version__}, no CUDA GPU (CPU only)"


def _toolchain_rows() -> list[tuple[str, str]]:
    from .engines import llamacpp

    rows = []
    for r in llamacpp.doctor():
        mark = "[green]ok[/green]" if r.ok else "[yellow]missing[/yellow]"
        where = f" ({r.source})" if r.source else ""
        rows.append((f"llama.cpp {r.part}", f"{mark} {escape(r.detail + where)}"))
    return rows


@app.command()
def toolchain(bindings: Annotated[bool, typer.Option(help="Also build the llama-cpp-python wheel.")] = True,
              install: Annotated[bool, typer.Option(help="Install the bindings wheel into this Python.")] = True,
              jobs: Annotated[int | None, typer.Option(help="Compile jobs (default: all cores).")] = None) -> None:
    """Build (or restore from the cache) the pinned llama.cpp tools and Python bindings."""
    from .engines import llamacpp

    with _progress() as rep:
        def progress(task: str, done: int, total: int | None) -> None:
            rep(_TaskEvent("task", "llama.cpp", task, done, total))

        report = _run(lambda: llamacpp.build_toolchain(progress, bindings=bindings, install=install, jobs=jobs))
    for step, state in report.steps.items():
        out.print(f"{step:8} {state:9} {report.seconds[step]:7.1f} s")
    out.print(f"tools: {report.tools}")
    if report.wheel:
        out.print(f"wheel: {report.wheel}")


@dataclass(frozen=True)
class _TaskEvent:
    kind: str
    variant: str
    task: str
    done: int
    total: int | None


def main() -> None:
    app(args=_ray_argv(sys.argv[1:]))


if __name__ == "__main__":
    main()
