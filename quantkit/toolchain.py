"""The llama.cpp toolchain (a builder, not an engine): the HF→GGUF converter, llama-quantize/-imatrix/-perplexity,
llama-gguf-split, the bindings.

Found in this order, each part on its own: an explicit directory (argument or
`LLAMA_CPP_DIR`: a llama.cpp checkout or install), then `PATH`, then the cache
(`QUANTKIT_CACHE`, default ~/.cache/quantkit) that `build_toolchain` fills from the pinned
llama-cpp-python sdist, so tools, converter and bindings share one llama.cpp version.

The cached build is one explicit step, `quantkit toolchain`.
It compiles llama.cpp once as shared libraries: the tools
link to them, and the bindings wheel is packed from the same libraries instead of
compiling llama.cpp a second time. Every step is skipped when its output is there.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EngineError, EngineUnavailable

PIN = "0.3.36"  # llama-cpp-python: the bindings, and the llama.cpp tree the tools are built from
SDIST = f"llama_cpp_python-{PIN}"
SPLIT_TOOL = "llama-gguf-split"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", SPLIT_TOOL)  # what the cached build makes
# The split tool is needed only for files above split_max_size: a toolchain without it (a cache
# built before it was added, a llama.cpp install of one's own) still builds everything else.
REQUIRED_TOOLS = TOOLS[:3]
CONVERTER = "convert_hf_to_gguf.py"
BUILD_COMMAND = "quantkit toolchain"
# Where a llama.cpp checkout or install keeps its executables, relative to its root.
TOOL_SUBDIRS = ("", "bin", "build/bin", "build/bin/Release")
# The cached build: shared libraries (the wheel reuses them), found next to the tools via $ORIGIN.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=ON", "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    "-DCMAKE_INSTALL_RPATH=$ORIGIN",
)
# QUANTKIT_LLAMA_PORTABLE=1 (the Docker image): no -march=native. ggml builds one CPU backend per
# instruction-set level and loads the best one for the CPU it runs on, from GGML_BACKEND_DIR
# (the bindings live in site-packages, where ggml would not look for them).
PORTABLE_FLAGS = ("-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON")
CUDA_FLAGS = ("-DGGML_CUDA=ON",)  # QUANTKIT_LLAMA_CUDA=1

Progress = Callable[[str, int, "int | None"], None]


def _no_progress(task: str, done: int, total: int | None) -> None:
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("QUANTKIT_CACHE") or Path.home() / ".cache" / "quantkit").expanduser()


def sdist_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "src" / SDIST


def build_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "llama.cpp" / "build"


def wheel_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "wheels"


# ---------------------------------------------------------------- finding it


@dataclass(frozen=True)
class Toolchain:
    converter: Path  # convert_hf_to_gguf.py
    gguf_py: Path  # the converter's own gguf-py (PyPI gguf lacks what it needs)
    quantize: Path
    imatrix: Path
    perplexity: Path
    converter_from: str  # "LLAMA_CPP_DIR (/x)", "PATH", "cache (/root/.cache/quantkit)"
    tools_from: str
    split: Path | None = None  # llama-gguf-split, found beside the other tools

    def splitter(self) -> Path:
        """llama-gguf-split, or EngineUnavailable saying how to get it."""
        if self.split is None:
            raise EngineUnavailable("gguf", f"{SPLIT_TOOL} not found beside {self.quantize} "
                                    f"({self.tools_from}): run `{BUILD_COMMAND}` (builds only that tool "
                                    "when the rest is cached), or raise split_max_size above the file's size")
        return self.split

    def converter_env(self) -> dict[str, str]:
        """Environment for the converter subprocess: its own gguf-py first on PYTHONPATH."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.gguf_py), env.get("PYTHONPATH")) if p)
        env.pop("NO_LOCAL_GGUF", None)  # it would make the converter pick up PyPI gguf
        return env

    def version(self) -> str:
        """`0c1e570 (build 1)`: the llama.cpp commit the tools were built from."""
        return tool_version(self.imatrix)


@functools.lru_cache(maxsize=8)
def tool_version(tool: Path) -> str:
    try:
        out = subprocess.run([str(tool), "--version"], capture_output=True, text=True, timeout=60)
    except OSError as e:
        raise EngineUnavailable("gguf", f"{tool} does not run: {e.strerror}") from None
    m = re.search(r"version: \S+ \(build (\d+), commit (\w+)\)", out.stdout + out.stderr)
    if not m:
        m2 = re.search(r"version: (\d+) \((\w+)\)", out.stdout + out.stderr)  # older tools
        if not m2:
            raise EngineUnavailable("gguf", f"{tool} --version printed no version (exit {out.returncode})")
        return f"{m2.group(2)} (build {m2.group(1)})"
    return f"{m.group(2)} (build {m.group(1)})"


