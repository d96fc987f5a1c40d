"""The llama.cpp toolchain: where it is found, what doctor says, the cached build step."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from quantkit import toolchain as llamacpp
from quantkit.errors import EngineUnavailable


def _fake_tools(folder: Path, version: str = "abc1234") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for t in llamacpp.TOOLS:
        p = folder / t
        p.write_text(f"#!/bin/sh\necho 'version: 0.5.0 (build 7, commit {version})' >&2\n")
        p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


def _fake_converter(root: Path) -> Path:
    (root / "gguf-py" / "gguf").mkdir(parents=True, exist_ok=True)
    (root / llamacpp.CONVERTER).write_text("# converter\n")
    return root


def _fake_cache(cache: Path, pinned: bool = True) -> Path:
    """A cache as build_toolchain leaves it: sdist, a build of it, a wheel."""
    src = _fake_converter(llamacpp.sdist_dir(cache) / "vendor" / "llama.cpp")
    build = llamacpp.build_dir(cache)
    _fake_tools(build / "bin", "cached0")
    home = src if pinned else cache / "src" / "llama_cpp_python-0.2.0" / "vendor" / "llama.cpp"
    (build / "CMakeCache.txt").write_text(f"CMAKE_HOME_DIRECTORY:INTERNAL={home}\n")
    llamacpp.wheel_dir(cache).mkdir(parents=True)
    (llamacpp.wheel_dir(cache) / f"{llamacpp.SDIST}-py3-none-linux_x86_64.whl").write_bytes(b"")
    return cache


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No LLAMA_CPP_DIR, a PATH without llama.cpp, an empty cache."""
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    llamacpp.tool_version.cache_clear()
    return tmp_path


def test_nothing_found_says_how_to_build(clean_env):
    with pytest.raises(EngineUnavailable) as e:
        llamacpp.find_toolchain()
    msg = str(e.value)
    assert "\n" not in msg and llamacpp.BUILD_COMMAND in msg and "LLAMA_CPP_DIR" in msg


def test_cache_is_used_only_when_built_from_the_pin(clean_env):
    cache = _fake_cache(clean_env / "cache", pinned=False)
    with pytest.raises(EngineUnavailable):
        llamacpp.find_toolchain()
    (llamacpp.build_dir(cache) / "CMakeCache.txt").write_text(
        f"CMAKE_HOME_DIRECTORY:INTERNAL={llamacpp.sdist_dir(cache)}/vendor/llama.cpp\n")
    tc = llamacpp.find_toolchain()
    assert tc.tools_from.startswith("cache") and tc.converter_from.startswith("cache")
    assert tc.quantize == llamacpp.build_dir(cache) / "bin" / "llama-quantize"
    assert tc.version() == "cached0 (build 7)"


def test_order_explicit_then_path_then_cache(clean_env, monkeypatch):
    _fake_cache(clean_env / "cache")
    on_path = _fake_tools(clean_env / "pathbin", "onpath0")
    monkeypatch.setenv("PATH", f"{on_path}:/usr/bin:/bin")
    tc = llamacpp.find_toolchain()
    assert tc.tools_from == "PATH" and tc.version() == "onpath0 (build 7)"
    assert tc.converter_from.startswith("cache")  # no converter on PATH: the sdist's

    checkout = _fake_converter(clean_env / "llama.cpp")
    _fake_tools(checkout / "build" / "bin", "checkout")
    monkeypatch.setenv("LLAMA_CPP_DIR", str(checkout))
    tc = llamacpp.find_toolchain()
    assert tc.tools_from.startswith("LLAMA_CPP_DIR") and tc.converter == checkout / llamacpp.CONVERTER
    assert tc.gguf_py == checkout / "gguf-py"

    explicit = _fake_tools(clean_env / "install" / "bin", "explicit")
    tc = llamacpp.find_toolchain(explicit.parent)  # an install: tools only, converter from PATH/cache
    assert tc.quantize.parent == explicit and tc.converter_from.startswith("cache")


