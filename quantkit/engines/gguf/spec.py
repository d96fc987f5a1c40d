"""The GGUF format as the other stages see it: names, branches, the card's table in TheBloke's
layout, runtimes, and the names the template partial uses."""

from __future__ import annotations

from typing import Any

from ... import formats as f
from .estimate import llama_cpp_overhead
from .files import first_shard, hub_quant_label, include_pattern, shards
from .params import GGUFParams, autoround, ftype, label, tuned, use_case, uses_imatrix


def gguf_file(row: f.CardRow) -> str:
    return first_shard(e.path for e in row.record.files)


def _file_link(r: f.CardRow) -> str:
    """The file on main, where every GGUF file of the repo lies."""
    name = gguf_file(r)
    return f"[{name}]({r.link.rsplit('/tree/', 1)[0]}/blob/main/{name})"


def _quant_method(r: f.CardRow) -> str:
    p = dict(r.params)
    if autoround(p):
        return f"{p.get('quant')}, AutoRound"
    if tuned(p):
        return f"tuned mix at {ftype(p)} size, imatrix" if p.get("quant") else \
            f"tuned mix at {p['target_bpw']:.2f} bits per weight, imatrix"
    return str(p.get("quant")) + (", imatrix" if uses_imatrix(p) else "")


def card_names(row: f.CardRow, rows: list[f.CardRow]) -> dict[str, Any]:
    """The file, and the type tag `-hf REPO:TAG` resolves by; no tag when another file on main
    has the same one (a plain and an imatrix file of one type): then the card names the file."""
    name = gguf_file(row)
    tag = hub_quant_label(name) or ""
    shared = sum(hub_quant_label(gguf_file(r)) == tag for r in rows) > 1
    files = [e.path for e in row.record.files]
    # gguf_files: the model's files in load order (one, or every shard); gguf_include: a glob for
    # `hf download REPO --include` that fetches exactly those.
    return {"gguf_file": name, "quant_tag": "" if shared else tag, "file_tag": tag,
            "gguf_files": shards(files), "gguf_include": include_pattern(files), "tuned_mixes": _tuned_rows(rows),
            "autoround_files": _autoround_rows(rows)}


def _autoround_rows(rows: list[f.CardRow]) -> list[dict[str, Any]]:
    """How each AutoRound file was made: its settings as run, its quantizer, its time."""
    return [{"branch": r.variant.branch, "file": gguf_file(r), "made_with": r.record.notes.get("made_with", ""),
             "quantizer": r.record.notes.get("quantizer", ""), "seconds": r.record.seconds}
            for r in rows if autoround(dict(r.params))]


def _tuned_rows(rows: list[f.CardRow]) -> list[dict[str, Any]]:
    """What the card says of each tuned mix: its rules file, what moved, how to rebuild it."""
    return [{"branch": r.variant.branch, "file": gguf_file(r), "rules": r.record.notes["tensor_type_file"],
             "budget": label(dict(r.params)), "changes": r.record.notes.get("mix_changes", ""),
             "rebuild": r.record.notes.get("rebuild", "")}
            for r in rows if tuned(dict(r.params)) and "tensor_type_file" in r.record.notes]


def _variant_name(p: GGUFParams) -> str:
    return f"gguf-{label(p)}"


def _branch_name(p: GGUFParams) -> str:
    return label(p)


def _describe(p: Any) -> str:
    if autoround(dict(p)):
        return f"llama.cpp {p['quant']} with AutoRound's tuned rounding (its own packer)"
    if tuned(dict(p)):
        return f"llama.cpp types per tensor, chosen on the importance matrix within the {label(dict(p))} budget"
    return f"llama.cpp {p['quant']}" + (", with importance matrix" if uses_imatrix(dict(p)) else "")


def _use_case(r: f.CardRow) -> str:
    p = dict(r.params)
    stock = use_case(ftype(p))
    if autoround(p):
        return f"{stock}; rounding tuned on the calibration language"
    return f"{stock}; per-tensor types tuned on the calibration language" if tuned(p) else stock


SPEC = f.FormatSpec(
    name="gguf", repo_suffix="GGUF", params=GGUFParams, variant_name=_variant_name, branch_name=_branch_name,
    name_keys=frozenset({"quant", "mix", "target_bpw", "method"}),
    # TheBloke's GGUF table (Name, Quant method, Bits, Size, Max RAM required, Use case) plus
    # measured quality and the variant's own branch.
    columns=(f.Column("Name", _file_link), f.Column("Quant method", _quant_method),
             f.Column("Bits", lambda r: f"{r.record.bits_per_weight:.2f}"), f.SIZE, f.memory_column("RAM"),
             f.Column("Use case", _use_case), *f.QUALITY, f.TOP1, f.BRANCH),
    describe=_describe,
    use="CPU and CPU+GPU inference with llama.cpp and the apps built on it",
    tags=("gguf", "quantized", "quantkit"), library_name=None,  # the Hub recognises .gguf files itself
    runtimes=(
        f.TEXTGEN_WEBUI,
        # GGUF is llama.cpp's format; everything that embeds llama.cpp reads it.
        f.Runtime("llama.cpp", f.always, "`llama-cli -hf REPO:TYPE`"),
        f.Runtime("llama-cpp-python", f.always, "`Llama.from_pretrained(REPO, FILE)`"),
        f.Runtime("Ollama", f.always, "`ollama run hf.co/REPO:TYPE`"),
        f.Runtime("LM Studio, KoboldCpp", f.always, "open or import the .gguf file"),
    ),
    example={"quant": "Q4_K_M"},
    run_device="RAM", run_overhead=llama_cpp_overhead, ladder_on_main=True,
    card_context=card_names,
)
