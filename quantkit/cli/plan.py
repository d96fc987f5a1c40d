"""`quantkit plan`: the variants a recipe expands to and what building them needs; no work."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import Problem, QuantkitError, RecipeError
from .common import OutOpt, RecipeArg, err, fail, load_plan, out, run, size

MachineOpt = Annotated[str, typer.Option("--machine", help="Estimate for: 'this' machine, or 'h100' "
                                                           "(one H100 80GB server).")]


def plan(recipe: RecipeArg,
         as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
         machine: MachineOpt = "this", out_dir: OutOpt = None) -> None:
    """Show the variants a recipe expands to and what building them needs, without doing any work
    (after a build, the quality-gate column says which variants publish would refuse)."""
    p = run(lambda: load_plan(recipe, out_dir))
    rp, why = _resources(p, machine)
    if as_json:
        print(json.dumps(_as_json(p, rp), indent=2))
        return
    out.print(f"{p.recipe.model.model_name}: {len(p.variants)} variants → {p.out_dir}")
    done = _manifest_if_built(p)
    for repo in dict.fromkeys(v.repo for v in p.variants):
        out.print(_repo_table(p, rp, repo, done))
    for name, line in _file_warnings(rp).items():
        err.print(f"[yellow]warning:[/yellow] {escape(name)}: {escape(line)}", highlight=False, soft_wrap=True)
    _print_build_estimate(rp, why)


def _as_json(p: Any, rp: Any) -> dict[str, Any]:
    res = rp.as_dict() if rp else None
    rows = [{"name": v.name, "format": v.format, "repo": v.repo, "branch": v.branch,
             "params": v.params_dict(), **({"resources": res["variants"][v.name]} if res else {})}
            for v in p.variants]
    return {"variants": rows, "resources": res and {k: res[k] for k in res if k != "variants"},
            "warnings": _file_warnings(rp)}


def _repo_table(p: Any, rp: Any, repo: str, done: Any) -> Table:
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
    return t


def _manifest_if_built(p: Any) -> Any:
    """The build's manifest when there is one (the plan then marks measured gate failures)."""
    from ..manifest import load_manifest

    try:
        return load_manifest(p.out_dir)
    except QuantkitError:
        return None


def _run_cell(rp: Any, name: str) -> str:
    if rp is None or name not in rp.run:
        return "?"
    device, mem = rp.run[name]
    return f"{size(mem.total)} {device}"


def _gate_cell(p: Any, v: Any, manifest: Any) -> str:
    """The variant's quality limits; after a build, whether its measured quality passes them."""
    gate = p.recipe.publish.gate(v.format)
    if not gate.limits:
        return "-"
    rec = manifest.variants.get(v.name) if manifest is not None else None
    if rec is None or rec.quality is None:
        return str(gate.limits)
    why = gate.failures(rec.quality)
    return f"[red]gated[/red]: {escape('; '.join(why))}" if why else f"passes ({gate.limits})"


def _file_warnings(rp: Any) -> dict[str, str]:
    from ..resources import file_warnings

    return file_warnings(rp) if rp else {}


def _files_cell(e: Any) -> str:
    """Weight files the variant writes: a count, and the largest when there are several."""
    f = getattr(e, "files", None)
    if f is None:
        return "?" if e is None else "-"
    return str(f.count) if f.count == 1 else f"{f.count} (≤ {size(f.largest)})"


def _resources(p: Any, machine: str) -> tuple[Any, str]:
    """The resource plan, or None and why not (an unreadable config does not stop `plan`)."""
    from ..resources import MACHINES, plan_resources

    if machine != "this" and machine not in MACHINES:
        raise fail(RecipeError("quantkit plan", [Problem("--machine", f"unknown machine {machine!r}; "
                                                      f"known: this, {', '.join(MACHINES)}")]))
    try:
        return plan_resources(p, MACHINES.get(machine)), ""
    except (QuantkitError, KeyError, ValueError) as e:
        return None, str(e)


def _resource_cells(e: Any) -> tuple[str, ...]:
    if e is None:
        return ("?",) * 4
    return (size(e.ram), size(e.vram) if e.vram else "-", size(e.disk), duration(e.seconds))


def duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


def _print_build_estimate(rp: Any, why: str) -> None:
    if rp is None:
        err.print(f"• resources: not estimated ({escape(why)})")
        return
    b, m = rp.build, rp.machine
    out.print(f"build on {m.name} ({m.cores} cores, {m.ram / 1e9:.0f} GB RAM+swap"
              + (f", {m.gpu}" if m.gpu else "") + f"): peak RAM {size(b.ram)} ({b.stage}), "
              + (f"GPU memory {size(b.vram)}, " if b.vram else "") + f"disk {size(b.disk)}, "
              f"time {duration(b.seconds)}; model {rp.shape.params / 1e9:.2f}B parameters, "
              f"{size(rp.shape.bf16_bytes)} in bf16")


def _other_settings(v: Any) -> str:
    """The settings its name does not show already (the format's spec knows which it shows)."""
    from ..recipe import SPECS

    items = v.params_dict().items()
    return " ".join(f"{k}={val}" for k, val in items if k not in SPECS[v.format].name_keys and val is not None)