def _tools_in(folder: Path) -> dict[str, Path] | None:
    for sub in TOOL_SUBDIRS:
        found = {t: folder / sub / t for t in REQUIRED_TOOLS}
        if all(_executable(p) for p in found.values()):
            split = folder / sub / SPLIT_TOOL
            return {**found, SPLIT_TOOL: split} if _executable(split) else found
    return None


def _executable(p: Path) -> bool:
    return p.is_file() and os.access(p, os.X_OK)


def _converter_in(folder: Path) -> tuple[Path, Path] | None:
    for root in (folder, folder.parent):
        if (root / CONVERTER).is_file() and (root / "gguf-py" / "gguf").is_dir():
            return root / CONVERTER, root / "gguf-py"
    return None


def _tools_on_path() -> dict[str, Path] | None:
    found = {t: shutil.which(t) for t in REQUIRED_TOOLS}
    if not all(found.values()):
        return None
    split = shutil.which(SPLIT_TOOL)
    return {t: Path(p) for t, p in {**found, SPLIT_TOOL: split}.items() if p}


def _converter_on_path() -> tuple[Path, Path] | None:
    p = shutil.which(CONVERTER)
    return _converter_in(Path(p).resolve().parent) if p else None


def cached_build_is_pinned(cache: Path | None = None) -> bool:
    """The cached build was configured from the pinned sdist (not some older one)."""
    cmake_cache = build_dir(cache) / "CMakeCache.txt"
    if not cmake_cache.is_file():
        return False
    m = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.*)$", cmake_cache.read_text(errors="replace"), re.M)
    return m is not None and f"/{SDIST}/" in m.group(1) + "/"


def extra_cmake_flags(cache: Path | None = None) -> list[str]:
    """The flags QUANTKIT_LLAMA_PORTABLE=1 and QUANTKIT_LLAMA_CUDA=1 add to CMAKE_FLAGS."""
    flags: list[str] = []
    if os.environ.get("QUANTKIT_LLAMA_PORTABLE") == "1":
        flags += [*PORTABLE_FLAGS, f"-DGGML_BACKEND_DIR={build_dir(cache) / 'bin'}"]
    if os.environ.get("QUANTKIT_LLAMA_CUDA") == "1":
        flags += CUDA_FLAGS
    return flags


def _configured_with(cache: Path, flags: list[str]) -> bool:
    """CMakeCache.txt holds every `-DKEY=VALUE` of flags (as `KEY:TYPE=VALUE`)."""
    text = (build_dir(cache) / "CMakeCache.txt").read_text(errors="replace")
    pairs = (f.removeprefix("-D").split("=", 1) for f in flags)
    return all(re.search(rf"^{re.escape(k)}:\w+={re.escape(v)}$", text, re.M) for k, v in pairs)


def _cached_tools(cache: Path) -> dict[str, Path] | None:
    """A build asked for as portable or CUDA reuses only a cache configured that way."""
    if not cached_build_is_pinned(cache) or not _configured_with(cache, extra_cmake_flags(cache)):
        return None
    return _tools_in(build_dir(cache) / "bin")


def find_toolchain(llama_cpp_dir: str | Path | None = None) -> Toolchain:
    """Converter and tools in the documented order; EngineUnavailable says how to get them."""
    explicit = llama_cpp_dir or os.environ.get("LLAMA_CPP_DIR")
    cache = cache_dir()
    conv = tools = None
    conv_from = tools_from = ""
    if explicit:
        root = Path(explicit).expanduser()
        label = f"{'LLAMA_CPP_DIR' if not llama_cpp_dir else 'setting'} ({root})"
        if not root.is_dir():
            raise EngineUnavailable("gguf", f"llama.cpp directory {root} does not exist")
        tools, tools_from = _tools_in(root), label
        conv, conv_from = _converter_in(root), label
        if tools is None and conv is None:
            raise EngineUnavailable("gguf", f"{root} holds neither {TOOLS[0]} nor {CONVERTER}: "
                                    "point LLAMA_CPP_DIR at a llama.cpp checkout with a build/ folder")
    if tools is None:
        tools, tools_from = _tools_on_path(), "PATH"
    if conv is None:
        conv, conv_from = _converter_on_path(), "PATH"
    if tools is None:
        tools, tools_from = _cached_tools(cache), f"cache ({cache})"
    if conv is None:
        conv, conv_from = _converter_in(sdist_dir(cache) / "vendor" / "llama.cpp"), f"cache ({cache})"
    missing = ([", ".join(REQUIRED_TOOLS)] if tools is None else []) + ([CONVERTER] if conv is None else [])
    if tools is None or conv is None:
        raise EngineUnavailable("gguf", f"llama.cpp not found ({' and '.join(missing)}; looked in "
                                f"LLAMA_CPP_DIR, PATH, {cache}): run `{BUILD_COMMAND}` once (~7 min)")
    return Toolchain(conv[0], conv[1], tools["llama-quantize"], tools["llama-imatrix"],
                     tools["llama-perplexity"], conv_from, tools_from, tools.get(SPLIT_TOOL))


