#!/usr/bin/env bash
# `make container-test`: build the runtime image for real, run it the way production does (read-only
# root filesystem, non-root, its HEALTHCHECK), call it from the host, then bring up the compose
# stack (convserve + Prometheus) and check that Prometheus scrapes the server.
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
# Environment: VENV (default .venv), ENGINE=docker|podman (default: docker if `docker info`
# succeeds, else podman), KEEP=1 leaves the containers running for a look.
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=${VENV:-.venv}
BIN=$VENV/bin
WORK=build/container-test
PROJECT=convserve-ct
CONTAINER=convserve-ct-server
IMAGE=localhost/convserve:container-test
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
        for c in "$CONTAINER" $(compose_containers); do
            echo "--- logs of $c (last 30 lines)" >&2
            "$ENGINE" logs --tail 30 "$c" >&2 2>&1
        done
    fi
    if [[ ${KEEP:-0} != 1 && -n ${ENGINE:-} ]]; then
        "$ENGINE" rm -f "$CONTAINER" >>"$LOG" 2>&1
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

# The image a compose service names, as podman stores an unqualified name from a registry.
compose_image() {
    "$BIN/python" -c 'import sys, yaml; print(yaml.safe_load(open("docker-compose.yml"))["services"][sys.argv[1]]["image"])' "$1"
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

build_image() {
    local old
    old=$("$ENGINE" image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
    local args=(build -f deploy/docker/Dockerfile --target runtime --build-arg MODELS_FROM=context
        --build-arg "MODELS_DIR=$WORK/models" -t "$IMAGE" .)
    [[ $ENGINE == podman ]] && args=(build --format docker --pull=never "${args[@]:1}")
    "$ENGINE" "${args[@]}" >"$TMP/build.log" 2>&1 || {
        tail -n 40 "$TMP/build.log" >&2
        fail "$ENGINE build"
    }
    drop_replaced "$old" "$IMAGE"
    [[ $("$ENGINE" image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE") == *convserve\ health* ]] ||
        fail "the image has no HEALTHCHECK"
    echo "$IMAGE: $("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
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

stop_server() {  # SIGTERM: drain, then exit 0
    "$ENGINE" stop -t 30 "$CONTAINER" >>"$LOG" 2>&1
    local code
    code=$("$ENGINE" inspect --format '{{.State.ExitCode}}' "$CONTAINER")
    [[ $code == 0 ]] || fail "the server exited with $code on SIGTERM"
    "$ENGINE" rm "$CONTAINER" >>"$LOG" 2>&1
}

compose_up() {
    read -r c_http c_grpc c_metrics c_prometheus <<<"$(free_ports 4)"
    export CONVSERVE_IMAGE=$IMAGE HTTP_PORT=$c_http GRPC_PORT=$c_grpc METRICS_PORT=$c_metrics \
        PROMETHEUS_PORT=$c_prometheus
    compose up -d --no-build convserve prometheus >>"$LOG" 2>&1 || fail "compose up"
    wait_ready "$c_grpc"
}

check_compose() {
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
"$ENGINE" rm -f "$CONTAINER" >>"$LOG" 2>&1 || true
compose down -v >>"$LOG" 2>&1 || true
if [[ $ENGINE == podman ]]; then
    step "base image python:3.11-slim (debootstrap, or reused)" env ENGINE=podman deploy/docker/base-image.sh
    step "Prometheus stand-in image (Debian's prometheus)" build_prometheus_standin
fi
step "train models on the host (--quick, or reused)" train_models
step "build the runtime image (MODELS_FROM=context)" build_image
step "image contents: the server only" image_holds_only_the_server
step "run it: read-only, non-root; wait for readiness" run_server
step "check: classify, models, HTTP, metrics, healthcheck" check_server
step "stop (SIGTERM, exit 0)" stop_server
step "compose up convserve prometheus" compose_up
step "check: classify, healthcheck, Prometheus scrapes" check_compose
compose_down() { compose down -v >>"$LOG" 2>&1 || fail "compose down -v"; }
if [[ ${KEEP:-0} != 1 ]]; then step "compose down -v" compose_down; fi
