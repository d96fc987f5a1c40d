"""Build a plan's variants on a Ray cluster. Ray schedules, retries and cancels; this module
only says what each task needs and merges what comes back.

- Shared state: the driver makes the source record, the calibration set and the reference
  logits once per recipe (pipeline.prepare / ensure_reference) and puts them in the object
  store once; every task reads that one copy. The source model itself is read from its path
  (storage every node sees) or, for a Hub model, downloaded by the node that needs it.
- One task per variant, with its engine's `ray_resources()` (default: one GPU), clamped to
  the largest node. An engine with `prepare_shared` (GGUF: convert and imatrix) runs it once
  as its own task; its variants fan out after it, into the same work folder.
- Workers never write manifest.json. Each finished step's record goes to a mailbox actor
  (with the progress events); the driver, the one writer, merges it and saves the manifest
  atomically, in today's format. A retried task asks the mailbox for the latest record of its
  variant, so a variant that was built but not evaluated is not built again.
- A task whose worker process dies (node lost, OOM-killed) is run again by Ray
  (MAX_RETRIES); a variant's own failure comes back as a failed record, as without Ray.
  Ctrl-C on the driver force-cancels every task still pending.
- With `publish`, each worker pushes its own variant's branch (no shared disk needed);
  GGUF types then stay on the node that holds the 16-bit file (soft affinity).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import pipeline
from .calibration import CalibrationSet
from .engines import ENGINES
from .errors import ClusterError, QuantkitError
from .evaluate import EvalSet, Reference
from .manifest import Manifest, VariantRecord, save_manifest
from .pipeline import BuildResult, Event, Reporter
from .plan import Plan, Variant
from .records import SourceModel

MAX_RETRIES = 3  # runs of a variant whose worker process died, after the first
DEFAULT_RESOURCES: dict[str, float] = {"num_gpus": 1}  # GPTQ, AWQ, EXL2: one GPU each
POLL_S = 0.25  # how often the driver drains the mailbox while tasks run
EVENT_EVERY_S = 0.5  # a worker sends a running task's progress at most this often
LOCAL = "local"  # the ADDRESS that means: start a cluster on this machine
_RESOURCE_NAMES = {"num_cpus": "CPU", "num_gpus": "GPU"}


@dataclass(frozen=True)
class Shared:
    """What every task of one recipe reads: put in the object store once."""

    plan: Plan
    source: SourceModel
    calib: CalibrationSet
    eval_set: EvalSet
    reference: Reference
    publish: bool


@dataclass(frozen=True)
class _Record:
    """A finished step of one variant, on its way to the driver."""

    name: str
    record: VariantRecord


@dataclass(frozen=True)
class _Outcome:
    """What a variant task returns: "built" | "skipped" | "failed", and the last record."""

    name: str
    outcome: str
    record: VariantRecord | None
    publish_error: str | None = None


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


def capacity() -> dict[str, float]:
    """The most of each resource one live node offers."""
    most: dict[str, float] = {}
    for node in _ray().nodes():
        if node.get("Alive"):
            for k, v in node.get("Resources", {}).items():
                most[k] = max(most.get(k, 0.0), float(v))
    return most


def task_resources(fmt: str, most: dict[str, float]) -> tuple[dict[str, float], list[str]]:
    """The engine's wish clamped to the largest node, and notes on what was dropped. A GPU
    format on a cluster without GPUs runs on the CPU and takes a whole node's cores, as the
    plain build does: torch's results depend on its thread count, so the files stay the same."""
    wish = getattr(ENGINES[fmt], "ray_resources", None)
    want = dict(wish() if wish else DEFAULT_RESOURCES)
    got: dict[str, float] = {}
    notes: list[str] = []
    for key, n in want.items():
        have = most.get(_RESOURCE_NAMES.get(key, key), 0.0)
        if have > 0:
            got[key] = min(float(n), have)
        elif key == "num_gpus":
            notes.append(f"{fmt}: no node has a GPU; its variants run on the CPU, one node each")
            got["num_cpus"] = max(1.0, most.get("CPU", 1.0))
        else:
            notes.append(f"{fmt}: no node offers {_RESOURCE_NAMES.get(key, key)}; asking for none")
    got.setdefault("num_cpus", 1.0)
    return got, notes


