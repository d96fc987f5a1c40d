"""Recipe -> Plan: variant names, repos, branches, output folders and cache keys. No I/O."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import Problem, RecipeError
from .recipe import SPECS, Recipe, VariantSpec, load_partial, valid_branch, valid_repo_name
from .variant import Variant

CACHE_SCHEMA = 1  # bump when what a cache key covers changes

__all__ = ["Plan", "Variant", "cache_key", "load_plan", "make_plan", "repo_for"]


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    variants: tuple[Variant, ...]
    out_dir: Path

    def variant_dir(self, v: Variant) -> Path:
        return self.out_dir / v.name

    def select(self, only: list[str] | None) -> tuple[Variant, ...]:
        if not only:
            return self.variants
        unknown = [n for n in only if n not in {v.name for v in self.variants}]
        if unknown:
            raise RecipeError(self.recipe.path, [Problem("--only", f"no variant named {n!r}; "
                              f"known: {', '.join(v.name for v in self.variants)}") for n in unknown])
        return tuple(v for v in self.variants if v.name in only)


def repo_for(recipe: Recipe, fmt: str, owner: str | None = None) -> str:
    owner = owner or recipe.publish.owner or "{owner}"
    return recipe.publish.repo.format(owner=owner, name=recipe.model.model_name,
                                      FORMAT=SPECS[fmt].repo_suffix, format=fmt)


def make_plan(recipe: Recipe, out_dir: Path | None = None) -> Plan:
    """Name every variant, give each repo one `main`, and refuse collisions."""
    problems: list[Problem] = []
    variants: list[Variant[Any]] = []
    seen: dict[str, VariantSpec] = {}
    for spec in recipe.variants:
        name = SPECS[spec.format].variant_name(spec.params)
        if name in seen:
            problems.append(Problem(f"variants[{spec.index}]", f"gives {name!r} again (as "
                            f"variants[{seen[name].index}] does); variant names must be unique",
                            spec.line))
            continue
        seen[name] = spec
        repo = repo_for(recipe, spec.format)
        variants.append(Variant(name, spec.format, repo, spec.branch or "", spec.params, spec.index))
    variants = _assign_branches(variants, recipe, problems)
    problems += _check_repos(variants, recipe)
    if problems:
        raise RecipeError(recipe.path, problems)
    out = out_dir or Path("build") / recipe.model.model_name
    return Plan(recipe, tuple(_ordered(variants)), out)


def load_plan(path: str | Path, out_dir: Path | None = None) -> Plan:
    """A recipe file read and planned. Every problem of both stages comes at once, in one
    RecipeError sorted by line: the file's own, and the plan's (names, branches, repos) for
    the variants that are valid."""
    recipe, problems = load_partial(path)
    plan = None
    if recipe is not None:
        try:
            plan = make_plan(recipe, out_dir)
        except RecipeError as e:
            problems = sorted(dict.fromkeys([*problems, *e.problems]), key=lambda p: (p.line is None, p.line or 0))
    if problems or plan is None:
        raise RecipeError(str(path), problems)
    return plan


def _assign_branches(variants: list[Variant], recipe: Recipe, problems: list[Problem]) -> list[Variant]:
    """Explicit branches stay; the repo's first unnamed variant is `main` when none claims it."""
    by_repo: dict[str, list[Variant]] = defaultdict(list)
    for v in variants:
        by_repo[v.repo].append(v)
    out = []
    for repo, vs in by_repo.items():
        mains = [v for v in vs if v.branch == "main"]
        for extra in mains[1:]:
            problems.append(_problem(recipe, extra, "branch", f"a second 'main' for {repo} "
                                     f"(variants[{mains[0].index}] is main already)"))
        unnamed = [v for v in vs if not v.branch]
        default = mains[0] if mains else (unnamed[0] if unnamed else None)
        for v in vs:
            branch = "main" if v is default else (v.branch or SPECS[v.format].branch_name(v.params))
            out.append(Variant(v.name, v.format, v.repo, branch, v.params, v.index))
    return out


def _check_repos(variants: list[Variant], recipe: Recipe) -> list[Problem]:
    out: list[Problem] = []
    taken: dict[tuple[str, str], int] = {}
    for v in variants:
        key = (v.repo, v.branch)
        if key in taken and v.branch != "main":  # a second main is reported already
            out.append(_problem(recipe, v, "branch", f"{v.repo}@{v.branch} is used by another "
                                f"variant (variants[{taken[key]}])"))
        taken.setdefault(key, v.index)
        name = v.repo.split("/")[-1]
        if not valid_repo_name(name):
            out.append(Problem("publish.repo", f"{name!r} is not a repo name the Hub accepts"))
        if not valid_branch(v.branch):
            out.append(_problem(recipe, v, "branch", f"{v.branch!r} is not a valid branch name"))
    return out


def _problem(recipe: Recipe, v: Variant, key: str, msg: str) -> Problem:
    line = next((s.line for s in recipe.variants if s.index == v.index), None)
    return Problem(f"variants[{v.index}].{key}", msg, line)


def _ordered(variants: list[Variant]) -> list[Variant]:
    """Repos in recipe order; within one, `main` first, then names sorted."""
    repos = list(dict.fromkeys(v.repo for v in variants))
    return sorted(variants, key=lambda v: (repos.index(v.repo), v.branch != "main", v.name))


def cache_key(v: Variant, *, source_fingerprint: str, calib_sha256: str, engine: str,
              engine_version: str, extra: dict[str, Any] | None = None) -> str:
    """Everything that changes a variant's bytes: source, settings, calibration, engine."""
    blob = json.dumps({"schema": CACHE_SCHEMA, "source": source_fingerprint, "format": v.format,
                       "params": v.params_dict(), "calib": calib_sha256, "engine": engine,
                       "engine_version": engine_version, "extra": extra or {}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
