"""A task written on a pull request, end to end with the real Claude Code CLI.

Same setup as tests/test_e2e.py; the task's sourceURL names a pull request of
the fake GitHub, as the upstream adapter does for an `@shepherd` comment on one.
"""

from __future__ import annotations

import json

import pytest
from test_e2e import CHANGE, COMMIT, TASK, bash, e2e, end  # noqa: F401

pytestmark = pytest.mark.e2e
FEATURE = "feature/greeting"
REVIEW = "Please say hello to the whole world, not just to one person."


@pytest.fixture
def written_on(e2e, api, github, token):  # noqa: F811
    """`written_on(pull)`: the task becomes a comment on that pull request."""

    def on(pull):
        api.add_task(TASK, repo_url=e2e.repo_url, token=token, source_url=pull["html_url"],
                     description="Address the review comments",
                     context="The pull request's conversation.")  # fmt: skip

    return on


def open_feature_pull(github):
    github.commit_to("acme", "widgets", FEATURE, {"feature.txt": "one\n"}, "Start the feature")
    return github.add_pull("acme", "widgets", FEATURE, title="Greeting feature")


def seen_by_model(e2e):
    return json.dumps(e2e.model.requests)


def test_open_pull_request_is_continued_on_its_branch_with_its_review_comments(
    e2e, api, github, home, written_on
):
    pull = open_feature_pull(github)
    github.add_review_comment("acme", "widgets", 1, "README.md", 1, REVIEW, user="alice")
    written_on(pull)
    read_context = {"tool": "Read", "input": {"file_path": str(home / "task-context.md")}}
    terminal = e2e.finish([read_context, *CHANGE, COMMIT, end("Greeted the world.")])
    assert terminal["event"] == "completed", (terminal["message"], e2e.runner.output)
    assert terminal["details"]["pr_url"] == pull["html_url"]
    assert terminal["message"] == f"pull request {pull['html_url']}"
    assert "pr_opened_by" not in terminal["details"]
    assert len(github.pulls) == 1  # no new pull request
    assert github.log("acme", "widgets", FEATURE)[:3] == [
        "Update greeting", "Start the feature", "Initial commit"
    ]  # fmt: skip
    assert github.branch_sha("acme", "widgets", f"shepherd/{TASK}") is None
    assert not any(p["forced"] for p in github.pushes)
    # The agent was told, and the review comment reached it through the context file.
    prompt = json.dumps(e2e.model.requests[0]["messages"])
    assert f"You are continuing pull request #1 ({pull['html_url']}) onto base main" in prompt
    assert f"on the git branch {FEATURE}" in prompt
    assert REVIEW in seen_by_model(e2e)
    context = (home / "task-context.md").read_text()
    assert context.startswith("The pull request's conversation.\n\n## Review comments on pull")
    assert "### README.md, line 1, by alice, " in context


def test_open_pull_request_without_commits_fails_with_no_changes(e2e, api, github, written_on):
    pull = open_feature_pull(github)
    written_on(pull)
    terminal = e2e.finish([end("The review asks for nothing I can change.")])
    assert (terminal["event"], terminal["message"]) == ("failed", "no changes made")
    assert len(github.pulls) == 1 and github.pushes == []


@pytest.mark.parametrize("merged", [False, True], ids=["closed", "merged"])
def test_closed_pull_request_leads_to_a_new_one_that_links_it(e2e, api, github, written_on, merged):
    github.commit_to("acme", "widgets", FEATURE, {"feature.txt": "one\n"}, "Start the feature")
    pull = github.add_pull("acme", "widgets", FEATURE, state="closed", merged=merged)
    written_on(pull)
    terminal = e2e.finish([*CHANGE, COMMIT, end("Greeted the world.")])
    assert terminal["event"] == "completed", (terminal["message"], e2e.runner.output)
    why = "it is merged" if merged else "it is closed"
    _, new = github.pulls
    assert new["head"] == f"shepherd/{TASK}" and terminal["details"]["pr_url"] == new["html_url"]
    assert f"The task was written on pull request {pull['html_url']}; {why}" in new["body"]
    assert terminal["message"].endswith(
        f"the work is not on pull request {pull['html_url']}: {why}"
    )
    assert github.log("acme", "widgets", f"shepherd/{TASK}")[:2] == [
        "Update greeting", "Initial commit"
    ]  # fmt: skip
    assert "pull request is not continued" in e2e.runner.output and why in e2e.runner.output


