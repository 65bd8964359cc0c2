#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU and no network.
#
#   bench/gpu_check.sh [MODEL_REPOSITORY] [WHEELHOUSE]
#
# Installs convserve with --no-deps into the current Python (whose onnxruntime-gpu, grpcio,
# protobuf, numpy, pydantic-settings, aiohttp, prometheus-client and Pillow are already there, or
# come from WHEELHOUSE with --no-index), preloads pip-installed CUDA libraries when present, checks
# that onnxruntime offers CUDA, starts the server with the CUDA provider required, checks that
# every model really got CUDAExecutionProvider, then runs the bench suite (which also measures
# onnxruntime in-process) and leaves its figures in bench-results/gpu-suite.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
REPOSITORY=${1:-models}
WHEELHOUSE=${2:-}
PYTHON=${PYTHON:-python3}

if [ -n "$WHEELHOUSE" ]; then
    "$PYTHON" -m pip install --no-index --find-links "$WHEELHOUSE" -e . >/dev/null
else
    "$PYTHON" -m pip install --no-deps --no-build-isolation -e . >/dev/null
fi

"$PYTHON" - <<'PY'
import onnxruntime as ort
providers = ort.get_available_providers()
print("onnxruntime", ort.__version__, "providers:", providers)
if "CUDAExecutionProvider" not in providers:
    raise SystemExit("CUDAExecutionProvider is not available in this onnxruntime: nothing to check")
if hasattr(ort, "preload_dlls"):
    try:
        ort.preload_dlls()  # pip-installed CUDA/cuDNN, when present
    except Exception as exc:  # system CUDA libraries are used instead
        print("preload_dlls:", exc)
PY

export CONVSERVE_PROVIDERS='["CUDAExecutionProvider","CPUExecutionProvider"]'
export CONVSERVE_REQUIRE_GPU=1
PORT=${PORT:-8501}
LOG=$(mktemp)
"$PYTHON" -m service serve --model-repository "$REPOSITORY" --grpc-port "$PORT" --http-port $((PORT + 1)) \
    --metrics-port -1 >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    if "$PYTHON" -m service health --target "127.0.0.1:$PORT" >/dev/null 2>&1; then break; fi
    if ! kill -0 $SERVER 2>/dev/null; then cat "$LOG"; exit 1; fi
    sleep 0.5
done
"$PYTHON" -m service models --target "127.0.0.1:$PORT" --json | "$PYTHON" -c '
import json, sys
models = json.load(sys.stdin)
models = models.get("models", models) if isinstance(models, dict) else models
bad = [m for m in models for v in m.get("versions", []) if v.get("provider") != "CUDAExecutionProvider"]
print("providers:", {m["name"]: [v.get("provider") for v in m.get("versions", [])] for m in models})
sys.exit(1 if bad or not models else 0)
'
kill $SERVER; wait $SERVER || true; trap - EXIT

mkdir -p bench-results
# The suite starts its own servers; with the CUDA provider asked for in their environment.
"$PYTHON" -m bench --suite --model-repository "$REPOSITORY" \
    --json bench-results/gpu-suite.json --markdown bench-results/gpu-suite.md
