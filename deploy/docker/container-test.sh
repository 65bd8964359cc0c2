#!/usr/bin/env bash
# `make container-test`: build the runtime image for real, run it the way production does (read-only
# root filesystem, non-root, its HEALTHCHECK), call it from the host; run the image without models
# exactly as deploy/kserve/cluster-serving-runtime.yaml describes it (args, env, ports, readiness
# probe, a repository mounted read-only at /mnt/models) and call it over both ports, and check that
# it never goes ready on an empty repository; then bring up the compose stack as a newcomer would
# (its own convserve:dev image without models, the trainer publishing a quick LeNet-5 into the
# shared volume, Prometheus) and check the server picks the model up and Prometheus scrapes it.
#
# `make container-test-gpu` (container-test.sh gpu): the ORT=gpu EXTRAS=cuda image (about 2.9 GB;
# its dependencies are a layer of their own, so later runs rebuild only convserve's small layer),
# run on this machine's CPU: it serves with the provider it really got reported, and with
# CONVSERVE_REQUIRE_GPU=1 readiness stays NOT_SERVING with each model's reason.
#
# docker where a real engine answers (`docker info`), otherwise podman, installed here when
# missing (root, Debian), with what this kind of host needs: runc (crun fails on cgroup v1 hosts
# like this one), default ulimits capped to the hard limits, a locally built base image
# (base-image.sh, debootstrap: no registry needed), --format docker (keeps HEALTHCHECK),
# `podman healthcheck run` called explicitly (no systemd to run health timers), and a local
# stand-in image for Prometheus (prometheus-standin.Dockerfile). Grafana is not started.
#
# The models are trained on the host (`convserve-train all --quick`, into build/container-test/,
# reused by the next run) and baked in with MODELS_FROM=context: a trainer stage inside the build
# would download torch (several GB). Containers, networks and volumes are removed at the end;
# the images are kept, so a second run reuses the base image and the build cache.
#
# The trainer image's torch: pip's find-links of this host (PIP_FIND_LINKS), when set, are mounted
# into its build, so a local CPU wheel is used; else the CPU index (TORCH_INDEX_URL).
#
# Environment: VENV (default .venv), ENGINE=docker|podman (default: docker if `docker info`
# succeeds, else podman), KEEP=1 leaves the containers running for a look.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODE=${1:-cpu}
[[ $MODE == cpu || $MODE == gpu ]] || {
    echo "usage: $0 [cpu|gpu]" >&2
    exit 2
}

VENV=${VENV:-.venv}
BIN=$VENV/bin
WORK=build/container-test
PROJECT=convserve-ct
CONTAINER=convserve-ct-server
IMAGE=localhost/convserve:container-test
KSERVE_CONTAINER=convserve-ct-kserve
GPU_CONTAINER=convserve-ct-gpu
RUNTIME=deploy/kserve/cluster-serving-runtime.yaml
PODMAN_COMPOSE_VERSION=1.6.0
TMP=$(mktemp -d /tmp/convserve-container-test.XXXXXX)
LOG=$TMP/engine.log

