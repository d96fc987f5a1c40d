"""How the CLI draws a build's events: progress bars and one line per finished variant, or, on
a Ray driver, one live table; and the summary table of a manifest."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, Task, TaskID,
                           TextColumn, TimeElapsedColumn)
from rich.table import Table
from rich.text import Text

from .. import events as ev
from .common import err, size


class PlanETA(ProgressColumn):
    """Time left: from the plan's estimate for the variant or step when there is one (the plan
    knows a whole variant's build and scoring), else from the task's own rate."""

    def render(self, task: Task) -> Text:
        end = task.fields.get("plan_end")
        if end is not None:
            left = max(0.0, end - time.monotonic())
            return Text(f"~{_short(left)} left (plan)" if left > 0 else "past the plan's estimate", style="dim")
        if task.total and task.completed and task.time_remaining is not None:
            return Text(f"~{_short(task.time_remaining)} left", style="dim")
        return Text("")


def _short(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


class ProgressView:
    """One bar per running variant or shared step (its current task, with an ETA), a line per
    finished variant or step."""

    def __init__(self, progress: Progress):
        self.p = progress
        self.bars: dict[str, TaskID] = {}
        self.estimates: dict[str, float] = {}

    def __call__(self, e: ev.Event) -> None:
        match e:
            case ev.Estimates(seconds=seconds):
                self.estimates = dict(seconds)
            case ev.Stage(text=text):
                self.p.console.print(f"[bold]•[/bold] {text}")
            case ev.StepDone(key=key, text=text):
                self._close(key)
                self.p.console.print(f"[bold]•[/bold] {text}")
            case ev.Warn(message=message):
                self.p.console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)
            case ev.Started(variant=v, message=message):
                self.p.console.print(f"[bold cyan]▶ {v}[/bold cyan] {message}")
                self._bar(v)
            case ev.Progress():
                self._task(e)
            case ev.Done(variant=v, message=message) | ev.Skipped(variant=v, message=message):
                self._close(v)
                mark = "✓" if isinstance(e, ev.Done) else "="
                self.p.console.print(f"[green]{mark} {v}[/green] {message}")
            case ev.Failed(variant=v, message=message):
                self._close(v)
                self.p.console.print(f"[red]✗ {v}[/red] {escape(message)}", highlight=False)

    def _bar(self, owner: str) -> TaskID:
        if owner not in self.bars:
            est = self.estimates.get(owner)
            self.bars[owner] = self.p.add_task(owner, total=None,
                                               plan_end=None if est is None else time.monotonic() + est)
        return self.bars[owner]

    def _task(self, e: ev.Progress) -> None:
        self.p.update(self._bar(e.variant), description=f"{e.variant} {e.task}", completed=e.done, total=e.total)

    def _close(self, owner: str) -> None:
        if owner in self.bars:
            self.p.remove_task(self.bars.pop(owner))


@contextmanager
def progress_view() -> Iterator[ProgressView]:
    cols = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), PlanETA())
    # No redirection of stdout/stderr: library output goes to the build log (capture.py), not
    # through the live display onto the terminal.
    with Progress(*cols, console=err, transient=True, redirect_stdout=False, redirect_stderr=False,
                  disable=not err.is_terminal) as p:  # bars only on a terminal: a log gets the lines
        yield ProgressView(p)


class ClusterView:
    """One live table on the Ray driver: each variant's state, the node it runs on, its step."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, str]] = {}
        self.live: Any = None

    def __call__(self, e: ev.Event) -> None:
        if isinstance(e, (ev.Stage, ev.StepDone, ev.Warn)):
            line = f"[yellow]warning:[/yellow] {escape(e.message)}" if isinstance(e, ev.Warn) else \
                f"[bold]•[/bold] {escape(e.text)}"
            self.live.console.print(line, highlight=False)
            return
        if isinstance(e, ev.Estimates):
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
    for col in ("variant", "branch", "state", "size", "bpw", "ΔPPL %", "KLD", "p99.9", "top-1", "flips", "seconds"):
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
                  f"{q.kld_p999:.4f}" if q and q.kld_p999 is not None else "-",
                  f"{q.top1:.3f}" if q else "-", f"{q.qa_flips:.1%}" if q and q.qa_flips is not None else "-",
                  f"{r.seconds:.0f}")
    return t
