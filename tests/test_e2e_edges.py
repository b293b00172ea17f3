"""The edges of a run with the real Claude Code CLI: backup, signals, silence, hangs.

Same setup as tests/test_e2e.py: the runner as production runs it, the real
CLI driven by tests/fake_model.py, the loopback Shepherd API and GitHub.
"""

from __future__ import annotations

import os
import signal
import stat
import time
from datetime import UTC, datetime, timedelta

import pytest
from test_e2e import (  # noqa: F401
    BRANCH,
    CHANGE,
    COMMIT,
    TASK,
    bash,
    e2e,
    end,
    long_command,
)

from harness import processes

pytestmark = pytest.mark.e2e


def wait_until(predicate, timeout, what, runner=None):
    """Polls `predicate` (a remote state no event announces) until it holds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        log = runner.output if runner else ""
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{log}"
        time.sleep(0.05)
    return value


def new_commit(tmp_path, github):
    """The task branch's local head once the agent has committed on it, else None."""
    path = tmp_path / "workspace" / "widgets" / ".git" / "refs" / "heads" / "shepherd" / TASK
    head = path.read_text().strip() if path.exists() else None
    return head if head != github.branch_sha("acme", "widgets", "main") else None


def test_commit_reaches_the_remote_within_10s_while_the_agent_works_and_sigterm_keeps_it(
    e2e, api, github, tmp_path
):
    marker = b"sleep\x00614\x00"
    runner = e2e.run([*CHANGE, COMMIT, long_command(614), end("Slept.")])
    committed = wait_until(lambda: new_commit(tmp_path, github), 60, "the agent's commit")
    seen_at = time.monotonic()
    wait_until(
        lambda: github.branch_sha("acme", "widgets", BRANCH) == committed, 10, "backup", runner
    )
    delay = time.monotonic() - seen_at
    print(f"commit -> remote: {delay:.2f}s")
    # The agent is still at work: the backup did not wait for it to finish.
    wait_until(lambda: processes(marker), 30, "the agent's long command")
    assert runner.proc.poll() is None
    runner.wait_for(r"INFO branch backed up branch=shepherd/e2e-task sha=" + committed[:7])

    runner.proc.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=30) == 0
    terminal = api.terminal(TASK)
    assert terminal["event"] == "failed"
    compare = f"{github.url}/acme/widgets/compare/main...{BRANCH}"
    assert terminal["message"] == (
        "terminated (SIGTERM): the pod is being deleted (sandbox timeout or cancellation); "
        f"its work (1 commit) is on branch {BRANCH} ({compare})"
    )
    assert github.branch_sha("acme", "widgets", BRANCH) == committed
    # No result line came, yet the report has the usage and turns so far.
    details = terminal["details"]
    assert details["compare_url"] == compare and "cost_usd" not in details
    assert details["num_turns"] >= 4 and details["session_id"]
    assert details["usage"]["input_tokens"] >= 40, details["usage"]
    assert details["duration_ms"] > 0
    assert details["events_sent"] == len(api.events(TASK))
    assert processes(marker) == []


def test_sigterm_right_after_a_commit_pushes_it_before_reporting(e2e, api, github, tmp_path):
    marker = b"sleep\x00615\x00"
    runner = e2e.run([*CHANGE, bash("git commit -qam 'Quick one' && sleep 615"), end("Slept.")])
    wait_until(lambda: processes(marker), 60, "the agent's long command")
    runner.proc.send_signal(signal.SIGTERM)  # the backup may not have run yet
    assert runner.wait(timeout=30) == 0
    terminal = api.terminal(TASK)
    assert terminal["message"].startswith("terminated (SIGTERM)")
    assert f"its work (1 commit) is on branch {BRANCH}" in terminal["message"]
    assert github.log("acme", "widgets", BRANCH)[0] == "Quick one"


def test_agent_silent_past_the_idle_timeout_is_stopped_and_its_commit_kept(
    e2e, api, github, tmp_path
):
    marker = b"sleep\x00616\x00"
    start = time.monotonic()
    terminal = e2e.finish([*CHANGE, COMMIT, long_command(616), end("Slept.")],
                          SHEPHERD_IDLE_TIMEOUT="4s")  # fmt: skip
    assert time.monotonic() - start < 60
    assert terminal["event"] == "failed"
    assert terminal["message"].startswith(
        "the agent produced no output for 4s (SHEPHERD_IDLE_TIMEOUT); "
        "its unfinished work is in pull request "
    ), terminal
    [pull] = github.pulls
    assert pull["draft"] is True and terminal["details"]["pr_url"] == pull["html_url"]
    assert github.log("acme", "widgets", BRANCH)[0] == "Update greeting"
    assert processes(marker) == []


