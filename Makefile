# Entry points. Every target installs what it needs first (a .venv with the
# locked dependencies, the Temporal CLI, grpcurl and buf among them), so a
# fresh clone with only python3 can run any of them.

VENV        := .venv
BIN         := $(CURDIR)/$(VENV)/bin
PY          := $(BIN)/python
UV_VERSION  := 0.13.8
STAMP       := $(VENV)/.synced

# Where `make run` / `make temporal` keep Temporal's state: orders survive a restart.
TEMPORAL_DB ?= .temporal/orders.db
TEMPORAL_PORT ?= 7233
TEMPORAL_UI_PORT ?= 8233
# The dev server's SQLite: a write-ahead log, synced at checkpoints only: about
# 1.7x the orders per second of SQLite's defaults (make bench). A crash of the
# dev server loses nothing; an OS crash or power cut can lose the last moments'
# transactions (docs/performance/README.md). `make run TEMPORAL_TUNING=` for the defaults.
TEMPORAL_TUNING ?= --sqlite-pragma journal_mode=wal --sqlite-pragma synchronous=normal

# The keys every payload is encrypted with (docs/decisions/0017). Without ORDER_KEYS_FILE
# (or ORDER_PAYLOAD_KEYS and ORDER_CUSTOMER_ID_KEY), a development keys file is made on the
# first start and kept: the orders in $(TEMPORAL_DB) cannot be read without it.
DEV_KEYS_FILE ?= .temporal/keys.toml
KEYS_FILE = $(or $(ORDER_KEYS_FILE),$(DEV_KEYS_FILE))
KEYS_FLAGS = $(if $(ORDER_PAYLOAD_KEYS),,--keys-file $(KEYS_FILE))
DEV_KEYS = $(if $(ORDER_KEYS_FILE)$(ORDER_PAYLOAD_KEYS),,$(DEV_KEYS_FILE))
# The codec server: the Web UI (and `temporal --codec-endpoint`) decrypt orders through it.
CODEC_PORT ?= 8081
CODEC_URL = http://localhost:$(CODEC_PORT)
UI_ORIGINS = http://localhost:$(TEMPORAL_UI_PORT),http://127.0.0.1:$(TEMPORAL_UI_PORT)

# The custom search attributes ListOrders filters on (workflows/search_attributes.py).
SEARCH_ATTRIBUTES = $(shell $(PY) -m workflows.search_attributes)

export PATH := $(BIN):$(PATH)
SHELL := /bin/bash

.PHONY: install run temporal worker server codec proto docs lint test test-faults mutate bench dist clean

install: $(STAMP)

$(STAMP): pyproject.toml uv.lock
	@test -x $(BIN)/uv || { python3 -m venv $(VENV) && $(BIN)/pip install --quiet uv==$(UV_VERSION); }
	$(BIN)/uv sync --locked --quiet
	@touch $@

$(DEV_KEYS_FILE): | $(STAMP)
	@$(PY) -m infra.keys new $@
	@echo "Made a development key in $@: keep it, the orders it encrypts need it."

## run: the whole system (Temporal dev server + worker + gRPC server + codec server); Ctrl-C
## stops it all.
# Background jobs of a non-interactive shell ignore SIGINT, so Ctrl-C reaches
# only this shell; its trap stops the server, worker and codec server first, Temporal last.
run: install $(DEV_KEYS)
	@mkdir -p $(dir $(TEMPORAL_DB))
	@set -u; \
	temporal server start-dev --db-filename $(TEMPORAL_DB) --port $(TEMPORAL_PORT) \
		--ui-port $(TEMPORAL_UI_PORT) --ui-codec-endpoint $(CODEC_URL) \
		--log-level error $(TEMPORAL_TUNING) $(SEARCH_ATTRIBUTES) & temporal_pid=$$!; \
	$(PY) -m worker --temporal-address localhost:$(TEMPORAL_PORT) $(KEYS_FLAGS) & worker_pid=$$!; \
	$(PY) -m server --temporal-address localhost:$(TEMPORAL_PORT) $(KEYS_FLAGS) & server_pid=$$!; \
	$(PY) -m server.codec_server --port $(CODEC_PORT) --allowed-origins $(UI_ORIGINS) \
		$(KEYS_FLAGS) & codec_pid=$$!; \
	stop() { trap - INT TERM; echo; echo "Stopping..."; \
		kill -TERM $$server_pid $$worker_pid $$codec_pid 2>/dev/null; \
		wait $$server_pid $$worker_pid $$codec_pid 2>/dev/null; \
		kill -TERM $$temporal_pid 2>/dev/null; wait $$temporal_pid 2>/dev/null; exit 0; }; \
	trap stop INT TERM; \
	for i in $$(seq 120); do \
		grpcurl -plaintext -d '{"service":"acme.orders.v1.OrderService"}' localhost:$${ORDER_SERVICE_PORT:-50051} \
			grpc.health.v1.Health/Check 2>/dev/null | grep -q '"SERVING"' && break; sleep 0.5; done; \
	echo; \
	echo "  OrderService  localhost:$${ORDER_SERVICE_PORT:-50051}  (grpcurl -plaintext localhost:$${ORDER_SERVICE_PORT:-50051} list)"; \
	echo "  Temporal UI   http://localhost:$(TEMPORAL_UI_PORT)  (orders decrypted by the codec server)"; \
	echo "  Codec server  $(CODEC_URL)  (temporal workflow show --detailed --codec-endpoint $(CODEC_URL) -w order-...)"; \
	echo "  State         $(TEMPORAL_DB)   Keys  $(if $(ORDER_PAYLOAD_KEYS),ORDER_PAYLOAD_KEYS,$(KEYS_FILE))   Emails  $${ORDER_SMTP_HOST:-outbox/}"; \
	echo "  The grpcurl walkthrough (docs/walkthrough.md) works from here. Ctrl-C stops everything."; \
	echo; \
	wait -n; echo "A component exited; stopping the rest."; stop

