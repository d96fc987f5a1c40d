"""`<out>/report.html`: one self-contained page per build (no file or network beside it) with the
size-against-quality picture, the provided-files table of every format as its card shows it,
and the plan's estimates against the measured time and memory of every variant."""

from __future__ import annotations

import base64
import html
import re
import time
from pathlib import Path
from typing import Any

from . import __version__, atomic, card
from .chart import CHART
from .manifest import Manifest, State
from .plan import Plan

REPORT = "report.html"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.chart { max-width: 100%; border: 1px solid #ddd; }
.muted { color: #777; }
"""


def write_report(plan: Plan, manifest: Manifest, out_dir: Path) -> Path:
    """The page, written atomically; it reads the chart card.write_cards left in out_dir."""
    m = plan.recipe.model
    body = [f"<h1>{_e(m.display_name or m.model_name)}: quantkit build report</h1>",
            f'<p class="muted">{_e(str(len(manifest.variants)))} variants, written '
            f"{time.strftime('%Y-%m-%d %H:%M')} by quantkit {__version__}; quality on held-out text "
            f"against the unquantized model.</p>",
            _chart(out_dir), *_file_tables(plan, manifest), _plan_against_build(plan, manifest)]
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>"
            f"{_e(m.model_name)} - quantkit report</title><style>{_STYLE}</style></head>\n"
            f"<body data-chart=\"none\">\n" + "\n".join(body) + "\n</body></html>\n")
    return atomic.write_text(out_dir / REPORT, page)


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _chart(out_dir: Path) -> str:
    png = out_dir / CHART
    if not png.is_file():
        return "<p class=\"muted\">No picture: no evaluated variant, or matplotlib is not installed.</p>"
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    # The page says when the picture has loaded (the browser test reads it back).
    return (f'<h2>File size against quality</h2>\n<img class="chart" id="chart" alt="file size against KLD" '
            f'src="data:image/png;base64,{data}" onload="document.body.dataset.chart=\'loaded\'">')


def _inline(md: str) -> str:
    """The card cells' Markdown (links, bold, code) as HTML."""
    out = _e(md)
    out = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', out)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def _table(header: list[str], rows: list[list[str]], numeric: set[int] | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i in (numeric or set()) else ""}>{c}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _file_tables(plan: Plan, manifest: Manifest) -> list[str]:
    """Each repo's provided-files table, as its cards have it (one card per repo is enough)."""
    shown = card.card_variants(plan, manifest)
    out = []
    for repo in dict.fromkeys(v.repo for v in shown):
        first = next(v for v in shown if v.repo == repo)
        ctx = card.card_context(plan, manifest, first.name)
        rows = [[_inline(c) for c in r["cells"]] for r in ctx.rows]
        out.append(f"<h2>{_e(ctx.repo)}</h2>\n" + _table(ctx.header, rows))
    return out or ["<p class=\"muted\">No variant has been evaluated yet.</p>"]


def _plan_against_build(plan: Plan, manifest: Manifest) -> str:
    """Per variant: the plan's time and peak RAM on this machine against what the build measured."""
    est = _estimates(plan)
    rows = []
    for v in plan.variants:
        rec = manifest.variants.get(v.name)
        if rec is None or not rec.at_least(State.BUILT):
            continue
        e = est.get(v.name)
        rows.append([_e(v.name), _secs(e.seconds) if e else "?", _secs(rec.task_seconds) if rec.task_seconds else "-",
                     _ratio(rec.task_seconds, e.seconds if e else 0), _gb(e.ram) if e else "?",
                     _gb(rec.peak_ram) if rec.peak_ram else "-", _ratio(rec.peak_ram, e.ram if e else 0)])
    header = ["variant", "planned time", "measured time", "measured / planned", "planned peak RAM",
              "measured peak RAM", "measured / planned"]
    note = ("<p class=\"muted\">Measured: the wall time of the variant's task (building and scoring; the first "
            "task of a format also runs its shared steps) and the peak RssAnon of the build's process tree "
            "meanwhile. Planned: quantkit's resource plan for this machine, from the model's config alone.</p>")
    return "<h2>The plan against the build</h2>\n" + _table(header, rows, {1, 2, 3, 4, 5, 6}) + note


def _estimates(plan: Plan) -> dict[str, Any]:
    from .errors import QuantkitError
    from .resources import plan_resources

    try:
        return dict(plan_resources(plan).variants)
    except (QuantkitError, KeyError, ValueError, TypeError):
        return {}


def _secs(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _ratio(measured: float, planned: float) -> str:
    return f"{measured / planned:.2f}" if measured and planned else "-"