def bindings_version() -> str | None:
    """Installed llama-cpp-python version, without importing it (that loads the library)."""
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None


def require_bindings() -> None:
    if bindings_version() is None:
        raise EngineUnavailable("gguf", f"llama-cpp-python is not installed: run `{BUILD_COMMAND}` "
                                f"(builds or reuses the wheel in {wheel_dir()} and installs it)")


# ---------------------------------------------------------------- doctor


@dataclass(frozen=True)
class DoctorRow:
    part: str  # "converter", "tools", "bindings"
    ok: bool
    detail: str  # path and version, or what is wrong
    source: str = ""  # where it was found


def doctor() -> tuple[DoctorRow, ...]:
    """What `quantkit doctor` shows for GGUF: each part, where it was found, its version, or the fix."""
    try:
        tc = find_toolchain()
    except EngineUnavailable as e:
        rows = [DoctorRow("llama.cpp", False, e.reason)]
    else:
        try:
            ver = f"llama.cpp {tc.version()}"
        except EngineUnavailable as e:
            ver = f"version unknown: {e.reason}"
        rows = [DoctorRow("converter", True, str(tc.converter), tc.converter_from),
                DoctorRow("tools", True, f"{tc.quantize.parent} ({ver})", tc.tools_from),
                DoctorRow("gguf-split", tc.split is not None, str(tc.split) if tc.split else
                          f"{SPLIT_TOOL} missing (needed for files above split_max_size): run `{BUILD_COMMAND}`",
                          tc.tools_from)]
        rows += _cpu_backend_rows(cpu_backends(tc.quantize.parent))
    bv = bindings_version()
    if bv is None:
        rows.append(DoctorRow("bindings", False, f"llama-cpp-python not installed: run `{BUILD_COMMAND}`"))
    else:
        note = "" if bv == PIN else f" (quantkit pins {PIN})"
        rows.append(DoctorRow("bindings", bv == PIN, f"llama-cpp-python {bv}{note}", "installed"))
    return tuple(rows)


def cpu_backends(bin_dir: Path) -> dict[str, int]:
    """The CPU backends a GGML_CPU_ALL_VARIANTS build keeps beside its tools, each with the score
    ggml gives it on this CPU (0: it cannot run here); ggml loads the highest. Empty for other builds."""
    scores = {}
    for lib in sorted(bin_dir.glob("libggml-cpu-*.so")):
        try:  # loading a variant to ask for its score is what ggml itself does
            score = ctypes.CDLL(str(lib)).ggml_backend_score
        except (OSError, AttributeError):
            continue
        score.restype = ctypes.c_int
        scores[lib.name.removeprefix("libggml-cpu-").removesuffix(".so")] = int(score())
    return scores


def _cpu_backend_rows(scores: dict[str, int]) -> list[DoctorRow]:
    if not scores:
        return []
    best = max(scores, key=lambda name: scores[name])
    runs = [name for name, s in scores.items() if s > 0]
    detail = f"{best}, chosen at run time; {len(runs)} of {len(scores)} variants run on this CPU: {', '.join(runs)}"
    return [DoctorRow("cpu backend", scores[best] > 0, detail, "GGML_CPU_ALL_VARIANTS")]


# ---------------------------------------------------------------- building it


@dataclass
class BuildReport:
    """What build_toolchain did: per step 'built'/'cached'/'installed', and seconds."""

    steps: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    wheel: Path | None = None
    tools: Path | None = None