def test_bad_explicit_dir_is_one_clear_line(clean_env, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_DIR", str(clean_env / "nope"))
    with pytest.raises(EngineUnavailable, match="does not exist"):
        llamacpp.find_toolchain()
    (clean_env / "empty").mkdir()
    monkeypatch.setenv("LLAMA_CPP_DIR", str(clean_env / "empty"))
    with pytest.raises(EngineUnavailable, match="neither llama-quantize nor convert_hf_to_gguf.py"):
        llamacpp.find_toolchain()


def test_converter_gets_its_own_gguf_py(clean_env, monkeypatch):
    _fake_cache(clean_env / "cache")
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    monkeypatch.setenv("NO_LOCAL_GGUF", "1")
    env = llamacpp.find_toolchain().converter_env()
    first, rest = env["PYTHONPATH"].split(os.pathsep, 1)
    assert first.endswith("gguf-py") and rest == "/somewhere" and "NO_LOCAL_GGUF" not in env


def test_doctor_rows(clean_env):
    rows = llamacpp.doctor()
    assert not rows[0].ok and llamacpp.BUILD_COMMAND in rows[0].detail
    _fake_cache(clean_env / "cache")
    rows = {r.part: r for r in llamacpp.doctor()}
    assert rows["tools"].ok and "cached0" in rows["tools"].detail and rows["converter"].ok
    assert "bindings" in rows


def test_build_toolchain_skips_what_is_cached(clean_env):
    cache = _fake_cache(clean_env / "cache")
    rep = llamacpp.build_toolchain(cache=cache, install=False)
    assert rep.steps == {"sdist": "cached", "tools": "cached", "wheel": "cached"}
    assert rep.wheel == llamacpp.cached_wheel(cache) and rep.tools == llamacpp.build_dir(cache) / "bin"


def test_wheel_stage_carries_the_built_libraries(tmp_path):
    sdist = tmp_path / "sdist"
    (sdist / "llama_cpp" / "lib").mkdir(parents=True)
    for name in ("pyproject.toml", "CMakeLists.txt", "README.md", "LICENSE.md", "llama_cpp/__init__.py"):
        (sdist / name).write_text("x")
    (sdist / "llama_cpp" / "lib" / "stale.so").write_text("old")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "libllama.so.0").write_bytes(b"ELF")
    (bin_dir / "libllama.so").symlink_to("libllama.so.0")
    stage = llamacpp._stage_python_package(sdist, tmp_path / "stage", llamacpp._shared_libs(bin_dir))
    lib = stage / "llama_cpp" / "lib"
    assert sorted(p.name for p in lib.iterdir()) == ["libllama.so", "libllama.so.0"]
    assert not (lib / "libllama.so").is_symlink()  # wheels hold files, not links


def test_real_toolchain_reports_a_version():
    """Uses whatever the product finds here (LLAMA_CPP_DIR, PATH, cache)."""
    try:
        tc = llamacpp.find_toolchain()
    except EngineUnavailable as e:
        pytest.skip(str(e))
    assert tc.converter.is_file() and (tc.gguf_py / "gguf").is_dir()
    assert " (build " in tc.version()


def test_portable_and_cuda_builds_are_asked_for_by_environment(clean_env, monkeypatch):
    cache = clean_env / "cache"
    assert llamacpp.extra_cmake_flags(cache) == []
    monkeypatch.setenv("QUANTKIT_LLAMA_PORTABLE", "1")
    monkeypatch.setenv("QUANTKIT_LLAMA_CUDA", "1")
    flags = llamacpp.extra_cmake_flags(cache)
    assert flags == [*llamacpp.PORTABLE_FLAGS, f"-DGGML_BACKEND_DIR={llamacpp.build_dir(cache) / 'bin'}",
                     "-DGGML_CUDA=ON"]
    assert "-DGGML_NATIVE=OFF" in flags and not any("march" in f for f in [*llamacpp.CMAKE_FLAGS, *flags])


