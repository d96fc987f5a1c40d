"""Recipe: a TOML file validated at the door into frozen pydantic models.

Lists in a `[[variants]]` entry expand to one variant per combination; a table named after a
format (its FormatSpec's defaults table) holds defaults for that format's variants. Every problem is
reported with its field path and TOML line, all at once.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import Field, SerializeAsAny, ValidationError, create_model, field_validator, model_validator

from .engines import ENGINES
from .errors import Problem, RecipeError
from .formats import GROUP_SIZES, FormatSpec, ParamsModel, one_of
from .records import QualityRecord

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_RECIPE_BYTES = 1_000_000  # the longest real recipe is a few KB

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HUB_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,96}$")
_BRANCH = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


class _Frozen(ParamsModel):
    """Every recipe table has the same rules: frozen, unknown keys refused."""


# ---------------------------------------------------------------- top-level tables


class ModelSpec(_Frozen):
    source: str
    revision: str = "main"
    name: str | None = None  # default: last part of source
    display_name: str | None = None
    creator: str | None = None
    license: str | None = None
    prompt_template: str | None = None
    # The Hub id of the original, for a local source: the card's `base_model` links to it.
    base_model: str | None = None

    @field_validator("base_model")
    @classmethod
    def _hub_id(cls, v: str | None) -> str | None:
        if v is not None and not _HUB_ID.match(v):
            raise ValueError(f"{v!r} is not a Hub model id like 'owner/name'")
        return v

    @field_validator("source")
    @classmethod
    def _source_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @property
    def model_name(self) -> str:
        return self.name or self.source.rstrip("/").split("/")[-1]


class CalibrationSpec(_Frozen):
    dataset: str | None = None  # None: the German sample shipped in calibration/
    split: str = "train"
    samples: int = Field(128, ge=1, le=100_000)
    seq_len: int = Field(4096, ge=16, le=131_072)
    seed: int = 0
    template: str | None = None  # uses {context}, {question}, {answer}

    @field_validator("template")
    @classmethod
    def _template_fields(cls, v: str | None) -> str | None:
        if v is not None and "{context}" not in v:
            raise ValueError("must contain {context}")
        return v


class EvaluationSpec(_Frozen):
    dataset: str | None = None  # None: the part of the calibration data held out
    split: str = "test"
    tokens: int = Field(16384, ge=64)
    ctx: int = Field(512, ge=16)
    # Multiple-choice items from the held-out questions, for answer flips (0: not measured).
    qa_items: int = Field(200, ge=0, le=10_000)


class BuildSpec(_Frozen):
    keep_intermediate: bool = False  # keep the 16-bit GGUF and other temporaries after the build


class GateSpec(_Frozen):
    """Quality limits a variant must meet to be published (measured against the original)."""

    max_kld: float | None = Field(None, gt=0)
    max_delta_ppl_pct: float | None = Field(None, gt=0)
    max_kld_p999: float | None = Field(None, gt=0)  # the 99.9 % percentile of per-token KLD: the tail

    def failures(self, q: QualityRecord | None) -> list[str]:
        """Why a variant measuring `q` may not be published; empty when it passes.
        A variant never evaluated always fails: nothing vouches for it."""
        if q is None:
            return ["never evaluated"]
        out = []
        for key, attr, label, fmt, unit in GATES:
            limit, got = getattr(self, key), getattr(q, attr)
            if limit is None:
                continue
            if got is None:  # a manifest from before this was measured
                out.append(f"{label} not measured ({key}): run `quantkit eval` first")
            elif got > limit:
                out.append(f"{label} {got:{fmt}}{unit} over the limit {limit:g}{unit} ({key})")
        return out

    @property
    def limits(self) -> str:
        """The limits in words ("KLD ≤ 0.1, ΔPPL ≤ 20 %"), or "" without any."""
        return ", ".join(f"{label} ≤ {getattr(self, key):g}{unit}" for key, _, label, _, unit in GATES
                         if getattr(self, key) is not None)


# The gate's limits: (setting, QualityRecord field, name in messages, format, unit).
GATES = (
    ("max_kld", "kld", "KLD", ".4f", ""),
    ("max_delta_ppl_pct", "delta_ppl_pct", "ΔPPL", "+.2f", " %"),
    ("max_kld_p999", "kld_p999", "KLD p99.9", ".4f", ""),
)


class PublishSpec(GateSpec):
    repo: str = "{owner}/{name}-{FORMAT}"
    owner: str | None = None  # None: asked from the Hub at publish time
    private: bool = False
    quantized_by: str | None = None
    collection: bool = True  # one Hub collection per recipe holding every repo it published
    # [publish.<format>] tables: that format's own limits, over the global ones above.
    formats: dict[str, GateSpec] = {}

    @model_validator(mode="before")
    @classmethod
    def _format_tables(cls, d: Any) -> Any:
        """Move `[publish.gguf]`-style tables (a format's name) under `formats`."""
        if not isinstance(d, dict):
            return d
        per = {k: v for k, v in d.items() if k in SPECS}
        rest = {k: v for k, v in d.items() if k not in SPECS}
        return {**rest, "formats": {**rest.get("formats", {}), **per}} if per else d

    def gate(self, fmt: str) -> GateSpec:
        """The limits for one format's variants: its own table's, else the global ones."""
        own = self.formats.get(fmt, GateSpec())
        return GateSpec(**{key: getattr(own, key) if getattr(own, key) is not None else getattr(self, key)
                           for key, *_ in GATES})


# ---------------------------------------------------------------- per-format parameters
# Each format's settings model lives in its module's FormatSpec (quantkit.engines, ENGINES).

SPECS: dict[str, FormatSpec] = {fmt: engine.spec for fmt, engine in ENGINES.items()}
FORMATS = tuple(SPECS)
PARAMS: dict[str, type[ParamsModel]] = {fmt: spec.params for fmt, spec in SPECS.items()}
Params = ParamsModel  # any format's settings


class VariantSpec(_Frozen):
    """One expanded variant as the recipe asks for it (before naming)."""

    format: str  # a key of SPECS
    params: SerializeAsAny[ParamsModel]
    branch: str | None = None  # explicit branch; "main" marks the repo's default variant
    index: int  # position of its [[variants]] entry, for error messages
    line: int | None = None  # TOML line of that entry's header


class Recipe(_Frozen):
    model: ModelSpec
    calibration: CalibrationSpec = CalibrationSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    publish: PublishSpec = PublishSpec()
    build: BuildSpec = BuildSpec()
    variants: tuple[VariantSpec, ...]
    path: str = ""  # the file it came from
    base_dir: str = "."  # relative paths in the recipe resolve against this


class _RecipeFileBase(_Frozen):
    """The raw file shape: tables validated here, variants expanded afterwards."""

    version: int = 1
    model: ModelSpec
    calibration: CalibrationSpec = CalibrationSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    publish: PublishSpec = PublishSpec()
    build: BuildSpec = BuildSpec()
    variants: list[dict[str, Any]] = Field(min_length=1)

    @field_validator("version")
    @classmethod
    def _v1(cls, v: int) -> int:
        return one_of(v, (1,))


# Plus one table of defaults per format ([gptq], [gguf], ...), named by its spec.
_DEFAULT_TABLES: dict[str, Any] = {s.defaults_table: (dict[str, Any], {}) for s in SPECS.values()}
_RecipeFile: type[_RecipeFileBase] = create_model("_RecipeFile", __base__=_RecipeFileBase, **_DEFAULT_TABLES)


# ---------------------------------------------------------------- loading


def load_recipe(path: str | Path, *, check_source: bool = True) -> Recipe:
    """Read and validate a recipe file; raise RecipeError listing every problem."""
    p = Path(path)
    return parse_recipe(_read_recipe(p), file=str(p), base_dir=p.parent, check_source=check_source)


def load_partial(path: str | Path, *, check_source: bool = True) -> tuple[Recipe | None, list[Problem]]:
    """parse_partial for a file: a file that cannot be read is its one problem."""
    p = Path(path)
    return parse_partial(_read_recipe(p), file=str(p), base_dir=p.parent, check_source=check_source)


def _read_recipe(p: Path) -> str:
    """The file's text; a folder, a huge file or non-UTF-8 bytes are one clear problem each."""
    def bad(message: str) -> RecipeError:
        return RecipeError(str(p), [Problem("<file>", message)])

    try:
        if p.is_dir():
            raise bad("is a folder, not a recipe file")
        size = p.stat().st_size
        if size > MAX_RECIPE_BYTES:  # read nothing: it is not a recipe, and parsing it would take long
            raise bad(f"is {size / 1e6:.1f} MB; a recipe is a small TOML file (at most "
                      f"{MAX_RECIPE_BYTES // 1_000_000} MB)")
        return p.read_bytes().decode("utf-8")
    except OSError as e:
        raise bad(e.strerror or str(e)) from None
    except UnicodeDecodeError as e:
        raise bad(f"is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None


def parse_recipe(text: str, *, file: str = "<recipe>", base_dir: str | Path = ".",
                 check_source: bool = True) -> Recipe:
    """A validated recipe; RecipeError naming every problem of every table at once."""
    recipe, problems = parse_partial(text, file=file, base_dir=base_dir, check_source=check_source)
    if problems or recipe is None:
        raise RecipeError(file, problems)
    return recipe


def parse_partial(text: str, *, file: str = "<recipe>", base_dir: str | Path = ".",
                  check_source: bool = True) -> tuple[Recipe | None, list[Problem]]:
    """Every problem the file has, each with its field path and line, and the recipe made of its
    valid parts (None when even that cannot be made: no model source, no variants), so that
    the next stage can add its own problems to the same list."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # nothing past a syntax error can be read
        m = re.search(r"\(at line (\d+)", str(e))
        return None, [Problem("<toml>", str(e).split(" (at line")[0], int(m.group(1)) if m else None)]
    locate = _Locator(text)
    rf, found = _validate_tables(raw)
    problems = [Problem(p, m) for p, m in found]
    recipe = None
    if rf is not None:
        variants = [v.model_copy(update={"line": locate.line_of(f"variants[{v.index}]")})
                    for v in _expand_all(rf, problems)]
        recipe = Recipe(model=rf.model, calibration=rf.calibration, evaluation=rf.evaluation,
                        publish=rf.publish, build=rf.build, variants=tuple(variants), path=file,
                        base_dir=str(Path(base_dir).resolve()))
        problems += _check_branches(recipe)
        if check_source:
            problems += _check_source(recipe)
    located = [locate.problem(p.path, p.message) for p in problems]
    return recipe, sorted(dict.fromkeys(located), key=lambda p: (p.line is None, p.line or 0))


def _validate_tables(raw: dict[str, Any]) -> tuple[_RecipeFileBase | None, list[tuple[str, str]]]:
    """The file's tables, each problem once; a bad value falls back to its default so that the
    rest of the recipe is still checked (None when a required part is missing or unusable)."""
    try:
        return _RecipeFile.model_validate(raw), []
    except ValidationError as e:
        found = _pydantic_problems(e)
        cleaned = _without(raw, [err["loc"] for err in e.errors()])
    try:
        return _RecipeFile.model_validate(cleaned), found
    except ValidationError:
        return None, found


def _without(raw: Any, locs: list[tuple[Any, ...]]) -> Any:
    """`raw` with the value at each location removed (its default then applies)."""
    import copy

    out = copy.deepcopy(raw)
    for loc in locs:
        node, keys = out, [k for k in loc if not str(k).startswith(("function-", "int", "float"))]
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and keys:
            node.pop(keys[-1], None)
    return out


# pydantic's bound errors, in the words the rest of our messages use
_BOUNDS = {"greater_than_equal": "at least", "greater_than": "more than", "less_than_equal": "at most",
           "less_than": "less than"}


def _pydantic_problems(e: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for err in e.errors():
        loc = [str(x) for x in err["loc"] if not str(x).startswith(("function-", "int", "float"))]
        path = prefix + _join_path(loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] in _BOUNDS and "ctx" in err:
            msg = f"must be {_BOUNDS[err['type']]} {next(iter(err['ctx'].values()))}"
        got = err.get("input")
        if err["type"] not in ("extra_forbidden", "missing") and isinstance(got, (int, float, str)) \
                and repr(got) not in msg:
            msg += f" (got {err['input']!r})"
        out.append((path, msg))
    return out


def _join_path(parts: list[str]) -> str:
    out = ""
    for part in parts:
        if part.isdigit():
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def _expand_all(rf: _RecipeFileBase, problems: list[Problem]) -> list[VariantSpec]:
    """Every entry's variants; each entry's problems are its own (one bad entry stops no other)."""
    out: list[VariantSpec] = []
    for i, entry in enumerate(rf.variants):
        fmt = entry.get("format")
        defaults = getattr(rf, SPECS[fmt].defaults_table) if fmt in SPECS else {}
        own: list[Problem] = []
        out += _expand_one(i, entry, defaults, own)
        problems += own
    return out


def _expand_one(i: int, entry: dict[str, Any], defaults: dict[str, Any],
                problems: list[Problem]) -> list[VariantSpec]:
    """Expand list-valued keys into the product of their values, then validate each."""
    where = f"variants[{i}]"
    fmt = entry.get("format")
    if fmt not in FORMATS:
        problems.append(Problem(f"{where}.format", f"must be one of {', '.join(FORMATS)}"))
        return []
    model = PARAMS[fmt]
    body = {k: v for k, v in entry.items() if k not in ("format", "branch")}
    for key in [*defaults, *body]:
        if key not in model.recipe_keys():
            src = f"{SPECS[fmt].defaults_table}.{key}" if key in defaults and key not in body else f"{where}.{key}"
            problems.append(Problem(src, f"unknown key for {fmt} (known: {', '.join(model.recipe_keys())})"))
    if problems:
        return []
    merged = {**defaults, **body}
    keys = list(merged)
    axes = [v if isinstance(v, list) else [v] for v in merged.values()]
    if any(len(a) == 0 for a in axes):
        problems.append(Problem(where, "a list of values is empty"))
        return []
    combos = [dict(zip(keys, c)) for c in itertools.product(*axes)]
    branch = entry.get("branch")
    if branch is not None and (len(combos) > 1 or not isinstance(branch, str)):
        problems.append(Problem(f"{where}.branch", "must be a string on a variant that expands to one"))
        return []
    return [v for c in combos if (v := _validate_combo(i, fmt, c, body, problems, branch))]


def _validate_combo(i: int, fmt: str, combo: dict[str, Any], body: dict[str, Any],
                    problems: list[Problem], branch: str | None) -> VariantSpec | None:
    try:
        params = PARAMS[fmt].model_validate(combo)
    except ValidationError as e:
        for path, msg in _pydantic_problems(e):
            key = path.split(".")[0].split("[")[0]
            src = f"variants[{i}].{path}" if (key in body or not key) else f"{SPECS[fmt].defaults_table}.{path}"
            if not key:
                src = f"variants[{i}]"
            problems.append(Problem(src, msg))
        return None
    return VariantSpec(format=fmt, params=params, branch=branch, index=i)


def _check_branches(recipe: Recipe) -> list[Problem]:
    out = []
    for v in recipe.variants:
        b = v.branch
        if b is not None and not valid_branch(b):
            out.append(Problem(f"variants[{v.index}].branch",
                               f"{b!r} is not a branch name git and the Hub accept"))
    return out


def valid_branch(b: str) -> bool:
    """Git's ref rules plus the Hub's: plain ASCII parts, no '..', no '.lock' ending."""
    return bool(_BRANCH.match(b)) and ".." not in b and not b.endswith((".lock", ".")) \
        and not b.startswith(("-", ".")) and not b.startswith("refs") and b != "HEAD"


def valid_repo_name(name: str) -> bool:
    return bool(_HUB_NAME.match(name)) and "--" not in name and ".." not in name \
        and not name.startswith(("-", ".")) and not name.endswith(("-", "."))


# ---------------------------------------------------------------- source model checks


def resolve_local_source(recipe: Recipe) -> Path | None:
    """The source as a local folder, if it is one (relative to the recipe, then the cwd)."""
    src = Path(recipe.model.source).expanduser()
    for cand in ([src] if src.is_absolute() else [Path(recipe.base_dir) / src, Path.cwd() / src]):
        if cand.is_dir():
            return cand.resolve()
    return None


def _check_source(recipe: Recipe) -> list[Problem]:
    local = resolve_local_source(recipe)
    if local is None and not _HUB_ID.match(recipe.model.source):
        return [Problem("model.source", f"{recipe.model.source!r} is neither an existing folder "
                        "nor a Hub id like 'owner/name'")]
    config = read_model_config(recipe, local)
    return _check_group_sizes(recipe, config) if config else []


def read_model_config(recipe: Recipe, local: Path | None = None) -> dict[str, Any] | None:
    """config.json from the local folder or the Hub cache; None if not readable offline."""
    path: Path | None = None
    local = local or resolve_local_source(recipe)
    if local is not None:
        path = local / "config.json"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(recipe.model.source, "config.json",
                                         revision=recipe.model.revision)
            path = Path(hit) if isinstance(hit, str) else None
        except Exception:  # a broken cache must not stop validation
            path = None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def layer_input_widths(config: dict[str, Any]) -> dict[str, int]:
    """Input width of each quantized Linear of a decoder layer (Llama-style configs)."""
    cfg = config.get("text_config", config)
    hidden = cfg.get("hidden_size")
    if not hidden:
        return {}
    heads = cfg.get("num_attention_heads") or 1
    head_dim = cfg.get("head_dim") or hidden // heads
    widths = {
        "self_attn.q_proj/k_proj/v_proj, mlp.gate_proj/up_proj (hidden_size)": hidden,
        "self_attn.o_proj (heads x head_dim)": heads * head_dim,
    }
    if cfg.get("intermediate_size"):
        widths["mlp.down_proj (intermediate_size)"] = cfg["intermediate_size"]
    return widths


def _check_group_sizes(recipe: Recipe, config: dict[str, Any]) -> list[Problem]:
    widths = layer_input_widths(config)
    if not widths:
        return []
    ok = [g for g in GROUP_SIZES if g == -1 or all(w % g == 0 for w in widths.values())]
    out, seen = [], set()
    for v in recipe.variants:
        gs = getattr(v.params, "group_size", -1)
        bad = [(layer, w) for layer, w in widths.items() if gs != -1 and w % gs]
        if bad and (v.index, gs) not in seen:
            seen.add((v.index, gs))
            layer, w = bad[0]
            out.append(Problem(f"variants[{v.index}].group_size",
                               f"{gs} does not divide the input width {w} of {layer}; "
                               f"the runtime kernels refuse such a checkpoint. Group sizes that "
                               f"work for this model: {', '.join(map(str, ok))}"))
    return out


# ---------------------------------------------------------------- TOML line lookup


class _Locator:
    """Finds the TOML line of a field path like 'variants[2].bits' or 'gptq.damp'."""

    _HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.-]+)\s*\]\]?")

    def __init__(self, text: str):
        self.lines = text.splitlines()

    def problem(self, path: str, message: str) -> Problem:
        return Problem(path, message, self.line_of(path))

    def line_of(self, path: str) -> int | None:
        m = re.match(r"^([A-Za-z0-9_]+)(?:\[(\d+)\])?(?:\.([A-Za-z0-9_]+))?", path)
        if not m:
            return None
        table, index, key = m.group(1), int(m.group(2) or 0), m.group(3)
        start = self._table_start(table, index)
        if start is None:
            return None
        if key is None:
            return start + 1
        for j in range(start + 1, len(self.lines)):
            if self._HEADER.match(self.lines[j]):
                break
            if re.match(rf"^\s*{re.escape(key)}\s*=", self.lines[j]):
                return j + 1
        return start + 1

    def _table_start(self, table: str, index: int) -> int | None:
        count = 0
        for j, line in enumerate(self.lines):
            h = self._HEADER.match(line)
            if h and h.group(1) == table:
                if count == index:
                    return j
                count += 1
        return None
