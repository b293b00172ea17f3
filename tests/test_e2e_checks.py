"""Green before done, with the real Claude Code CLI: the pull request's checks.

The runner runs as production does, with the real poll interval (10 s) and
no-CI window (60 s); the fake GitHub's CI (tests/fake_checks.py) runs the
repository's test on every pushed head; the scripted model (tests/fake_model.py)
goes on where the conversation is, so a resumed session plays the script's
next steps.
"""

from __future__ import annotations

import json
import secrets
import signal
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest

import shepherd_runner as sr
from fake_model import FakeModel
from harness import Runner, processes, runner_env

pytestmark = pytest.mark.e2e
TASK = "ci-task"
BRANCH = f"shepherd/{TASK}"
GREET = "def greet():\n    return 'hello'\n"
TEST = "from greet import greet\n\nassert greet() == 'hello', f'expected hello, got {greet()!r}'\n"
CHECK_PATHS = ("/commits/", "/check-", "/rules/", "/actions/")


def bash(command):
    return {"tool": "Bash", "input": {"command": command, "description": "run"}}


def end(text):
    return {"text": text, "end": True}


def read(path):
    return {"tool": "Read", "input": {"file_path": str(path)}}


def greet_edit(old, new):
    return {"tool": "Edit", "input": {"file_path": "greet.py", "old_string": old,
                                      "new_string": new}}  # fmt: skip


def commit(message):
    return bash(f"git commit -qam '{message}' && git log --oneline | head -3")


# The first run breaks the test: greet() says "hi".
BREAK = [read("greet.py"), greet_edit("'hello'", "'hi'"), commit("Say hi"),
         end("The greeting now says hi.")]  # fmt: skip


@pytest.fixture
def ci(tmp_path, home, api, github, token, claude_bin):
    class CI:
        repo_url = github.create_repo(
            "acme", "widgets", files={"greet.py": GREET, "test_greet.py": TEST}
        )
        failures = home / "ci-failures.md"
        model = runner = None

        def __init__(self):
            api.add_task(TASK, repo_url=self.repo_url, token=token,
                         description="Make the greeting say hi")  # fmt: skip
            github.checks.add_job("tests", [sys.executable, "test_greet.py"])

        def run(self, script, **extra):
            self.model = FakeModel(script).start()
            env = runner_env(
                tmp_path, claude_bin=claude_bin, github=github, HOME=str(home),
                ANTHROPIC_BASE_URL=self.model.url,
                ANTHROPIC_API_KEY="sk-ant-test-" + secrets.token_hex(12), IS_SANDBOX="1",
                CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", CLAUDE_CODE_MAX_RETRIES="0",
            )  # fmt: skip
            for name, value in {"SHEPHERD_CI_WAIT": "20m", **extra}.items():
                env.pop(name, None)  # None: the setting is not there at all
                env.update({name: value} if value is not None else {})
            self.runner = Runner(env)
            self.runner.assign(TASK, api.url)
            return self.runner

        def finish(self, script, timeout=240, **extra):
            self.run(script, **extra)
            self.code = self.runner.wait(timeout=timeout)
            return api.terminal(TASK)

        def resumed(self):
            """The model requests that began a fix round: the runner's prompt names the file."""
            found = []
            for request in self.model.main_requests:
                said = [m for m in request["messages"] if m.get("role") == "user"][-1:]
                if "This is fix round" in json.dumps(said):
                    found.append(request)
            return found

    world = CI()
    yield world
    if world.runner:
        world.runner.kill()
    if world.model:
        world.model.stop()


def checks_requests(github):
    return [r for r in github.api_requests if r["path"].startswith("/api/v3/repos/")
            and any(p in r["path"] for p in CHECK_PATHS)]  # fmt: skip


