"""Builds on a real local Ray cluster (2 CPUs, this machine only): the same files as the
plain build, a worker SIGKILLed mid-variant is retried, Ctrl-C cancels, a failing variant is
recorded. Every cluster is time-bounded and shut down; no Ray process outlives a test."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from _hub_fixtures import hub  # noqa: E402, F401 - the local Hub server fixture
from quantkit import cluster, events  # noqa: E402
from quantkit.cli import _ray_argv  # noqa: E402
from quantkit.manifest import load_manifest  # noqa: E402
from quantkit.plan import make_plan  # noqa: E402
from quantkit.recipe import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUANTKIT = [sys.executable, "-m", "quantkit.cli"]
LIMIT_S = 600  # no test here may hold a cluster longer than this

FOUR = ('[[variants]]\nformat = "gptq"\nbits = [4, 8]\ngroup_size = 32\n'
        '[[variants]]\nformat = "gguf"\nquant = ["Q4_K_M", "Q8_0"]\nimatrix = true\n')
TWO_GPTQ = '[[variants]]\nformat = "gptq"\nbits = [4, 8]\ngroup_size = 32\n'


def _recipe(tmp_path: Path, model: Path, variants: str) -> Path:
    r = tmp_path / "recipe.toml"
    r.write_text(f'[model]\nsource = "{model}"\nname = "tiny"\n[calibration]\nsamples = 8\nseq_len = 128\n'
                 f'[evaluation]\ntokens = 1024\nctx = 128\nqa_items = 8\n[publish]\nowner = "me"\n{variants}')
    return r


def _env() -> dict[str, str]:
    # PYTHONPATH: the CLI subprocess and Ray's workers import this checkout's quantkit.
    return {**os.environ, "GPTQMODEL_CPU_WORKERS": str(os.cpu_count() or 1), "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _ray_pids() -> set[int]:
    """Processes of Ray clusters on this machine (GCS, raylet, workers)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    marks = ("gcs_server", "raylet", "ray::", "default_worker.py", "ray/_private/", "dashboard/agent.py")
    return {int(line.split(None, 1)[0]) for line in out.splitlines() if any(m in line for m in marks)}


def _wait_gone(pids: set[int], timeout: float = 30) -> set[int]:
    t0 = time.time()
    while (left := pids & _ray_pids()) and time.time() - t0 < timeout:
        time.sleep(0.2)
    return left


