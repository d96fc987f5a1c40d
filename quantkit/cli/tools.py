"""`quantkit calib`, `init`, `doctor` and `toolchain`: the set-up and inspection commands."""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from .. import __version__, atomic
from ..errors import QuantkitError
from ..events import Progress
from .common import RecipeArg, err, fail, out, quiet_libraries, run
from .views import progress_view


def calib(recipe: RecipeArg) -> None:
    """Build the calibration set and show what it holds."""
    from ..calibration import german_share

    t0 = time.perf_counter()
    c = run(lambda: _calib(recipe))
    secs = time.perf_counter() - t0
    t = Table(title=f"calibration set: {c.source}")
    t.add_column("")
    t.add_column("value", justify="right")
    rows = [("contexts available", c.n_contexts), ("items used", c.n_items),
            ("tokens in items used", c.tokens_available),
            ("mean tokens per item", f"{c.tokens_available / max(c.n_items, 1):.1f}"),
            ("windows x seq_len", f"{c.windows.shape[0]} x {c.windows.shape[1]}"),
            ("held-out evaluation texts", len(c.eval_texts)),
            ("German function-word share", f"{german_share(c.texts):.0%}"), ("sha256", c.sha256),
            ("seconds", f"{secs:.2f}")]
    for k, v in rows:
        t.add_row(k, str(v))
    out.print(t)


def _calib(recipe: Path) -> Any:
    from transformers import AutoTokenizer

    from ..calibration import build_calibration, language_warning
    from ..recipe import load_recipe, resolve_local_source
    from ..source_check import check_recipe_source

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
    return c


def init(model: Annotated[str, typer.Argument(help="Hub id or local folder of the source model.")],
         output: Annotated[Path | None, typer.Option("--output", "-o", help="Recipe file to write.")] = None,
         force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False) -> None:
    """Write a starter recipe with TheBloke's GPTQ/AWQ/GGUF ladder for MODEL."""
    from ..starter import starter_recipe

    name = model.rstrip("/").split("/")[-1]
    path = output or Path("recipes") / f"{name}.toml"
    if path.exists() and not force:
        raise fail(QuantkitError(f"{path} exists; use --force to overwrite it"))
    atomic.write_text(path, starter_recipe(model))
    out.print(f"wrote {path}")


def doctor() -> None:
    """Python, torch, GPU, engines and toolchains found here, with versions."""
    from ..engines import ENGINES

    quiet_libraries()
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
    from .. import toolchain as llamacpp

    rows = []
    for r in llamacpp.doctor():
        mark = "[green]ok[/green]" if r.ok else "[yellow]missing[/yellow]"
        where = f" ({r.source})" if r.source else ""
        rows.append((f"llama.cpp {r.part}", f"{mark} {escape(r.detail + where)}"))
    return rows


def toolchain(bindings: Annotated[bool, typer.Option(help="Also build the llama-cpp-python wheel.")] = True,
              install: Annotated[bool, typer.Option(help="Install the bindings wheel into this Python.")] = True,
              jobs: Annotated[int | None, typer.Option(help="Compile jobs (default: all cores).")] = None) -> None:
    """Build (or restore from the cache) the pinned llama.cpp tools and Python bindings."""
    from .. import toolchain as llamacpp

    with progress_view() as rep:
        def progress(task: str, done: int, total: int | None) -> None:
            rep(Progress("llama.cpp", task, done, total))

        report = run(lambda: llamacpp.build_toolchain(progress, bindings=bindings, install=install, jobs=jobs))
    steps = ", ".join(f"{step} {state} ({report.seconds[step]:.0f} s)" for step, state in report.steps.items())
    out.print(f"• llama.cpp toolchain: {steps}", highlight=False)
    out.print(f"• llama.cpp tools in {report.tools}" + (f"; bindings wheel {report.wheel}" if report.wheel else ""),
              highlight=False, soft_wrap=True)
