# The two commands of the README's quick start:
#   make run    set up a virtual environment and start the server
#   make test   set up everything the tests need and run them
# Both work on a fresh Debian/Ubuntu machine with python3; `make test` installs espeak-ng and
# flite (speech fixtures) and redis-server (the scale-out tests) with apt-get when they are missing.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: run test system-deps clean

run: $(VENV)/.run
	$(PY) server.py

test: $(VENV)/.dev system-deps
	$(PY) -m pytest

$(VENV)/.run: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	touch $@ $(VENV)/.run

system-deps:
	@if ! command -v espeak-ng >/dev/null || ! command -v flite >/dev/null || ! command -v redis-server >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		echo "installing espeak-ng and flite (speech fixtures) and redis-server (scale-out tests)"; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq espeak-ng flite redis-server; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
