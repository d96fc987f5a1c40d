"""Model cards: one README.md per branch, generated from the manifest, never hand-filled.

One repo per format, so a card's "provided files" table lists the variants of its repo (every
branch carries the same table, its own row marked). Sizes and quality come from the manifest,
which the build measured. Everything that differs between formats (columns, descriptions,
runtimes, tags, the usage sections of the template) comes from the format's FormatSpec and its
template partial. The section order follows the cards users know from TheBloke's repos
(DESIGN §3), in our words.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from . import __version__, atomic, chart, formats
from .chart import CHART
from .formats import CardRow, human_size, yes
from .manifest import Manifest, State, VariantRecord
from .plan import Plan, Variant, repo_for
from .recipe import SPECS, Recipe, read_model_config, resolve_local_source
from .records import QualityRecord
from .sizing import ModelShape, RunMemory, run_memory

__all__ = ["CardContext", "OriginalCard", "card_context", "files_size", "human_size", "load_original_card",
           "render_card", "render_cards", "write_cards"]

TEMPLATE = "card.md.j2"
README = formats.README
ORIGINAL_CACHE = "original_card.json"  # in the build folder: fetched once, reused by publish
HUB = "https://huggingface.co"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FRONT_MATTER = re.compile(r"^\s*---\r?\n.*?\r?\n---[ \t]*(\r?\n|$)", re.S)

# Calibration dataset -> language of the text (card metadata `language`); unknown: omitted.
DATASET_LANGUAGE: dict[str | None, str] = {
    None: "de",  # the German QA sample shipped in calibration/
    "deepset/germanquad": "de",  # GermanQuAD
    "deepset/germandpr": "de",  # GermanDPR, built from GermanQuAD
}


@dataclass(frozen=True)
class OriginalCard:
    text: str | None  # the original README without its front matter; None: not available
    origin: str  # where it was (to be) read from
    reason: str | None = None  # why it is missing

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "origin": self.origin, "reason": self.reason}


def files_size(rec: VariantRecord) -> int:
    """Bytes of the built files; the README is not one of them (it shows this number)."""
    return formats.files_size(rec.files, rec.size_bytes)


def _quality(row: CardRow, key: str) -> str:
    return formats.quality_cell(row.quality, key)


def _cell(text: str) -> str:
    """Markdown table cells cannot hold pipes or line breaks."""
    return str(text).replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------- what the card is made of


def card_variants(plan: Plan, manifest: Manifest) -> list[Variant]:
    """Variants that get a card: evaluated (or further), not failed, in plan order."""
    out = []
    for v in plan.variants:
        rec = manifest.variants.get(v.name)
        if rec is not None and rec.at_least(State.EVALUATED):
            out.append(v)
    return out


_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")


def _hub_dataset(recipe: Recipe, d: str | None) -> bool:
    """A Hub dataset id, not a local file named like one ("data/de.json")."""
    if not d or not _HUB_ID.match(d) or d.endswith(_DATA_SUFFIXES):
        return False
    return not any((base / d).exists() for base in (Path(recipe.base_dir), Path.cwd()))


def _hub_model(recipe: Recipe) -> bool:
    return resolve_local_source(recipe) is None and bool(_HUB_ID.match(recipe.model.source))


def _dataset_cell(recipe: Recipe, label: str | None) -> str:
    d = recipe.calibration.dataset
    if _hub_dataset(recipe, d):
        return f"[{d}]({HUB}/datasets/{d})"
    return label or d or "quantkit German sample"


def _architecture(recipe: Recipe, manifest: Manifest) -> str | None:
    if manifest.source.architecture:
        return manifest.source.architecture
    cfg = read_model_config(recipe) or {}
    return (cfg.get("architectures") or [None])[0]


def _remarks(rows: list[CardRow]) -> list[CardRow]:
    """Measured superlatives among a repo's rows: smallest download, closest to the original."""
    if len(rows) < 2:
        return rows
    small = min(rows, key=lambda r: files_size(r.record))
    klds = [r for r in rows if r.quality is not None]
    best = min(klds, key=lambda r: r.quality.kld) if klds else None  # type: ignore[union-attr]
    out = []
    for r in rows:
        marks = (("smallest download",) if r is small else ()) + (("lowest KLD",) if r is best else ())
        out.append(replace(r, remarks=marks))
    return out


def _shape(recipe: Recipe) -> ModelShape | None:
    """The source's shape from its config.json, for the memory column; None when unreadable."""
    try:
        return ModelShape.from_config(read_model_config(recipe) or {})
    except (KeyError, TypeError, ValueError):
        return None


