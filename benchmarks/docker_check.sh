#!/usr/bin/env bash
# Build the cpu image from this checkout on a locally made Debian base, then run quantkit in it:
#   doctor; the llama.cpp build flags and the CPU backend ggml picks at run time;
#   batch over the demo recipe plus a broken one, publishing to the local Hub stand-in
#   (quantkit.testing.hub_server, on this machine's loopback): exit 1, the demo built and published,
#   every file on the host volume owned by the caller; publish again: nothing left to upload.
# Prints the image size and the seconds of each step; SUMMARY=FILE also writes them as JSON.
#
#   benchmarks/docker_check.sh      (as the user who should own the outputs, with docker access)
#
# Environment:
#   DOCKER       a client that builds with BuildKit (default docker; Debian's docker.io 20.10
#                client /usr/bin/docker does, a client >= 23 needs the buildx plugin)
#   BASE         the Debian base image (default local/debian:bookworm; made with debootstrap from
#                the mirror apt uses when missing and run as root)
#   TORCH_WHEEL  a CPU torch wheel to build with, where download.pytorch.org is out of reach
#   PIP_CERT     a CA bundle pip must trust inside the build (handed over as a BuildKit secret)
#   MODEL        the SmolLM2 checkpoint to give the demo recipe (default: built, or taken from
#                the test cache, by PY: a python with quantkit's dependencies, .venv/bin/python)
# The Hub stand-in (python -m quantkit.testing.hub_stand_in, standard library only) and the
# summary run on the host with PY too, from this checkout.
#   IMAGE        tag to build (default quantkit:cpu); NO_CACHE=1 builds every layer afresh;
#                KEEP=1 keeps the work folder
set -euo pipefail
cd "$(dirname "$0")/.."
DOCKER=${DOCKER:-docker}
BASE=${BASE:-local/debian:bookworm}
IMAGE=${IMAGE:-quantkit:cpu}
PY=${PY:-.venv/bin/python}
RUN_AS="$(id -u):$(id -g)"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/quantkit-docker.XXXXXX")
HUB_PID=""

die() { echo "docker_check: $*" >&2; exit 2; }
secs() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }'; }
step() { printf '\n== %s\n' "$*"; }

