"""The `quantkit` command: the only package that prints, draws progress or exits. One module per
command group (plan; build, eval, card, batch; publish; calib, init, doctor, toolchain), each
thin over the library; every command turns library errors into one line per problem and an
exit code from common.EXIT_CODES, so no traceback reaches the user for input mistakes."""

from __future__ import annotations

import sys
from pathlib import Path

from . import build, plan, publish, tools
from .common import EXIT_CODES, app

# The commands, in the order `quantkit --help` lists them.
app.command()(plan.plan)
app.command()(build.build)
app.command(name="eval")(build.eval_)
app.command()(build.card)
app.command()(publish.publish)
app.command()(build.batch)
app.command()(tools.calib)
app.command()(tools.init)
app.command()(tools.doctor)
app.command()(tools.toolchain)

__all__ = ["app", "main", "EXIT_CODES"]


def _ray_argv(argv: list[str]) -> list[str]:
    """A bare `--ray` (last, or before an option or a recipe file) means `--ray=local`:
    typer's parser has no options with an optional value."""
    def bare(i: int) -> bool:
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        return nxt is None or nxt.startswith("-") or nxt.endswith(".toml") or Path(nxt).is_file()

    return ["--ray=local" if a == "--ray" and bare(i) else a for i, a in enumerate(argv)]


def main() -> None:
    app(args=_ray_argv(sys.argv[1:]))