def _run(v: Variant, rec: VariantRecord, shape: ModelShape | None) -> RunMemory | None:
    if shape is None:
        return None
    return run_memory(files_size(rec), shape, SPECS[v.format].run_overhead(shape))


def _rows(plan: Plan, manifest: Manifest, fmt: str, repo: str, current: str, arch: str | None) -> list[CardRow]:
    recipe = plan.recipe
    cal = manifest.calibration
    shape = _shape(recipe)
    rows = []
    for v in card_variants(plan, manifest):
        if v.format != fmt:
            continue
        rec = manifest.variants[v.name]
        params = {**v.params_dict(), **rec.params}
        seq = params.get("seq_len") or cal.seq_len or recipe.calibration.seq_len
        rows.append(CardRow(v, rec, params, f"{HUB}/{repo}/tree/{v.branch}", v.name == current, arch,
                            SPECS[v.format].describe(params), dataset=_dataset_cell(recipe, cal.source), seq_len=seq,
                            run=_run(v, rec, shape)))
    return _remarks(rows)


def base_model(recipe: Recipe) -> str | None:
    """The Hub id the card links to as the original: `[model] base_model`, else a Hub source."""
    return recipe.model.base_model or (recipe.model.source if _hub_model(recipe) else None)


def _front_matter(recipe: Recipe, fmt: str, owner: str | None) -> dict[str, Any]:
    m, cal, ev = recipe.model, recipe.calibration, recipe.evaluation
    spec = SPECS[fmt]
    meta: dict[str, Any] = {}
    base = base_model(recipe)
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "quantized"
    if spec.library_name:
        meta["library_name"] = spec.library_name
    lang = getattr(m, "language", None) or DATASET_LANGUAGE.get(cal.dataset)
    if lang:
        meta["language"] = [lang] if isinstance(lang, str) else list(lang)
    if m.license:
        meta["license"] = m.license
    datasets = [d for d in dict.fromkeys((cal.dataset, ev.dataset)) if _hub_dataset(recipe, d)]
    if datasets:
        meta["datasets"] = datasets
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = list(spec.tags)
    if m.creator:
        meta["model_creator"] = m.creator
    meta["model_name"] = m.display_name or m.model_name
    if recipe.publish.quantized_by or owner or recipe.publish.owner:
        meta["quantized_by"] = recipe.publish.quantized_by or recipe.publish.owner or owner
    if m.prompt_template:
        meta["prompt_template"] = m.prompt_template
    return meta


def _yaml(meta: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000).rstrip("\n")


def _notes(rows: list[CardRow]) -> list[tuple[str, str, str]]:
    """(branches, key, value) for each scalar note the engines left for the card; a note
    every branch shares is listed once."""
    seen: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        for k, v in sorted(r.record.notes.items()):
            if isinstance(v, (str, int, float, bool)) and len(str(v)) <= 400:
                seen.setdefault((k, str(v)), []).append(f"`{r.variant.branch}`")
    return [("all branches" if len(b) == len(rows) > 1 else ", ".join(b), k, v) for (k, v), b in seen.items()]


def _compat(fmt: str, rows: list[CardRow], arch: str | None) -> list[tuple[str, list[str], str]]:
    return [(rt.name, [yes(rt.works(r.params, arch)) for r in rows], rt.how.format(fmt=fmt))
            for rt in SPECS[fmt].runtimes]


def known_owner(plan: Plan, manifest: Manifest) -> str | None:
    """The recipe's owner, else the one an earlier publish resolved (recorded in the manifest)."""
    if plan.recipe.publish.owner:
        return plan.recipe.publish.owner
    for v in plan.variants:
        rec = manifest.variants.get(v.name)
        repo = rec.published.repo if rec is not None and rec.published else ""
        if "{owner}" in v.repo and "/" in repo and repo_for(plan.recipe, v.format, repo.split("/")[0]) == repo:
            return repo.split("/")[0]
    return None


