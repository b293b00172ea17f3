# Everything a fresh machine needs is installed by these targets: a venv with
# the runner and its test tools, and the Claude Code CLI from npm.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLAUDE_CODE_VERSION ?= 2.1.197
CLAUDE_DIR := .cache/claude-code-$(CLAUDE_CODE_VERSION)
CLAUDE := $(CLAUDE_DIR)/node_modules/.bin/claude
export SHEPHERD_TEST_CLAUDE_BIN := $(abspath $(CLAUDE))

.PHONY: install claude test test-e2e lint run demo fixtures clean portable

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

# The portable runner (deploy/portable.spec) built here, for bench/portable.py:
# build/portable/shepherd-runner/. The image builds its own in a Dockerfile stage.
PORTABLE_VENV := build/portable-venv
PORTABLE := build/portable/shepherd-runner/shepherd-runner

$(PORTABLE_VENV)/.installed: deploy/portable-requirements.txt setup.cfg
	$(PYTHON) -m venv $(PORTABLE_VENV)
	$(PORTABLE_VENV)/bin/pip install -q -r deploy/portable-requirements.txt .
	touch $@

$(PORTABLE): $(PORTABLE_VENV)/.installed shepherd_runner.py hook.py deploy/portable.spec deploy/portable_main.py
	$(PORTABLE_VENV)/bin/pyinstaller --noconfirm --log-level WARN \
		--distpath build/portable --workpath build/pyinstaller deploy/portable.spec
	$@ --version

portable: $(PORTABLE)

# The container image: `make image`, `make image-test` (buildah/podman, root).
include deploy/image.mk