# ---------------------------------------------------------------- on the workers


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
        if ev.kind == "task" and ev.total and ev.done < ev.total:
            now = time.monotonic()
            if now - self.sent.get((ev.variant, ev.task), 0.0) < EVENT_EVERY_S:
                return
            self.sent[(ev.variant, ev.task)] = now
        self.mailbox.put.remote(ev)

    def record(self, name: str, rec: VariantRecord) -> None:
        self.mailbox.put.remote(_Record(name, rec))

    def flush(self) -> None:
        """Wait until everything sent has arrived: the driver drains after the task ends."""
        _ray().get(self.mailbox.record.remote(""))


def _where() -> str:
    ray = _ray()
    # The pid lets an operator find (or kill) the worker that holds a variant.
    return (f"{socket.gethostname()} {ray.util.get_node_ip_address()} "
            f"({ray.get_runtime_context().get_node_id()[:8]}) pid {os.getpid()}")


def _use_assigned_cores() -> None:
    """llama.cpp threads: the cores Ray gave this task, not the whole node's."""
    cpus = _ray().get_runtime_context().get_assigned_resources().get("CPU", 1)
    os.environ["QUANTKIT_THREADS"] = str(max(1, int(cpus)))


def _inputs(shared: Shared, send: _Sender) -> pipeline._Inputs:
    source = shared.source
    if not source.path.is_dir():  # a Hub model this node has not downloaded yet
        source = replace(pipeline.resolve_source(shared.plan.recipe), fingerprint=source.fingerprint)
    return pipeline._Inputs(shared.plan, source, None, shared.calib, pipeline.detect_device(), send,
                            shared.eval_set, shared.reference, record_sink=send.record)


def _variant(plan: Plan, name: str) -> Variant:
    return next(v for v in plan.variants if v.name == name)


def run_variant(shared: Shared, name: str, manifest: Manifest, mailbox: Any) -> _Outcome:
    """The body of one variant's task: build and evaluate (pipeline.build_one), then publish."""
    _use_assigned_cores()
    send = _Sender(mailbox)
    send(Event("node", name, message=_where()))
    latest = _ray().get(mailbox.record.remote(name))  # a retry: what the last run finished
    if latest is not None:
        manifest = manifest.with_variant(name, latest)
    v = _variant(shared.plan, name)
    m, outcome = pipeline.build_one(v, _inputs(shared, send), manifest)
    error = None
    if shared.publish and outcome != "failed":
        m, error = _publish(shared.plan, m, name, send)
    send.flush()
    return _Outcome(name, outcome, m.variants.get(name), error)


def _publish(plan: Plan, m: Manifest, name: str, send: _Sender) -> tuple[Manifest, str | None]:
    """This worker pushes its own branch; the card lists the variants the driver knew of."""
    from .publish import publish

    send(Event("task", name, "publish", 0, 1))
    try:
        report = publish(plan, m, plan.out_dir, only=[name])
    except QuantkitError as e:
        return m, str(e)
    failed = [b.error for b in report.branches if b.status == "failed"]
    send(Event("task", name, "publish", 1, 1))
    rec = report.manifest.variants[name]
    send.record(name, rec)
    return report.manifest, (failed[0] or "failed") if failed else None


def run_shared(shared: Shared, fmt: str, names: list[str], mailbox: Any) -> str:
    """The body of a format's shared task (GGUF: convert, imatrix); returns its node id."""
    _use_assigned_cores()
    send = _Sender(mailbox)
    todo = [_variant(shared.plan, n) for n in names]
    engine = ENGINES[fmt]
    send(Event("stage", task=f"{engine.name}: shared work for {len(todo)} variants on {_where()}"))
    try:
        engine.prepare_shared(todo, _inputs(shared, send).context(todo[0]))
    except QuantkitError:
        pass  # each variant meets the same error again and records it under its own name
    send.flush()
    return _ray().get_runtime_context().get_node_id()


def run_release(shared: Shared, fmt: str, name: str) -> int:
    """The format's last variant is done: remove its shared temporaries on this node."""
    inputs = pipeline._Inputs(shared.plan, shared.source, None, shared.calib, "cpu", pipeline._quiet)
    release = getattr(ENGINES[fmt], "release", None)
    return len(release(inputs.context(_variant(shared.plan, name)))) if release else 0


# ---------------------------------------------------------------- on the driver


def build(plan: Plan, *, only: list[str] | None = None, report: Reporter = pipeline._quiet,
          publish: bool = False) -> BuildResult:
    """pipeline.build with the variants as Ray tasks; call inside `connect()`.
    Skips what the manifest proves done, as without Ray; failures are recorded, not raised."""
    got = build_many([plan], only=only, reports=[report], publish=publish)[0]
    if isinstance(got, QuantkitError):
        raise got
    return got


