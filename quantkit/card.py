"""Model cards: one README.md per branch, generated from the manifest, never hand-filled.

One repo per format, so a card's "provided files" table lists the variants of its repo (every
branch carries the same table, its own row marked). Sizes and quality come from the manifest,
which the build measured; what the runtimes accept comes from the RUNTIMES table below. The
section order follows the cards users know from TheBloke's repos (DESIGN §3), in our words.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import __version__, atomic
from .manifest import Manifest, VariantRecord
from .plan import FORMAT_SUFFIX, Plan, Variant, repo_for
from .recipe import Recipe, read_model_config, resolve_local_source

TEMPLATE = "card.md.j2"
README = "README.md"
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

# Per format: metadata tags, library_name (None: let the Hub detect it), what the repo is for.
FORMAT_TAGS: dict[str, tuple[str, ...]] = {
    "gptq": ("gptq", "quantized", "quantkit"),
    "awq": ("awq", "quantized", "quantkit"),
    "gguf": ("gguf", "quantized", "quantkit"),
    "exl2": ("exl2", "quantized", "quantkit"),
}
FORMAT_LIBRARY: dict[str, str | None] = {
    "gptq": "transformers",  # loads through GPTQModel
    "awq": "transformers",  # loads through GPTQModel's AWQ kernels
    "gguf": None,  # the Hub recognises .gguf files itself
    "exl2": None,  # exllamav2 is not a Hub library id
}
FORMAT_USE: dict[str, str] = {
    "gptq": "GPU inference; one set of GPTQ parameters per branch",
    "awq": "GPU inference with AWQ (GEMM) kernels",
    "gguf": "CPU and CPU+GPU inference with llama.cpp and the apps built on it",
    "exl2": "GPU inference with exllamav2, one bits-per-weight choice per branch",
}

# GGUF types whose llama.cpp quantizer ignores an importance matrix (8-bit and float).
IMATRIX_UNUSED = frozenset({"Q8_0", "F16", "BF16", "F32"})

_LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM")


def _llama_like(arch: str | None) -> bool | None:
    return None if not arch else arch in _LLAMA_LIKE


def _always(p: Mapping[str, Any], arch: str | None) -> bool | None:
    return True


@dataclass(frozen=True)
class Runtime:
    name: str
    formats: tuple[str, ...]
    works: Callable[[Mapping[str, Any], str | None], bool | None]  # (params, architecture); None: unknown
    how: str  # how to load it there


# ExLlama's GPTQ kernels are 4-bit only and know Llama-style layers (TheBloke's ExLlama column).
EXLLAMA = Runtime("ExLlama (v1/v2 kernels)", ("gptq",),
                  lambda p, arch: False if p.get("bits") != 4 else _llama_like(arch), "ExLlamav2 loader")

# Runtime compatibility, one row per runtime. A card shows the rows of its format.
RUNTIMES: tuple[Runtime, ...] = (
    EXLLAMA,
    # transformers 5 loads GPTQ checkpoints through GPTQModel (+ optimum), any bit width.
    Runtime("transformers + GPTQModel", ("gptq",), _always, "`AutoModelForCausalLM.from_pretrained`"),
    # vLLM has GPTQ kernels for 2/3/4/8 bits; quantkit writes GPTQ v1 ("gptq"), which it reads.
    Runtime("vLLM", ("gptq", "awq"), _always, "`vllm serve REPO --revision BRANCH --quantization {fmt}`"),
    # TGI serves GPTQ and AWQ checkpoints with `--quantize gptq|awq`.
    Runtime("Text Generation Inference", ("gptq", "awq"), _always, "`--quantize {fmt}`"),
    # text-generation-webui: ExLlamav2 loader for 4-bit GPTQ, the transformers loader otherwise.
    Runtime("text-generation-webui", ("gptq", "awq", "gguf", "exl2"), _always, "`REPO:BRANCH` in Download"),
    # AWQ GEMM checkpoints load in transformers through GPTQModel's AWQ kernels.
    Runtime("transformers + GPTQModel (AWQ GEMM)", ("awq",), _always, "`AutoModelForCausalLM.from_pretrained`"),
    # GGUF is llama.cpp's format; everything that embeds llama.cpp reads it.
    Runtime("llama.cpp", ("gguf",), _always, "`llama-cli -m FILE`"),
    Runtime("llama-cpp-python", ("gguf",), _always, "`Llama(model_path=FILE)`"),
    Runtime("LM Studio, Ollama, KoboldCpp", ("gguf",), _always, "open or import the .gguf file"),
    # EXL2 is exllamav2's own format (CUDA only) and the servers built on it.
    Runtime("exllamav2", ("exl2",), _always, "`ExLlamaV2Config(DIR)`"),
    Runtime("TabbyAPI", ("exl2",), _always, "model folder in `models/`"),
)


@dataclass(frozen=True)
class OriginalCard:
    text: str | None  # the original README without its front matter; None: not available
    origin: str  # where it was (to be) read from
    reason: str | None = None  # why it is missing

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "origin": self.origin, "reason": self.reason}


@dataclass(frozen=True)
class Column:
    title: str
    value: Callable[[Row], str]


@dataclass(frozen=True)
class Row:
    variant: Variant
    record: VariantRecord
    params: Mapping[str, Any]
    link: str  # the branch on the Hub
    current: bool
    exllama: bool | None = None
    remarks: tuple[str, ...] = ()
    dataset: str = ""
    seq_len: int | None = None


# ---------------------------------------------------------------- small formatters


def files_size(rec: VariantRecord) -> int:
    """Bytes of the built files; the README is not one of them (it shows this number)."""
    files = [f for f in rec.files if f.path != README]
    return sum(f.size for f in files) if files else rec.size_bytes


def human_size(n: int) -> str:
    """Decimal units, as the Hub shows file sizes."""
    for unit, step in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= step:
            return f"{n / step:.2f} {unit}"
    return f"{n} B"


def _num(q: Mapping[str, Any] | None, key: str, fmt: str) -> str:
    v = (q or {}).get(key)
    return "n/a" if v is None else format(v, fmt)


def _yes(v: bool | None) -> str:
    return {True: "Yes", False: "No", None: "Unknown"}[v]


QUALITY_FORMAT = {"delta_ppl_pct": "+.2f", "kld": ".4f", "ppl": ".3f"}  # digits the card shows


def _quality(row: Row, key: str) -> str:
    return _num(row.record.quality, key, QUALITY_FORMAT[key])


def _branch_cell(row: Row) -> str:
    cell = f"[{row.variant.branch}]({row.link})"
    return f"**{cell}** (this branch)" if row.current else cell


def _gs(p: Mapping[str, Any]) -> str:
    return "None" if p.get("group_size") == -1 else str(p.get("group_size"))


# Table columns per format: the GPTQ set is TheBloke's plus measured quality.
_QUALITY = (Column("ΔPPL %", lambda r: _quality(r, "delta_ppl_pct")), Column("KLD", lambda r: _quality(r, "kld")))
_TAIL = (Column("Size", lambda r: human_size(files_size(r.record))),)
COLUMNS: dict[str, tuple[Column, ...]] = {
    "gptq": (Column("Branch", _branch_cell), Column("Bits", lambda r: str(r.params.get("bits"))),
             Column("GS", lambda r: _gs(r.params)), Column("Act Order", lambda r: _yes(r.params.get("act_order"))),
             Column("Damp %", lambda r: f"{r.params.get('damp', 0):g}"), Column("Dataset", lambda r: r.dataset),
             Column("Seq Len", lambda r: str(r.seq_len or "n/a")), *_TAIL,
             Column("ExLlama", lambda r: _yes(r.exllama)), *_QUALITY,
             Column("Description", lambda r: _describe(r))),
    "awq": (Column("Branch", _branch_cell), Column("Bits", lambda r: str(r.params.get("bits"))),
            Column("GS", lambda r: _gs(r.params)), Column("Zero point", lambda r: _yes(r.params.get("zero_point"))),
            Column("Dataset", lambda r: r.dataset), Column("Seq Len", lambda r: str(r.seq_len or "n/a")), *_TAIL,
            *_QUALITY, Column("Description", lambda r: _describe(r))),
    "gguf": (Column("Branch", _branch_cell), Column("File", lambda r: f"`{_gguf_file(r)}`"),
             Column("Quant", lambda r: str(r.params.get("quant"))),
             Column("Bits/weight", lambda r: f"{r.record.bits_per_weight:.2f}"),
             Column("imatrix", lambda r: r.dataset if _imatrix(r.params) else "No"), *_TAIL,
             *_QUALITY, Column("Description", lambda r: _describe(r))),
    "exl2": (Column("Branch", _branch_cell), Column("Bits/weight", lambda r: f"{r.params.get('bpw')}"),
             Column("Head bits", lambda r: str(r.params.get("head_bits"))), Column("Dataset", lambda r: r.dataset),
             *_TAIL, *_QUALITY, Column("Description", lambda r: _describe(r))),
}

# What each variant is, in a few words, per format.
DESCRIBE: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "gptq": lambda p: f"{p['bits']}-bit" + (", act order" if p.get("act_order") else "")
    + (", no grouping" if p.get("group_size") == -1 else f", group size {p.get('group_size')}"),
    "awq": lambda p: f"{p['bits']}-bit AWQ (GEMM), group size {p.get('group_size')}",
    "gguf": lambda p: f"llama.cpp {p['quant']}" + (", with importance matrix" if _imatrix(p) else ""),
    "exl2": lambda p: f"{p['bpw']} bits per weight, {p.get('head_bits')}-bit output layer",
}


def _imatrix(p: Mapping[str, Any]) -> bool:
    return bool(p.get("imatrix")) and p.get("quant") not in IMATRIX_UNUSED


def _describe(row: Row) -> str:
    return "; ".join((DESCRIBE[row.variant.format](row.params), *row.remarks))


def _gguf_file(row: Row) -> str:
    return next((f.path for f in row.record.files if f.path.endswith(".gguf")), "")


def _cell(text: str) -> str:
    """Markdown table cells cannot hold pipes or line breaks."""
    return str(text).replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------- what the card is made of


def card_variants(plan: Plan, manifest: Manifest) -> list[Variant]:
    """Variants that get a card: evaluated (or further), not failed, in plan order."""
    out = []
    for v in plan.variants:
        rec = manifest.variants.get(v.name)
        if rec is not None and rec.at_least("evaluated"):
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
    arch = manifest.source.get("architecture")
    if arch:
        return str(arch)
    cfg = read_model_config(recipe) or {}
    return (cfg.get("architectures") or [None])[0]


def _remarks(rows: list[Row]) -> list[Row]:
    """Measured superlatives among a repo's rows: smallest download, closest to the original."""
    if len(rows) < 2:
        return rows
    small = min(rows, key=lambda r: files_size(r.record))
    klds = [r for r in rows if (r.record.quality or {}).get("kld") is not None]
    best = min(klds, key=lambda r: r.record.quality["kld"]) if klds else None  # type: ignore[index]
    out = []
    for r in rows:
        marks = (("smallest download",) if r is small else ()) + (("lowest KLD",) if r is best else ())
        out.append(replace(r, remarks=marks))
    return out