@pytest.fixture
def local_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A 2-CPU cluster on this machine for one test; SIGALRM bounds it; stopped after."""
    before = _ray_pids()

    def too_long(*_: object) -> None:
        raise TimeoutError(f"Ray test ran past {LIMIT_S} s")

    old = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(LIMIT_S)
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])  # the workers inherit the driver's env
    try:
        with cluster.connect(cluster.LOCAL, num_cpus=2):  # as `build --ray` starts its cluster
            yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert not _wait_gone(_ray_pids() - before), "Ray processes left behind"


def _weights(out: Path) -> dict[str, str]:
    """sha256 of every file but those that hold measured seconds (the cards, report.html,
    build.log) and the manifest."""
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and ".work" not in p.parts
            and p.name not in ("README.md", "manifest.json", "report.html", "build.log")}


def _timeless(out: Path) -> dict:
    """manifest.json without what a second run measures differently: seconds, and the cards."""
    doc = json.loads((out / "manifest.json").read_text())
    for rec in doc["variants"].values():
        for measured in ("seconds", "task_seconds", "peak_ram"):
            rec.pop(measured)
        rec["notes"].pop("quantize_seconds", None)
        rec["files"] = [f for f in rec["files"] if f["path"] != "README.md"]
    return doc


# ---------------------------------------------------------------- fast


def test_resources_come_from_the_engines_and_fit_the_largest_node() -> None:
    from quantkit.engines import ENGINES
    from quantkit.recipe import parse_recipe

    plan = make_plan(parse_recipe('[model]\nsource = "org/m"\n[[variants]]\nformat = "gguf"\nquant = "Q4_K_M"\n'
                                  '[[variants]]\nformat = "gptq"\n[[variants]]\nformat = "awq"\n'
                                  '[[variants]]\nformat = "mlx"\nmethod = ["rtn", "gptq"]\n', check_source=False))
    want = {v.name: ENGINES[v.format].resources(v) for v in plan.variants}

    def clamp(name: str, most: dict[str, float]) -> tuple[dict[str, float], list[str]]:
        return cluster.clamp(name, want[name], most)

    cpu_only = {"CPU": 2.0}
    assert clamp("gguf-Q4_K_M", cpu_only)[0] == {"num_cpus": 2.0}  # 4 wanted, 2 exist
    assert clamp("gguf-Q4_K_M", {"CPU": 16.0})[0] == {"num_cpus": 4.0}
    res, notes = clamp("gptq-4bit-128g-actorder_True", cpu_only)
    assert res == {"num_cpus": 2.0} and "no node has a GPU" in notes[0]  # the CPU path, a node each
    assert clamp("awq-4bit-128g", {"CPU": 16.0, "GPU": 8.0}) == ({"num_cpus": 1.0, "num_gpus": 1.0}, [])
    # MLX declares its own: round to nearest is one mlx-lm call on the CPU, GPTQ runs on torch's GPU
    assert clamp("mlx-4bit-64g-rtn", {"CPU": 16.0, "GPU": 8.0}) == ({"num_cpus": 1.0}, [])
    assert clamp("mlx-4bit-64g-gptq", {"CPU": 16.0, "GPU": 8.0})[0]["num_gpus"] == 1.0


def test_bare_ray_option_means_a_local_cluster(tmp_path: Path) -> None:
    r = tmp_path / "r.toml"
    r.write_text("")
    assert _ray_argv(["build", str(r), "--ray"]) == ["build", str(r), "--ray=local"]
    assert _ray_argv(["batch", "--ray", "a.toml", "b.toml"]) == ["batch", "--ray=local", "a.toml", "b.toml"]
    assert _ray_argv(["build", str(r), "--ray", "auto"]) == ["build", str(r), "--ray", "auto"]
    assert _ray_argv(["build", "--ray", "--only", "x", str(r)])[1] == "--ray=local"


# ---------------------------------------------------------------- real builds


@pytest.mark.slow
def test_ray_build_gives_the_plain_builds_files_and_skips_on_rerun(tiny_llama: Path, tmp_path: Path) -> None:
    """2 GPTQ + 2 GGUF through `build --ray` (its own local cluster) and without: the same
    files, byte for byte; a re-run skips all four; the cluster is gone afterwards."""
    recipe = _recipe(tmp_path, tiny_llama, FOUR)
    before = _ray_pids()
    plain = subprocess.run([*QUANTKIT, "build", str(recipe), "--out", str(tmp_path / "plain")],
                           env=_env(), capture_output=True, text=True, timeout=LIMIT_S)
    assert plain.returncode == 0, plain.stderr
    on_ray = subprocess.run([*QUANTKIT, "build", str(recipe), "--out", str(tmp_path / "ray"), "--ray"],
                            env=_env(), capture_output=True, text=True, timeout=LIMIT_S)
    assert on_ray.returncode == 0, on_ray.stderr
    assert not _wait_gone(_ray_pids() - before), "the local cluster outlived the build"
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "ray")
    assert len(a) >= 4 and a == b
    ma, mb = load_manifest(tmp_path / "plain"), load_manifest(tmp_path / "ray")
    assert ma is not None and mb is not None and set(ma.variants) == set(mb.variants)
    for name, rec in mb.variants.items():
        assert rec.state == "carded" and rec.files == ma.variants[name].files
        assert rec.quality == ma.variants[name].quality
    # the whole manifests, apart from timings (and the cards, which show them)
    assert _timeless(tmp_path / "plain") == _timeless(tmp_path / "ray")
    assert "variants on the Ray cluster" in on_ray.stderr and "pid" in on_ray.stderr  # the live view
    again = subprocess.run([*QUANTKIT, "build", str(recipe), "--out", str(tmp_path / "ray"), "--ray"],
                           env=_env(), capture_output=True, text=True, timeout=LIMIT_S)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("up to date") == 4
    assert _weights(tmp_path / "ray") == b


def test_the_local_clusters_workers_share_the_cores_as_the_plain_build_does(local_cluster: None) -> None:
    """Ray's default niceness (15) starved the workers whenever anything else ran: a worker-kill
    test ran past 600 s in CI beside the crash tests' builds."""
    assert ray.get(ray.remote(num_cpus=1)(lambda: os.nice(0)).remote()) == 0


