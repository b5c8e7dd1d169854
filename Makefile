# keystile: `make run` serves on an embedded PostgreSQL; `make test` runs the whole suite.
# Both create .venv and install the package on first use; nothing but Python 3.11+ and make needed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
PROTOC_GEN_ES_VERSION := 2.17.0
PROTOC_GEN_ES := .tools/node_modules/.bin/protoc-gen-es
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "keystile needs Python 3.11 or newer (set PYTHON=...)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

.PHONY: install
install: $(STAMP) ## create .venv and install keystile with its development tools

.PHONY: run
run: $(STAMP) ## serve on 127.0.0.1:50051 with an embedded PostgreSQL in ./.keystile
	@# First start only: mint an admin key and print it once (with a grpcurl line that uses it).
	@if [ -z "$$KEYSTILE_DATABASE_URL" ]; then $(BIN)/keystile bootstrap --if-missing; fi
	$(BIN)/keystile serve

.PHONY: migrate
migrate: $(STAMP) ## apply database migrations (KEYSTILE_DATABASE_URL, or the embedded database)
	$(BIN)/keystile migrate

.PHONY: test
test: $(STAMP) ## run the whole test suite (embedded PostgreSQL, or KEYSTILE_TEST_DATABASE_URL)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

.PHONY: bench
bench: $(STAMP) ## benchmark scenario (< 2 min): writes bench/results/latest.json and latest.png
	$(BIN)/python bench/run.py

.PHONY: chaos
chaos: $(STAMP) ## faults and abuse at full scale (~8 min): writes bench/results/chaos.json
	$(BIN)/python bench/chaos.py

$(BUF):
	mkdir -p .tools
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

$(PROTOC_GEN_ES):
	mkdir -p .tools
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/protoc-gen-es@$(PROTOC_GEN_ES_VERSION)

.PHONY: clients
clients: $(STAMP) $(BUF) $(PROTOC_GEN_ES) ## generate Go, TypeScript and Java clients into gen/ (buf.gen.yaml)
	@command -v protoc-gen-go >/dev/null && command -v grpc_java_plugin >/dev/null || $(MAKE) client-plugins
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BUF) generate

.PHONY: client-plugins
client-plugins: ## install protoc-gen-go and grpc-java's stub plugin from Debian (root, apt-get)
	apt-get install -y -q golang-goprotobuf-dev protobuf-compiler-grpc-java-plugin

.PHONY: proto
proto: $(STAMP) ## regenerate client/keystile/v1 from proto/
	$(BIN)/python tools/genproto.py

.PHONY: lint
lint: $(STAMP) $(BUF) ## buf lint, buf format, buf breaking, ruff, mypy --strict
	$(BUF) lint
	$(BUF) format --diff --exit-code
	@# The contract only grows: the working tree's proto against the last commit's (FILE rules).
	$(BUF) breaking --against '.git#ref=HEAD'
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

.PHONY: fmt
fmt: $(STAMP) $(BUF) ## format proto and Python in place
	$(BUF) format -w
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

.PHONY: clean
clean: ## remove .venv, tools and build output (keeps ./.keystile data)
	rm -rf $(VENV) .tools build dist gen *.egg-info client/*.egg-info
