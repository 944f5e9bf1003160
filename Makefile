# Two commands matter: `make demo` runs the integration, `make test` tests it.
# Everything installs into .venv/ in this folder; nothing needs Docker or a pre-started server.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
export PYTHONPATH := $(CURDIR)/plugins:$(CURDIR)

.PHONY: install test lint demo reconcile retry-quarantine sandbox crm-db crm-db-stop bench bench-dlt chaos clean lock

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	@touch $@

## Run the test suite (embedded PostgreSQL, or the server in CRM_DATABASE_URL).
test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . || true

## Start the CRM database, the sandbox store (and, later, Airflow). ARGS=--once for one headless pass.
demo: install
	$(BIN)/python -m store_sync.local.demo $(ARGS)

## Compare the CRM with the store (the demo's sandbox and embedded CRM, or AIRFLOW_CONN_STORE_API / CRM_DATABASE_URL / AIRFLOW_CONN_CRM_DB); exit 1 on differences.
reconcile: install
	CRM_DATABASE_EMBEDDED=1 $(BIN)/python -m store_sync.crm.reconcile $(ARGS)

## Re-apply the inbox rows the CRM transforms quarantined (ARGS="--id 12 --entity orders"); exit 1 while some remain.
retry-quarantine: install
	CRM_DATABASE_EMBEDDED=1 $(BIN)/python -m store_sync.crm.transform --retry-quarantine $(ARGS)

sandbox: install
	$(BIN)/python -m sandbox serve $(ARGS)

crm-db: install
	$(BIN)/python -m store_sync.crm.database start

crm-db-stop: install
	$(BIN)/python -m store_sync.crm.database stop

bench: install
	$(BIN)/python bench/sandbox_throughput.py $(ARGS)
	$(BIN)/python bench/landing.py --skip-large
	$(BIN)/python bench/freshness.py

## The same first load by this package and by dlt, A/B/A/B (dlt installs into .venv-dlt, benchmark only), e.g. ARGS="--size medium --mode prerendered".
bench-dlt: install
	$(BIN)/python bench/vs_dlt.py $(ARGS)

## The full stack for 10 minutes under changes, bulk edits, store faults, killed tasks and CRM restarts; exit 1 on differences.
chaos: install
	$(BIN)/python bench/chaos.py $(ARGS)

## Re-resolve the pinned requirements from the top-level list in requirements.in.
lock:
	rm -rf .lockvenv && $(PYTHON) -m venv .lockvenv && .lockvenv/bin/pip install -q -r requirements.in
	(head -2 requirements.txt; .lockvenv/bin/pip freeze) > requirements.txt.new && mv requirements.txt.new requirements.txt
	rm -rf .lockvenv

clean:
	-$(BIN)/python -m store_sync.crm.database stop
	rm -rf .data
