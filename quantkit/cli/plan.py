"""`quantkit plan`: the variants a recipe expands to and what building them needs; no work."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich import box
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
    if machine == "this":
        for line in _slow_hints(p, rp):
            out.print(f"[yellow]hint:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)
    _print_build_estimate(rp, why)


def _as_json(p: Any, rp: Any) -> dict[str, Any]:
    res = rp.as_dict() if rp else None
    rows = [{"name": v.name, "format": v.format, "repo": v.repo, "branch": v.branch,
             "params": v.params_dict(), **({"resources": res["variants"][v.name]} if res else {})}
            for v in p.variants]
    return {"variants": rows, "resources": res and {k: res[k] for k in res if k != "variants"},
            "warnings": _file_warnings(rp)}


def _repo_table(p: Any, rp: Any, repo: str, done: Any) -> Table:
    """One row per variant, one line per row: what differs from the format's defaults, what
    building it needs here, the memory to run it; the gate only when the recipe sets one."""
    variants = [v for v in p.variants if v.repo == repo]
    gated = any(p.recipe.publish.gate(v.format).limits for v in variants)
    t = Table(title=repo, box=box.SIMPLE_HEAD, pad_edge=False)
    cols = ["variant", "branch", "settings", "RAM", "GPU", "disk", "time", "files", "to run"]
    extra = (["measured (KLD / p99.9 / flips)"] if done is not None else []) + (["quality gate"] if gated else [])
    for col in cols + extra:
        t.add_column(col, no_wrap=True, justify="right" if col in cols[3:] else "left")
    for v in variants:
        e = rp.variants[v.name] if rp else None
        t.add_row(v.name, _branch_cell(v), _settings(v), *_resource_cells(e), _files_cell(e), _run_cell(rp, v.name),
                  *([_measured_cell(v, done)] if done is not None else []),
                  *([_gate_cell(p, v, done)] if gated else []))
    return t


def _measured_cell(v: Any, manifest: Any) -> str:
    """After a build: the quality the variant measured (its tail and answer flips too)."""
    rec = manifest.variants.get(v.name)
    q = rec.quality if rec is not None else None
    if q is None:
        return "-"
    tail = f"{q.kld_p999:.4f}" if q.kld_p999 is not None else "n/a"
    flips = f"{q.qa_flips:.1%}" if q.qa_flips is not None else "n/a"
    return f"{q.kld:.4f} / {tail} / {flips}"


DAY = 86_400


def _slow_hints(p: Any, rp: Any) -> list[str]:
    """One line per variant that would take more than a day here: where it is practical."""
    from ..resources import MACHINES, plan_resources

    slow = [v for v in p.variants if rp and rp.variants[v.name].seconds > DAY]
    if not slow:
        return []
    gpu, name = plan_resources(p, MACHINES["h100"]), MACHINES["h100"].name
    return [f"{v.name}: ~{duration(rp.variants[v.name].seconds)} here ({rp.machine.cores} cores); needs a "
            f"GPU: ~{duration(gpu.variants[v.name].seconds)} on {name}" for v in slow] + \
        ["quantkit plan --machine h100 shows the whole plan for that machine"]


def _branch_cell(v: Any) -> str:
    """The branch when it is not the variant's own name (main, a GGUF type, one the recipe set)."""
    return "" if v.branch == v.name else v.branch


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
    if s >= 10 * DAY:
        return f"{s / DAY:.0f} days"
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


def _print_build_estimate(rp: Any, why: str) -> None:
    if rp is None:
        err.print(f"• resources: not estimated ({escape(why)})")
        return
    b, m = rp.build, rp.machine
    out.print(f"model: {rp.shape.params / 1e9:.2f}B parameters, {size(rp.shape.bf16_bytes)} in bf16")
    out.print(f"build on {m.name} ({m.cores} cores, {m.ram / 1e9:.0f} GB RAM+swap"
              + (f", {m.gpu}" if m.gpu else "") + f"): peak RAM {size(b.ram)} ({b.stage}), "
              + (f"GPU memory {size(b.vram)}, " if b.vram else "") + f"disk {size(b.disk)}, "
              f"time {duration(b.seconds)}")


def _settings(v: Any) -> str:
    """The settings that differ from the format's defaults and that its name does not show
    (`--json` lists every setting)."""
    from ..recipe import SPECS

    spec = SPECS[v.format]
    fields = spec.params.model_fields
    return " ".join(f"{k}={val}" for k, val in v.params_dict().items()
                    if k not in spec.name_keys and val is not None
                    and not (k in fields and not fields[k].is_required() and fields[k].default == val))