def _rows(plan: Plan, manifest: Manifest, fmt: str, repo: str, current: str, arch: str | None) -> list[Row]:
    recipe = plan.recipe
    cal = manifest.calibration
    rows = []
    for v in card_variants(plan, manifest):
        if v.format != fmt:
            continue
        rec = manifest.variants[v.name]
        params = {**v.params_dict(), **rec.params}
        seq = params.get("seq_len") or cal.get("seq_len") or recipe.calibration.seq_len
        rows.append(Row(v, rec, params, f"{HUB}/{repo}/tree/{v.branch}", v.name == current,
                        exllama=EXLLAMA.works(params, arch) if fmt in EXLLAMA.formats else None,
                        dataset=_dataset_cell(recipe, cal.get("source")),
                        seq_len=seq))
    return _remarks(rows)


def _front_matter(recipe: Recipe, fmt: str, owner: str | None) -> dict[str, Any]:
    m, cal, ev = recipe.model, recipe.calibration, recipe.evaluation
    meta: dict[str, Any] = {}
    if _hub_model(recipe):
        meta["base_model"] = m.source
        meta["base_model_relation"] = "quantized"
    if FORMAT_LIBRARY[fmt]:
        meta["library_name"] = FORMAT_LIBRARY[fmt]
    lang = getattr(m, "language", None) or DATASET_LANGUAGE.get(cal.dataset)
    if lang:
        meta["language"] = [lang] if isinstance(lang, str) else list(lang)
    if m.license:
        meta["license"] = m.license
    datasets = [d for d in dict.fromkeys((cal.dataset, ev.dataset)) if _hub_dataset(recipe, d)]
    if datasets:
        meta["datasets"] = datasets
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = list(FORMAT_TAGS[fmt])
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


