"""What the agent is told besides its prompt: our baked CLAUDE.md and the repository's own
CLAUDE.md or AGENTS.md, as the real CLI sends them to the model (tests/CLI_FINDINGS.md).

Same setup as tests/test_e2e.py: the runner as production runs it (it installs the baked
CLAUDE.md into ~/.claude/), the real CLI, the scripted model recording each request.
"""

from __future__ import annotations

import json

import pytest
from test_e2e import e2e, end  # noqa: F401

from conftest import ROOT

pytestmark = pytest.mark.e2e

BAKED = (ROOT / "CLAUDE.md").read_text().splitlines()[0]  # "# Working as a Shepherd agent"
AGENTS_MD = "Run `make check` before each commit; it is what CI runs."
CLAUDE_MD = "Indent with tabs; the linter refuses spaces."


def first_request_context(e2e, github, files: dict[str, str]) -> str:
    """The first user message the model received, for a repository holding `files`."""
    github.commit_to("acme", "widgets", "main", files, "Instructions for agents")
    e2e.finish([end("Nothing to do.")])
    first = e2e.model.main_requests[0]
    assert BAKED not in json.dumps(first.get("system")), "CLAUDE.md is context, not system"
    return json.dumps(first["messages"][0])


def test_agents_md_reaches_the_model_when_the_repository_has_no_claude_md(e2e, github):
    context = first_request_context(e2e, github, {"AGENTS.md": AGENTS_MD + "\n"})
    assert BAKED in context
    assert AGENTS_MD in context
    assert context.index(BAKED) < context.index(AGENTS_MD)


def test_repository_claude_md_comes_after_the_baked_one_and_agents_md_is_left_out(e2e, github):
    files = {"CLAUDE.md": CLAUDE_MD + "\n", "AGENTS.md": AGENTS_MD + "\n"}
    context = first_request_context(e2e, github, files)
    assert BAKED in context and CLAUDE_MD in context
    assert context.index(BAKED) < context.index(CLAUDE_MD)
    assert AGENTS_MD not in context