# --- timings and cleanup ---------------------------------------------------------------------------
TIMINGS=()
START=$EPOCHREALTIME
step() {  # step NAME COMMAND...: run, time, record
    local name=$1 t0=$EPOCHREALTIME
    shift
    echo "==> $name"
    "$@"
    TIMINGS+=("$(printf '%-52s %7.1f s' "$name" "$(bc_sub "$EPOCHREALTIME" "$t0")")")
}
bc_sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a - b }'; }
fail() {
    echo "container-test: FAILED: $*" >&2
    exit 1
}
cleanup() {
    local rc=$?
    set +e
    if ((rc != 0)); then
        echo "--- engine log (last 40 lines)" >&2
        tail -n 40 "$LOG" >&2 2>/dev/null
        for c in "$CONTAINER" "$KSERVE_CONTAINER" "$GPU_CONTAINER" $(compose_containers); do
            echo "--- logs of $c (last 30 lines)" >&2
            "$ENGINE" logs --tail 30 "$c" >&2 2>&1
        done
    fi
    if [[ ${KEEP:-0} != 1 && -n ${ENGINE:-} ]]; then
        for c in "$CONTAINER" "$KSERVE_CONTAINER" "$GPU_CONTAINER"; do "$ENGINE" rm -f "$c" >>"$LOG" 2>&1; done
        compose down -v >>"$LOG" 2>&1
    fi
    rm -rf "$TMP"
    if ((${#TIMINGS[@]})); then
        echo "--- timings"
        printf '%s\n' "${TIMINGS[@]}"
        printf '%-52s %7.1f s\n' total "$(bc_sub "$EPOCHREALTIME" "$START")"
    fi
    if ((rc == 0)); then echo "container-test: OK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# --- engine ----------------------------------------------------------------------------------------
if [[ -z ${ENGINE:-} ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker; else ENGINE=podman; fi
fi
compose() {
    if [[ $ENGINE == docker ]]; then
        if docker compose version >/dev/null 2>&1; then
            docker compose -p "$PROJECT" -f docker-compose.yml "$@"
        else
            docker-compose -p "$PROJECT" -f docker-compose.yml "$@"
        fi
    else
        "$BIN/podman-compose" -p "$PROJECT" -f docker-compose.yml "$@"
    fi
}
compose_containers() {  # compose_containers [SERVICE]: ids of this project's containers
    [[ -n ${ENGINE:-} ]] || return 0
    "$ENGINE" ps -aq --filter "label=com.docker.compose.project=$PROJECT" \
        ${1:+--filter "label=com.docker.compose.service=$1"} 2>/dev/null
}
echo "container-test: engine $ENGINE"

install_podman() {
    local packages=(podman runc netavark aardvark-dns iptables debootstrap) missing=() p
    for p in "${packages[@]}"; do
        [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == *"install ok installed"* ]] || missing+=("$p")
    done
    if ((${#missing[@]})); then
        ((EUID == 0)) || fail "podman needs: apt-get install ${missing[*]} (as root)"
        echo "apt-get install ${missing[*]}"
        local apt=(apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${missing[@]}")
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" >>"$LOG" 2>&1 || {
            apt-get -o DPkg::Lock::Timeout=600 update >>"$LOG" 2>&1
            DEBIAN_FRONTEND=noninteractive "${apt[@]}" >>"$LOG" 2>&1
        } || fail "apt-get install ${missing[*]}"
    fi
    if [[ ! -x $BIN/podman-compose ]]; then
        "$BIN/python" -m pip install --quiet "podman-compose==$PODMAN_COMPOSE_VERSION" >>"$LOG" 2>&1 ||
            fail "pip install podman-compose (see $LOG)"
    fi
    # Settings for every podman call here, podman-compose's included; the host's files stay as they are.
    local nofile nproc
    nofile=$(ulimit -Hn)
    [[ $nofile == unlimited ]] && nofile=1048576
    nproc=$(ulimit -Hu)
    [[ $nproc == unlimited || $nproc -gt 32768 ]] && nproc=32768
    cat >"$TMP/containers.conf" <<EOF
[containers]
default_capabilities = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE",
  "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[network]
network_backend = "netavark"
[engine]
runtime = "runc"
EOF
    export CONTAINERS_CONF=$TMP/containers.conf
}

# The image a compose service names, with the defaults of its ${VARIABLE:-default} references.
compose_image() {
    "$BIN/python" -c '
import re, sys, yaml
image = yaml.safe_load(open("docker-compose.yml"))["services"][sys.argv[1]]["image"]
print(re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", image))' "$1"
}
local_tag() {  # local_tag NAME: the tag a local build gets, as the engine resolves the short name
    if [[ $ENGINE == podman ]]; then echo "localhost/$1"; else echo "$1"; fi
}
qualified() {
    local name=$1 first=${1%%/*}
    if [[ $name != */* ]]; then
        echo "docker.io/library/$name"
    elif [[ $first != *.* && $first != *:* && $first != localhost ]]; then
        echo "docker.io/$name"
    else
        echo "$name"
    fi
}

build_prometheus_standin() {
    local image label
    image=$(qualified "$(compose_image prometheus)")
    label=$(podman image inspect --format '{{ index .Config.Labels "convserve.standin" }}' "$image" 2>/dev/null || true)
    if podman image exists "$image" && [[ $label != prometheus ]]; then
        echo "$image: a real image, kept"
        return
    fi
    local old
    old=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
    podman build --format docker --pull=never --label convserve.standin=prometheus \
        -f deploy/docker/prometheus-standin.Dockerfile -t "$image" deploy/docker >>"$LOG" 2>&1 ||
        fail "building the Prometheus stand-in (see the log above)"
    drop_replaced "$old" "$image"
    echo "$image: stand-in (Debian $(podman run --rm --entrypoint /bin/prometheus "$image" --version 2>&1 | head -n 1))"
}

train_models() {
    mkdir -p "$WORK"
    "$BIN/convserve-train" all --quick --missing --no-progress --repository "$WORK/models" \
        --runs "$WORK/runs" >"$TMP/train.log" 2>&1 || {
        tail -n 30 "$TMP/train.log" >&2
        fail "convserve-train all --quick"
    }
    echo "models: $(cd "$WORK/models" && echo */ | tr -d /)"
}

drop_replaced() {  # drop_replaced OLD_ID IMAGE: remove the image a rebuild replaced (the build cache stays)
    local new
    new=$("$ENGINE" image inspect --format '{{.Id}}' "$2" 2>/dev/null || true)
    if [[ -n $1 && $1 != "$new" ]]; then "$ENGINE" rmi "$1" >>"$LOG" 2>&1 || true; fi
}

build() {  # build TAG BUILD_ARGUMENT...: deploy/docker/Dockerfile into TAG, replacing the old image
    local tag=$1 old
    shift
    old=$("$ENGINE" image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
    local args=(build -f deploy/docker/Dockerfile "$@" -t "$tag" .)
    [[ $ENGINE == podman ]] && args=(build --format docker --pull=never "${args[@]:1}")
    "$ENGINE" "${args[@]}" >"$TMP/build.log" 2>&1 || {
        tail -n 40 "$TMP/build.log" >&2
        fail "$ENGINE build $tag"
    }
    drop_replaced "$old" "$tag"
    echo "$tag: $("$ENGINE" image inspect --format '{{.Size}}' "$tag" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
}

has_healthcheck() {
    [[ $("$ENGINE" image inspect --format '{{json .Config.Healthcheck}}' "$1") == *convserve\ health* ]] ||
        fail "the image $1 has no HEALTHCHECK"
}

build_image() {  # the production shape: the models baked in
    build "$IMAGE" --target runtime --build-arg MODELS_FROM=context --build-arg "MODELS_DIR=$WORK/models"
    has_healthcheck "$IMAGE"
}

build_dev_image() {  # the image docker-compose.yml builds: no models (the trainer publishes them)
    DEV_IMAGE=$(local_tag "$(compose_image convserve)")
    build "$DEV_IMAGE" --target runtime --build-arg ORT=cpu --build-arg MODELS_FROM=none
    has_healthcheck "$DEV_IMAGE"
}

build_gpu_image() {  # compose's convserve-gpu: onnxruntime-gpu with CUDA and cuDNN from pip, no models
    GPU_IMAGE=$(local_tag "$(compose_image convserve-gpu)")
    build "$GPU_IMAGE" --target runtime --build-arg ORT=gpu --build-arg EXTRAS=cuda --build-arg MODELS_FROM=none
    has_healthcheck "$GPU_IMAGE"
}

build_trainer_image() {  # compose's trainer: torch on the CPU and convserve-train
    local tag args=(--target trainer) links=${PIP_FIND_LINKS:-}
    tag=$(local_tag "$(compose_image trainer)")
    if [[ $ENGINE == podman && -n $links && $links != *" "* && -d $links ]]; then
        args+=(--build-arg "PIP_FIND_LINKS=$links" --volume "$links:$links:ro")
    else
        args+=(--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu)
    fi
    build "$tag" "${args[@]}"
}

image_holds_only_the_server() {  # no bench, training or tests code in the runtime image
    local found
    found=$("$ENGINE" run --rm --network none --entrypoint python "$IMAGE" -c '
import importlib.metadata, importlib.util
names = ("bench", "training", "tests")
found = [name for name in names if importlib.util.find_spec(name)]
found += [str(f) for f in importlib.metadata.files("convserve") if f.parts[0] in names]
print(" ".join(found))') || fail "$ENGINE run python in $IMAGE"
    [[ -z $found ]] || fail "the server image holds code that is not the server's: $found"
    echo "image: the server only (no bench, training or tests)"
}

free_ports() {  # free_ports N: N free TCP ports on 127.0.0.1
    "$BIN/python" -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

wait_ready() {  # wait_ready GRPC_PORT: readiness from the host (the `convserve health` of the image's HEALTHCHECK)
    local deadline=$((SECONDS + 120))
    until "$BIN/convserve" health --timeout 2 --target "127.0.0.1:$1" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "not SERVING on 127.0.0.1:$1 after 120 s"
        sleep 0.5
    done
}

engine_healthcheck() {  # engine_healthcheck CONTAINER: the image's HEALTHCHECK, run by the engine
    if [[ $ENGINE == podman ]]; then
        podman healthcheck run "$1" >>"$LOG" 2>&1 || fail "podman healthcheck run $1"
    else
        local deadline=$((SECONDS + 120)) status
        while status=$(docker inspect --format '{{.State.Health.Status}}' "$1") && [[ $status != healthy ]]; do
            if [[ $status == unhealthy ]] || ((SECONDS >= deadline)); then fail "docker health of $1: $status"; fi
            sleep 1
        done
    fi
}

classify() {  # classify GRPC_PORT: the example 7 must come back as a 7
    local out
    out=$("$BIN/convserve" classify --json --target "127.0.0.1:$1" examples/digit-7.jpg) || fail "classify"
    "$BIN/python" -c 'import json, sys; r = json.loads(sys.argv[1]); assert r["predictions"][0]["label"] == "7", r' \
        "$out" || fail "classify: $out"
    echo "classify: $out"
}

every_model_ready() {  # every_model_ready GRPC_PORT: each model folder has a READY version
    "$BIN/convserve" models --json --target "127.0.0.1:$1" >"$TMP/models.json" || fail "convserve models"
    "$BIN/python" - "$TMP/models.json" "$WORK/models" <<'EOF' || fail "not every model is ready"
import json, pathlib, sys
served = {m["name"]: [v["state"] for v in m["versions"]] for m in json.load(open(sys.argv[1]))}
wanted = sorted(p.name for p in pathlib.Path(sys.argv[2]).iterdir() if (p / "config.yaml").exists())
missing = [name for name in wanted if not any(s.endswith("READY") for s in served.get(name, []))]
print(f"models ready: {sorted(served)}")
sys.exit(f"not ready: {missing} (served: {served})" if missing else 0)
EOF
}

run_server() {
    read -r http grpc metrics <<<"$(free_ports 3)"
    local args=(run -d --name "$CONTAINER" --read-only --cap-drop=ALL --security-opt=no-new-privileges
        -p "127.0.0.1:$http:8000" -p "127.0.0.1:$grpc:8001" -p "127.0.0.1:$metrics:8002" "$IMAGE")
    # podman mounts tmpfs on /tmp, /var/tmp and /run with --read-only unless told not to: nothing writable.
    [[ $ENGINE == podman ]] && args=(run --read-only-tmpfs=false "${args[@]:1}")
    "$ENGINE" "${args[@]}" >>"$LOG" 2>&1 || fail "$ENGINE run"
    wait_ready "$grpc"
}

check_server() {
    local uid
    uid=$("$ENGINE" exec "$CONTAINER" id -u)
    [[ $uid != 0 ]] || fail "the server runs as root"
    [[ $("$ENGINE" inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$CONTAINER") == true ]] ||
        fail "the root filesystem is writable"
    if "$ENGINE" exec "$CONTAINER" sh -c 'touch /probe || touch /tmp/probe' 2>/dev/null; then
        fail "could write in the container"
    fi
    echo "server: uid $uid, read-only root filesystem (no tmpfs)"
    classify "$grpc"
    every_model_ready "$grpc"
    curl -fsS "http://127.0.0.1:$http/v2/health/ready" >/dev/null || fail "HTTP /v2/health/ready"
    # Read the whole page first: `curl | grep -q` under pipefail fails when grep stops reading early.
    local page
    page=$(curl -fsS "http://127.0.0.1:$metrics/metrics") || fail "the metrics port does not answer"
    grep -q '^convserve_requests_total{' <<<"$page" || fail "no convserve_requests_total on the metrics port"
    engine_healthcheck "$CONTAINER"
    echo "healthcheck: healthy"
}

# --- KServe: the runtime's own description --------------------------------------------------------
kserve_run() {  # kserve_run REPOSITORY: the dev image as the runtime says, REPOSITORY at /mnt/models (read-only)
    local options args ports
    mapfile -t options < <("$BIN/python" deploy/docker/kserve_runtime.py "$RUNTIME" options)
    mapfile -t args < <("$BIN/python" deploy/docker/kserve_runtime.py "$RUNTIME" args)
    read -r -a ports <<<"$("$BIN/python" deploy/docker/kserve_runtime.py "$RUNTIME" ports)"
    read -r probe_path probe_port <<<"$("$BIN/python" deploy/docker/kserve_runtime.py "$RUNTIME" readiness)"
    read -r k_http k_grpc k_metrics <<<"$(free_ports 3)"
    declare -g -A host_port=(["${ports[0]}"]=$k_http ["${ports[1]}"]=$k_grpc ["${ports[2]}"]=$k_metrics)
    local engine_options=()
    # podman mounts tmpfs on /tmp, /var/tmp and /run with --read-only unless told not to
    [[ $ENGINE == podman ]] && engine_options=(--read-only-tmpfs=false)
    "$ENGINE" run -d --name "$KSERVE_CONTAINER" "${engine_options[@]}" "${options[@]}" \
        --volume "$(realpath "$1"):/mnt/models:ro" \
        -p "127.0.0.1:$k_http:${ports[0]}" -p "127.0.0.1:$k_grpc:${ports[1]}" \
        -p "127.0.0.1:$k_metrics:${ports[2]}" \
        "$DEV_IMAGE" "${args[@]}" >>"$LOG" 2>&1 || fail "$ENGINE run (as $RUNTIME describes it)"
    echo "run: ${options[*]} $DEV_IMAGE ${args[*]}"
}

probe_status() {  # the HTTP status of the runtime's readiness probe, as the kubelet sees it
    curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${host_port[$probe_port]}$probe_path" || true
}

kserve_ready() {
    local deadline=$((SECONDS + 120))
    until [[ $(probe_status) == 200 ]]; do
        ((SECONDS < deadline)) || fail "readiness probe $probe_path not 200 after 120 s"
        sleep 0.5
    done
    echo "readiness probe: GET $probe_path on $probe_port -> 200"
}

http_infer() {  # http_infer BASE_URL MODEL: KServe v2 inference over HTTP/REST, a zero tensor
    "$BIN/python" - "$1" "$2" <<'EOF' || fail "HTTP inference on $1"
import json, math, sys, urllib.request

base, model = sys.argv[1], sys.argv[2]
with urllib.request.urlopen(f"{base}/v2/models/{model}", timeout=10) as response:
    (tensor,) = json.load(response)["inputs"]
shape = [1 if size < 0 else size for size in tensor["shape"]]
body = {"inputs": [{"name": tensor["name"], "datatype": tensor["datatype"], "shape": shape,
                    "data": [0] * math.prod(shape)}]}
request = urllib.request.Request(f"{base}/v2/models/{model}/infer", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=30) as response:
    output = json.load(response)["outputs"][0]
assert output["shape"][0] == 1 and len(output["data"]) == math.prod(output["shape"]), output
print(f"HTTP infer {model}: {tensor['name']} {shape} -> {output['name']} {output['shape']}")
EOF
}

kserve_serve() {
    kserve_run "$WORK/models"
    kserve_ready
}

check_kserve() {
    http_infer "http://127.0.0.1:$k_http" lenet5
    classify "$k_grpc"
    every_model_ready "$k_grpc"
    local page
    page=$(curl -fsS "http://127.0.0.1:$k_metrics/metrics") || fail "the runtime's metrics port does not answer"
    grep -q '^convserve_requests_total{.*model="lenet5"' <<<"$page" || fail "no lenet5 requests on the metrics port"
    echo "metrics: convserve_requests_total on the port the runtime advertises"
}

stop_container() {  # stop_container NAME: SIGTERM, drain, exit 0
    "$ENGINE" stop -t 30 "$1" >>"$LOG" 2>&1
    local code
    code=$("$ENGINE" inspect --format '{{.State.ExitCode}}' "$1")
    [[ $code == 0 ]] || fail "$1 exited with $code on SIGTERM"
    "$ENGINE" rm "$1" >>"$LOG" 2>&1
}

kserve_empty_repository() {  # a download that brought nothing: alive, never ready
    mkdir -p "$TMP/empty"
    kserve_run "$TMP/empty"
    local deadline=$((SECONDS + 60))
    until curl -fsS "http://127.0.0.1:$k_http/v2/health/live" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "not live after 60 s"
        sleep 0.5
    done
    sleep 2 # loading is over at once: readiness must stay down, not merely be late
    [[ $(probe_status) == 503 ]] || fail "an empty repository answers $(probe_status) on $probe_path"
    # The whole log, then grep: with pipefail, `logs | grep -q` fails when grep stops reading early.
    local logs
    deadline=$((SECONDS + 30))
    until logs=$("$ENGINE" logs "$KSERVE_CONTAINER" 2>&1) && grep -q "min_models: 0 model(s) ready" <<<"$logs"; do
        ((SECONDS < deadline)) || fail "no min_models log"
        sleep 0.5
    done
    echo "empty repository: live, readiness probe 503 (min_models)"
    stop_container "$KSERVE_CONTAINER"
}

# --- the GPU image on this machine's CPU -------------------------------------------------------------
gpu_run() {  # gpu_run [ENV=VALUE...]: the GPU image, the repository mounted read-only at /models
    read -r g_http g_grpc <<<"$(free_ports 2)"
    local options=(--read-only --cap-drop=ALL --security-opt=no-new-privileges) variable
    [[ $ENGINE == podman ]] && options+=(--read-only-tmpfs=false)
    for variable in "$@"; do options+=(--env "$variable"); done
    "$ENGINE" run -d --name "$GPU_CONTAINER" "${options[@]}" --volume "$(realpath "$WORK/models"):/models:ro" \
        -p "127.0.0.1:$g_http:8000" -p "127.0.0.1:$g_grpc:8001" "$GPU_IMAGE" >>"$LOG" 2>&1 ||
        fail "$ENGINE run $GPU_IMAGE"
}

gpu_serves_on_the_cpu() {
    gpu_run
    wait_ready "$g_grpc"
    classify "$g_grpc"
    "$BIN/convserve" models --json --target "127.0.0.1:$g_grpc" >"$TMP/models.json" || fail "convserve models"
    "$BIN/python" - "$TMP/models.json" <<'EOF' || fail "the GPU image does not report the CPU provider"
import json, sys
versions = {f"{m['name']}/{v['version']}": v for m in json.load(open(sys.argv[1])) for v in m["versions"]}
assert versions, "no models"
for name, v in sorted(versions.items()):
    assert v["state"] == "READY" and v["provider"] == "CPUExecutionProvider", (name, v)
print(f"providers: {sorted({v['provider'] for v in versions.values()})} for {sorted(versions)}")
EOF
    stop_container "$GPU_CONTAINER"
}

gpu_required() {  # CONVSERVE_REQUIRE_GPU=1 without a GPU: never ready, each model says why
    gpu_run CONVSERVE_REQUIRE_GPU=1
    local deadline=$((SECONDS + 120))
    until "$BIN/convserve" health --service liveness --timeout 2 --target "127.0.0.1:$g_grpc" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "not live after 120 s"
        sleep 0.5
    done
    "$BIN/python" - "$BIN/convserve" "127.0.0.1:$g_grpc" "$WORK/models" <<'EOF' || fail "require_gpu"
import json, pathlib, subprocess, sys, time

convserve, target, repository = sys.argv[1:]
wanted = sorted(p.name for p in pathlib.Path(repository).iterdir() if (p / "config.yaml").exists())
deadline = time.monotonic() + 120
while True:  # until every model's versions are past loading
    listed = subprocess.run([convserve, "models", "--json", "--target", target], capture_output=True, text=True)
    states = {m["name"]: m["versions"] for m in json.loads(listed.stdout)} if listed.returncode == 0 else {}
    loading = [v for vs in states.values() for v in vs if v["state"] == "LOADING"]
    if sorted(states) == wanted and not loading:
        break
    assert time.monotonic() < deadline, f"still loading: {states}"
    time.sleep(0.5)
for name, versions in sorted(states.items()):
    for v in versions:
        assert v["state"] == "FAILED" and "require_gpu" in v["reason"], (name, v)
        print(f"{name}/{v['version']}: {v['reason']}")
health = subprocess.run([convserve, "health", "--target", target], capture_output=True, text=True)
assert health.returncode == 1 and health.stdout.strip() == "NOT_SERVING", health
print("readiness: NOT_SERVING")
EOF
    stop_container "$GPU_CONTAINER"
}

# --- compose, as a newcomer runs it -------------------------------------------------------------------
compose_up() {
    read -r c_http c_grpc c_metrics c_prometheus <<<"$(free_ports 4)"
    # compose's own image tags (built above); the trainer publishes a quick LeNet-5 only
    export HTTP_PORT=$c_http GRPC_PORT=$c_grpc METRICS_PORT=$c_metrics PROMETHEUS_PORT=$c_prometheus \
        TRAIN_ARGS="--quick --only lenet5"
    compose up -d --no-build convserve trainer prometheus >>"$LOG" 2>&1 || fail "compose up"
    wait_ready "$c_grpc"
}

check_compose() {
    # the trainer -> volume -> server hand-off: the model appears on the running server
    local deadline=$((SECONDS + 600)) trainer
    until "$BIN/convserve" health --service lenet5 --timeout 2 --target "127.0.0.1:$c_grpc" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "lenet5 not served 600 s after compose up"
        sleep 1
    done
    trainer=$(compose_containers trainer)
    [[ -n $trainer ]] || fail "no compose container for the service trainer"
    "$ENGINE" wait "$trainer" >>"$LOG" 2>&1
    [[ $("$ENGINE" inspect --format '{{.State.ExitCode}}' "$trainer") == 0 ]] || fail "the trainer failed"
    echo "trainer: published lenet5 into the models volume, exit 0; the server picked it up"
    classify "$c_grpc"
    local id
    id=$(compose_containers convserve)
    [[ -n $id ]] || fail "no compose container for the service convserve"
    engine_healthcheck "$id"
    echo "compose healthcheck: healthy"
    # Prometheus scrapes every 15 s (deploy/prometheus/prometheus.yml).
    "$BIN/python" - "http://127.0.0.1:$c_prometheus" <<'EOF' || fail "Prometheus does not scrape convserve"
import json, sys, time, urllib.parse, urllib.request

def query(expr):
    url = f"{sys.argv[1]}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)["data"]["result"]
    except OSError:
        return []

for expr, ok in [
    ('up{job="convserve"}', lambda r: any(s["value"][1] == "1" for s in r)),
    ('convserve_requests_total{job="convserve",model="lenet5",code="OK"}', lambda r: len(r) > 0),
]:
    deadline = time.monotonic() + 90
    while not ok(result := query(expr)):
        if time.monotonic() > deadline:
            sys.exit(f"prometheus: {expr} -> {result}")
        time.sleep(1)
    print(f"prometheus: {expr} -> {[(s['metric'].get('instance'), s['value'][1]) for s in result]}")
EOF
}

# --- the steps ---------------------------------------------------------------------------------------
[[ -x $BIN/convserve ]] || fail "$BIN/convserve is missing: make install"
# Leftovers of an interrupted run.
if [[ $ENGINE == podman ]]; then step "install podman, runc, podman-compose (if missing)" install_podman; fi
for c in "$CONTAINER" "$KSERVE_CONTAINER" "$GPU_CONTAINER"; do "$ENGINE" rm -f "$c" >>"$LOG" 2>&1 || true; done
compose down -v >>"$LOG" 2>&1 || true
if [[ $ENGINE == podman ]]; then
    step "base image python:3.11-slim (debootstrap, or reused)" env ENGINE=podman deploy/docker/base-image.sh
    if [[ $MODE == cpu ]]; then step "Prometheus stand-in image (Debian's prometheus)" build_prometheus_standin; fi
fi
step "train models on the host (--quick, or reused)" train_models
if [[ $MODE == gpu ]]; then
    step "build the GPU image (ORT=gpu EXTRAS=cuda; cached)" build_gpu_image
    step "GPU image on the CPU: serves, reports its provider" gpu_serves_on_the_cpu
    step "CONVSERVE_REQUIRE_GPU=1: NOT_SERVING, each reason" gpu_required
    exit 0
fi
step "build the runtime image (MODELS_FROM=context)" build_image
step "image contents: the server only" image_holds_only_the_server
step "run it: read-only, non-root; wait for readiness" run_server
step "check: classify, models, HTTP, metrics, healthcheck" check_server
step "stop (SIGTERM, exit 0)" stop_container "$CONTAINER"
step "build compose's convserve:dev (MODELS_FROM=none)" build_dev_image
step "KServe runtime: its args, env, ports; /mnt/models ro" kserve_serve
step "check: HTTP infer :8080, classify :8081, metrics" check_kserve
step "stop the KServe-style container (SIGTERM, exit 0)" stop_container "$KSERVE_CONTAINER"
step "KServe runtime, empty /mnt/models: never ready" kserve_empty_repository
step "build compose's trainer (torch on the CPU)" build_trainer_image
step "compose up convserve trainer prometheus" compose_up
step "check: trainer -> volume -> server, Prometheus" check_compose
compose_down() { compose down -v >>"$LOG" 2>&1 || fail "compose down -v"; }
if [[ ${KEEP:-0} != 1 ]]; then step "compose down -v" compose_down; fi