def build_many(plans: list[Plan], *, only: list[str] | None = None, reports: list[Reporter] | None = None,
               publish: bool = False) -> list[BuildResult | QuantkitError]:
    """Several recipes at once: while the driver prepares one recipe's shared inputs, the
    tasks of the recipes before it already run, so the cluster does not idle between recipes.
    One result per plan: its BuildResult, or the error that stopped that recipe."""
    reports = reports or [pipeline._quiet] * len(plans)
    results: list[BuildResult | QuantkitError | None] = [None] * len(plans)
    started: list[tuple[int, _Started]] = []
    try:
        for i, plan in enumerate(plans):
            try:
                started.append((i, _start(plan, only, reports[i], publish)))
            except QuantkitError as e:
                results[i] = e
            _advance([s.driver for _, s in started if s.driver], timeout=0)
        drivers = [s.driver for _, s in started if s.driver]
        while any(d.pending for d in drivers):
            _advance(drivers, timeout=POLL_S)
    except BaseException:  # Ctrl-C or a driver failure: no task keeps running for nobody
        for _, s in started:
            if s.driver:
                s.driver.cancel()
        raise
    finally:
        for _, s in started:
            if s.driver:
                s.driver.close()
    for i, s in started:
        try:
            results[i] = s.finish()
        except QuantkitError as e:
            results[i] = e
    return [r for r in results if r is not None]


@dataclass
class _Started:
    """One recipe in flight: its manifest so far and, when any variant is to build, its driver."""

    plan: Plan
    manifest: Manifest
    skipped: list[str]
    report: Reporter
    driver: _Driver | None

    def finish(self) -> BuildResult:
        m, built, failed = (self.driver.manifest, self.driver.built, self.driver.failed) if self.driver \
            else (self.manifest, [], {})
        m = pipeline._cards(self.plan, m, self.report)
        return BuildResult(m, tuple(built), tuple(self.skipped), failed)


def _start(plan: Plan, only: list[str] | None, report: Reporter, publish: bool) -> _Started:
    """Shared inputs on the driver (source, calibration, reference logits), then the tasks."""
    variants = plan.select(only)
    inputs = pipeline.prepare(plan, report)
    manifest = pipeline.start_manifest(plan, inputs)
    todo = [v for v in variants if not _done(v, inputs, manifest, publish)]
    skipped = [v.name for v in variants if v not in todo]
    for name in skipped:
        report(Event("skip", name, message="up to date"))
    if not todo:
        return _Started(plan, manifest, skipped, report, None)
    es, ref = inputs.ensure_reference()
    shared = Shared(plan, inputs.source, inputs.calib, es, replace(ref, logprobs=np.asarray(ref.logprobs)), publish)
    driver = _Driver(shared, manifest, report)
    driver.submit_all(todo)
    return _Started(plan, manifest, skipped, report, driver)


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


def _done(v: Variant, inputs: pipeline._Inputs, m: Manifest, publish: bool) -> bool:
    """Done as without Ray; when publishing from workers, done means published (the files
    may be on a worker's disk only)."""
    try:
        _, key, rec, fresh = pipeline._freshness(v, inputs, m)
    except QuantkitError:  # the engine is not installed on the driver: a worker decides
        return False
    if publish:
        return rec is not None and rec.cache_key == key and rec.state == "published"
    return fresh and rec is not None and rec.at_least("evaluated")


