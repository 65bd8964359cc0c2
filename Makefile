# convserve: `make serve` and `make test` are all a newcomer needs; both set up .venv themselves.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODELS ?= models
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002

# onnxruntime comes from exactly one extra: `gpu` (onnxruntime-gpu, runs on the CPU when there is
# no GPU) on Linux x86_64, `cpu` elsewhere. Choose with `make ORT=cpu ...`; EXTRAS=cuda adds
# CUDA and cuDNN from pip for machines without a system CUDA.
ifeq ($(shell uname -sm),Linux x86_64)
ORT ?= gpu
else
ORT ?= cpu
endif
ifeq ($(ORT),gpu)
OTHER_ORT := onnxruntime
else
OTHER_ORT := onnxruntime-gpu
endif
EXTRAS ?=
comma := ,
ALL_EXTRAS := $(ORT),train,dev$(if $(EXTRAS),$(comma)$(EXTRAS))
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(ALL_EXTRAS))

# More `convserve serve` flags for `make serve`, e.g. SERVE_ARGS="--repository-control enabled" to allow
# model load/unload over the network on a local machine (off by default).
SERVE_ARGS ?=

# Models `make serve` trains before serving (fast), and models it trains in the background while
# the first ones are already served (the server picks them up when they are published), TRAIN_JOBS
# at a time (one process and torch thread each).
FOREGROUND_MODELS ?= lenet5
BACKGROUND_MODELS ?= scenes-resnet dcgan captioner captioner-butd
TRAIN_JOBS ?= 2

.PHONY: help install serve test models bench protos lint format clean container-test

help:
	@echo "make serve    set up, train the default models if missing, serve on HTTP $(HTTP_PORT), gRPC $(GRPC_PORT), metrics $(METRICS_PORT)"
	@echo "make test     set up and run the whole test suite"
	@echo "make models   train and publish the default models at full quality (a new version each time)"
	@echo "make bench    the performance suite: convserve vs no-op and naive reference servers (bench-results/)"
	@echo "make soak     100,000 calls at high concurrency on a fresh server: codes, throughput, p99, RSS (not in CI)"
	@echo "make protos   regenerate service/_proto from protos/"
	@echo "make lint     ruff, the import rules, the duplicate-code check, the docs site (mkdocs --strict)"
	@echo "make container-test  build the image, run it read-only and as the KServe runtime, compose up with the trainer (docker, else podman)"
	@echo "make container-test-gpu  build the ORT=gpu EXTRAS=cuda image and check it on the CPU (provider, CONVSERVE_REQUIRE_GPU)"
	@echo "variables: ORT=gpu|cpu (now $(ORT)), EXTRAS=cuda, MODELS=$(MODELS), PYTHON=$(PYTHON)"
	@echo "           SERVE_ARGS='--repository-control enabled' (allow model load/unload for local work)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# onnxruntime and onnxruntime-gpu install the same module: never both.
	@if $(BIN)/python -m pip show --quiet $(OTHER_ORT) >/dev/null 2>&1; then \
		$(BIN)/python -m pip uninstall --yes onnxruntime onnxruntime-gpu; fi
	$(BIN)/python -m pip install --quiet -e '.[$(ALL_EXTRAS)]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

serve: install
	$(BIN)/convserve-train all --missing --only $(FOREGROUND_MODELS) --repository $(MODELS)
	@if [ -n "$(strip $(BACKGROUND_MODELS))" ]; then \
		mkdir -p runs; \
		echo "training $(BACKGROUND_MODELS) in the background (log: runs/background.log)"; \
		$(BIN)/convserve-train all --missing --no-progress --only $(BACKGROUND_MODELS) --jobs $(TRAIN_JOBS) \
			--repository $(MODELS) > runs/background.log 2>&1 & \
	fi
	$(BIN)/convserve serve --model-repository $(MODELS) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) \
		--metrics-port $(METRICS_PORT) $(SERVE_ARGS)

models: install
	$(BIN)/convserve-train all --jobs $(TRAIN_JOBS) --repository $(MODELS)

test: install system-deps
	$(BIN)/python -m pytest --durations=25  # the slowest 25, to keep the run short

# What the tests run besides the dev extra's tools: Debian's prometheus package (prometheus and
# promtool, for tests/deploy), libb64 (for perf_analyzer) and chromium (the web console's browser
# tests drive it with Playwright), installed when missing (as root, else through sudo; Recommends
# left out), and kubectl.
.PHONY: system-deps
system-deps:
	@if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then \
		echo "installing Debian's prometheus (prometheus, promtool) for tests/deploy"; \
		sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$sudo apt-get update -qq \
		&& $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			prometheus >/dev/null; \
	fi
	@if ! /sbin/ldconfig -p | grep -q 'libb64\.so\.0d'; then \
		echo "installing Debian's libb64-0d for perf_analyzer"; \
		sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$sudo apt-get update -qq \
		&& $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			libb64-0d >/dev/null; \
	fi
	@if ! command -v chromium >/dev/null 2>&1; then \
		echo "installing Debian's chromium for tests/console"; \
		sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$sudo apt-get update -qq \
		&& $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium >/dev/null; \
	fi
	@if ! command -v npm >/dev/null 2>&1; then \
		echo "installing Debian's npm for tests/console (it fetches the pinned axe-core)"; \
		sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$sudo apt-get update -qq \
		&& $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			npm >/dev/null; \
	fi
	@command -v kubectl >/dev/null 2>&1 || { \
		echo "kubectl is missing: tests/deploy renders deploy/k8s with kubectl kustomize" >&2; exit 1; }

bench: install
	$(BIN)/convserve-train all --missing --repository $(MODELS)
	@mkdir -p bench-results
	$(BIN)/convserve-bench --suite --model-repository $(MODELS) \
		--json bench-results/suite.json --markdown bench-results/suite.md

SOAK_REQUESTS ?= 100000
.PHONY: soak
soak: install
	$(BIN)/convserve-train all --missing --only $(FOREGROUND_MODELS) --repository $(MODELS)
	@mkdir -p bench-results
	$(BIN)/python tools/soak.py --model-repository $(MODELS) --requests $(SOAK_REQUESTS) \
		--json bench-results/soak.json

protos: install
	$(BIN)/python tools/gen_protos.py

.PHONY: proto-check
# buf breaking (@bufbuild/buf from npm, into the git-ignored build/buf) against the baseline commit.
proto-check: install
	$(BIN)/python -m pytest -q tests/test_proto_contract.py

# ruff; the import rules between packages (pyproject.toml's [tool.importlinter]); copies of code
# beyond tools/duplicate_code_baseline.txt; the documentation site, no broken link or anchor.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-logo
	$(BIN)/python tools/duplicate_code.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site  # --quiet would hide what --strict counts

# Needs root where podman must be installed; see deploy/docker/container-test.sh.
container-test: install
	VENV=$(VENV) deploy/docker/container-test.sh

# The ORT=gpu EXTRAS=cuda image (about 2.9 GB), built and run on the CPU; its dependencies layer is
# cached by the engine, so later runs rebuild only convserve's own layer.
.PHONY: container-test-gpu
container-test-gpu: install
	VENV=$(VENV) deploy/docker/container-test.sh gpu

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .venv-clients .axe-core runs .pytest_cache .ruff_cache .import_linter_cache
