"""How the CLI draws a build's events: progress bars and one line per finished variant, or, on
a Ray driver, one live table; and the summary table of a manifest."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .. import events as ev
from .common import err, size


class ProgressView:
    """One bar per running task, a line per finished variant or step."""

    def __init__(self, progress: Progress):
        self.p = progress
        self.tasks: dict[tuple[str, str], Any] = {}

    def __call__(self, e: ev.Event) -> None:
        match e:
            case ev.Stage(text=text):
                self.p.console.print(f"[bold]•[/bold] {text}")
            case ev.Warn(message=message):
                self.p.console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)
            case ev.Started(variant=v, message=message):
                self.p.console.print(f"[bold cyan]▶ {v}[/bold cyan] {message}")
            case ev.Progress():
                self._task(e)
            case ev.Done(variant=v, message=message) | ev.Skipped(variant=v, message=message):
                self._close(v)
                mark = "✓" if isinstance(e, ev.Done) else "="
                self.p.console.print(f"[green]{mark} {v}[/green] {message}")
            case ev.Failed(variant=v, message=message):
                self._close(v)
                self.p.console.print(f"[red]✗ {v}[/red] {escape(message)}", highlight=False)

    def _task(self, e: ev.Progress) -> None:
        key = (e.variant, e.task)
        if key not in self.tasks:
            self.tasks[key] = self.p.add_task(f"{e.variant} {e.task}", total=e.total)
        self.p.update(self.tasks[key], completed=e.done, total=e.total)

    def _close(self, variant: str) -> None:
        for key in [k for k in self.tasks if k[0] == variant or "/" in k[0] or k[0] == "reference"]:
            self.p.remove_task(self.tasks.pop(key))


@contextmanager
def progress_view() -> Iterator[ProgressView]:
    cols = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn())
    with Progress(*cols, console=err, transient=True) as p:
        yield ProgressView(p)


class ClusterView:
    """One live table on the Ray driver: each variant's state, the node it runs on, its step."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, str]] = {}
        self.live: Any = None

    def __call__(self, e: ev.Event) -> None:
        if isinstance(e, (ev.Stage, ev.Warn)):
            line = f"[bold]•[/bold] {escape(e.text)}" if isinstance(e, ev.Stage) else \
                f"[yellow]warning:[/yellow] {escape(e.message)}"
            self.live.console.print(line, highlight=False)
            return
        row = self.rows.setdefault(e.variant, {"state": "", "node": "", "runs": "0", "step": "", "note": ""})
        match e:
            case ev.Queued(message=message):
                row.update(state="queued", note=message)
            case ev.OnNode(message=message):  # a task began on a node; a second time means Ray retried it
                runs = int(row["runs"]) + 1
                row.update(state="running" if runs == 1 else f"retry {runs - 1}", node=message, runs=str(runs),
                           step="", note="")
            case ev.Started(message=message):
                row["note"] = message
            case ev.Progress(task=task, done=done, total=total):
                row["step"] = f"{task} {done}/{total}" if total else task
            case ev.Done(message=m):
                row.update(state="[green]done[/green]", step="", note=m)
            case ev.Skipped(message=m):
                row.update(state="skipped", step="", note=m)
            case ev.Failed(message=m):
                row.update(state="[red]failed[/red]", step="", note=m)

    def table(self) -> Table:
        t = Table(title="variants on the Ray cluster")
        for col in ("variant", "state", "node", "step", "note"):
            t.add_column(col, no_wrap=col != "note", overflow="fold")
        for name, r in self.rows.items():
            t.add_row(name, r["state"], r["node"], r["step"], escape(r["note"]))
        return t


def summary(manifest: Any, plan: Any, names: list[str] | None = None) -> Table:
    """One row per variant; a variant over the recipe's quality gate is marked (publish refuses it)."""
    from ..manifest import State

    t = Table(title="variants")
    for col in ("variant", "branch", "state", "size", "bpw", "ΔPPL %", "KLD", "top-1", "seconds"):
        t.add_column(col, justify="right" if col not in ("variant", "branch", "state") else "left",
                     no_wrap=True)
    for name, r in manifest.variants.items():
        if names is not None and name not in names:
            continue
        q = r.quality
        gated = q is not None and plan.recipe.publish.gate(r.format).failures(q)
        state = "[red]failed[/red]" if r.state == State.FAILED else \
            str(r.state) + (" [red](gated)[/red]" if gated else "")
        t.add_row(name, r.branch, state, size(r.size_bytes), f"{r.bits_per_weight:.2f}",
                  f"{q.delta_ppl_pct:+.2f}" if q else "-", f"{q.kld:.4f}" if q else "-",
                  f"{q.top1:.3f}" if q else "-", f"{r.seconds:.0f}")
    return t
