"""Makespan of many recipes on a Ray cluster, from per-variant times measured on this machine.

A list-scheduling simulation of what Ray does with `quantkit batch --ray`: tasks wait in
submission order and each starts on the first node with its resources free (GPU formats
num_gpus=1 + 1 CPU, a GGUF type num_cpus=4, the GGUF shared step num_cpus=4 before its
types). The driver makes each recipe's calibration set and reference logits itself, then
submits its tasks. Two batch policies: "overlapped" (what `batch --ray` does, cluster.build_many:
the driver prepares the next recipe while earlier recipes' tasks run) and "one after another"
(the next recipe starts when the last one is done, as a loop of `build --ray` would). Prints a
table.

    python benchmarks/schedule.py [--recipes 50] [--nodes 8] [--params 13e9]

Per-variant times, measured on this machine (2 CPU cores, SmolLM2-135M, DESIGN.md §4):
GPTQ 6-9 min (7.5 used), AWQ 57 min, GGUF imatrix 90 s + convert ~10 s (shared, once per
recipe), llama-quantize a few seconds per type (5 s used). Scaling factors (stated, not
measured): time grows linearly with parameters; a GPU format runs GPU_SPEEDUP times faster
on one datacenter GPU than on 2 CPU cores; llama.cpp work scales with cores (a 4-core GGUF
task: 2x the 2-core rate). Evaluation adds EVAL_FRACTION of each variant's build time.
Publishing (with --publish): bytes / NODE_UPLINK per variant on the node that built it.
"""

from __future__ import annotations

import argparse
import heapq
from dataclasses import dataclass, field

BASE_PARAMS = 135e6  # SmolLM2-135M: the model the times below were measured on
MEASURED_S = {"gptq": 7.5 * 60, "awq": 57 * 60, "exl2": 7.5 * 60,  # exl2: no CPU path; taken = GPTQ
              "gguf_shared": 100.0, "gguf": 5.0}
BITS = {"gptq": 4.6, "awq": 4.6, "exl2": 5.0, "gguf": 5.0}  # mean bits per weight of the files uploaded
GPU_SPEEDUP = 40.0  # one H100-class GPU vs 2 CPU cores, for GPTQ/AWQ/EXL2 (assumption)
CORE_RATE = 2.0  # cores the measurements used
GGUF_CPUS = 4  # engines/gguf.py RAY_CPUS
EVAL_FRACTION = 0.25  # scoring against the reference, per variant (assumption)
DRIVER_S_PER_B = 60.0  # driver: calibration + reference logits, seconds per 1e9 params on its GPU (assumption)
NODE_UPLINK = 100e6  # bytes/s one node pushes to the Hub (1 Gbit/s class link)
MIX = {"gptq": 3, "awq": 1, "exl2": 2, "gguf": 6}  # 12 variants per recipe (TheBloke-style ladder)


@dataclass(frozen=True)
class Node:
    cpus: int = 16
    gpus: int = 1


@dataclass
class Task:
    recipe: int
    kind: str  # gptq | awq | exl2 | gguf | gguf_shared
    seconds: float
    cpus: int
    gpus: int
    after: list[int] = field(default_factory=list)  # task ids that must finish first
    ready_at: float = 0.0


def task_seconds(kind: str, params: float, publish: bool) -> float:
    size = params / BASE_PARAMS
    base = MEASURED_S[kind] * size
    if kind in ("gptq", "awq", "exl2"):
        base /= GPU_SPEEDUP
    else:  # llama.cpp on GGUF_CPUS cores instead of 2
        base *= CORE_RATE / GGUF_CPUS
    if kind != "gguf_shared":
        base *= 1 + EVAL_FRACTION
        if publish:
            base += params * BITS[kind] / 8 / NODE_UPLINK
    return base


def recipe_tasks(r: int, params: float, publish: bool, first_id: int) -> list[Task]:
    tasks: list[Task] = []
    shared_id = None
    for kind, n in MIX.items():
        if kind == "gguf":
            shared_id = first_id + len(tasks)
            tasks.append(Task(r, "gguf_shared", task_seconds("gguf_shared", params, publish), GGUF_CPUS, 0))
        for _ in range(n):
            gpu = kind != "gguf"
            tasks.append(Task(r, kind, task_seconds(kind, params, publish), 1 if gpu else GGUF_CPUS, int(gpu),
                              [shared_id] if kind == "gguf" and shared_id is not None else []))
    return tasks


