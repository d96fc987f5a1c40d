"""The size-against-quality picture: file size on one axis, KLD against the original on the
other, one labelled point per evaluated variant, formats in their own colours. The build folder
gets the whole build's (report.html shows it); each variant folder gets its repo's, the picture
of the table its card shows (`quality.png` beside the README, so the Hub shows it). Per repo,
so that a new variant of one format changes no other repo's branches."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from . import atomic
from .formats import files_size
from .manifest import Manifest, State

CHART = "quality.png"
# One colour per format, in the order formats first appear in a build (colour-blind safe).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442")


@dataclass(frozen=True)
class Point:
    name: str
    format: str
    repo: str
    size: int  # bytes of the files
    kld: float


def points(manifest: Manifest) -> list[Point]:
    """Every evaluated variant with a measured KLD, smallest first."""
    out = [Point(n, r.format, r.repo, files_size(r.files, r.size_bytes), r.quality.kld)
           for n, r in manifest.variants.items()
           if r.at_least(State.EVALUATED) and r.quality is not None and r.quality.kld is not None]
    return sorted(out, key=lambda p: p.size)


def render(pts: list[Point], title: str) -> bytes | None:
    """The PNG, or None without matplotlib (the cards then leave the picture out)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    unit, scale = ("GB", 1e9) if max(p.size for p in pts) > 2e9 else ("MB", 1e6)
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
    formats = list(dict.fromkeys(p.format for p in pts))
    for i, fmt in enumerate(formats):
        mine = [p for p in pts if p.format == fmt]
        ax.plot([p.size / scale for p in mine], [max(p.kld, 1e-6) for p in mine], "o-", label=fmt,
                color=PALETTE[i % len(PALETTE)], alpha=0.85)
        for p in mine:
            ax.annotate(p.name, (p.size / scale, max(p.kld, 1e-6)), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, annotation_clip=False)
    kld = [max(p.kld, 1e-6) for p in pts]
    if max(kld) / min(kld) > 10:  # a ladder spans decades: log; a few close points: linear
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.25, y=0.15)  # room for the labels right of the points
    ax.set_xlabel(f"file size ({unit})")
    ax.set_ylabel("KLD against the original (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write(manifest: Manifest, out_dir: Path, title: str) -> bytes | None:
    """quality.png of the whole build in out_dir, and of its repo in every evaluated variant's
    folder (its branch carries it beside the README); None when there is nothing to draw."""
    pts = points(manifest)
    png = render(pts, title) if pts else None
    if png is None:
        return None
    if _changed(out_dir / CHART, png):
        atomic.write_bytes(out_dir / CHART, png)
    for repo in dict.fromkeys(p.repo for p in pts):
        mine = [p for p in pts if p.repo == repo]
        own = render(mine, f"{repo.split('/')[-1]}: file size against KLD")
        for p in mine:
            if own is not None and (out_dir / p.name).is_dir() and _changed(out_dir / p.name / CHART, own):
                atomic.write_bytes(out_dir / p.name / CHART, own)
    return png


def _changed(path: Path, data: bytes) -> bool:
    """Rewrite only what differs: an unchanged picture keeps its mtime (publish's hash cache)."""
    return not path.is_file() or path.read_bytes() != data