def test_pull_request_from_a_fork_leads_to_a_new_one_that_links_it(
    e2e, api, github, home, written_on
):
    github.create_repo("someone", "widgets")
    github.commit_to("someone", "widgets", "patch-1", {"feature.txt": "one\n"})
    pull = github.add_pull("acme", "widgets", "patch-1", head_repo="someone/widgets")
    github.add_review_comment("acme", "widgets", 1, "feature.txt", 1, REVIEW)
    written_on(pull)
    terminal = e2e.finish([*CHANGE, COMMIT, end("Greeted the world.")])
    assert terminal["event"] == "completed", (terminal["message"], e2e.runner.output)
    _, new = github.pulls
    assert new["head"] == f"shepherd/{TASK}" and terminal["details"]["pr_url"] == new["html_url"]
    assert f"The task was written on pull request {pull['html_url']}" in new["body"]
    assert "its branch is in the fork someone/widgets" in terminal["message"]
    assert github.log("acme", "widgets", f"shepherd/{TASK}")[0] == "Update greeting"
    assert [p["repo"] for p in github.pushes] == ["acme/widgets"]
    assert REVIEW in (home / "task-context.md").read_text()


def raced(e2e, github, tmp_path, files):
    """Runs the agent; someone pushes `files` to the PR branch after the clone, before
    the agent commits (its first command waits for that)."""
    gate = tmp_path / "pushed"
    runner = e2e.run([bash(f"until [ -e {gate} ]; do sleep 0.1; done"), *CHANGE, COMMIT,
                      end("Greeted the world.")])  # fmt: skip
    assert e2e.model.wait_for_requests(1, timeout=60), runner.output  # the CLI runs: cloned
    theirs = github.commit_to("acme", "widgets", FEATURE, files, "Their change")
    gate.touch()
    e2e.code = runner.wait(timeout=180)
    return theirs


def test_push_that_raced_the_agent_is_kept_and_the_work_rebased_onto_it(
    e2e, api, github, tmp_path, written_on
):
    pull = open_feature_pull(github)
    written_on(pull)
    theirs = raced(e2e, github, tmp_path, {"feature.txt": "two\n"})
    terminal = api.terminal(TASK)
    assert terminal["event"] == "completed", (terminal["message"], e2e.runner.output)
    assert terminal["details"]["pr_url"] == pull["html_url"] and len(github.pulls) == 1
    assert github.log("acme", "widgets", FEATURE)[:3] == [
        "Update greeting", "Their change", "Start the feature"
    ]  # fmt: skip
    assert not any(p["forced"] for p in github.pushes), github.pushes
    # One push of the branch: a fast-forward from their commit.
    assert [p["old"] for p in github.pushes if p["ref"] == f"refs/heads/{FEATURE}"] == [theirs]
    assert "the agent's commits are rebased onto it" in e2e.runner.output


def test_conflicting_push_that_raced_the_agent_keeps_the_work_on_a_linking_pull_request(
    e2e, api, github, tmp_path, written_on
):
    pull = open_feature_pull(github)
    written_on(pull)
    theirs = raced(e2e, github, tmp_path, {"README.md": "goodbye\n"})
    terminal = api.terminal(TASK)
    assert terminal["event"] == "completed", (terminal["message"], e2e.runner.output)
    original, new = github.pulls
    assert terminal["details"]["pr_url"] == new["html_url"]
    assert terminal["message"] == (
        f"pull request {new['html_url']}; the work is not on pull request {pull['html_url']}: "
        "its branch moved while the agent worked and the agent's commits did not rebase "
        "cleanly onto it"
    )
    assert f"The task was written on pull request {pull['html_url']}" in new["body"]
    assert github.branch_sha("acme", "widgets", FEATURE) == theirs  # untouched
    assert github.log("acme", "widgets", f"shepherd/{TASK}")[:2] == [
        "Update greeting", "Start the feature"
    ]  # fmt: skip
    assert not any(p["forced"] for p in github.pushes), github.pushes