## temporal: only the Temporal dev server, state in $(TEMPORAL_DB), UI on $(TEMPORAL_UI_PORT)
## (decoding with the codec server of `make codec`).
temporal: install
	@mkdir -p $(dir $(TEMPORAL_DB))
	temporal server start-dev --db-filename $(TEMPORAL_DB) $(TEMPORAL_TUNING) \
		--port $(TEMPORAL_PORT) --ui-port $(TEMPORAL_UI_PORT) --ui-codec-endpoint $(CODEC_URL) \
		--log-level warn $(SEARCH_ATTRIBUTES)

## worker: only the Temporal worker (workflow + activities).
worker: install $(DEV_KEYS)
	$(PY) -m worker $(KEYS_FLAGS)

## server: only the gRPC server, on port 50051 unless ORDER_SERVICE_PORT says otherwise.
server: install $(DEV_KEYS)
	$(PY) -m server $(KEYS_FLAGS)

## codec: only the codec server, on $(CODEC_URL), for the Web UI and `temporal --codec-endpoint`.
codec: install $(DEV_KEYS)
	$(PY) -m server.codec_server --port $(CODEC_PORT) --allowed-origins $(UI_ORIGINS) $(KEYS_FLAGS)

## proto: regenerate generated/ from protos/.
proto: install
	$(PY) protos/generate.py

## docs: regenerate docs/configuration.md from the settings models.
docs: install
	$(PY) -m tests.support.docs

## lint: ruff, mypy, buf lint, and buf breaking against the API's previous version on main.
# That version is the last committed one that differs from the .proto files as they
# are: HEAD while one has uncommitted changes, else (a clean tree, as CI's fresh
# clone) the parent of the last commit that changed one. buf reads it from .git,
# offline; the rules are buf.yaml's (protos/breaking.py, docs/decisions/0018).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/buf lint
	$(PY) protos/breaking.py

## test: the whole suite, against a real Temporal dev server and real gRPC servers it starts itself.
test: install
	$(PY) -m pytest --ignore=tests/faults $(ARGS)

## test-faults: the slower proofs: processes killed for real, load with invariants.
test-faults: install
	$(PY) -m pytest tests/faults $(ARGS)

## mutate: each money or cancellation rule broken on purpose, alone, in a copy of the repo;
## the fast tests that guard it must fail every time (tests/mutate.py; a few minutes).
mutate: install
	$(PY) -m tests.mutate $(ARGS)

## bench: the gRPC front against raw Temporal, plain vs tuned dev server, 10,000 parked orders
## (about 10 minutes; ARGS=--quick for a sanity run); writes docs/performance/.
bench: install
	$(PY) -m tests.bench.benchmark --temporal-tuning="$(TEMPORAL_TUNING)" $(ARGS)
	$(PY) -m tests.bench.call_counts
	$(PY) -m tests.bench.no_worker

## dist: the client package for other services (generated code + acme_orders_client), as a wheel
## and an sdist in dist/: acme_orders_api-<version>-py3-none-any.whl (docs/client.md).
DIST_DIR ?= dist
dist: install
	rm -f $(DIST_DIR)/acme_orders_api-*
	$(BIN)/uv build --quiet --out-dir $(DIST_DIR) generated
	@ls -1 $(DIST_DIR)/acme_orders_api-*

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
