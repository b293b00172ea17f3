"""GitHub failing at the edges of a run: each ends in one report that tells the truth.

The runner runs as production does, the agent is tests/stand_in_agent.py (it
commits and runs the Stop hook from ~/.claude/settings.json), the API and
GitHub are the loopback fakes.
"""

from __future__ import annotations

import signal
import time

from test_flow import TASK, world  # noqa: F401

BRANCH = f"shepherd/{TASK}"


def terminal_statuses(api):
    return [s for s in api.statuses(TASK) if s["event"] in ("completed", "failed")]


def test_transient_500s_on_push_and_pr_creation_are_retried_into_one_pr(world, api, github):
    github.fail_next("git_push", [500])
    github.fail_next("pulls_create", [502])
    terminal = world.run("commit")
    assert terminal["event"] == "completed", terminal
    [pull] = github.pulls
    assert terminal["details"]["pr_url"] == pull["html_url"]
    assert github.log("acme", "widgets", BRANCH)[0] == "Update greeting"
    assert "failed; retrying" in world.runner.output
    assert len(terminal_statuses(api)) == 1


def test_lost_answer_to_pr_creation_finds_the_pr_instead_of_opening_a_second(world, api, github):
    github.fail_next("pulls_create", ["lost"])
    terminal = world.run("commit")
    assert terminal["event"] == "completed", terminal
    [pull] = github.pulls
    assert terminal["details"]["pr_url"] == pull["html_url"]


def test_hook_failing_transiently_leaves_the_conclusion_to_the_runner(world, api, github):
    # Five refusals outlast the hook's 20 s budget (tries at 0, 1, 3, 7, 15 s).
    github.fail_next("pulls_create", [503] * 5)
    terminal = world.run("commit")
    assert terminal["event"] == "completed", world.runner.output
    assert "decided_by" not in terminal["details"]
    assert "the Stop hook's conclusion failed; trying again" in world.runner.output
    assert len(github.pulls) == 1 and len(terminal_statuses(api)) == 1


def test_permanent_refusal_is_not_retried(world, api, github):
    github.fail_next("pulls_create", [403] * 10)
    terminal = world.run("commit")
    assert terminal["event"] == "failed"
    assert "HTTP 403" in terminal["message"]
    creates = [r for r in github.api_requests if r["method"] == "POST"]
    assert len(creates) == 1  # the hook's; the runner reports its decision


def test_stale_pr_of_an_earlier_attempt_is_brought_up_to_the_agents_commit(world, api, github):
    github.commit_to("acme", "widgets", BRANCH, files={"OLD.md": "an earlier attempt\n"})
    stale = github.add_pull("acme", "widgets", BRANCH)
    terminal = world.run("commit")
    assert terminal["event"] == "completed", terminal
    assert terminal["details"]["pr_url"] == stale["html_url"]
    assert len(github.pulls) == 1
    # The PR now holds the agent's commit, not the earlier attempt's.
    assert github.log("acme", "widgets", BRANCH)[:2] == ["Update greeting", "Initial commit"]
    assert {p["ref"] for p in github.pushes} == {f"refs/heads/{BRANCH}"}
    assert [p["forced"] for p in github.pushes] == [True]


def test_closed_pr_of_an_earlier_attempt_is_not_named_a_new_one_is_opened(world, api, github):
    github.commit_to("acme", "widgets", BRANCH, files={"OLD.md": "an earlier attempt\n"})
    old = github.add_pull("acme", "widgets", BRANCH, state="closed")
    terminal = world.run("commit")
    assert terminal["event"] == "completed", terminal
    assert terminal["details"]["pr_url"] != old["html_url"]
    assert len(github.pulls) == 2


def test_agent_that_wrecks_the_clone_gets_a_failed_that_says_so(world, api, github):
    terminal = world.run("wreck")
    assert world.code == 0
    assert terminal["event"] == "failed"
    assert terminal["message"].startswith("the repository could not be read after the agent's run")
    assert "internal error" not in terminal["message"]


def test_sigterm_while_github_is_retried_ends_the_retries_and_reports_at_once(world, api, github):
    github.fail_next("pulls_create", [503] * 1000)
    runner = world.start("max-turns")  # the runner keeps the commit in a draft PR itself
    runner.assign(TASK, api.url)
    runner.wait_for(r"opening the pull request failed; retrying")
    start = time.monotonic()
    runner.proc.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=30) == 0
    assert time.monotonic() - start < 10
    terminal = api.terminal(TASK)
    assert terminal["message"].startswith("terminated (SIGTERM)"), terminal
    # ... and still says where the work is: the push came before the pull request.
    assert f"its work (1 commit) is on branch {BRANCH}" in terminal["message"], terminal
    assert terminal["details"]["branch"] == BRANCH
