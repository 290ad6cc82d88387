# Two entry points for a fresh machine: `make run` and `make test`.
# Both create (or reuse) the virtual environment in $(VENV) and install the project into it.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.waferwatch-installed
DATA ?= ../shared/datasets/dacon-semiconductor
RUN_DIR ?= runs/demo

.PHONY: install run test faults lint bench clean services browser

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,fast-png]' || { \
		echo "pywuffs (the fast-png extra) did not build; is a C++ compiler installed? PNGs decode with libspng instead (about 1 ms more CPU per image)"; \
		$(PY) -m pip install --quiet -e '.[test]'; }
	touch $(STAMP)

install: $(STAMP)

# The demo's settings land in $(RUN_DIR)/.env: `$(VENV)/bin/waferwatch --workdir $(RUN_DIR) status` and the
# other commands it prints at the end read them. Exits non-zero when not every image was scored in time.
run: $(STAMP)
	$(VENV)/bin/waferwatch demo --data $(DATA) --workdir $(RUN_DIR)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The tests need PostgreSQL and Redis on 127.0.0.1 (started here if down) and Chromium for the HTML report.
services:
	@pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no

browser:
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium could not be installed: the HTML report screenshot test will be skipped"

test: $(STAMP) lint services browser
	$(PY) -m pytest

# The fault-injection suite with its long variants (the `faults_long` marker, which `make test` skips).
faults: $(STAMP) services
	$(PY) -m pytest tests/faults -m "faults_long or not faults_long"

bench: $(STAMP)
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
