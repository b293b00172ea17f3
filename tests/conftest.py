"""Fixtures shared by the suite: a HOME per test and the loopback servers."""

from __future__ import annotations

import io
import logging
import os
import pathlib
import re
import secrets
import sys

import pytest

TESTS = pathlib.Path(__file__).parent
sys.path.insert(0, str(TESTS))

import shepherd_runner as sr  # noqa: E402
from fake_github import FakeGitHub  # noqa: E402
from fake_shepherd import FakeShepherd  # noqa: E402

ROOT = TESTS.parent
PIN = re.compile(r"^ARG CLAUDE_CODE_VERSION=(\S*)$", re.MULTILINE)


def pinned_claude_code_version(dockerfile: pathlib.Path = ROOT / "Dockerfile") -> str:
    """The Claude Code CLI version the project pins: the Dockerfile's ARG, its one place."""
    found = PIN.findall(dockerfile.read_text(encoding="utf-8"))
    if len(found) != 1 or not re.fullmatch(r"\d+\.\d+\.\d+", found[0]):
        raise AssertionError(
            f"{dockerfile} must pin the CLI once, as `ARG CLAUDE_CODE_VERSION=X.Y.Z`: found {found}"
        )
    return found[0]


@pytest.fixture(autouse=True)
def home(tmp_path_factory, monkeypatch):
    """Every test gets its own HOME with a git identity, and no git config leaks in."""
    path = tmp_path_factory.mktemp("home")
    (path / ".gitconfig").write_text(
        "[user]\n\tname = Test User\n\temail = test@example.com\n[init]\n\tdefaultBranch = main\n"
    )
    monkeypatch.setenv("HOME", str(path))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for name in list(os.environ):
        if name.startswith(("GIT_CONFIG_", "SHEPHERD_", "GH_", "GITHUB_")) and not name.startswith(
            "SHEPHERD_TEST_"
        ):
            monkeypatch.delenv(name)
    return path


@pytest.fixture
def token():
    return "ghs_" + secrets.token_hex(18)


@pytest.fixture
def api():
    with FakeShepherd() as server:
        yield server


@pytest.fixture
def github(tmp_path, token):
    with FakeGitHub(tmp_path / "github", token) as server:
        yield server


@pytest.fixture(scope="session")
def claude_bin():
    """The real Claude Code CLI, installed by `make claude`."""
    path = os.environ.get("SHEPHERD_TEST_CLAUDE_BIN", "")
    if not path or not os.access(path, os.X_OK):
        pytest.fail(
            f"the Claude Code CLI is missing ({path or 'SHEPHERD_TEST_CLAUDE_BIN unset'}): "
            "run the tests with `make test`, which installs it"
        )
    return path


@pytest.fixture
def log():
    """The runner's log lines while the test runs, redacted as in production."""
    logger = logging.getLogger("shepherd_runner")
    state = (list(logger.handlers), logger.level, logger.propagate)
    stream = io.StringIO()
    sr.setup_logging(stream, sr.Redactor())
    yield stream
    sr.setup_logging(io.StringIO(), sr.Redactor())  # also empties the log context
    logger.handlers[:], logger.level, logger.propagate = state
