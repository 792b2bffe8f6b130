# Plinth: `make run` starts the platform, `make test` runs the suite. Both create .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: venv run demo test test-fast lint format proto proto-check lock bench clean-data

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/uv || { $(BIN)/python -m pip --version > /dev/null 2>&1 || $(BIN)/python -m ensurepip > /dev/null; \
	  $(BIN)/python -m pip install -q --disable-pip-version-check uv==0.13.8; }
	$(BIN)/uv pip install -q --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	@# This machine sets PYTHONDONTWRITEBYTECODE: without compiled bytecode every process
	@# (services, jobs) re-compiles mlflow, sklearn and feast on import, costing seconds each.
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	@rm -f $(VENV)/.installed-* && touch $@

# Serving's native inference data plane is Debian's haproxy (2.6+): installed when missing if
# apt-get may run; without it inference stays on the Python path (serving says so in one line).
run: venv
	@command -v haproxy > /dev/null || { echo "haproxy not found: apt-get install haproxy (serving's inference data plane)"; \
	  { apt-get install -y -q haproxy || sudo -n apt-get install -y -q haproxy; } > /dev/null 2>&1 \
	  || echo "could not install haproxy: inference stays on the Python path"; }
	$(BIN)/python -m plinth_common.devstack

# Walks the golden path on a running platform (`make run` in another terminal). The example
# feature data is generated into the platform's Feast repository first (same machine).
demo: venv
	$(BIN)/python -m examples.feature_repo.generate_data
	$(BIN)/python examples/demo.py

test: venv proto-check lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Lint and types: ruff (format check and rules, configured in pyproject.toml) and mypy.
LINT_PATHS := services lib sdk tests bench tools examples
lint: venv
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/mypy services lib sdk tests bench tools

format: venv
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

test-fast: venv
	$(BIN)/python -m pytest -m "not e2e" $(PYTEST_ARGS)

proto: venv
	$(BIN)/python tools/protogen.py

proto-check: venv
	$(BIN)/python tools/protogen.py --check

# Re-resolve pinned versions after editing requirements.in (needs the package index).
lock: venv
	$(BIN)/uv pip compile requirements.in --python-version 3.11 --no-header -q -o requirements.lock

bench: venv
	$(BIN)/python -m bench.event_path
	$(BIN)/python -m bench.gateway_overhead
	$(BIN)/python -m bench.auth_path
	$(BIN)/python -m bench.inference
	$(BIN)/python -m bench.online_features
	$(BIN)/python -m bench.registry_reads
	$(BIN)/python -m bench.metrics_cost
	$(BIN)/python -m bench.scheduler

clean-data:
	rm -rf .data
