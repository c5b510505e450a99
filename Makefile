# `make run` and `make test` work on a fresh machine: each sets up .venv
# from setup.cfg first (and reinstalls when the sources change).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# `make run` installs only what running needs (no test extras).
RUN_STAMP := $(VENV)/.installed-run
SOURCES := setup.cfg pyproject.toml constraints.txt $(shell find openclaw twisted -name '*.py' 2>/dev/null)

.PHONY: run test lint trial bench bench-data clean upgrade redis-server postgres pgbouncer faketime logrotate

run: $(RUN_STAMP)
	$(BIN)/twistd -n --pidfile= openclaw $(ARGS)

# The whole suite once, under pytest with pytest-twisted: the integration
# tests are trial TestCases, and `make trial` runs the same suite under
# Twisted's own runner (both must pass; once under each in `make test` took
# longer on a slow two-core host than the 15 minutes CI allows: see
# bench/README.rst).  Each
# runner runs them in TEST_JOBS worker processes (pytest-xdist's -n,
# trial's -j; each test gets its own ports and temporary directories): the
# tests mostly wait on processes and timers, so two workers halve the time
# on two cores.  TEST_JOBS=1 runs them in one process.
TEST_JOBS ?= 2
test: $(STAMP) lint redis-server postgres pgbouncer faketime logrotate
	$(BIN)/python -m pytest -n $(TEST_JOBS) $(PYTEST_ARGS)

# Format, lint and strict types (configured in pyproject.toml), before the tests.
lint: $(STAMP)
	$(BIN)/ruff format --check openclaw tests bench twisted
	$(BIN)/ruff check openclaw tests bench twisted
	$(BIN)/mypy

# A tool one test needs, installed when missing and we can (root with
# apt-get: first from the package lists there are, then after updating
# them); without it that test is skipped, and this says how to install it.
# $(call optional_tool,CHECK,PACKAGE,WHAT NEEDS IT)
define optional_tool
	@$(1) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    { DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq $(2) >/dev/null 2>&1 || \
	      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq $(2) >/dev/null 2>&1; }; } || \
	      echo "could not install $(2): $(3) will be skipped"; \
	  else \
	    echo "$(2) is not installed ('sudo apt-get install -y $(2)'): $(3) will be skipped"; \
	  fi; }
endef

# The cluster tests (#18) start their own redis-server on a free port in a
# temporary directory: install it when it is missing and we can, else say how.
redis-server:
	@command -v redis-server >/dev/null || test -x /usr/bin/redis-server || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else \
	    echo "make test needs redis-server for the cluster tests: run 'sudo apt-get install -y redis-server' (or put redis-server on PATH)"; exit 1; \
	  fi; }

# One cluster test runs an instance under libfaketime (its host's clock
# off): installed when missing and we can; without it that test is skipped.
faketime:
	$(call optional_tool,test -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1,faketime,the clock-skew cluster test)

# One daemon test rotates the log with logrotate's own copytruncate and
# create, then SIGUSR1: installed when missing and we can; without it that
# test is skipped.
logrotate:
	$(call optional_tool,command -v logrotate >/dev/null || test -x /usr/sbin/logrotate,logrotate,the log rotation test)

# The consumer tests (#19) start their own postgres (initdb in a temporary
# directory, a free port; as the postgres user when run as root).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else \
	    echo "make test needs PostgreSQL for the consumer tests: run 'sudo apt-get install -y postgresql'"; exit 1; \
	  fi; }

# The pooler test starts its own pgbouncer in front of that postgres: installed
# when missing and we can; without it that one test skips, saying how.
pgbouncer:
	$(call optional_tool,command -v pgbouncer >/dev/null || test -x /usr/sbin/pgbouncer,pgbouncer,the pooler test)

# The same suite under trial (Twisted's own runner), after setting up the
# servers `make test` sets up.
trial: $(STAMP) redis-server postgres pgbouncer faketime logrotate
	$(BIN)/python -m twisted.trial -j $(TEST_JOBS) tests

bench: $(STAMP)
	$(BIN)/python bench/control_plane.py

bench-data: $(STAMP)
	$(BIN)/python bench/data_plane.py

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "openclaw needs Python 3.11 or newer"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# A real (not editable) install: the twistd plugin is found the way an
# operator's install finds it.  build/ goes first: setuptools reuses it, and
# a module deleted from the sources would be installed from it still.
# The versions come from constraints.txt: the ones the suite last passed with.
$(STAMP): $(BIN)/python $(SOURCES)
	rm -rf build
	$(BIN)/python -m pip install --quiet -c constraints.txt '.[test]'
	@touch $@

$(RUN_STAMP): $(BIN)/python $(SOURCES)
	rm -rf build
	$(BIN)/python -m pip install --quiet -c constraints.txt '.[http2]'
	@touch $@

# The newest releases setup.cfg's ranges allow, written to constraints.txt
# (its comment kept); then run `make test` and commit both.
upgrade: $(BIN)/python
	rm -rf build
	$(BIN)/python -m pip install --quiet --upgrade --upgrade-strategy eager '.[test,http2]'
	{ grep '^#' constraints.txt; $(BIN)/python -m pip freeze --exclude openclaw; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	@touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp
