# quantkit in a container; the entrypoint is the `quantkit` command:
#   docker run --rm --gpus all --user "$(id -u):$(id -g)" -e HF_TOKEN \
#     -v "$PWD/recipes:/work/recipes:ro" -v "$PWD/build:/work/build" -v "$HOME/.cache/quantkit-docker:/cache" \
#     quantkit batch recipes/my-model.toml --publish
#
# One file, two flavors, picked by the FLAVOR build arg (BuildKit: the default builder of Docker >= 23;
# Docker 20.10 needs DOCKER_BUILDKIT=1):
#   cuda (default)  docker build -t quantkit .
#                   CUDA base, CUDA torch, llama.cpp built with CUDA, GPTQModel, exllamav2
#   cpu             docker build --build-arg FLAVOR=cpu -t quantkit:cpu .
#                   Debian base, CPU torch, no exllamav2
# Other build args: CUDA_BASE / CPU_BASE (the base images), TORCH_INDEX_CUDA / TORCH_INDEX_CPU (the
# index torch comes from). Wheels in the context's .wheels/ folder are preferred by pip (a CPU torch
# wheel where the PyTorch index is out of reach). A CA bundle pip must trust (a TLS-inspecting proxy):
# --secret id=pip_cert,src=FILE, used while pip runs and never stored in the image.
# HF_TOKEN comes from the environment of `docker run` only.

ARG FLAVOR=cuda
# CUDA 13.0: PyPI's torch 2.13.0 (constraints.txt) is built for it (cuda-toolkit 13.0.x), and
# exllamav2 compiles its kernels against torch with this toolkit's nvcc, which must agree.
ARG CUDA_BASE=nvidia/cuda:13.0.2-devel-ubuntu24.04
ARG CPU_BASE=debian:bookworm-slim

FROM ${CUDA_BASE} AS os-cuda
# PyPI's Linux torch is the CUDA build.
ARG TORCH_INDEX_CUDA=https://pypi.org/simple
ENV QK_TORCH_INDEX=${TORCH_INDEX_CUDA} QK_EXTRAS=gptq,gguf,exl2,ray \
    QUANTKIT_LLAMA_CUDA=1 CUDA_HOME=/usr/local/cuda

FROM ${CPU_BASE} AS os-cpu
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu
ENV QK_TORCH_INDEX=${TORCH_INDEX_CPU} QK_EXTRAS=gptq,gguf,ray QUANTKIT_LLAMA_CUDA=0

# What the dependency and toolchain layers read, so that editing the package rebuilds neither.
FROM scratch AS deps-context
COPY pyproject.toml constraints.txt .wheel[s] /ctx/
FROM scratch AS toolchain-context
COPY quantkit/__init__.py quantkit/errors.py quantkit/toolchain.py /quantkit/

FROM os-${FLAVOR}
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PATH=/opt/venv/bin:$PATH \
    QUANTKIT_CACHE=/opt/quantkit-cache QUANTKIT_LLAMA_PORTABLE=1

# A compiler stays in the image: GPTQModel (CPU and CUDA) and exllamav2 compile kernels on first use.
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential cmake ninja-build ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# torch first, alone, from the flavor's index; then the extras' dependencies at the pinned versions.
# llama-cpp-python is left to the toolchain step, which packs it from its own llama.cpp build.
# pip's cache is a build cache mount: kept between builds, never in the image.
RUN --mount=type=bind,from=deps-context,source=/ctx,target=/tmp/ctx --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip_cert,target=/etc/ssl/certs/ca-certificates.crt \
    python3 -m venv /opt/venv \
    && pip install -q --upgrade pip \
    && pip install -q -c /tmp/ctx/constraints.txt --index-url "$QK_TORCH_INDEX" --find-links /tmp/ctx torch \
    && python -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb"))["project"]; \
extra = p["optional-dependencies"]; reqs = p["dependencies"] + [r for e in sys.argv[2].split(",") for r in extra[e]]; \
print("\n".join(r for r in reqs if not r.startswith("llama-cpp-python")))' /tmp/ctx/pyproject.toml "$QK_EXTRAS" \
        > /tmp/requirements.txt \
    && pip install -q -c /tmp/ctx/constraints.txt --find-links /tmp/ctx -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# llama.cpp tools and bindings, portable (QUANTKIT_LLAMA_PORTABLE: no -march=native, CPU variants
# chosen at run time); the build fails if any compile line still has -march=native. Kept: the
# tools and libraries, the configuration and compile lines (CMakeCache.txt, build.ninja), and
# the converter's sources; gone: objects, the packed wheel, llama.cpp's docs, tests, vocab files.
RUN --mount=type=bind,from=toolchain-context,target=/tmp/qk --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip_cert,target=/etc/ssl/certs/ca-certificates.crt \
    PYTHONPATH=/tmp/qk python -c 'from quantkit.toolchain import build_toolchain; build_toolchain()' \
    && cd "$QUANTKIT_CACHE/llama.cpp/build" \
    && if grep -q -- -march=native build.ninja; then echo "build.ninja targets the build CPU" >&2; exit 1; fi \
    && find . -mindepth 1 -maxdepth 1 ! -name bin ! -name CMakeCache.txt ! -name build.ninja -exec rm -rf {} + \
    && cd "$QUANTKIT_CACHE/src/llama_cpp_python-"*/vendor/llama.cpp \
    && rm -rf docs tests benches examples models/ggml-vocab-* "$QUANTKIT_CACHE/wheels" /tmp/quantkit-*.log

# The package, editable: it reads calibration/ from beside quantkit/. Offline: the build backend
# is the venv's own setuptools.
WORKDIR /opt/quantkit
COPY pyproject.toml README.md constraints.txt ./
COPY quantkit ./quantkit
COPY calibration ./calibration
COPY recipes ./recipes
RUN pip install -q --no-cache-dir --no-build-isolation --no-deps -e . && quantkit --help > /dev/null

# Any --user uid may run it: caches go to /cache (the Hugging Face cache and compiled kernels);
# /cache, HOME and /work (GPTQModel writes logs/ into the working folder) are writable by all,
# sticky like /tmp.
ENV HOME=/home/quantkit XDG_CACHE_HOME=/cache HF_HOME=/cache/huggingface \
    GPTQMODEL_TORCH_EXTENSIONS_DIR=/cache/gptqmodel TRITON_CACHE_DIR=/cache/triton
RUN useradd --uid 10001 --user-group --create-home quantkit \
    && mkdir -p /work/recipes /work/build /cache/huggingface \
    && chown quantkit:quantkit /work/recipes /work/build \
    && chmod 1777 /work /cache /cache/huggingface /home/quantkit
USER quantkit
WORKDIR /work
VOLUME ["/work/recipes", "/work/build", "/cache"]
ENTRYPOINT ["quantkit"]
CMD ["--help"]