def test_cli_that_does_not_exit_after_its_result_is_stopped_and_the_task_completes(
    e2e, api, github, tmp_path, claude_bin
):
    # claude-code #25629: the result line is printed, the process never exits.
    # The real CLI does the work; a wrapper keeps its stdout open afterwards.
    wrapper = tmp_path / "claude-that-hangs"
    wrapper.write_text(f'#!/bin/sh\n"{claude_bin}" "$@"\nexec sleep 617\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    runner = e2e.run([*CHANGE, COMMIT, end("Done.")], SHEPHERD_CLAUDE_BIN=str(wrapper))
    runner.wait_for(r"stop hook decided", timeout=120)
    result_seen = time.monotonic()
    assert runner.wait(timeout=90) == 0
    took = time.monotonic() - result_seen
    print(f"result -> exit with a hung CLI: {took:.1f}s")
    assert 25 < took < 60, took
    terminal = api.terminal(TASK)
    assert terminal["event"] == "completed", terminal
    [pull] = github.pulls
    assert terminal["details"]["pr_url"] == pull["html_url"]
    assert "printed its result but did not exit" in runner.output
    assert processes(b"sleep\x00617\x00") == []


def test_background_command_running_after_the_answer_is_stopped_and_the_task_completes(
    e2e, api, github
):
    # Since 2.1.332 the CLI prints its result, then waits for the agent's background
    # commands and wakes the model when they end (tests/CLI_FINDINGS.md).
    marker = b"sleep\x00618\x00"
    background = bash("echo started && sleep 618")
    background["input"]["run_in_background"] = True
    runner = e2e.run([background, *CHANGE, COMMIT, end("Done; the check runs on.")])
    runner.wait_for(r"stop hook decided", timeout=120)
    decided = time.monotonic()
    assert processes(marker), "the background command is running after the answer"
    assert runner.wait(timeout=90) == 0
    took = time.monotonic() - decided
    print(f"result -> exit with a background command: {took:.1f}s")
    assert 25 < took < 60, took
    terminal = api.terminal(TASK)
    assert terminal["event"] == "completed", terminal
    assert terminal["details"]["decided_by"] == "stop-hook"
    [pull] = github.pulls
    assert terminal["details"]["pr_url"] == pull["html_url"]
    assert "printed its result but did not exit" in runner.output
    assert processes(marker) == []


def test_background_command_ending_after_the_answer_wakes_the_agent_and_both_turns_count(
    e2e, api, github, tmp_path
):
    # 2.1.332: the CLI starts a turn for the ended command, a second Stop and `result`.
    gate = tmp_path / "gate"
    background = bash(f"echo started && until [ -e {gate} ]; do sleep 0.1; done")
    background["input"]["run_in_background"] = True
    runner = e2e.run([background, *CHANGE, COMMIT, end("Done; the check runs on.")])
    runner.wait_for(r"stop hook decided", timeout=120)
    gate.touch()
    assert runner.wait(timeout=60) == 0
    assert runner.output.count("stop hook decided") == 2, runner.output
    assert "printed its result but did not exit" not in runner.output
    terminal = api.terminal(TASK)
    assert terminal["event"] == "completed", terminal
    replies = len(e2e.model.main_requests)
    assert replies == 6  # the five scripted replies, and one for the woken turn
    details = terminal["details"]
    assert details["num_turns"] == replies
    assert details["usage"]["input_tokens"] == 10 * replies  # 10 a reply (fake_model.py)
    [pull] = github.pulls
    assert details["pr_url"] == pull["html_url"]


@pytest.fixture(autouse=True)
def _no_stray_sleepers():
    yield
    for seconds in range(614, 619):
        for pid in processes(b"sleep\x00%d\x00" % seconds):
            os.kill(pid, signal.SIGKILL)


def _short_token(api, github, e2e, token, seconds):
    """The task's token expires `seconds` from now, at the API and at GitHub alike."""
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=seconds)
    api.add_task(TASK, repo_url=e2e.repo_url, token=token, expires_at=expires)
    github.expire_token_at(api.token_expires_at(TASK))
    return expires


def _after_expiry(tmp_path):
    """A Bash step that waits for the test to say the token has expired, then goes on."""
    flag = tmp_path / "token-expired"
    return flag, bash(f"while [ ! -e {flag} ]; do sleep 0.1; done; echo expired")


LATER = bash("echo more >> README.md && git commit -qam 'Later work'")


def test_commits_after_the_token_expired_fail_saying_where_each_commit_is(
    e2e, api, github, tmp_path, token
):
    expires = _short_token(api, github, e2e, token, 45)
    flag, wait = _after_expiry(tmp_path)
    runner = e2e.run([*CHANGE, COMMIT, wait, LATER, end("Done.")])
    # With less than 5 minutes left from the start, the first commit goes
    # into a draft pull request at once.
    runner.wait_for(r"draft pull request keeps the work before the token expires", 60)
    runner.wait_for(r"GitHub token expired; the branch backup stops", 60)
    flag.touch()
    assert runner.wait(timeout=120) == 0
    terminal = api.terminal(TASK)
    [pull] = github.pulls
    first = github.branch_sha("acme", "widgets", BRANCH)
    assert github.log("acme", "widgets", BRANCH)[0] == "Update greeting"
    assert terminal["event"] == "failed", terminal
    assert terminal["message"] == (
        f"the GitHub token expired at {expires:%H:%M} UTC, 1 minute into the task; "
        f"1 commit made later is only in the pod; the work up to {first[:7]} is in "
        f"pull request {pull['html_url']}"
    )
    assert pull["draft"] is True and terminal["details"]["pr_url"] == pull["html_url"]
    assert "401" not in terminal["message"]
    assert github.requests_after_expiry() == []


def test_token_expiring_after_the_last_commit_completes_with_the_draft_pr(
    e2e, api, github, tmp_path, token
):
    expires = _short_token(api, github, e2e, token, 45)
    flag, wait = _after_expiry(tmp_path)
    runner = e2e.run([*CHANGE, COMMIT, wait, end("Done.")])
    runner.wait_for(r"GitHub token expired; the branch backup stops", 60)
    flag.touch()
    assert runner.wait(timeout=120) == 0
    terminal = api.terminal(TASK)
    [pull] = github.pulls
    assert terminal["event"] == "completed", terminal
    assert terminal["message"] == (
        f"pull request {pull['html_url']} (it stays a draft: the GitHub token expired at "
        f"{expires:%H:%M} UTC, 1 minute into the task)"
    )
    assert terminal["details"]["pr_url"] == pull["html_url"] and pull["draft"] is True
    assert github.requests_after_expiry() == []
