# Everything a fresh machine needs is installed by these targets: a venv with
# the runner and its test tools, and the Claude Code CLI from npm.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CLI's version is pinned in one place, the Dockerfile's ARG (the release
# workflow builds the Dockerfile without build-args).
CLAUDE_CODE_VERSION ?= $(shell sed -n 's/^ARG CLAUDE_CODE_VERSION=//p' Dockerfile)
ifeq ($(strip $(CLAUDE_CODE_VERSION)),)
$(error the Dockerfile has no `ARG CLAUDE_CODE_VERSION=` line)
endif
CLAUDE_DIR := .cache/claude-code-$(CLAUDE_CODE_VERSION)
CLAUDE := $(CLAUDE_DIR)/node_modules/.bin/claude
export SHEPHERD_TEST_CLAUDE_BIN := $(abspath $(CLAUDE))

.PHONY: install claude test test-e2e lint run demo fixtures clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lint]'
	touch $@

$(CLAUDE):
	npm install --prefix $(CLAUDE_DIR) --no-audit --no-fund --loglevel=error \
		@anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION)

install: $(VENV)/.installed
claude: $(CLAUDE)

# The image tests have their own target (make image-test).
test: install claude
	$(PY) -m pytest

test-e2e: install claude
	$(PY) -m pytest -m e2e

demo: install claude
	$(PY) tests/demo.py

# The demo's servers without the runner: run it yourself (README, Development).
fixtures: install claude
	$(PY) tests/demo.py --serve-only

lint: install lint-deploy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

run: install
	$(PY) -m shepherd_runner serve

clean:
	rm -rf $(VENV) .cache build *.egg-info

# The container image: `make image`, `make image-test` (buildah/podman, root).
include deploy/image.mk