def simulate(recipes: int, nodes: int, params: float, *, overlapped: bool, publish: bool,
             node: Node = Node()) -> float:
    """Event-driven list scheduling; returns the makespan in seconds."""
    free = [[node.cpus, node.gpus] for _ in range(nodes)]
    driver_s = DRIVER_S_PER_B * params / 1e9
    tasks: list[Task] = []
    per_recipe: list[range] = []
    for r in range(recipes):
        batch = recipe_tasks(r, params, publish, len(tasks))
        per_recipe.append(range(len(tasks), len(tasks) + len(batch)))
        tasks += batch
    done: set[int] = set()
    running: list[tuple[float, int, int]] = []  # (end, task id, node)
    now, driver_free, submitted = 0.0, 0.0, 0
    queue: list[int] = []
    left_in = [len(rr) for rr in per_recipe]

    def submit_next() -> None:
        nonlocal submitted, driver_free
        start = max(driver_free, now)
        driver_free = start + driver_s  # the driver prepares the recipe's shared inputs
        for t in per_recipe[submitted]:
            tasks[t].ready_at = driver_free
            queue.append(t)
        submitted += 1

    submit_next()
    while overlapped and submitted < recipes:
        submit_next()
    while queue or running:
        for t in list(queue):  # FIFO; a task that does not fit does not block smaller ones
            task = tasks[t]
            if task.ready_at > now or any(a not in done for a in task.after):
                continue
            n = next((i for i, f in enumerate(free) if f[0] >= task.cpus and f[1] >= task.gpus), None)
            if n is not None:
                free[n][0] -= task.cpus
                free[n][1] -= task.gpus
                heapq.heappush(running, (now + task.seconds, t, n))
                queue.remove(t)
        waits = [tasks[t].ready_at for t in queue if tasks[t].ready_at > now]
        next_end = running[0][0] if running else float("inf")
        now = min([next_end, *waits])
        while running and running[0][0] <= now:
            _, t, n = heapq.heappop(running)
            free[n][0] += tasks[t].cpus
            free[n][1] += tasks[t].gpus
            done.add(t)
            left_in[tasks[t].recipe] -= 1
            if not overlapped and left_in[tasks[t].recipe] == 0 and submitted < recipes:
                submit_next()
    return now


def plain_one_node(recipes: int, params: float, publish: bool) -> float:
    """`quantkit batch` without Ray on one node: every variant after the other."""
    per = DRIVER_S_PER_B * params / 1e9 + sum(task_seconds(k, params, publish) * n for k, n in MIX.items())
    return recipes * (per + task_seconds("gguf_shared", params, publish))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", type=int, default=50)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--params", type=float, default=13e9, help="parameters of each recipe's model")
    a = ap.parse_args()
    print(f"{a.recipes} recipes x {sum(MIX.values())} variants {MIX}, {a.params / 1e9:g}B params each; "
          f"node: 1 GPU + 16 cores")
    print(f"per-variant seconds here: { {k: round(task_seconds(k, a.params, False)) for k in MEASURED_S} }")
    print(f"factors: time ~ params (x{a.params / BASE_PARAMS:.0f} from 135M), GPU {GPU_SPEEDUP:g}x 2 cores, "
          f"GGUF {GGUF_CPUS} cores, eval +{EVAL_FRACTION:.0%}, driver {DRIVER_S_PER_B:g} s/B params, "
          f"upload {NODE_UPLINK / 1e6:g} MB/s per node")
    rows = []
    for publish in (False, True):
        base = plain_one_node(a.recipes, a.params, publish)
        rows.append(("1 node, no Ray (sequential)", publish, base, base))
        for nodes in (1, a.nodes):
            for overlapped in (False, True):
                label = f"{nodes} node{'s' if nodes > 1 else ''}, Ray, recipes " + \
                    ("overlapped (batch --ray)" if overlapped else "one after another")
                rows.append((label, publish, simulate(a.recipes, nodes, a.params, overlapped=overlapped,
                                                      publish=publish), base))
    print(f"\n{'schedule':48} {'publish':>7} {'makespan':>10} {'speed-up':>9}")
    for label, publish, s, base in rows:
        print(f"{label:48} {'yes' if publish else 'no':>7} {s / 3600:9.1f}h {base / s:8.1f}x")
    up = a.recipes * sum(a.params * BITS[k] / 8 * n for k, n in MIX.items())
    print(f"\nHub upload volume {up / 1e12:.1f} TB: {up / NODE_UPLINK / 3600:.0f} h through one "
          f"{NODE_UPLINK / 1e6:g} MB/s uplink, {up / NODE_UPLINK / a.nodes / 3600:.1f} h spread over "
          f"{a.nodes} nodes' own links (when the Hub accepts that rate).")


if __name__ == "__main__":
    main()