def _versions(manifest: Manifest) -> str:
    return str(getattr(manifest, "quantkit_version", None) or manifest.source.get("quantkit_version")
               or __version__)


def _notes(rows: list[Row]) -> list[tuple[str, str, str]]:
    """(branches, key, value) for each scalar note the engines left for the card; a note
    every branch shares is listed once."""
    seen: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        for k, v in sorted(r.record.notes.items()):
            if isinstance(v, (str, int, float, bool)) and len(str(v)) <= 400:
                seen.setdefault((k, str(v)), []).append(f"`{r.variant.branch}`")
    return [("all branches" if len(b) == len(rows) > 1 else ", ".join(b), k, v) for (k, v), b in seen.items()]


def _compat(fmt: str, rows: list[Row], arch: str | None) -> list[tuple[str, list[str], str]]:
    return [(rt.name, [_yes(rt.works(r.params, arch)) for r in rows], rt.how.format(fmt=fmt))
            for rt in RUNTIMES if fmt in rt.formats]


def known_owner(plan: Plan, manifest: Manifest) -> str | None:
    """The recipe's owner, else the one an earlier publish resolved (recorded in the manifest)."""
    if plan.recipe.publish.owner:
        return plan.recipe.publish.owner
    for v in plan.variants:
        pub = (manifest.variants.get(v.name) or VariantRecord("", "", "", "built")).published or {}
        repo = pub.get("repo", "")
        if "{owner}" in v.repo and "/" in repo and repo_for(plan.recipe, v.format, repo.split("/")[0]) == repo:
            return repo.split("/")[0]
    return None