@pytest.mark.slow
def test_worker_killed_mid_variant_is_retried_and_nothing_finished_is_rebuilt(
        tiny_llama: Path, tmp_path: Path, local_cluster: None) -> None:
    """SIGKILL the worker process that is building the second GPTQ variant (each takes the
    whole 2-CPU node, so they run one after the other): Ray runs that task again; the variant
    that finished before is neither rerun nor rewritten."""
    plan = make_plan(load_recipe(_recipe(tmp_path, tiny_llama, TWO_GPTQ)), tmp_path / "out")
    runs: dict[str, list[int]] = {}
    killed: list[int] = []
    mtime: dict[str, int] = {}
    order: list[str] = []

    def report(ev) -> None:
        if isinstance(ev, events.OnNode):
            runs.setdefault(ev.variant, []).append(int(ev.message.rsplit("pid ", 1)[1]))
        if isinstance(ev, events.Done) and not mtime:
            mtime[ev.variant] = (plan.out_dir / ev.variant / "model.safetensors").stat().st_mtime_ns
            order.append(ev.variant)
        if isinstance(ev, events.Progress) and mtime and ev.variant not in mtime and not killed:
            order.append(ev.variant)
            killed.append(runs[ev.variant][-1])
            os.kill(killed[0], signal.SIGKILL)
            print(f"SIGKILL worker pid {killed[0]} during {ev.variant}: {ev.task} {ev.done}/{ev.total}")

    res = cluster.build(plan, report=report)
    assert killed, "the second variant was never seen running"
    first, second = order
    assert len(runs[second]) == 2 and runs[second][1] != killed[0]  # retried, in a new process
    assert len(runs[first]) == 1
    assert not res.failed and set(res.built) == {first, second}
    assert (plan.out_dir / first / "model.safetensors").stat().st_mtime_ns == mtime[first]
    m = load_manifest(plan.out_dir)
    assert m is not None and all(r.state == "carded" and r.quality for r in m.variants.values())
    assert not list(plan.out_dir.glob(".*.partial"))
    print(f"runs per variant: { {k: len(v) for k, v in runs.items()} }; {first} files untouched")


@pytest.mark.slow
def test_a_variant_failing_for_its_own_reasons_is_recorded(tiny_llama: Path, tmp_path: Path,
                                                           local_cluster: None) -> None:
    """EXL2 needs CUDA: on this CPU cluster its task fails, is recorded, and is not retried."""
    plan = make_plan(load_recipe(_recipe(tmp_path, tiny_llama, '[[variants]]\nformat = "exl2"\nbpw = 4.0\n')),
                     tmp_path / "out")
    nodes: list[str] = []
    res = cluster.build(plan, report=lambda ev: nodes.append(ev.variant) if isinstance(ev, events.OnNode) else None)
    m = load_manifest(plan.out_dir)
    assert m is not None
    if m.variants["exl2-4.0bpw"].state != "failed":  # a CUDA machine with exllamav2 built it
        return
    assert "exllamav2" in res.failed["exl2-4.0bpw"] and m.variants["exl2-4.0bpw"].error
    assert nodes == ["exl2-4.0bpw"]  # one run: an error of its own is no reason to retry
    assert json.loads((plan.out_dir / "manifest.json").read_text())["variants"]["exl2-4.0bpw"]["state"] == "failed"


@pytest.mark.slow
def test_ctrl_c_cancels_the_tasks_and_stops_the_cluster(tiny_llama: Path, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, tiny_llama, TWO_GPTQ)
    out = tmp_path / "out"
    before = _ray_pids()
    # A job a shell started in the background inherits Ctrl-C ignored, and so would the build:
    # the build gets the terminal's default, as a user's foreground build has.
    proc = subprocess.Popen([*QUANTKIT, "build", str(recipe), "--out", str(out), "--ray"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        t0 = time.time()
        while not list(out.glob(".gptq-*.partial")):  # a variant is being built on a worker
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.time() - t0 < LIMIT_S
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert not _wait_gone(_ray_pids() - before), "tasks or the cluster outlived Ctrl-C"
    m = load_manifest(out)
    assert m is None or not any(r.at_least("evaluated") for r in m.variants.values())


@pytest.mark.slow
def test_batch_on_ray_runs_recipes_together_and_workers_publish(tiny_llama: Path, tmp_path: Path, hub) -> None:
    """`batch --ray --publish`: two recipes on one local cluster; each worker pushes its own
    variant's branch to the (local) Hub; the driver records the commits in each manifest."""
    recipes = []
    for name in ("tiny_a", "tiny_b"):
        (tmp_path / name).mkdir()
        r = _recipe(tmp_path / name, tiny_llama, '[[variants]]\nformat = "gptq"\nbits = 8\ngroup_size = 32\n')
        r.write_text(r.read_text().replace('name = "tiny"', f'name = "{name}"'))
        recipes.append(r)
    before = _ray_pids()
    res = subprocess.run([*QUANTKIT, "batch", *map(str, recipes), "--out", str(tmp_path / "build"), "--ray",
                          "--publish"], env=_env(), capture_output=True, text=True, timeout=LIMIT_S)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not _wait_gone(_ray_pids() - before), "the local cluster outlived the batch"
    for name in ("tiny_a", "tiny_b"):
        m = load_manifest(tmp_path / "build" / name)
        assert m is not None
        rec = m.variants["gptq-8bit-32g-actorder_True"]
        assert rec.state in ("published", "carded") and rec.published and rec.published.commit
        assert rec.published.repo == f"me/{name}-GPTQ"
    assert len(hub.requests("POST", "/commit/")) == 2
    assert "tiny_a/gptq-8bit-32g-actorder_True" in res.stderr  # one view, rows named by recipe
