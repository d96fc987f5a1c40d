"""The Ray executor of a build graph (quantkit.graph): the same graph the local executor runs,
its shared steps and variant tasks as Ray tasks. Ray schedules, retries and cancels; this
module says what each task needs and merges what comes back.

- A step the graph marks local (the reference logits: it needs the tokenizer) runs on the
  driver, and its product goes into the object store once; every task reads that one copy.
- Every other shared step (GGUF: convert, imatrix) runs once as its own task, before the
  tasks that need it. A task then runs the step again where it is: with the files on disk
  (a shared disk, or the same node) that only reads them back; on a node without them it
  makes them there. Publishing from workers (no shared disk needed), tasks stay near the
  node that did their steps (soft affinity).
- Workers never write manifest.json. Each finished step's record goes to a mailbox actor
  (with the progress events); the driver, the one writer, merges it and saves the manifest
  atomically, in today's format. A retried task asks the mailbox for the latest record of its
  variant and decides again (graph.decide) with what its own node holds.
- A task whose worker process dies (node lost, OOM-killed) is run again by Ray
  (MAX_RETRIES); a variant's own failure comes back as a failed record, as without Ray.
  Ctrl-C on the driver force-cancels every task still pending.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import pipeline
from .errors import ClusterError, EngineError, QuantkitError
from .events import Event, Failed, OnNode, Progress, Queued, Reporter, Stage, Warn, quiet
from .evaluate import Baseline
from .graph import Action, Task, decide
from .manifest import Manifest, State, VariantRecord, save_manifest
from .pipeline import Begun, BuildResult, LazyProducts, Outcome, Ran, TaskEnv
from .plan import Plan
from .sizing import Machine
from .steps import SharedStep, StepFailed, TaskResources

MAX_RETRIES = 3  # runs of a task whose worker process died, after the first
POLL_S = 0.25  # how often the driver drains the mailbox while tasks run
EVENT_EVERY_S = 0.5  # a worker sends a running task's progress at most this often
LOCAL = "local"  # the ADDRESS that means: start a cluster on this machine
_NICENESS = "RAY_worker_niceness"  # Ray's config key, read from the environment
_RESOURCE_NAMES = {"num_cpus": "CPU", "num_gpus": "GPU"}


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ClusterError(LOCAL, "ray is not installed: pip install 'quantkit-workbench[ray]'") from None
    return ray


# ---------------------------------------------------------------- the cluster


@contextmanager
def connect(address: str | None = LOCAL, *, num_cpus: int | None = None) -> Iterator[None]:
    """Join the cluster at ADDRESS, or start one on this machine (LOCAL or None) and stop it
    afterwards. A caller that already called ray.init keeps its cluster as it is."""
    ray = _ray()
    if ray.is_initialized():
        yield
        return
    local = address in (None, "", LOCAL)
    # Worker output would tear through the driver's progress view; errors come back as values.
    kw: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR"}
    try:
        if local:
            with _workers_at_our_priority():
                ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, **kw)
        else:
            ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClusterError(address or LOCAL, first) from None
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def _workers_at_our_priority() -> Iterator[None]:
    """Ray starts its workers at niceness 15. On a machine that also runs other work they then
    crawl (a CPU-bound task took 28x as long beside two busy processes), while the plain build
    would share the cores evenly: the cluster this process starts runs them at niceness 0. The
    raylet reads it from its environment when it starts; this process's is left as it was."""
    old = os.environ.get(_NICENESS)
    os.environ[_NICENESS] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_NICENESS, None)
        else:
            os.environ[_NICENESS] = old


def capacity() -> dict[str, float]:
    """The most of each resource one live node offers."""
    most: dict[str, float] = {}
    for node in _ray().nodes():
        if node.get("Alive"):
            for k, v in node.get("Resources", {}).items():
                most[k] = max(most.get(k, 0.0), float(v))
    return most


