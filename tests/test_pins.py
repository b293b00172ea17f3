"""The Claude Code CLI version is pinned in one place: the Dockerfile's ARG.

The Makefile and deploy/image.mk read it from there; every other mention of a
CLI version (README, workflows, tests, comments) must agree with it, and the CLI
the suite drives must be that version. tests/CLI_FINDINGS.md is the history of
what each version did, so it names older ones; only its title must name the pin.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, pinned_claude_code_version

HISTORY = "tests/CLI_FINDINGS.md"
VERSION = r"(\d+\.\d+\.\d+)"
# Ways a file states which CLI it uses. Recorded CLI output is not a pin: a
# sample's "claude_code_version" field says which CLI printed it.
MENTIONS = [
    re.compile(r"CLAUDE_CODE_VERSION[^\w\n]{0,6}" + VERSION),  # ARG, ?=, README prose
    re.compile(r"claude[ _-]code(?: CLI)?[^\w\n]{0,4}v?" + VERSION, re.IGNORECASE),
    re.compile(VERSION + r" \(Claude Code\)"),  # `claude --version`
]


def pin_mentions(root: Path, files: list[str]) -> list[tuple[str, int, str]]:
    """(file, line number, version) of every CLI version mentioned in `files`."""
    found = []
    for name in files:
        try:
            text = (root / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue  # binary, a submodule, or deleted but not yet staged
        for number, line in enumerate(text.splitlines(), 1):
            for pattern in MENTIONS:
                found.extend((name, number, m[1]) for m in pattern.finditer(line))
    return found


def project_files(root: Path = ROOT) -> list[str]:
    """The project's files: tracked, and new ones not ignored (never .cache or .venv)."""
    out = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return sorted({name for name in out.split("\0") if name and name != HISTORY})


def disagreements(root: Path, files: list[str], pin: str) -> list[str]:
    return [f"{f}:{n}: {v}" for f, n, v in pin_mentions(root, files) if v != pin]


def test_the_dockerfile_pins_the_cli_once():
    assert re.fullmatch(r"\d+\.\d+\.\d+", pinned_claude_code_version())


def test_every_mention_of_the_cli_version_agrees_with_the_dockerfile_pin():
    pin = pinned_claude_code_version()
    files = project_files()
    assert {"README.md", "Makefile", ".github/workflows/ci.yml"} <= set(files)
    assert disagreements(ROOT, files, pin) == [], (
        f"the Dockerfile pins Claude Code {pin}: bump these mentions with it"
    )
    # the README says which CLI the suite was proven with
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert f"proven with Claude Code **{pin}**" in readme


def test_the_findings_are_titled_with_the_pinned_version():
    title = (ROOT / HISTORY).read_text(encoding="utf-8").splitlines()[0]
    assert pinned_claude_code_version() in title, title


def test_a_stale_mention_anywhere_is_reported_with_its_place(tmp_path):
    pin, stale = "3.0.1", "2.9.0"
    (tmp_path / "Dockerfile").write_text(f"FROM x\nARG CLAUDE_CODE_VERSION={pin}\n")
    (tmp_path / "README.md").write_text(f"proven with Claude Code **{stale}**, and\n")
    (tmp_path / "ci.yml").write_text(f"run: npm i @anthropic-ai/claude-code@{stale}\n")
    (tmp_path / "notes.txt").write_text(f"claude --version says {pin} (Claude Code)\n")
    (tmp_path / "blob.bin").write_bytes(b"\xff\xfe claude-code-" + stale.encode())
    files = ["Dockerfile", "README.md", "ci.yml", "notes.txt", "blob.bin"]
    assert pinned_claude_code_version(tmp_path / "Dockerfile") == pin
    assert disagreements(tmp_path, files, pin) == [f"README.md:1: {stale}", f"ci.yml:1: {stale}"]


@pytest.mark.parametrize("defaults", [[], [None], ["latest"], ["1.0.0", "1.0.1"]])
def test_a_dockerfile_without_exactly_one_version_pin_is_refused(tmp_path, defaults):
    args = ["ARG CLAUDE_CODE_VERSION" + (f"={v}" if v else "") for v in defaults]
    (tmp_path / "Dockerfile").write_text("\n".join(["FROM x", *args, ""]))
    with pytest.raises(AssertionError, match="must pin the CLI once"):
        pinned_claude_code_version(tmp_path / "Dockerfile")


def test_the_makefile_installs_and_tests_the_pinned_version():
    # `make` prints the variables the test and image targets use.
    probe = "pin: ; @echo $(CLAUDE_CODE_VERSION) $(SHEPHERD_TEST_CLAUDE_BIN)"
    out = subprocess.run(
        ["make", "-s", "--no-print-directory", "-C", str(ROOT), "--eval", probe, "pin"],
        check=True, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"},
    ).stdout.split()  # fmt: skip
    pin = pinned_claude_code_version()
    assert out == [pin, str(ROOT / ".cache" / f"claude-code-{pin}" / "node_modules/.bin/claude")]


@pytest.mark.e2e
def test_the_cli_under_test_is_the_pinned_version(claude_bin):
    out = subprocess.run(
        [claude_bin, "--version"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    assert out.split()[0] == pinned_claude_code_version(), (
        f"SHEPHERD_TEST_CLAUDE_BIN={claude_bin} is {out.strip()!r}: run `make test`"
    )
