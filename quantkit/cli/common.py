"""What every command shares: the typer app, the consoles, the error table, options, and the
few helpers that load a recipe or hold the output folder's lock."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import (BuildFailed, BusyError, CalibrationError, ClusterError, EngineError, EngineUnavailable,
                      EvalError, GateRefused, ManifestError, PublishError, QuantkitError, RecipeError, ResourceError,
                      SourceError)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize and convert LLMs from one recipe into every format a publisher ships.")

def _width(stream: Any) -> int | None:
    """The terminal's width; COLUMNS when set; piped output (CI logs, files) gets 160 columns
    instead of rich's 80-column default."""
    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    return None if stream.isatty() else 160


out = Console(width=_width(sys.stdout))
err = Console(stderr=True, width=_width(sys.stderr))

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


def lines_of(e: QuantkitError) -> list[str]:
    """An error as the lines the user reads: one per problem, failure or refusal."""
    if isinstance(e, RecipeError):
        return [f"{e.file}: {p}" for p in e.problems]
    if isinstance(e, BuildFailed):
        return [f"{name} failed: {why}" for name, why in e.failures.items()]
    if isinstance(e, GateRefused):
        return [f"{name} not published: {why} (--force publishes it)" for name, why in e.refused.items()]
    return [str(e)]


def fail(e: QuantkitError) -> typer.Exit:
    """Print the error's lines and give the exit its code (EXIT_CODES)."""
    for line in lines_of(e):
        err.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)
    return typer.Exit(next(c for t, c in EXIT_CODES if isinstance(e, t)))


def run(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except QuantkitError as e:
        raise fail(e) from None


@contextmanager
def locked(out_dir: Path, command: str) -> Iterator[None]:
    """One run per output folder; a lock left by a killed run is taken over, and we say so."""
    from ..lock import hold

    with hold(out_dir, command) as lk:
        if lk.took_over:
            err.print(f"note: took over the lock of {lk.took_over.describe()}, which ended without "
                      "releasing it", highlight=False, markup=False)
        yield


def load_plan(recipe: Path, out_dir: Path | None = None) -> Any:
    """The recipe planned; every mistake in it at once (plan.load_plan)."""
    from ..plan import load_plan as plan_file

    return plan_file(recipe, out_dir)


def size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def quiet_libraries() -> None:
    """The engines draw their own progress bars (tqdm, huggingface_hub); ours replace them.
    Everything else the libraries say goes to the build log (capture.py)."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
    except ImportError:
        pass