def clamp(what: str, wish: TaskResources, most: dict[str, float]) -> tuple[dict[str, float], list[str]]:
    """A task's wish clamped to the largest node, and notes on what was dropped. A GPU task on a
    cluster without GPUs runs on the CPU and takes a whole node's cores, as the plain build does:
    torch's results depend on its thread count, so the files stay the same."""
    got: dict[str, float] = {}
    notes: list[str] = []
    for key, n in wish.as_ray().items():
        have = most.get(_RESOURCE_NAMES.get(key, key), 0.0)
        if have > 0:
            got[key] = min(float(n), have)
        elif key == "num_gpus":
            notes.append(f"{what}: no node has a GPU; its variants run on the CPU, one node each")
            got["num_cpus"] = max(1.0, most.get("CPU", 1.0))
        else:
            notes.append(f"{what}: no node offers {_RESOURCE_NAMES.get(key, key)}; asking for none")
    got.setdefault("num_cpus", 1.0)
    return got, notes


def largest_node() -> Machine:
    """What the preflight weighs a task against: the cluster's largest node (Ray's `memory`
    resource: what it lets tasks use). Disk is the build folder's, on the driver."""
    from .sizing import this_machine

    most, cores = capacity(), max(1, int(capacity().get("CPU", 1)))
    gpus = int(most.get("GPU", 0))
    return Machine("the largest Ray node", cores, int(most.get("memory", 0)) or this_machine().ram,
                   gpu=f"{gpus} GPU(s)" if gpus else None, cpu_flops=45e9 * cores)


# ---------------------------------------------------------------- on the workers


@dataclass(frozen=True)
class Shared:
    """What every task of one recipe reads: put in the object store once."""

    env: TaskEnv
    steps: dict[str, SharedStep]  # the graph's steps that run on workers
    tasks: dict[str, Task]
    publish: bool


@dataclass(frozen=True)
class _Record:
    """A finished step of one variant, on its way to the driver."""

    name: str
    record: VariantRecord


@dataclass(frozen=True)
class _Outcome:
    """What a variant task returns: its outcome and its last record."""

    name: str
    outcome: Outcome
    record: VariantRecord | None
    node: str = ""
    publish_error: str | None = None


class _Mailbox:
    """An actor: events and records from the workers, drained by the driver; and the latest
    record per variant, for a retried task."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.latest: dict[str, VariantRecord] = {}

    def put(self, item: Any) -> None:
        self.items.append(item)
        if isinstance(item, _Record):
            self.latest[item.name] = item.record

    def take(self) -> list[Any]:
        items, self.items = self.items, []
        return items

    def record(self, name: str) -> VariantRecord | None:
        return self.latest.get(name)


class _Sender:
    """A worker's reporter: progress at most every EVENT_EVERY_S per task, the rest at once.
    Calls from one worker to the actor run in the order sent."""

    def __init__(self, mailbox: Any):
        self.mailbox = mailbox
        self.sent: dict[tuple[str, str], float] = {}

    def __call__(self, ev: Event) -> None:
        if isinstance(ev, Progress) and ev.total and ev.done < ev.total:
            now = time.monotonic()
            if now - self.sent.get((ev.variant, ev.task), 0.0) < EVENT_EVERY_S:
                return
            self.sent[(ev.variant, ev.task)] = now
        self.mailbox.put.remote(ev)

    def save(self, m: Manifest, name: str) -> None:
        self.mailbox.put.remote(_Record(name, m.variants[name]))

    def flush(self) -> None:
        """Wait until everything sent has arrived: the driver drains after the task ends."""
        _ray().get(self.mailbox.record.remote(""))


def _where() -> str:
    ray = _ray()
    # The pid lets an operator find (or kill) the worker that holds a variant.
    return (f"{socket.gethostname()} {ray.util.get_node_ip_address()} "
            f"({ray.get_runtime_context().get_node_id()[:8]}) pid {os.getpid()}")


def _node() -> str:
    return str(_ray().get_runtime_context().get_node_id())


def _use_assigned_cores() -> None:
    """llama.cpp threads: the cores Ray gave this task, not the whole node's."""
    cpus = _ray().get_runtime_context().get_assigned_resources().get("CPU", 1)
    os.environ["QUANTKIT_THREADS"] = str(max(1, int(cpus)))


def _here(env: TaskEnv) -> TaskEnv:
    """The env as this node sees it: a Hub model this node has not downloaded yet is fetched."""
    if env.source.path.is_dir():
        return replace(env, device=pipeline.detect_device())
    source = replace(pipeline.resolve_source(env.plan.recipe), fingerprint=env.source.fingerprint)
    return replace(env, source=source, device=pipeline.detect_device())