def _run(cmd: list[str], *, what: str, env: dict[str, str] | None = None, cwd: Path | None = None,
         progress: Progress = _no_progress, total: int | None = None) -> None:
    """Run a build command; `[n/N]` lines (ninja) drive progress; failure keeps the log tail."""
    tail: list[str] = []
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env, cwd=cwd, errors="replace")
    except OSError as e:
        raise EngineUnavailable("gguf", f"{what}: cannot run {cmd[0]}: {e.strerror}") from None
    assert p.stdout is not None
    for line in p.stdout:
        tail = (tail + [line.rstrip()])[-30:]
        m = re.match(r"\[(\d+)/(\d+)\]", line)
        if m:
            progress(what, int(m.group(1)), int(m.group(2)))
    if p.wait() != 0:
        log = Path(tempfile.gettempdir()) / f"quantkit-{what.replace(' ', '-')}.log"
        log.write_text("\n".join(tail) + "\n")
        raise EngineError("gguf", f"{what} failed (exit {p.returncode}); last lines in {log}")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One toolchain build at a time per cache (CI jobs and developers share it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fetch_sdist(cache: Path, progress: Progress = _no_progress) -> Path:
    """Download (pip) and unpack the pinned sdist; returns its folder."""
    dest = sdist_dir(cache)
    if (dest / "vendor" / "llama.cpp" / CONVERTER).is_file():
        return dest
    src = dest.parent
    src.mkdir(parents=True, exist_ok=True)
    tarball = src / f"{SDIST}.tar.gz"
    if not tarball.is_file():
        progress("download llama-cpp-python sdist", 0, None)
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              f"llama-cpp-python=={PIN}", "-d", str(src)], what="download sdist")
    with tempfile.TemporaryDirectory(dir=src) as tmp, tarfile.open(tarball) as tf:
        # Pythons without extraction filters (3.11.2 of Debian 12) unpack PyPI's pinned sdist as is.
        safe: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(tmp, **safe)
        shutil.rmtree(dest, ignore_errors=True)
        (Path(tmp) / SDIST).rename(dest)
    tarball.unlink()  # 74 MB a CI cache need not carry: the unpacked tree is what is used
    return dest


def build_tools(cache: Path, progress: Progress = _no_progress, jobs: int | None = None) -> Path:
    """cmake-build the tools (and the shared libraries) from the sdist; returns bin/."""
    out = build_dir(cache)
    if cached := _cached_tools(cache):
        if SPLIT_TOOL not in cached:
            _build_split_tool(out, progress, jobs)
        return out / "bin"
    source = sdist_dir(cache) / "vendor" / "llama.cpp"
    if (out / "CMakeCache.txt").is_file() and not cached_build_is_pinned(cache):
        shutil.rmtree(out)  # configured from another sdist: cmake refuses to switch sources
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(source), "-B", str(out), *gen, *CMAKE_FLAGS, *extra_cmake_flags(cache)],
         what="configure llama.cpp", progress=progress)
    _run(["cmake", "--build", str(out), "--parallel", str(jobs or os.cpu_count() or 2),
          "--target", *TOOLS], what="build llama.cpp", progress=progress)  # ggml depends on its backends
    if SPLIT_TOOL not in (_tools_in(out / "bin") or {}):
        raise EngineError("gguf", f"llama.cpp build finished but {out / 'bin'} lacks some of "
                          f"{', '.join(TOOLS)}")
    shutil.rmtree(wheel_dir(cache), ignore_errors=True)  # packed from the libraries just replaced
    return out / "bin"


def _build_split_tool(out: Path, progress: Progress, jobs: int | None) -> None:
    """A cache built before quantkit used llama-gguf-split: one more ninja target in the same
    build folder (its one source file and a link against the existing libraries). The
    libraries, the other tools and the wheel packed from them stay as they are."""
    _run(["cmake", "--build", str(out), "--parallel", str(jobs or os.cpu_count() or 2), "--target", SPLIT_TOOL],
         what=f"build {SPLIT_TOOL}", progress=progress)
    if SPLIT_TOOL not in (_tools_in(out / "bin") or {}):
        raise EngineError("gguf", f"{SPLIT_TOOL} build finished but {out / 'bin'} lacks it")


def cached_wheel(cache: Path | None = None) -> Path | None:
    found = sorted(wheel_dir(cache).glob(f"{SDIST}-*.whl"))
    return found[-1] if found else None


# The libraries the bindings load (libllama.so, libggml.so) and their dependencies by soname
# (libggml-base.so.0, ...); not the tools' own libraries or the fully versioned names.
_BINDINGS_LIB = re.compile(r"^lib(llama|ggml(-[a-z0-9]+)?)\.so(\.\d+)?$")