def test_red_then_green_one_fix_round_with_the_failing_log_reaches_the_model(ci, api, github):
    fix = [read(ci.failures), read("greet.py"), greet_edit("'hi'", "'hello'"),
           commit("Say hello again"), end("Fixed: the test passes.")]  # fmt: skip
    terminal = ci.finish([*BREAK, *fix])
    assert ci.code == 0, ci.runner.output
    assert terminal["event"] == "completed", terminal
    [pull] = github.pulls
    details = terminal["details"]
    assert details["checks"] == {"state": "success", "rounds": 1, "failed": [],
                                 "url": f"{pull['html_url']}/checks"}  # fmt: skip
    assert terminal["message"] == f"pull request {pull['html_url']}; checks passed"
    assert details["pr_url"] == pull["html_url"]
    # One resumed request, and the next one carries the failing log the agent read.
    [resumed] = ci.resumed()
    later = ci.model.main_requests[ci.model.main_requests.index(resumed) + 1]
    assert "AssertionError: expected hello, got 'hi'" in json.dumps(later["messages"][-2:])
    assert github.log("acme", "widgets", BRANCH)[:2] == [
        "Say hello again", "Say hi"]  # fmt: skip
    head = github.branch_sha("acme", "widgets", BRANCH)
    assert github.checks.conclusions(head) == {"tests": "success"}
    # The task's figures add both runs up; the events went on in one sequence.
    assert details["num_turns"] >= 9 and details["usage"]["input_tokens"] == 10 * 9
    # The resumed run's total_cost_usd is the session's (CLI 2.1.332): it is not added
    # to the first run's. Each scripted reply costs the same ($0.00014: 10 in, 5 out).
    assert details["cost_usd"] == pytest.approx(0.00014 * details["num_turns"]), details
    events = api.events(TASK)
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    check_events = [e["summary"] for e in events if e.get("tool") == "checks"]
    assert "tests: failure" in check_events and check_events[-1] == "checks passed"


def test_never_green_stops_after_the_fix_rounds_and_names_the_failing_checks(ci, api, github):
    attempt = [read(ci.failures), bash("echo tried >> notes.txt && git add notes.txt"),
               commit("Try again"), end("Tried.")]  # fmt: skip
    terminal = ci.finish([*BREAK, *attempt, *attempt, *attempt])
    assert terminal["event"] == "completed", terminal
    [pull] = github.pulls
    assert terminal["details"]["checks"] == {"state": "failure", "rounds": 2, "failed": ["tests"],
                                             "url": f"{pull['html_url']}/checks"}  # fmt: skip
    assert terminal["message"] == (
        f"pull request {pull['html_url']}; checks failing: tests after 2 fix rounds"
    )
    assert len(ci.resumed()) == 2
    assert github.log("acme", "widgets", BRANCH)[:3] == ["Try again", "Try again", "Say hi"]


def test_a_run_waiting_for_approval_gets_no_fix_round_and_says_a_person_must_approve(
    ci, api, github
):
    github.checks.mode = "action_required"
    terminal = ci.finish([*BREAK, read(ci.failures), end("Should not be asked.")])
    assert terminal["event"] == "completed", terminal
    [pull] = github.pulls
    assert terminal["details"]["checks"]["state"] == "action_required"
    assert terminal["details"]["checks"]["rounds"] == 0
    assert terminal["message"] == (
        f"pull request {pull['html_url']}; a person must approve the workflow runs of the pull "
        "request; checks need approval to run"
    )
    assert ci.resumed() == [] and not ci.failures.exists()


def test_a_repository_without_ci_is_none_about_a_minute_after_the_push(ci, api, github):
    github.checks.mode = "none"
    terminal = ci.finish(BREAK)
    reported = datetime.now(UTC)
    assert terminal["event"] == "completed", terminal
    assert terminal["details"]["checks"]["state"] == "none"
    assert terminal["message"].endswith("; no checks")
    pushed = max(p["at"] for p in github.pushes if p["ref"] == f"refs/heads/{BRANCH}")
    took = (reported - pushed).total_seconds()
    print(f"push -> none reported: {took:.1f}s")
    assert 60 <= took < 70, took