def run_step(shared: Shared, key: str, mailbox: Any) -> tuple[str, Any]:
    """A shared step's task: (this node, its product or StepFailed)."""
    _use_assigned_cores()
    send = _Sender(mailbox)
    send(Stage(f"{key}: {shared.steps[key].title} on {_where()}"))
    made = LazyProducts(shared.steps, _here(shared.env), send)[key]
    send.flush()
    return _node(), made


def _settle(task: Task, shared: Shared, env: TaskEnv, m: Manifest) -> Task | None:
    """Decide again with this node's view (its engines, its disk, the latest record): None
    when the variant turns out to be done."""
    if task.action not in (Action.BUILD, Action.EVALUATE, Action.PUBLISH):
        return task
    v = task.variant
    fresh = pipeline.freshness(env.plan, v, env, m)
    action = decide(fresh, m.variants.get(v.name), State.PUBLISHED if shared.publish else State.EVALUATED)
    return None if action is None else replace(task, action=action, fresh=fresh)


def run_variant(shared: Shared, name: str, manifest: Manifest, mailbox: Any, keys: list[str],
                *values: Any) -> _Outcome:
    """The body of one variant's task: build and evaluate (pipeline.run_task), then publish.
    `keys`/`values`: products made elsewhere (the reference, failed steps and variants)."""
    _use_assigned_cores()
    send = _Sender(mailbox)
    send(OnNode(name, _where()))
    latest = _ray().get(mailbox.record.remote(name))  # a retry: what the last run finished
    if latest is not None:
        manifest = manifest.with_variant(name, latest)
    env = _here(shared.env)
    task = _settle(shared.tasks[name], shared, env, manifest)
    outcome = Outcome("skipped")
    if task is not None:
        products = LazyProducts(shared.steps, env, send, provided=dict(zip(keys, values)))
        manifest, outcome = pipeline.run_task(task, env, manifest, products, send, send.save)
    error = None
    if shared.publish and outcome.kind != "failed":
        manifest, error = _publish(env.plan, manifest, name, send)
    send.flush()
    return _Outcome(name, outcome, manifest.variants.get(name), _node(), error)


def _publish(plan: Plan, m: Manifest, name: str, send: _Sender) -> tuple[Manifest, str | None]:
    """This worker pushes its own branch; the card lists the variants the driver knew of."""
    from .publish import publish

    send(Progress(name, "publish", 0, 1))
    try:
        report = publish(plan, m, plan.out_dir, only=[name])
    except QuantkitError as e:
        return m, str(e)
    failed = [b.error for b in report.branches if b.status == "failed"]
    send(Progress(name, "publish", 1, 1))
    send.save(report.manifest, name)
    return report.manifest, (failed[0] or "failed") if failed else None


def run_release(shared: Shared, key: str, made: Any) -> int:
    """No task needs a step any more: remove its temporaries on this node."""
    return len(shared.steps[key].release(shared.env.context(key, quiet), made))


# ---------------------------------------------------------------- on the driver


def build(plan: Plan, *, only: list[str] | None = None, report: Reporter = quiet,
          publish: bool = False, preflight: bool = True) -> BuildResult:
    """pipeline.build with the graph on Ray; call inside `connect()`. Skips what the manifest
    proves done, as without Ray; failures are recorded, not raised."""
    got = build_many([plan], only=only, reports=[report], publish=publish, preflight=preflight)[0]
    if isinstance(got, QuantkitError):
        raise got
    return got


