# Two commands for a newcomer: `make run` (the demo) and `make test` (everything).
# Both create .venv themselves; `make test` also installs the system tools the tests
# run for real (promtool, Prometheus and Redis, from Debian's packages; OpenBao comes
# from PyPI with the test extra).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Debian packages the tests need, as "command:package" pairs.
TEST_TOOLS := promtool:prometheus prometheus:prometheus redis-server:redis-server redis-cli:redis-tools
BENCH_TOOLS := nginx:nginx wrk:wrk taskset:util-linux redis-server:redis-server valgrind:valgrind

.PHONY: run test lint typecheck unit tools bench soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { apt-get update && apt-get install -y python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.run-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[fast]'
	touch $@

$(VENV)/.test-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[fast,test]'
	touch $@

run: $(VENV)/.run-deps
	$(BIN)/invoice-proxy demo

# Install only what is missing: apt-get update once, then every missing package.
define apt_missing
	@missing=""; for pair in $(1); do cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  for svc in $$missing; do systemctl stop $$svc 2>/dev/null || service $$svc stop >/dev/null 2>&1 || true; done; \
	fi
endef

tools:
	$(call apt_missing,$(TEST_TOOLS))

lint: $(VENV)/.test-deps
	$(BIN)/ruff check proxy tests bench deploy
	$(BIN)/ruff format --check proxy tests bench deploy

typecheck: $(VENV)/.test-deps
	$(BIN)/mypy

unit: $(VENV)/.test-deps tools
	$(BIN)/pytest -q

test: lint typecheck unit

$(VENV)/.bench-deps: pyproject.toml $(VENV)/.test-deps
	$(BIN)/pip install -q -e '.[fast,test,bench]'
	touch $@

bench: $(VENV)/.bench-deps
	$(call apt_missing,$(BENCH_TOOLS))
	$(BIN)/python -m bench.run

soak: $(VENV)/.test-deps
	$(BIN)/python -m bench.soak

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