@dataclass(frozen=True)
class CardContext:
    """Everything the template reads, as plain values; the format's partial adds `extra`."""

    front_matter: str
    model: Any  # the recipe's [model] table
    display_name: str
    creator: str | None
    source: str
    source_is_hub: bool
    hub: str
    format: str
    FORMAT: str  # the repo suffix: GPTQ, GGUF, ...
    partial: str  # the format's template with its own sections
    repo: str
    variant: Variant
    current: CardRow
    current_description: str
    owner: str | None
    siblings: list[dict[str, Any]]
    header: list[str]
    rows: list[dict[str, Any]]
    other_branch: str
    calibration: dict[str, Any]
    evaluation: Any  # the recipe's [evaluation] table
    ref_ppl: float | None
    quality_rows: list[dict[str, str]]
    qa_items: int | None  # multiple-choice items behind the answer flips (None: not measured)
    build_rows: list[dict[str, Any]]
    compat_header: list[str]
    compat: list[tuple[str, list[str], str]]
    notes: list[tuple[str, str, str]]
    quantkit_version: str
    example_prompt: str
    original: OriginalCard | None
    run_device: str  # "RAM" or "VRAM": what the memory column counts
    human_size: Any  # the formatter, for the template's memory line
    extra: dict[str, Any]  # names the format's partial uses (FormatSpec.card_context)
    chart: str | None = None  # the size-against-quality picture beside the README, when there is one

    def names(self) -> dict[str, Any]:
        """The template's variables: the fields, and the partial's extra names beside them."""
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, **self.extra}


def card_context(plan: Plan, manifest: Manifest, variant: str, *, owner: str | None = None,
                 original: OriginalCard | None = None) -> CardContext:
    """What the template needs (no I/O except the source's config.json)."""
    recipe = plan.recipe
    owner = owner or known_owner(plan, manifest)
    v = next(x for x in plan.variants if x.name == variant)
    spec = SPECS[v.format]
    repo = repo_for(recipe, v.format, owner)
    arch = _architecture(recipe, manifest)
    rows = _rows(plan, manifest, v.format, repo, variant, arch)
    m = recipe.model
    current = next(r for r in rows if r.current)
    return CardContext(
        front_matter=_yaml(_front_matter(recipe, v.format, owner)),
        model=m, display_name=m.display_name or m.model_name, creator=m.creator,
        source=m.source, source_is_hub=_hub_model(recipe), hub=HUB,
        format=v.format, FORMAT=spec.repo_suffix, partial=spec.partial, repo=repo, variant=v,
        current=current, current_description=current.description, owner=owner or recipe.publish.owner,
        siblings=_siblings(plan, v.format, owner),
        header=[c.title for c in spec.columns],
        rows=[{"cells": [_cell(c.value(r)) for c in spec.columns], "row": r} for r in rows],
        other_branch=next((r.variant.branch for r in rows if not r.current), v.branch),
        calibration=_calibration(recipe, manifest), evaluation=recipe.evaluation,
        ref_ppl=next((r.quality.ref_ppl for r in rows if r.quality is not None), None),
        quality_rows=[{"branch": r.variant.branch, **{k: _quality(r, k) for k in formats.QUALITY_FORMAT}}
                      for r in rows],
        qa_items=next((r.quality.qa_items for r in rows if r.quality is not None and r.quality.qa_items), None),
        build_rows=[{"branch": r.variant.branch, "engine": r.record.engine or "n/a",
                     "version": r.record.engine_version or "n/a", "seconds": f"{r.record.seconds:.0f}",
                     "files": sum(f.path != README for f in r.record.files)} for r in rows],
        compat_header=[r.variant.branch for r in rows],
        compat=_compat(v.format, rows, arch),
        notes=_notes(rows), quantkit_version=manifest.source.quantkit_version or __version__,
        example_prompt=(m.prompt_template or "{prompt}").replace(
            "{prompt}", "Was ist die Hauptstadt von Deutschland?"),
        original=original, run_device=spec.run_device, human_size=human_size,
        extra=spec.extra_context(current, rows),
        chart=CHART if (plan.variant_dir(v) / CHART).is_file() else None,
    )


def _siblings(plan: Plan, fmt: str, owner: str | None) -> list[dict[str, Any]]:
    """The recipe's other repos, for "Repositories available"."""
    out = []
    for f in dict.fromkeys(x.format for x in plan.variants):
        spec = SPECS[f]
        out.append({"format": spec.repo_suffix, "repo": repo_for(plan.recipe, f, owner), "use": spec.use,
                    "this": f == fmt})
    return out


def _calibration(recipe: Recipe, manifest: Manifest) -> dict[str, Any]:
    c, cal = recipe.calibration, manifest.calibration
    template = c.template or recipe.model.prompt_template
    return {"dataset": _dataset_cell(recipe, cal.source), "split": c.split,
            "samples": c.samples if cal.samples is None else cal.samples,
            "seq_len": c.seq_len if cal.seq_len is None else cal.seq_len,
            "n_items": cal.items, "sha256": cal.sha256, "seed": c.seed,
            "template": template or "the tokenizer's chat template, else context + question + answer"}


# ---------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=1)
def _template() -> Any:
    return _env().get_template(TEMPLATE)