def card_context(plan: Plan, manifest: Manifest, variant: str, *, owner: str | None = None,
                 original: OriginalCard | None = None) -> dict[str, Any]:
    """Everything the template needs, as plain values (no I/O except the source's config.json)."""
    recipe = plan.recipe
    owner = owner or known_owner(plan, manifest)
    v = next(x for x in plan.variants if x.name == variant)
    repo = repo_for(recipe, v.format, owner)
    arch = _architecture(recipe, manifest)
    rows = _rows(plan, manifest, v.format, repo, variant, arch)
    cols = COLUMNS[v.format]
    m = recipe.model
    fmts = list(dict.fromkeys(x.format for x in plan.variants))
    current = next(r for r in rows if r.current)
    return {
        "front_matter": _yaml(_front_matter(recipe, v.format, owner)),
        "model": m, "display_name": m.display_name or m.model_name, "creator": m.creator,
        "source": m.source, "source_is_hub": _hub_model(recipe), "hub": HUB,
        "format": v.format, "FORMAT": FORMAT_SUFFIX[v.format], "repo": repo, "variant": v,
        "current": current, "current_description": _describe(current), "owner": owner or recipe.publish.owner,
        "siblings": [{"format": FORMAT_SUFFIX[f], "repo": repo_for(recipe, f, owner), "use": FORMAT_USE[f],
                      "this": f == v.format} for f in fmts],
        "header": [c.title for c in cols],
        "rows": [{"cells": [_cell(c.value(r)) for c in cols], "row": r} for r in rows],
        "other_branch": next((r.variant.branch for r in rows if not r.current), v.branch),
        "calibration": _calibration(recipe, manifest), "evaluation": recipe.evaluation,
        "ref_ppl": next((r.record.quality or {}).get("ref_ppl") for r in rows),
        "quality_rows": [{"branch": r.variant.branch, "ppl": _quality(r, "ppl"),
                          "delta": _quality(r, "delta_ppl_pct"), "kld": _quality(r, "kld"),
                          "top1": _pct(r.record.quality, "top1")} for r in rows],
        "build_rows": [{"branch": r.variant.branch, "engine": r.record.engine or "n/a",
                        "version": r.record.engine_version or "n/a", "seconds": f"{r.record.seconds:.0f}",
                        "files": sum(f.path != README for f in r.record.files)} for r in rows],
        "compat_header": [r.variant.branch for r in rows],
        "compat": _compat(v.format, rows, arch),
        "notes": _notes(rows), "quantkit_version": _versions(manifest),
        "gguf_file": _gguf_file(current) if v.format == "gguf" else "",
        "example_prompt": (m.prompt_template or "{prompt}").replace(
            "{prompt}", "Was ist die Hauptstadt von Deutschland?"),
        "original": original,
    }


def _pct(q: Mapping[str, Any] | None, key: str) -> str:
    v = (q or {}).get(key)
    return "n/a" if v is None else f"{100 * v:.1f} %"


def _calibration(recipe: Recipe, manifest: Manifest) -> dict[str, Any]:
    c, cal = recipe.calibration, manifest.calibration
    template = c.template or recipe.model.prompt_template
    return {"dataset": _dataset_cell(recipe, cal.get("source")), "split": c.split,
            "samples": cal.get("samples", c.samples), "seq_len": cal.get("seq_len", c.seq_len),
            "n_items": cal.get("n_items", cal.get("items")), "sha256": cal.get("sha256"),
            "seed": c.seed,
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
    text = _template().render(**card_context(plan, manifest, variant, owner=owner,
                                                               original=original))
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
    for name, text in render_cards(plan, manifest, owner=owner, original=original).items():
        path = Path(out_dir) / name / README
        if not path.parent.is_dir():
            continue  # no files to describe: the pipeline rebuilds it
        old = path.read_text(encoding="utf-8") if path.is_file() else None
        if old != text:
            atomic.write_text(path, text)  # a crash leaves the old card or the new, whole
        rec = manifest.variants[name]
        if rec.state == "evaluated" or (rec.state == "published" and old != text):
            manifest = manifest.with_variant(name, replace(rec, state="carded"))
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