cleanup() {
    [ -n "$HUB_PID" ] && kill "$HUB_PID" 2>/dev/null && wait "$HUB_PID" 2>/dev/null
    if [ "${KEEP:-0}" = 1 ]; then echo "work folder kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# Docker Hub may be out of reach: a minimal Debian made from the packages apt already uses.
make_base() {
    [ "$(id -u)" = 0 ] || die "no image $BASE; make it once as root (this script does, with debootstrap)"
    local mirror rootfs
    mirror=$(grep -hoE '^(URIs:|deb) +https?://[^ ]+' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
        2>/dev/null | awk '{ print $2; exit }')
    rootfs="$WORK/rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "${mirror:-http://deb.debian.org/debian}" >/dev/null
    rm -f "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | "$DOCKER" import - "$BASE" >/dev/null
    rm -rf "$rootfs"
}

docker_build() {
    if "$DOCKER" buildx version >/dev/null 2>&1; then
        "$DOCKER" buildx build --load "$@"
    elif [ "$("$DOCKER" version -f '{{.Client.Version}}' | cut -d. -f1)" -lt 23 ]; then
        DOCKER_BUILDKIT=1 "$DOCKER" build "$@"  # BuildKit built into the 20.10 client and daemon
    else
        die "$DOCKER has no buildx plugin: install it, or set DOCKER to a client older than 23"
    fi
}

build_image() {
    local args=(--build-arg FLAVOR=cpu --build-arg "CPU_BASE=$BASE" -t "$IMAGE")
    if [ -n "${TORCH_WHEEL:-}" ]; then  # preferred by pip over PyPI's CUDA build of the same version
        [ -e ".wheels/$(basename "$TORCH_WHEEL")" ] || { mkdir -p .wheels && cp "$TORCH_WHEEL" .wheels/; }
        args+=(--build-arg TORCH_INDEX_CPU=https://pypi.org/simple)
    fi
    [ -n "${PIP_CERT:-}" ] && args+=(--secret "id=pip_cert,src=$PIP_CERT")
    [ "${NO_CACHE:-0}" = 1 ] && args+=(--no-cache)
    docker_build --progress=plain "${args[@]}" . > "$WORK/build.log" 2>&1 \
        || { tail -40 "$WORK/build.log"; die "image build failed (log above)"; }
}

# The demo recipe reads its model from ../build/models/ beside recipes/: both are volumes.
stage_volumes() {
    local model=${MODEL:-}
    [ -n "$model" ] || model=$("$PY" -c 'from quantkit.testing import smollm2; print(smollm2())' | tail -1)
    mkdir -p "$WORK/build/models"
    cp -r "$model" "$WORK/build/models/smollm2-135m-instruct"
    cp recipes/demo-smollm2.toml "$WORK/recipes/"
    cat > "$WORK/recipes/broken.toml" <<'EOF'
# Broken on purpose: GPTQ has no 5-bit kernels.
[model]
source = "../build/models/smollm2-135m-instruct"
name = "broken-demo"

[[variants]]
format = "gptq"
bits = 5
group_size = 64
EOF
}

start_hub() {
    "$PY" -m quantkit.testing.hub_stand_in --info "$WORK/hub.json" --state "$WORK/hub-state.json" &
    HUB_PID=$!
    for _ in $(seq 100); do [ -s "$WORK/hub.json" ] && break; sleep 0.1; done
    [ -s "$WORK/hub.json" ] || die "the Hub stand-in did not start"
    HF_ENDPOINT=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["url"])' "$WORK/hub.json")
    HF_TOKEN=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["token"])' "$WORK/hub.json")
    export HF_ENDPOINT HF_TOKEN
}

stop_hub() {
    kill "$HUB_PID" && wait "$HUB_PID" || true
    HUB_PID=""
}

# quantkit in the image, as the caller, with the three volumes and the host's loopback (the Hub).
qk() {
    "$DOCKER" run --rm --network host --user "$RUN_AS" -e HF_ENDPOINT -e HF_TOKEN -e HF_HUB_DISABLE_XET=1 \
        -v "$WORK/recipes:/work/recipes:ro" -v "$WORK/build:/work/build" -v "$WORK/cache:/cache" \
        "$IMAGE" "$@"
}

# What llama.cpp in the image was built with, and what ggml loads at run time (tools, bindings).
llama_info() {
    local tree=/opt/quantkit-cache/llama.cpp/build
    local sysinfo='import llama_cpp as l; l.llama_backend_init(); print(l.llama_print_system_info().decode())'
    "$DOCKER" run --rm --user "$RUN_AS" --entrypoint sh "$IMAGE" -c "
        grep -E '^(GGML_NATIVE|GGML_BACKEND_DL|GGML_CPU_ALL_VARIANTS|GGML_CUDA|GGML_BACKEND_DIR):' \\
            $tree/CMakeCache.txt
        echo \"compile lines with -march=native: \$(grep -c -- -march=native $tree/build.ninja)\"
        $tree/bin/llama-perplexity --list-devices 2>&1 | grep load_backend
        python -c '$sysinfo'"
}

main() {
    "$DOCKER" info >/dev/null 2>&1 || die "no Docker daemon answers ($DOCKER info)"
    "$DOCKER" image inspect "$BASE" >/dev/null 2>&1 || { step "base image $BASE (debootstrap)"; make_base; }

    step "build $IMAGE (FLAVOR=cpu on $BASE)"
    local t0=$EPOCHREALTIME
    build_image
    build_s=$(secs "$t0")
    size_mb=$(( $("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE") / 1000000 ))
    echo "built in $build_s s, $size_mb MB"

    mkdir -p "$WORK/recipes" "$WORK/build" "$WORK/cache"  # before any run: Docker would make them, root's
    step "quantkit doctor"
    t0=$EPOCHREALTIME
    qk doctor
    doctor_s=$(secs "$t0")

    step "llama.cpp in the image: build flags, the CPU backend ggml loads (tools, then bindings)"
    t0=$EPOCHREALTIME
    llama_info
    info_s=$(secs "$t0")  # a container that does next to nothing: the cost of starting one

    stage_volumes
    start_hub
    step "quantkit batch demo-smollm2.toml broken.toml --publish (expect exit 1)"
    t0=$EPOCHREALTIME
    set +e
    qk batch recipes/demo-smollm2.toml recipes/broken.toml --publish 2>&1 | tee "$WORK/batch.log"
    batch_rc=${PIPESTATUS[0]}
    set -e
    batch_s=$(secs "$t0")

    step "quantkit publish demo-smollm2.toml again (expect nothing to upload)"
    t0=$EPOCHREALTIME
    set +e
    qk publish recipes/demo-smollm2.toml
    publish_rc=$?
    set -e
    publish_s=$(secs "$t0")
    stop_hub

    step "files on the host volume ($WORK/build)"
    find "$WORK/build/SmolLM2-135M-Instruct" -maxdepth 2 -printf '%u:%g %10s %P\n' | sort -k3
    foreign=$(find "$WORK/build" ! -user "$(id -u)" | wc -l)
    echo "files not owned by $(id -un) ($RUN_AS): $foreign"

    step "summary"
    "$PY" benchmarks/docker_summary.py --work "$WORK" --image "$IMAGE" --size-mb "$size_mb" \
        --build-s "$build_s" --doctor-s "$doctor_s" --info-s "$info_s" --batch-s "$batch_s" --batch-rc "$batch_rc" \
        --publish-s "$publish_s" --publish-rc "$publish_rc" --foreign "$foreign" --json "${SUMMARY:-}"
}

main "$@"