def _env() -> Any:
    from jinja2 import Environment, PackageLoader, StrictUndefined

    return Environment(loader=PackageLoader("quantkit", "templates"), autoescape=False,
                       keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                       undefined=StrictUndefined)


def render_card(plan: Plan, manifest: Manifest, variant: str, *, owner: str | None = None,
                original: OriginalCard | None = None) -> str:
    """The README.md of one variant's branch."""
    if variant not in {v.name for v in card_variants(plan, manifest)}:
        raise ValueError(f"{variant}: no card before it is built and evaluated")
    text = _template().render(**card_context(plan, manifest, variant, owner=owner, original=original).names())
    return re.sub(r"\n{3,}", "\n\n", text).rstrip("\n") + "\n"


def render_cards(plan: Plan, manifest: Manifest, *, owner: str | None = None,
                 original: OriginalCard | None = None) -> dict[str, str]:
    """README text per variant name, for every variant that has been evaluated."""
    return {v.name: render_card(plan, manifest, v.name, owner=owner, original=original)
            for v in card_variants(plan, manifest)}


def write_cards(plan: Plan, manifest: Manifest, out_dir: Path, *, owner: str | None = None,
                original: OriginalCard | None = None) -> Manifest:
    """Write <out>/<variant>/README.md for each evaluated variant; return the manifest with states.

    evaluated -> carded. A published variant whose README changed goes back to carded: its
    branch no longer holds what the folder holds. The caller saves the manifest.
    """
    original = original or load_original_card(plan.recipe, out_dir=out_dir)
    m = plan.recipe.model
    chart.write(manifest, Path(out_dir), f"{m.display_name or m.model_name}: file size against KLD, every variant")
    for name, text in render_cards(plan, manifest, owner=owner, original=original).items():
        path = Path(out_dir) / name / README
        if not path.parent.is_dir():
            continue  # no files to describe: the pipeline rebuilds it
        old = path.read_text(encoding="utf-8") if path.is_file() else None
        if old != text:
            atomic.write_text(path, text)  # a crash leaves the old card or the new, whole
        rec = manifest.variants[name]
        if rec.state == State.EVALUATED or (rec.state == State.PUBLISHED and old != text):
            manifest = manifest.with_variant(name, rec.moved_to(State.CARDED))
    return manifest


# ---------------------------------------------------------------- the original model's card


def strip_front_matter(text: str) -> str:
    return _FRONT_MATTER.sub("", text, count=1).strip("\n")


def load_original_card(recipe: Recipe, *, out_dir: Path | None = None, fetch: bool = True) -> OriginalCard:
    """The source model's README: from its folder, from the build folder's copy, or from the Hub."""
    local = resolve_local_source(recipe)
    if local is not None:
        readme = local / README
        if readme.is_file():
            return OriginalCard(strip_front_matter(readme.read_text(encoding="utf-8", errors="replace")), str(local))
        return OriginalCard(None, str(local), f"{local} has no {README}")
    cache = Path(out_dir) / ORIGINAL_CACHE if out_dir else None
    if cache is not None and cache.is_file():
        try:
            return OriginalCard(**json.loads(cache.read_text(encoding="utf-8")))
        except (ValueError, TypeError):
            pass
    card = _fetch_original(recipe) if fetch else OriginalCard(None, recipe.model.source, "not fetched")
    if cache is not None and fetch:
        atomic.write_text(cache, json.dumps(card.to_json(), ensure_ascii=False))
    return card


def _fetch_original(recipe: Recipe) -> OriginalCard:
    """One GET with a short timeout: offline, a card must not wait through download retries."""
    src, rev = recipe.model.source, recipe.model.revision
    origin = f"{src}@{rev}"
    if not _HUB_ID.match(src):
        return OriginalCard(None, src, "the source is neither a folder nor a Hub id")
    from urllib.parse import quote

    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session

    if constants.HF_HUB_OFFLINE:
        return OriginalCard(None, origin, "HF_HUB_OFFLINE is set")
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    url = f"{endpoint}/{src}/resolve/{quote(rev, safe='')}/{README}"
    try:
        r = get_session().get(url, headers=build_hf_headers(), timeout=10, follow_redirects=True)
    except Exception as e:  # noqa: BLE001 - offline, DNS, TLS: the card says why
        return OriginalCard(None, origin, f"could not read it from the Hub ({type(e).__name__})")
    if r.status_code != 200:
        return OriginalCard(None, origin, f"could not read it from the Hub (HTTP {r.status_code})")
    return OriginalCard(strip_front_matter(r.content.decode("utf-8", errors="replace")), origin)
