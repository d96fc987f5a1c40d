"""The Hub's model-card metadata check (POST /api/validate-yaml), for the fields quantkit writes."""

from __future__ import annotations

import re
from typing import Any

from quantkit.testing.hub_repo import REPO_ID

PIPELINE_TAGS = {"text-generation", "text2text-generation", "feature-extraction", "fill-mask",
                 "question-answering", "text-classification", "token-classification",
                 "translation", "summarization", "sentence-similarity", "conversational"}
LICENSES = {"apache-2.0", "mit", "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3",
            "gemma", "openrail", "bigscience-openrail-m", "creativeml-openrail-m",
            "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0", "gpl-3.0",
            "agpl-3.0", "bsd-3-clause", "afl-3.0", "unknown", "other"}
RELATIONS = {"adapter", "merge", "quantized", "finetune"}
_YAML_BLOCK = re.compile(r"^(\s*---\r?\n)([\S\s]*?)(\r?\n---[ \t]*(\r?\n|$))")


def validate_card_metadata(content: str, repo_type: str = "model") -> tuple[list[str], list[str]]:
    """A subset of the Hub's model-card metadata rules: the fields quantkit writes."""
    import yaml

    m = _YAML_BLOCK.search(content)
    if not m:
        return [], ["Empty or missing yaml metadata in repo card"]
    try:
        meta = yaml.safe_load(m.group(2))
    except yaml.YAMLError as e:
        return [f"YAML metadata is not valid YAML: {e}"], []
    if meta is None:
        return [], ["Empty or missing yaml metadata in repo card"]
    if not isinstance(meta, dict):
        return ["YAML metadata must be a mapping"], []
    errors: list[str] = []

    def strings(key: str) -> list[Any]:
        v = meta.get(key)
        vals = v if isinstance(v, list) else [v]
        if v is not None and not all(isinstance(x, str) for x in vals):
            errors.append(f'"{key}" must be a string or a list of strings')
        return [x for x in vals if isinstance(x, str)] if v is not None else []

    for lic in strings("license"):
        if lic not in LICENSES:
            errors.append(f'"license" must be one of the Hub\'s license ids, not {lic!r}')
    if "other" in strings("license") and not meta.get("license_name"):
        errors.append('"license_name" is required when "license" is other')
    for lang in strings("language"):
        if not re.fullmatch(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*", lang):
            errors.append(f'"language" must be ISO 639 codes, not {lang!r}')
    for tag in strings("pipeline_tag"):
        if tag not in PIPELINE_TAGS:
            errors.append(f'"pipeline_tag" must be a known task, not {tag!r}')
    for bm in strings("base_model"):
        if not REPO_ID.match(bm):
            errors.append(f'"base_model" must be a Hub model id, not {bm!r}')
    rel = meta.get("base_model_relation")
    if rel is not None and (rel not in RELATIONS or "base_model" not in meta):
        errors.append(f'"base_model_relation" must be one of {sorted(RELATIONS)} and needs "base_model"')
    for key in ("tags", "datasets", "library_name", "quantized_by", "model_creator", "model_name",
                "prompt_template"):
        strings(key)
    return errors, []