def test_build_configures_with_the_asked_flags_and_drops_the_stale_wheel(clean_env, monkeypatch):
    cache = clean_env / "cache"
    _fake_converter(llamacpp.sdist_dir(cache) / "vendor" / "llama.cpp")
    llamacpp.wheel_dir(cache).mkdir(parents=True)
    (llamacpp.wheel_dir(cache) / f"{llamacpp.SDIST}-py3-none-linux_x86_64.whl").write_bytes(b"old libraries")
    calls: list[list[str]] = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if "--build" in cmd:
            _fake_tools(llamacpp.build_dir(cache) / "bin")

    monkeypatch.setattr(llamacpp, "_run", run)
    monkeypatch.setenv("QUANTKIT_LLAMA_PORTABLE", "1")
    llamacpp.build_tools(cache)
    configure = calls[0]
    assert configure[:2] == ["cmake", "-S"] and set(llamacpp.extra_cmake_flags(cache)) <= set(configure)
    assert "-DGGML_NATIVE=OFF" in configure and not llamacpp.wheel_dir(cache).exists()


def test_cache_is_reused_only_when_configured_as_asked(clean_env, monkeypatch):
    cache = _fake_cache(clean_env / "cache")
    monkeypatch.setenv("QUANTKIT_LLAMA_PORTABLE", "1")
    with pytest.raises(EngineUnavailable):  # a native build must not pass for a portable one
        llamacpp.find_toolchain()
    lines = [f"CMAKE_HOME_DIRECTORY:INTERNAL={llamacpp.sdist_dir(cache)}/vendor/llama.cpp"]
    lines += [f"{k}:BOOL={v}" for k, v in (f[2:].split("=") for f in llamacpp.PORTABLE_FLAGS)]
    lines.append(f"GGML_BACKEND_DIR:PATH={llamacpp.build_dir(cache) / 'bin'}")
    (llamacpp.build_dir(cache) / "CMakeCache.txt").write_text("\n".join(lines) + "\n")
    assert llamacpp.find_toolchain().tools_from.startswith("cache")
    monkeypatch.delenv("QUANTKIT_LLAMA_PORTABLE")
    assert llamacpp.find_toolchain().tools_from.startswith("cache")  # a portable build serves anyone


def test_vendored_llama_cpp_knows_the_portable_options():
    """cmake ignores an unknown -D option silently: the pinned tree must define each one."""
    cmake = llamacpp.sdist_dir() / "vendor" / "llama.cpp" / "ggml" / "CMakeLists.txt"
    if not cmake.is_file():
        pytest.skip(f"no llama.cpp sources in {cmake.parent.parent}: run `{llamacpp.BUILD_COMMAND}`")
    text = cmake.read_text()
    for flag in (*llamacpp.PORTABLE_FLAGS, *llamacpp.CUDA_FLAGS, "-DGGML_BACKEND_DIR="):
        name = flag[2:].split("=")[0]
        assert re.search(rf"(option|set)\({name}\b", text), name


def test_backend_modules_stay_out_of_the_wheel(tmp_path):
    """A GGML_BACKEND_DL build loads libggml-cpu-*.so / libggml-cuda.so from its bin/ at run time."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("libggml-base.so.0", "libggml.so.0", "libllama.so.0", "libggml-cuda.so", "libggml-cpu-haswell.so",
                 "libggml-cpu-x64.so"):
        (bin_dir / name).write_bytes(b"ELF")
    for name in ("libggml-base.so", "libggml.so", "libllama.so"):
        (bin_dir / name).symlink_to(name + ".0")
    names = [p.name for p in llamacpp._shared_libs(bin_dir)]
    assert names == ["libggml-base.so", "libggml-base.so.0", "libggml.so", "libggml.so.0", "libllama.so",
                     "libllama.so.0"]
    (bin_dir / "libggml-cuda.so.0").write_bytes(b"ELF")  # a build without GGML_BACKEND_DL links it
    assert "libggml-cuda.so" in [p.name for p in llamacpp._shared_libs(bin_dir)]


def test_doctor_names_the_cpu_backend_chosen_at_run_time():
    rows = llamacpp._cpu_backend_rows({"x64": 1, "sse42": 5, "haswell": 40, "skylakex": 0})
    assert len(rows) == 1 and rows[0].ok and rows[0].detail.startswith("haswell, chosen at run time")
    assert "3 of 4 variants" in rows[0].detail and "skylakex" not in rows[0].detail
    assert llamacpp._cpu_backend_rows({}) == []
    assert not llamacpp._cpu_backend_rows({"skylakex": 0})[0].ok
