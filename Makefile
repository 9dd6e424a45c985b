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

# The custom search attributes ListOrders filters on (workflows/search_attributes.py).
SEARCH_ATTRIBUTES = $(shell $(PY) -m workflows.search_attributes)

export PATH := $(BIN):$(PATH)
SHELL := /bin/bash

.PHONY: install run temporal worker server proto docs lint test test-faults mutate bench clean

install: $(STAMP)

$(STAMP): pyproject.toml uv.lock
	@test -x $(BIN)/uv || { python3 -m venv $(VENV) && $(BIN)/pip install --quiet uv==$(UV_VERSION); }
	$(BIN)/uv sync --locked --quiet
	@touch $@

## run: the whole system (Temporal dev server + worker + gRPC server); Ctrl-C stops it all.
# Background jobs of a non-interactive shell ignore SIGINT, so Ctrl-C reaches
# only this shell; its trap stops the server and worker first, Temporal last.
run: install
	@mkdir -p $(dir $(TEMPORAL_DB))
	@set -u; \
	temporal server start-dev --db-filename $(TEMPORAL_DB) --port $(TEMPORAL_PORT) \
		--ui-port $(TEMPORAL_UI_PORT) --log-level error $(TEMPORAL_TUNING) $(SEARCH_ATTRIBUTES) & temporal_pid=$$!; \
	$(PY) -m worker --temporal-address localhost:$(TEMPORAL_PORT) & worker_pid=$$!; \
	$(PY) -m server --temporal-address localhost:$(TEMPORAL_PORT) & server_pid=$$!; \
	stop() { trap - INT TERM; echo; echo "Stopping..."; \
		kill -TERM $$server_pid $$worker_pid 2>/dev/null; wait $$server_pid $$worker_pid 2>/dev/null; \
		kill -TERM $$temporal_pid 2>/dev/null; wait $$temporal_pid 2>/dev/null; exit 0; }; \
	trap stop INT TERM; \
	for i in $$(seq 120); do \
		grpcurl -plaintext -d '{"service":"acme.orders.v1.OrderService"}' localhost:$${ORDER_SERVICE_PORT:-50051} \
			grpc.health.v1.Health/Check 2>/dev/null | grep -q '"SERVING"' && break; sleep 0.5; done; \
	echo; \
	echo "  OrderService  localhost:$${ORDER_SERVICE_PORT:-50051}  (grpcurl -plaintext localhost:$${ORDER_SERVICE_PORT:-50051} list)"; \
	echo "  Temporal UI   http://localhost:$(TEMPORAL_UI_PORT)"; \
	echo "  State         $(TEMPORAL_DB)   Emails  $${ORDER_SMTP_HOST:-outbox/}"; \
	echo "  The grpcurl walkthrough (docs/walkthrough.md) works from here. Ctrl-C stops everything."; \
	echo; \
	wait -n; echo "A component exited; stopping the rest."; stop

## temporal: only the Temporal dev server, state in $(TEMPORAL_DB), UI on $(TEMPORAL_UI_PORT).
temporal: install
	@mkdir -p $(dir $(TEMPORAL_DB))
	temporal server start-dev --db-filename $(TEMPORAL_DB) $(TEMPORAL_TUNING) \
		--port $(TEMPORAL_PORT) --ui-port $(TEMPORAL_UI_PORT) --log-level warn $(SEARCH_ATTRIBUTES)

## worker: only the Temporal worker (workflow + activities).
worker: install
	$(PY) -m worker

## server: only the gRPC server, on port 50051 unless ORDER_SERVICE_PORT says otherwise.
server: install
	$(PY) -m server

## proto: regenerate generated/ from protos/.
proto: install
	$(PY) protos/generate.py

## docs: regenerate docs/configuration.md from the settings models.
docs: install
	$(PY) -m tests.support.docs

## lint: ruff, mypy and buf lint.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/buf lint

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

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