def build_many(plans: list[Plan], *, only: list[str] | None = None, reports: list[Reporter] | None = None,
               publish: bool = False, preflight: bool = True) -> list[BuildResult | QuantkitError]:
    """Several recipes at once: while the driver prepares one recipe's shared inputs, the
    tasks of the recipes before it already run, so the cluster does not idle between recipes.
    One result per plan: its BuildResult, or the error that stopped that recipe."""
    reports = reports or [quiet] * len(plans)
    results: list[BuildResult | QuantkitError | None] = [None] * len(plans)
    started: list[tuple[int, Begun, _Driver]] = []
    try:
        for i, plan in enumerate(plans):
            try:
                b = pipeline.begin(plan, only=only, report=reports[i], preflight=preflight, machine=largest_node(),
                                   goal=State.PUBLISHED if publish else State.EVALUATED, defer=True)
                started.append((i, b, _Driver(b, publish)))
            except QuantkitError as e:
                results[i] = e
            _advance([d for _, _, d in started], timeout=0)
        while any(d.pending for _, _, d in started):
            _advance([d for _, _, d in started], timeout=POLL_S)
    except BaseException:  # Ctrl-C or a driver failure: no task keeps running for nobody
        for _, _, d in started:
            d.cancel()
        raise
    finally:
        for _, _, d in started:
            d.close()
    for i, b, d in started:
        try:
            results[i] = pipeline.finish(b, d.ran())
        except QuantkitError as e:
            results[i] = e
    return [r for r in results if r is not None]


def _advance(drivers: list[_Driver], timeout: float) -> None:
    """Wait up to `timeout` for any task of any recipe; hand what finished to its driver."""
    owner = {ref: d for d in drivers for ref in d.pending}
    if not owner:
        return
    ready, _ = _ray().wait(list(owner), num_returns=len(owner), timeout=timeout)
    for d in drivers:
        if d.pending:
            d.drain()
    for ref in ready:
        owner[ref].on_ready(ref)


def _shareable(made: Any) -> Any:
    """The reference's memory-mapped log-probabilities as an array: the object store ships
    arrays without copies, a memmap only as a pickled copy per task."""
    if isinstance(made, Baseline):
        return replace(made, reference=replace(made.reference, logprobs=np.asarray(made.reference.logprobs)))
    return made


