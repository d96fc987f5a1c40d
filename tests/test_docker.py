"""The Docker image: static checks of Dockerfile, .dockerignore and README (fast, no daemon),
and the real build and run (marked `docker`, skipped where no Docker daemon answers)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer.main
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from quantkit.cli import app
from quantkit import toolchain as llamacpp
from quantkit.engines import exl2

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
CONSTRAINTS = ROOT / "constraints.txt"
# The CUDA that PyPI's Linux torch wheel is built for, per torch version (its cuda-toolkit
# requirement): the CUDA base image must match it, for exllamav2's kernels compiled at run time.
TORCH_CUDA = {"2.13.0": "13.0"}
# `docker run` options that take a value (the next word).
RUN_VALUE_OPTS = {"-v", "--volume", "-e", "--env", "--user", "-u", "--gpus", "--network", "--entrypoint",
                  "--name", "-w", "--workdir"}


def _instructions() -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments) for each instruction; continuation lines joined."""
    out, stage = [], ""
    for line in re.sub(r"\\\n", " ", DOCKERFILE).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, args = line.partition(" ")
        if instr.upper() == "FROM":
            named = re.search(r"\sAS\s+(\S+)", args, re.I)
            stage = named.group(1) if named else "final"
        out.append((stage, instr.upper(), args.strip()))
    return out


def _env(flavor: str) -> dict[str, str]:
    """The environment a flavor's build steps see: its os-<flavor> stage, then the final stage."""
    env: dict[str, str] = {}
    for stage, instr, args in _instructions():
        if instr == "ENV" and stage in (f"os-{flavor}", "final"):
            env.update(word.split("=", 1) for word in shlex.split(args))
    return env


def _arg_default(name: str) -> str:
    return next(args.split("=", 1)[1] for _, instr, args in _instructions()
                if instr == "ARG" and args.startswith(f"{name}="))


def _constraints() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _pip_installs() -> list[str]:
    runs = " ".join(args for _, instr, args in _instructions() if instr == "RUN")
    return [m.strip() for m in re.findall(r"pip install ([^&;]*)", runs)]


def test_flavors_are_the_os_stages() -> None:
    stages = {stage for stage, instr, _ in _instructions() if instr == "FROM"}
    assert {"os-cuda", "os-cpu"} <= stages and _arg_default("FLAVOR") == "cuda"
    assert "exl2" in _env("cuda")["QK_EXTRAS"].split(",")
    assert "exl2" not in _env("cpu")["QK_EXTRAS"].split(",")


def test_cuda_target_pins_equal_constraints() -> None:
    """What the cuda flavor installs is pinned by constraints.txt, and its own pins agree with it."""
    pins = _constraints()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = _env("cuda")["QK_EXTRAS"].split(",")
    reqs = [Requirement(r) for r in project["dependencies"]
            + [r for e in extras for r in project["optional-dependencies"][e]]]
    own = {canonicalize_name(r.name): str(r.specifier).removeprefix("==") for r in reqs
           if str(r.specifier).startswith("==")}
    for name, version in own.items():
        assert pins.get(name, version) == version, f"{name}: pyproject {version}, constraints {pins[name]}"
    # Pins constraints.txt lacks (packages CI does not install) are the engines' own.
    assert own["exllamav2"] == exl2.PIN and own["llama-cpp-python"] == llamacpp.PIN
    installs = [i for i in _pip_installs() if "--upgrade pip" not in i and not i.endswith("--no-deps -e .")]
    assert installs and all("-c /tmp/ctx/constraints.txt" in i for i in installs), installs
    assert "torch" in pins and any(i.endswith(" torch") for i in installs)  # its version: constraints'
    cuda = re.search(r":(\d+\.\d+)\.\d+-", _arg_default("CUDA_BASE"))
    assert cuda and cuda.group(1) == TORCH_CUDA[pins["torch"]]