def _shared_libs(bin_dir: Path) -> list[Path]:
    libs = sorted(p for p in bin_dir.glob("lib*.so*") if p.is_file() and _BINDINGS_LIB.match(p.name))
    return [p for p in libs if not _backend_module(p)]


def _backend_module(lib: Path) -> bool:
    """A backend that a GGML_BACKEND_DL build loads at run time from GGML_BACKEND_DIR (libggml-cuda.so):
    unversioned, unlike the linked libraries. The wheel leaves it out (the CUDA one is 100s of MB)."""
    return lib.name.startswith("libggml-") and lib.name.endswith(".so") and not any(
        lib.parent.glob(lib.name + ".[0-9]*"))


def build_wheel(cache: Path, progress: Progress = _no_progress) -> Path:
    """The bindings wheel: packed from the cached build's shared libraries when it has them
    (seconds), else compiled by pip from the sdist (~10 min)."""
    if whl := cached_wheel(cache):
        return whl
    out = wheel_dir(cache)
    out.mkdir(parents=True, exist_ok=True)
    libs = _shared_libs(build_dir(cache) / "bin") if cached_build_is_pinned(cache) else []
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        if any(p.name.startswith("libllama.so") for p in libs):
            src = _stage_python_package(sdist_dir(cache), Path(tmp) / SDIST, libs)
            env["CMAKE_ARGS"] = "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"
        else:
            src = sdist_dir(cache)
            env["CMAKE_ARGS"] = "-DLLAVA_BUILD=OFF " + env.get("CMAKE_ARGS", "")
        progress("build llama-cpp-python wheel", 0, None)
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(Path(tmp) / "whl"), str(src)],
             what="build wheel", env=env, progress=progress)
        built = next((Path(tmp) / "whl").glob("*.whl"))
        shutil.move(built, out / built.name)  # the cache only ever holds complete wheels
    return out / built.name


def _stage_python_package(sdist: Path, stage: Path, libs: list[Path]) -> Path:
    """The sdist's Python package plus the built libraries in llama_cpp/lib, as the wheel expects."""
    stage.mkdir(parents=True)
    for name in ("pyproject.toml", "CMakeLists.txt", "README.md", "LICENSE.md"):
        shutil.copy2(sdist / name, stage / name)
    shutil.copytree(sdist / "llama_cpp", stage / "llama_cpp",
                    ignore=shutil.ignore_patterns("__pycache__", "lib"))
    (stage / "llama_cpp" / "lib").mkdir()
    for lib in libs:  # wheels hold no symlinks: each name (libggml.so, libggml.so.0) as a file
        shutil.copy2(lib, stage / "llama_cpp" / "lib" / lib.name, follow_symlinks=True)
    return stage


def install_wheel(wheel: Path) -> bool:
    """Install the bindings into this interpreter's environment unless the pinned version is there."""
    if bindings_version() == PIN:
        return False
    _run([sys.executable, "-m", "pip", "install", str(wheel)], what="install wheel")
    return True


def build_toolchain(progress: Progress = _no_progress, *, cache: Path | None = None,
                    bindings: bool = True, install: bool = True, jobs: int | None = None) -> BuildReport:
    """Fetch the pinned sdist, build the tools and the bindings wheel, install it; idempotent."""
    cache = cache or cache_dir()
    rep = BuildReport()
    with _locked(cache / "llama.cpp" / ".build.lock"):
        for step, had, fn in (
            ("sdist", lambda: (sdist_dir(cache) / "vendor" / "llama.cpp" / CONVERTER).is_file(),
             lambda: fetch_sdist(cache, progress)),
            ("tools", lambda: SPLIT_TOOL in (_cached_tools(cache) or {}),
             lambda: build_tools(cache, progress, jobs)),
            ("wheel", lambda: cached_wheel(cache) is not None, lambda: build_wheel(cache, progress)),
        ):
            if step == "wheel" and not bindings:
                continue
            t0, cached = time.monotonic(), had()
            result = fn()
            rep.steps[step] = "cached" if cached else "built"
            rep.seconds[step] = round(time.monotonic() - t0, 1)
            if step == "tools":
                rep.tools = result
            if step == "wheel":
                rep.wheel = result
    if bindings and install and rep.wheel:
        t0 = time.monotonic()
        rep.steps["install"] = "installed" if install_wheel(rep.wheel) else "cached"
        rep.seconds["install"] = round(time.monotonic() - t0, 1)
    return rep