class _Driver:
    """Submits the tasks, drains the mailbox, merges records into the manifest."""

    def __init__(self, shared: Shared, manifest: Manifest, report: Reporter):
        ray = _ray()
        self.ray = ray
        self.shared = shared
        self.manifest = manifest
        self.report = report
        self.shared_ref = ray.put(shared)
        self.mailbox = ray.remote(num_cpus=0)(_Mailbox).remote()
        self.pending: dict[Any, tuple[str, str]] = {}  # ref -> (kind, variant name or format)
        self.finished: set[str] = set()
        self.built: list[str] = []
        self.failed: dict[str, str] = {}
        self.most = capacity()
        self.waiting: dict[str, list[Variant]] = {}  # format -> variants after its shared task
        self.left: dict[str, int] = {}  # format -> variants not finished
        self.node_of: dict[str, str] = {}  # format -> node that did its shared work
        self.remote = {fn: ray.remote(fn) for fn in (run_variant, run_shared, run_release)}

    def on_ready(self, ref: Any) -> None:
        self._finished(ref, *self.pending.pop(ref))
        if not self.pending:
            self.drain()  # the workers flushed before returning: this is the last of it
            self.shared_ref = None  # frees the object store's copy of the reference logits

    def cancel(self) -> None:
        for ref in self.pending:
            self.ray.cancel(ref, force=True)

    def close(self) -> None:
        self.ray.kill(self.mailbox)

    def submit_all(self, todo: list[Variant]) -> None:
        notes: set[str] = set()
        for v in todo:
            self.left[v.format] = self.left.get(v.format, 0) + 1
        for fmt in dict.fromkeys(v.format for v in todo):
            mine = [v for v in todo if v.format == fmt]
            notes.update(task_resources(fmt, self.most)[1])
            if hasattr(ENGINES[fmt], "prepare_shared"):
                self.waiting[fmt] = mine
                self._submit(run_shared, ("shared", fmt), fmt, self.shared_ref, fmt, [v.name for v in mine],
                             self.mailbox)
                for v in mine:
                    self.report(Event("queued", v.name, message=f"after {fmt} shared work"))
            else:
                for v in mine:
                    self._submit_variant(v)
        for note in sorted(notes):
            self.report(Event("warn", message=note))

    def _submit(self, fn: Callable[..., Any], key: tuple[str, str], fmt: str, *args: Any,
                strategy: Any = None) -> None:
        res, _ = task_resources(fmt, self.most)
        opts: dict[str, Any] = {**res, "max_retries": MAX_RETRIES}
        if strategy is not None:
            opts["scheduling_strategy"] = strategy
        ref = self.remote[fn].options(**opts).remote(*args)
        self.pending[ref] = key

    def _submit_variant(self, v: Variant, node: str | None = None) -> None:
        # Without a shared disk (publishing from workers) stay where the shared files are;
        # soft: if that node is gone, run elsewhere and redo the shared work there.
        strategy = _near(node) if node and self.shared.publish else None
        res, _ = task_resources(v.format, self.most)
        needs = " ".join(f"{k.removeprefix('num_')}={n:g}" for k, n in res.items())
        self.report(Event("queued", v.name, message=needs))
        self._submit(run_variant, ("variant", v.name), v.format, self.shared_ref, v.name, self.manifest,
                     self.mailbox, strategy=strategy)
        if node:
            self.node_of[v.format] = node

    def _finished(self, ref: Any, kind: str, key: str) -> None:
        if kind == "shared":
            node = self._get(ref)
            for v in self.waiting.pop(key, []):
                self._submit_variant(v, node if isinstance(node, str) else None)
        elif kind == "variant":
            self._variant_done(key, self._get(ref))

    def _get(self, ref: Any) -> Any:
        """The task's value, or the error that ended it after its retries, as a one-liner."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            first = next((ln for ln in str(e).strip().splitlines() if ln.strip()), "")
            return f"{type(e).__name__}: {first}"[:500]

    def _variant_done(self, name: str, got: _Outcome | str) -> None:
        v = _variant(self.shared.plan, name)
        self.finished.add(name)
        if isinstance(got, str):  # the task itself ended: worker lost after every retry, cancelled
            rec = pipeline._failed_record(v, self.manifest, got)
            self.report(Event("fail", name, message=got))
            got = _Outcome(name, "failed", rec)
        if got.record is not None:
            self._merge(name, got.record)
        if got.outcome == "failed":
            self.failed[name] = (got.record.error if got.record else None) or "failed"
        elif got.outcome == "built":
            self.built.append(name)
        if got.publish_error:
            self.failed[name] = f"publish: {got.publish_error}"
        self.left[v.format] -= 1
        if self.left[v.format] == 0 and hasattr(ENGINES[v.format], "release"):
            self._release(v)

    def _release(self, v: Variant) -> None:
        """On the node that did the shared work when we know it; its result is not needed."""
        node = self.node_of.get(v.format)
        opts: dict[str, Any] = {"num_cpus": 0, **({"scheduling_strategy": _near(node)} if node else {})}
        self.pending[self.remote[run_release].options(**opts).remote(self.shared_ref, v.format, v.name)] = \
            ("release", v.format)

    def drain(self) -> None:
        for item in self.ray.get(self.mailbox.take.remote()):
            if isinstance(item, _Record):
                if item.name not in self.finished:  # a late copy never undoes the final record
                    self._merge(item.name, item.record)
            else:
                self.report(item)

    def _merge(self, name: str, rec: VariantRecord) -> None:
        self.manifest = self.manifest.with_variant(name, rec)
        save_manifest(self.shared.plan.out_dir, self.manifest)


def _near(node: str) -> Any:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node, soft=True)