@pytest.mark.parametrize("flavor", ["cuda", "cpu"])
def test_no_build_step_compiles_for_the_build_machine(flavor: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No -march=native: llama.cpp portable, its CPU backend picked at run time; CUDA for cuda."""
    code = " ".join(args for _, _, args in _instructions())  # comments left out
    guard = "grep -q -- -march=native build.ninja"  # the build fails if a compile line has it
    assert guard in code and not re.search(r"-march=native|GGML_NATIVE=ON|CFLAGS|CMAKE_ARGS", code.replace(guard, ""))
    for key, value in _env(flavor).items():
        monkeypatch.setenv(key, value)
    assert any("from quantkit.toolchain import build_toolchain; build_toolchain()" in a
               for _, i, a in _instructions() if i == "RUN")
    flags = [*llamacpp.CMAKE_FLAGS, *llamacpp.extra_cmake_flags(Path(_env(flavor)["QUANTKIT_CACHE"]))]
    assert {"-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON"} <= set(flags)
    assert ("-DGGML_CUDA=ON" in flags) == (flavor == "cuda")
    assert not any("native" in f.lower() and "NATIVE=OFF" not in f for f in flags)


def test_image_runs_quantkit_as_a_user_with_volumes_and_no_token() -> None:
    final = [(instr, args) for stage, instr, args in _instructions() if stage == "final"]
    assert ("ENTRYPOINT", '["quantkit"]') in final
    users = [args for instr, args in final if instr == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert not re.search(r"^\s*(ENV|ARG)\b.*HF_TOKEN", DOCKERFILE, re.M)
    assert set(_volumes()) == {"/work/recipes", "/work/build", "/cache"}
    assert _env("cpu")["HF_HOME"].startswith("/cache/")


def _volumes() -> list[str]:
    return [v for _, instr, args in _instructions() if instr == "VOLUME" for v in json.loads(args)]


def test_dockerignore_lets_in_what_the_dockerfile_copies() -> None:
    patterns = [ln for ln in (ROOT / ".dockerignore").read_text().split("\n") if ln and not ln.startswith("#")]
    assert patterns[0] == "*"  # everything else (build/, .venv/, .git/) stays out of the context
    allowed = {p.lstrip("!").rstrip("/") for p in patterns if p.startswith("!")}
    for _, instr, args in _instructions():
        if instr == "COPY" and "--from" not in args:
            for src in shlex.split(args)[:-1]:
                top = src.split("/")[0].replace("[s]", "s")
                assert top in allowed, f"COPY {src}: not let in by .dockerignore"


def _readme_docker_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Docker"):]
    section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = [ln for b in blocks for ln in re.sub(r"\\\n", " ", b).splitlines()]
    return [shlex.split(ln) for ln in lines if ln.strip().startswith("docker ")]


def _run_parts(words: list[str]) -> tuple[list[str], str, list[str]]:
    """`docker run OPTIONS IMAGE ARGS` -> (options, image, args)."""
    i = 2
    while words[i].startswith("-"):
        i += 2 if words[i] in RUN_VALUE_OPTS else 1
    return words[2:i], words[i], words[i + 1:]


def test_readme_docker_commands_use_the_entrypoint_and_volumes() -> None:
    commands = _readme_docker_commands()
    builds = [c for c in commands if c[1] == "build"]
    runs = [_run_parts(c) for c in commands if c[1] == "run"]
    flavors = {re.sub(r"^FLAVOR=", "", c[c.index("--build-arg") + 1]) if "--build-arg" in c else "cuda"
               for c in builds}
    assert flavors == {"cuda", "cpu"}
    subcommands = set(typer.main.get_command(app).commands)
    assert len(runs) >= 2 and any("--gpus" in opts for opts, _, _ in runs)
    for opts, image, args in runs:
        assert args[0] in subcommands and "--entrypoint" not in opts, (image, args)
        assert args[0] == "batch" and "--publish" in args
        mounts = {opts[i + 1].split(":")[1] for i, o in enumerate(opts) if o in ("-v", "--volume")}
        assert mounts == set(_volumes()), mounts
        envs = [opts[i + 1] for i, o in enumerate(opts) if o in ("-e", "--env")]
        assert "HF_TOKEN" in envs  # passed on from the caller's environment, not written out
        assert "$(id -u):$(id -g)" in opts


def _docker_builds() -> bool:
    """A daemon answers and the client builds with BuildKit (buildx, or a client older than 23)."""
    docker = os.environ.get("DOCKER", "docker")
    if not shutil.which(docker) or subprocess.run([docker, "info"], capture_output=True, timeout=60).returncode:
        return False
    if subprocess.run([docker, "buildx", "version"], capture_output=True, timeout=60).returncode == 0:
        return True
    version = subprocess.run([docker, "version", "-f", "{{.Client.Version}}"], capture_output=True, text=True)
    return version.stdout.split(".")[0].isdigit() and int(version.stdout.split(".")[0]) < 23


@pytest.mark.docker
@pytest.mark.skipif(not _docker_builds(), reason="no Docker daemon, or no BuildKit client (set DOCKER)")
def test_cpu_image_builds_and_runs_batch_doctor_publish(tmp_path: Path) -> None:
    """benchmarks/docker_check.sh end to end (tens of minutes on 2 cores: the image compiles llama.cpp)."""
    summary = tmp_path / "summary.json"
    env = {**os.environ, "SUMMARY": str(summary), "PY": os.environ.get("PY", sys.executable)}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "docker_check.sh")], env=env,
                         capture_output=True, text=True, timeout=3 * 3600)
    assert summary.is_file(), res.stdout[-3000:] + res.stderr[-3000:]
    checks = json.loads(summary.read_text())["checks"]
    assert all(checks.values()), checks
    assert res.returncode == 0, res.stdout[-3000:]