def test_checks_are_not_waited_for_by_default(ci, api, github):
    terminal = ci.finish(BREAK, SHEPHERD_CI_WAIT=None)
    [pull] = github.pulls
    assert terminal["message"] == f"pull request {pull['html_url']}"
    assert "checks" not in terminal["details"]
    assert checks_requests(github) == []
    github.checks.wait_idle()
    assert github.checks.conclusions(pull_head(github)) == {"tests": "failure"}  # it did fail


def pull_head(github):
    return github.branch_sha("acme", "widgets", BRANCH)


def test_sigterm_while_waiting_reports_completed_with_the_pull_request_and_pending(ci, api, github):
    github.checks.jobs = []
    github.checks.add_job("tests", [sys.executable, "-c", "import time; time.sleep(600)"])
    runner = ci.run(BREAK)
    runner.wait_for(r"INFO checks started", timeout=120)
    signalled = time.monotonic()
    runner.proc.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=30) == 0
    took = time.monotonic() - signalled
    print(f"SIGTERM while waiting -> exit: {took:.2f}s")
    assert took < sr.REPORT_BY
    terminal = api.terminal(TASK)
    [pull] = github.pulls
    assert terminal["event"] == "completed", terminal
    assert terminal["details"]["checks"]["state"] == "pending"
    assert terminal["details"]["pr_url"] == pull["html_url"]
    assert terminal["message"].startswith(
        f"pull request {pull['html_url']}; terminated (SIGTERM): the pod is being deleted"
    )
    assert "; checks still running after " in terminal["message"]


def test_the_wait_ends_at_the_tokens_margin_and_no_call_comes_after_it(ci, api, github, token):
    github.checks.jobs = []
    github.checks.add_job("tests", [sys.executable, "-c", "import time; time.sleep(600)"])
    # The margin (5 minutes before the expiry) comes about 30 s into the task.
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=sr.TOKEN_MARGIN + 30)
    api.add_task(TASK, repo_url=ci.repo_url, token=token, expires_at=expires,
                 description="Make the greeting say hi")  # fmt: skip
    github.expire_token_at(api.token_expires_at(TASK))
    terminal = ci.finish(BREAK)
    assert terminal["event"] == "completed", terminal
    assert terminal["details"]["checks"]["state"] == "pending"
    assert (
        f"the wait ended at the GitHub token's margin (it expires at {expires:%H:%M} UTC)"
        in (terminal["message"])
    )
    margin = api.token_expires_at(TASK) - timedelta(seconds=sr.TOKEN_MARGIN)
    calls = github.api_requests + github.git_requests
    assert checks_requests(github), "the checks were read until the margin"
    assert [r["path"] for r in calls if r["at"] >= margin] == []


def test_sigterm_in_a_fix_round_pushes_its_commit_once_more_and_reports_pending(ci, api, github):
    fix = [read(ci.failures), read("greet.py"), greet_edit("'hi'", "'hello'"),
           bash("git commit -qam 'Say hello again' && sleep 619"), end("Fixed.")]  # fmt: skip
    runner = ci.run([*BREAK, *fix])
    runner.wait_for(r"INFO fix round started", timeout=120)
    deadline = time.monotonic() + 60
    while not processes(b"sleep\x00619\x00"):
        assert time.monotonic() < deadline, runner.output
        time.sleep(0.05)
    signalled = time.monotonic()
    runner.proc.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=30) == 0
    took = time.monotonic() - signalled
    assert took < sr.REPORT_BY, took
    terminal = api.terminal(TASK)
    [pull] = github.pulls
    assert terminal["event"] == "completed", terminal
    assert terminal["details"]["checks"] == {"state": "pending", "rounds": 1, "failed": [],
                                             "url": f"{pull['html_url']}/checks"}  # fmt: skip
    assert terminal["message"].startswith(f"pull request {pull['html_url']}; terminated (SIGTERM)")
    assert "checks still running after 0s" not in terminal["message"], terminal["message"]
    # The fix the agent committed before the signal is on the pull request's branch.
    assert github.log("acme", "widgets", BRANCH)[0] == "Say hello again"
    assert processes(b"sleep\x00619\x00") == []