@dataclass
class _Driver:
    """One recipe's graph on the cluster: submits what is ready, merges records, releases."""

    b: Begun
    publish: bool
    pending: dict[Any, tuple[str, str]] = field(default_factory=dict)  # ref -> (kind, key)
    done: dict[str, Any] = field(default_factory=dict)  # products known on the driver
    node: dict[str, str] = field(default_factory=dict)  # step or variant -> the node that made it
    failed: dict[str, str] = field(default_factory=dict)
    built: list[str] = field(default_factory=list)
    finished: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        ray = self.ray = _ray()
        g = self.b.graph
        self.manifest = self.b.manifest
        self.most = capacity()
        self.left = {k: set(users) for k, users in g.release_after.items()}
        self.remote = {fn: ray.remote(fn) for fn in (run_variant, run_step, run_release)}
        self.mailbox = ray.remote(num_cpus=0)(_Mailbox).remote()
        self.shared = Shared(self.b.env, {k: s for k, s in g.steps.items() if not s.local},
                             {t.variant.name: t for t in g.tasks}, self.publish)
        self.shared_ref = ray.put(self.shared)
        self.waiting = list(g.tasks)
        for key, step in g.steps.items():
            if step.local:  # the driver makes it now; the object store shares it
                made = LazyProducts(g.steps, self.b.env, self.b.report)[key]
                self.done[key] = ray.put(_shareable(made)) if not isinstance(made, StepFailed) else made
        self._warn_clamps()
        self._submit_ready()
        for t in self.waiting:
            self.b.report(Queued(t.variant.name, "after " + ", ".join(self.b.graph.step_needs(t))))

    def _warn_clamps(self) -> None:
        notes = {n for t in self.b.graph.tasks for n in clamp(t.variant.format, t.resources, self.most)[1]}
        for note in sorted(notes):
            self.b.report(Warn(note))

    def _submit_ready(self) -> None:
        for key, step in self.b.graph.steps.items():
            if key not in self.done and ("step", key) not in self.pending.values() and \
                    all(d in self.done for d in step.deps) and self._step_wanted(key):
                self._submit(run_step, ("step", key), key, step.resources, self.shared_ref, key, self.mailbox)
        for t in [t for t in self.waiting if all(self._ready(k) for k in t.needs)]:
            self.waiting.remove(t)
            self._submit_task(t)

    def _step_wanted(self, key: str) -> bool:
        return any(key in self.b.graph.step_needs(t) for t in self.waiting)

    def _ready(self, key: str) -> bool:
        return key in self.done or key not in self.b.graph.steps and key not in self.shared.tasks

    def _submit_task(self, t: Task) -> None:
        name = t.variant.name
        given = {k: self.done[k] for k in t.needs if k in self.done and (
            k not in self.b.graph.steps or self.b.graph.steps[k].local or isinstance(self.done[k], StepFailed))}
        given.update({k: StepFailed(k, EngineError(k, f"needs {k}, which failed: {self.failed[k]}"))
                      for k in t.needs if k in self.failed})
        res, _ = clamp(t.variant.format, t.resources, self.most)
        self.b.report(Queued(name, " ".join(f"{k.removeprefix('num_')}={n:g}" for k, n in res.items())))
        near = next((self.node[k] for k in t.needs if k in self.node), None) if self.publish else None
        self._submit(run_variant, ("task", name), t.variant.format, t.resources, self.shared_ref, name,
                     self.manifest, self.mailbox, list(given), *given.values(), near=near)

    def _submit(self, fn: Any, key: tuple[str, str], what: str, wish: TaskResources, *args: Any,
                near: str | None = None) -> None:
        res, _ = clamp(what, wish, self.most)
        opts: dict[str, Any] = {**res, "max_retries": MAX_RETRIES}
        if near:  # without a shared disk stay where the step's files are; soft: elsewhere if gone
            opts["scheduling_strategy"] = _near(near)
        self.pending[self.remote[fn].options(**opts).remote(*args)] = key

    def on_ready(self, ref: Any) -> None:
        kind, key = self.pending.pop(ref)
        got = self._get(ref)
        if kind == "step":
            node, made = got if isinstance(got, tuple) else ("", StepFailed(key, EngineError(key, got)))
            self.done[key], self.node[key] = made, node
        elif kind == "task":
            self._task_done(key, got)
        self._submit_ready()
        if not self.pending:
            self.drain()  # the workers flushed before returning: this is the last of it
            self.shared_ref = None  # frees the object store's copy of the reference

    def _task_done(self, name: str, got: _Outcome | str) -> None:
        self.finished.add(name)
        if isinstance(got, str):  # the task itself ended: worker lost after every retry, cancelled
            v = self.shared.tasks[name].variant
            got = _Outcome(name, Outcome("failed", got), pipeline.failed_record(v, self.manifest, got))
            self.b.report(Failed(name, got.outcome.reason or ""))
        if got.record is not None:
            self._merge(name, got.record)
        if got.outcome.kind == "failed":
            self.failed[name] = got.outcome.reason or "failed"
        elif got.outcome.kind == "built":
            self.built.append(name)
        if got.publish_error:
            self.failed[name] = f"publish: {got.publish_error}"
        self.done[name], self.node[name] = self.b.plan.out_dir / name, got.node
        self._release_after(name)

    def _release_after(self, name: str) -> None:
        """On the node that made the step, when we know it; its result is not needed."""
        for key in [k for k, users in self.left.items() if name in users]:
            self.left[key].discard(name)
            if not self.left[key] and not isinstance(self.done.get(key), StepFailed):
                near = self.node.get(key)
                opts: dict[str, Any] = {"num_cpus": 0, **({"scheduling_strategy": _near(near)} if near else {})}
                ref = self.remote[run_release].options(**opts).remote(self.shared_ref, key, self.done.get(key))
                self.pending[ref] = ("release", key)

    def _get(self, ref: Any) -> Any:
        """The task's value, or the error that ended it after its retries, as a one-liner."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            first = next((ln for ln in str(e).strip().splitlines() if ln.strip()), "")
            return f"{type(e).__name__}: {first}"[:500]

    def drain(self) -> None:
        for item in self.ray.get(self.mailbox.take.remote()):
            if isinstance(item, _Record):
                if item.name not in self.finished:  # a late copy never undoes the final record
                    self._merge(item.name, item.record)
            else:
                self.b.report(item)

    def _merge(self, name: str, rec: VariantRecord) -> None:
        self.manifest = self.manifest.with_variant(name, rec)
        save_manifest(self.b.plan.out_dir, self.manifest)

    def cancel(self) -> None:
        for ref in self.pending:
            self.ray.cancel(ref, force=True)

    def close(self) -> None:
        self.ray.kill(self.mailbox)

    def ran(self) -> Ran:
        return Ran(self.manifest, tuple(self.built), self.failed)


def _near(node: str) -> Any:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node, soft=True)
