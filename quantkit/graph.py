"""The build as data: the shared steps and variant tasks a build still has to do, what each
needs, and when a step's temporaries may go. Both executors (quantkit.pipeline's local one,
quantkit.cluster's Ray one) run the same graph; neither decides what to skip, what to share
or what to release.

Made by a pure function of the plan, the manifest and what the pipeline learned of each
variant (its cache key, whether its files are intact, whether its engine runs here).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from .engines import ENGINES
from .manifest import Manifest, State, VariantRecord
from .plan import Plan
from .steps import REFERENCE, SharedStep, TaskResources
from .variant import Variant



class Action(str, Enum):
    BUILD = "build"  # write the files, then evaluate
    EVALUATE = "evaluate"  # the files are this cache key's and intact: score them only
    RESCORE = "rescore"  # `quantkit eval`: score again; a failure leaves the record as it was
    PUBLISH = "publish"  # built and evaluated: only its branch is left to push (goal PUBLISHED)
    FAIL = "fail"  # cannot start here (its engine is not installed): recorded as failed


@dataclass(frozen=True)
class Freshness:
    """What the pipeline learned of a variant before the graph is made."""

    key: str = ""  # its cache key
    version: str = ""  # its engine's version
    files_intact: bool = False  # the manifest's files for this key are on disk, sizes equal
    error: str | None = None  # why its engine cannot run here


@dataclass(frozen=True)
class Task:
    """One variant still to do."""

    variant: Variant[Any]
    action: Action
    needs: tuple[str, ...]  # shared step keys and other variants' names, in the order to provide them
    resources: TaskResources
    fresh: Freshness


@dataclass(frozen=True)
class BuildGraph:
    steps: Mapping[str, SharedStep]  # the steps some task needs, by key, dependencies first
    tasks: tuple[Task, ...]  # in an order where every task comes after the variants it needs
    skipped: tuple[str, ...] = ()  # up to date
    moved: tuple[Variant[Any], ...] = ()  # up to date, but the recipe gave them another branch or repo
    # step key -> the tasks after whose end its temporaries go (none: they stay)
    release_after: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def task(self, name: str) -> Task:
        return next(t for t in self.tasks if t.variant.name == name)

    def step_needs(self, task: Task) -> list[str]:
        """The steps a task needs, each after the steps it reads (the order to run them in)."""
        out: list[str] = []

        def add(key: str) -> None:
            if key in self.steps and key not in out:
                for dep in self.steps[key].deps:
                    add(dep)
                out.append(key)

        for key in task.needs:
            add(key)
        return out

    def variant_needs(self, task: Task) -> list[str]:
        return [k for k in task.needs if k not in self.steps]


def unfinished(variants: Iterable[Variant[Any]], manifest: Manifest | None, goal: State = State.EVALUATED
               ) -> list[Variant[Any]]:
    """The variants the manifest does not show at `goal` yet (before cache keys are known:
    what the resource preflight weighs)."""
    def done(rec: VariantRecord | None) -> bool:
        return rec is not None and (rec.state == goal if goal == State.PUBLISHED else rec.at_least(goal))

    return [v for v in variants if not done(manifest.variants.get(v.name) if manifest else None)]


def make_graph(plan: Plan, variants: Sequence[Variant[Any]], manifest: Manifest,
               fresh: Mapping[str, Freshness], reference: SharedStep, *, goal: State = State.EVALUATED,
               keep_intermediate: bool = False, rescore: bool = False, defer: bool = False) -> BuildGraph:
    """What `variants` still need. `goal`: EVALUATED (a build) or PUBLISHED (workers that push
    their own branch); `rescore`: score every built variant again and build nothing; `defer`:
    a variant whose engine does not run here is built where it does (a Ray worker decides again)."""
    todo, skipped, moved = [], [], []
    for v in variants:
        rec = manifest.variants.get(v.name)
        action = _wanted(fresh[v.name], rec, goal, rescore, defer)
        if action is not None:
            todo.append((v, action))
        elif not rescore:
            skipped.append(v.name)
            if rec is not None and (rec.branch, rec.repo) != (v.branch, v.repo):
                moved.append(v)
    steps = _steps([v for v, a in todo if a == Action.BUILD])
    tasks = _dependencies_first([_task(plan, v, a, fresh[v.name]) for v, a in todo])
    if any(REFERENCE in t.needs for t in tasks):
        steps[REFERENCE] = reference
    graph = BuildGraph(steps, tuple(tasks), tuple(skipped), tuple(moved))
    return replace(graph, release_after={} if keep_intermediate else _release_points(graph))


def _wanted(f: Freshness, rec: VariantRecord | None, goal: State, rescore: bool, defer: bool) -> Action | None:
    if rescore:  # every built variant whose engine runs here, nothing else
        return Action.RESCORE if rec is not None and rec.at_least(State.BUILT) and f.error is None else None
    if defer and f.error is not None:
        return Action.BUILD
    return decide(f, rec, goal)


def decide(f: Freshness, rec: VariantRecord | None, goal: State = State.EVALUATED) -> Action | None:
    """What a variant needs to reach `goal`, or None when it is there."""
    if f.error is not None:
        return Action.FAIL
    current = rec is not None and rec.cache_key == f.key
    if goal == State.PUBLISHED and current and rec is not None and rec.state == State.PUBLISHED:
        return None
    if rec is None or not (current and f.files_intact):
        return Action.BUILD
    if not rec.at_least(State.EVALUATED):
        return Action.EVALUATE
    return Action.PUBLISH if goal == State.PUBLISHED else None


def _steps(building: list[Variant[Any]]) -> dict[str, SharedStep]:
    """Every engine's shared steps for its variants that are to be built."""
    out: dict[str, SharedStep] = {}
    for fmt in dict.fromkeys(v.format for v in building):
        for s in ENGINES[fmt].shared_steps([v for v in building if v.format == fmt]):
            out[s.key] = s
    return out


def _task(plan: Plan, v: Variant[Any], action: Action, f: Freshness) -> Task:
    """Its needs: the engine's (to build), then the reference (to evaluate)."""
    if action in (Action.FAIL, Action.PUBLISH):
        return Task(v, action, (), TaskResources(), f)
    engine = ENGINES[v.format]
    needs: tuple[str, ...] = ()
    if action == Action.BUILD:
        needs = engine.needs(v, [s for s in plan.variants if s.format == v.format])
    return Task(v, action, (*needs, REFERENCE), engine.resources(v), f)


def _dependencies_first(tasks: list[Task]) -> list[Task]:
    """Plan order, except that a task comes after the tasks of the variants it needs."""
    names = {t.variant.name for t in tasks}
    out: list[Task] = []
    placed: set[str] = set()

    def place(t: Task, seen: frozenset[str]) -> None:
        if t.variant.name in placed:
            return
        for dep in t.needs:
            if dep in names and dep not in seen:
                place(next(x for x in tasks if x.variant.name == dep), seen | {t.variant.name})
        placed.add(t.variant.name)
        out.append(t)

    for t in tasks:
        place(t, frozenset())
    return out


def _release_points(g: BuildGraph) -> dict[str, frozenset[str]]:
    """For each step with temporaries: the tasks that need it, directly or through a step."""
    users: dict[str, set[str]] = {k: set() for k in g.steps}
    for t in g.tasks:
        for key in g.step_needs(t):
            users[key].add(t.variant.name)
    return {k: frozenset(u) for k, u in users.items() if u and g.steps[k].releases}
