# The two commands a new user needs (see README):
#   make demo   set up and run the whole platform on this box
#   make test   set up and run every check CI runs
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYSTEM_PACKAGES := mosquitto

.PHONY: setup system-deps venv test check demo clean

setup: system-deps venv

# Debian/Ubuntu packages, installed only when missing.
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(BIN)/bluelight: pyproject.toml
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

venv: $(BIN)/bluelight

test: setup
	PATH="$(abspath $(BIN)):$$PATH" scripts/check

check: test

demo: setup
	$(BIN)/bluelight demo

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
