"""The whole flow, as production runs it, against loopback servers.

The runner is a subprocess (`python -m shepherd_runner serve`); the Shepherd
API, GitHub's git and REST endpoints are real local servers; the agent is
tests/stand_in_agent.py, which behaves like the Claude Code CLI (stream-json,
Stop hooks from ~/.claude/settings.json). tests/test_e2e.py does the same
with the real CLI.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import time

import pytest

import shepherd_runner as sr
from harness import Runner, runner_env

STAND_IN = str(pathlib.Path(__file__).with_name("stand_in_agent.py"))
TASK = "fix-greeting-1"


@pytest.fixture
def world(tmp_path, home, api, github, token):
    """A task whose repository lives on the fake GitHub, and a way to run it."""

    class World:
        repo_url = github.create_repo("acme", "widgets")
        record = tmp_path / "record.json"

        def __init__(self):
            self.token = api.add_task(TASK, repo_url=self.repo_url, token=token)

        def start(self, scenario="commit", **extra):
            env = runner_env(
                tmp_path, claude_bin=STAND_IN, github=github, HOME=str(home),
                STAND_IN_SCENARIO=scenario, STAND_IN_RECORD=str(self.record),
                STAND_IN_REPO="acme/widgets", **extra,
            )  # fmt: skip
            self.runner = Runner(env)
            return self.runner

        def run(self, scenario="commit", **extra):
            runner = self.start(scenario, **extra)
            runner.assign(TASK, api.url)
            self.code = runner.wait()
            return api.terminal(TASK)

        def seen(self):
            return json.loads(self.record.read_text())

    world = World()
    yield world
    if hasattr(world, "runner"):
        world.runner.kill()


def events_of(api):
    return [s["event"] for s in api.statuses(TASK)]


def test_agent_commit_ends_as_a_pull_request_decided_by_the_hook_reported_once_by_the_runner(
    world, api, github, tmp_path
):
    terminal = world.run("commit")
    assert world.code == 0, world.runner.output
    assert events_of(api) == ["started", "completed"]
    assert terminal["event"] == "completed"
    assert terminal["details"]["decided_by"] == "stop-hook"
    assert terminal["details"]["reported_by"] == "shepherd-runner"
    # The one terminal status carries the run's metrics, and came after every event.
    details = terminal["details"]
    assert (details["num_turns"], details["session_id"]) == (3, "stand-in")
    assert details["cost_usd"] == pytest.approx(0.0123) and details["duration_ms"] == 1500
    assert details["events_sent"] == len(api.events(TASK)) > 0 and details["events_dropped"] == 0
    assert set(details["usage"]) == set(sr.USAGE_KEYS)
    [pull] = github.pulls
    assert terminal["details"]["pr_url"] == pull["html_url"]
    assert pull["head"] == f"shepherd/{TASK}" and pull["base"] == "main"
    assert pull["title"] == "Fix the greeting"
    assert f"task `{TASK}`" in pull["body"] and "https://github.com/o/r/issues/1" in pull["body"]
    assert github.log("acme", "widgets", f"shepherd/{TASK}")[0] == "Update greeting"
    seen = world.seen()
    assert seen["branch"] == f"shepherd/{TASK}"
    assert seen["env"] == {
        "SHEPHERD_API_URL": api.url, "SHEPHERD_TASK_ID": TASK, "SHEPHERD_BASE_REF": "main",
        "DISABLE_AUTOUPDATER": "1", "CI": "true",
    }  # fmt: skip
    assert seen["has_gh_token"]
    argv = seen["argv"]
    assert argv[0] == "-p" and "Fix the greeting" in argv[1]
    assert str(world.runner and pathlib.Path(world.seen()["cwd"])).endswith("widgets")
    for flag in ("--dangerously-skip-permissions", "--verbose"):
        assert flag in argv
    assert argv[argv.index("--output-format") + 1] == "stream-json"
    assert argv[argv.index("--max-turns") + 1] == "50"
    assert argv[argv.index("--max-budget-usd") + 1] == "10.00"


def test_token_never_leaves_in_config_argv_logs_or_statuses(world, api, github, home, tmp_path):
    world.run("secrets")
    token = world.token
    repo = tmp_path / "workspace" / "widgets"
    assert token not in (repo / ".git" / "config").read_text()
    assert token not in world.seen()["ps"]
    assert token not in world.runner.output
    assert token not in json.dumps(api.statuses(TASK))
    assert token not in json.dumps(api.events(TASK))
    for path in [*home.rglob("*"), *repo.rglob("*")]:
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    # Git used it all the same: anonymous requests were refused, the clone and push got in.
    assert any(r["status"] == 401 for r in github.git_requests)
    assert any(r["authorized"] and r["service"] == "git-receive-pack" for r in github.git_requests)
    assert api.terminal(TASK)["event"] == "completed"


def test_no_commits_fails_with_the_agents_explanation(world, api, github):
    terminal = world.run("nothing")
    assert world.code == 0
    assert terminal["event"] == "failed"
    assert terminal["message"] == "no changes made"
    assert "does not exist" in terminal["details"]["error"]
    assert github.pulls == []


def test_agent_crash_fails_with_exit_code_and_stderr(world, api):
    terminal = world.run("crash")
    assert world.code == 0
    assert terminal["event"] == "failed"
    assert terminal["message"].startswith("the agent exited with code 3")
    assert "the agent crashed" in terminal["message"]
    assert terminal["details"]["reported_by"] == "shepherd-runner"


def test_turn_limit_fails_naming_it_and_keeps_the_commits_in_a_draft_pr(world, api, github):
    terminal = world.run("max-turns")
    assert terminal["event"] == "failed"
    assert terminal["message"].startswith(
        "the agent reached its turn limit (50 turns, SHEPHERD_MAX_TURNS); "
        "its unfinished work is in pull request "
    )
    assert terminal["details"]["num_turns"] == 3
    assert terminal["details"]["cost_usd"] == pytest.approx(0.0123)
    [pull] = github.pulls
    assert pull["draft"] is True and terminal["details"]["pr_url"] == pull["html_url"]
    assert pull["body"].startswith("Unfinished: the agent reached its turn limit")


def test_missing_agent_binary_fails_clearly(world, api, tmp_path):
    terminal = world.run("commit", SHEPHERD_CLAUDE_BIN=str(tmp_path / "no-such-claude"))
    assert terminal["event"] == "failed"
    assert "could not start" in terminal["message"] and "no-such-claude" in terminal["message"]


def test_uncommitted_changes_are_sent_back_once_then_the_pr_opens(world, api, github):
    terminal = world.run("uncommitted")
    assert terminal["event"] == "completed", api.statuses(TASK)
    assert len(github.pulls) == 1
    assert github.log("acme", "widgets", f"shepherd/{TASK}")[0] == "Commit it"
    assert "asks the agent to go on" in world.runner.output


def test_pull_request_opened_by_the_agent_is_found_not_duplicated(world, api, github):
    terminal = world.run("own-pr")
    assert terminal["event"] == "completed"
    [pull] = github.pulls
    assert terminal["details"]["pr_url"] == pull["html_url"]
    assert "pr_opened_by" not in terminal["details"]


@pytest.mark.parametrize(
    ("code", "words"), [(422, "refused to create the pull request"), (403, "refused the request")]
)
def test_github_refusing_the_pr_fails_with_the_reason(world, api, github, code, words):
    github.fail_next("pulls_create", [code, code])
    terminal = world.run("commit")
    assert terminal["event"] == "failed"
    assert words in terminal["message"] and f"HTTP {code}" in terminal["message"]
    assert github.pulls == []


def test_token_already_issued_fails_before_cloning(world, api, github):
    import requests

    assert requests.get(f"{api.url}/api/v1/tasks/{TASK}/token", timeout=5).status_code == 200
    terminal = world.run("commit")
    assert terminal["event"] == "failed"
    assert terminal["message"] == "token already issued; this runner cannot obtain credentials"
    assert github.git_requests == []
    assert world.code == 0


def test_task_already_terminal_exits_quietly(world, api):
    import requests

    requests.post(
        f"{api.url}/api/v1/tasks/{TASK}/status",
        json={"event": "failed", "message": "cancelled"},
        timeout=5,
    )
    world.run("commit")
    assert world.code == 0
    assert [s["event"] for s in api.statuses(TASK) if s["event"] != "started"] == ["failed"]
    assert "already terminal" in world.runner.output


def test_api_answering_503_twice_is_retried(world, api):
    api.fail_next(TASK, "/data", [503, 503])
    terminal = world.run("commit")
    assert terminal["event"] == "completed"


def test_unknown_task_exits_nonzero_without_reporting(world, api):
    runner = world.start("commit")
    runner.assign("no-such-task", api.url)
    assert runner.wait() == 1
    assert "unknown to the Shepherd API" in runner.output


def test_clone_refused_when_the_token_does_not_open_the_repository(world, api, github):
    github.token = "ghs_another_token_entirely_0000000000"
    terminal = world.run("commit")
    assert terminal["event"] == "failed"
    assert terminal["message"].startswith("cloning ")
    assert world.token not in terminal["message"]


@pytest.mark.parametrize(
    "url", ["file:///etc", "ssh://git@github.com/o/r.git", "--upload-pack=touch /tmp/x", "/srv/r"]
)
def test_non_http_repository_fails_before_git_runs(world, api, github, url):
    api.add_task("odd-url", repo_url=url)
    runner = world.start("commit")
    runner.assign("odd-url", api.url)
    assert runner.wait() == 0
    terminal = api.terminal("odd-url")
    assert terminal["event"] == "failed" and "repository URL" in terminal["message"]
    assert github.git_requests == []


def test_missing_ref_fails_with_gits_message(world, api, github):
    api.add_task("bad-ref", repo_url=world.repo_url, ref="no-such-branch", token=github.token)
    runner = world.start("commit")
    runner.assign("bad-ref", api.url)
    runner.wait()
    terminal = api.terminal("bad-ref")
    assert terminal["event"] == "failed"
    assert "no-such-branch" in terminal["message"]


def test_work_dir_not_writable_fails(world, api, tmp_path):
    terminal = world.run("commit", SHEPHERD_WORK_DIR=str(tmp_path / "missing" / "dir"))
    assert terminal["event"] == "failed"
    assert "not writable" in terminal["message"]


def _wait_for_pid_file_gone(pids, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{p}") for p in pids):
            return True
        time.sleep(0.05)
    return False


def _sleepers(marker_env_value):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = pathlib.Path(f"/proc/{entry}/cmdline").read_bytes()
                env = pathlib.Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"sleep\x00600") and marker_env_value.encode() in env:
                found.append(int(entry))
    return found


def test_sigterm_stops_every_agent_process_and_the_runners_failure_lands_first(world, api, github):
    runner = world.start("hang")
    runner.assign(TASK, api.url)
    runner.wait_for(r"Working on it|agent started")
    api.wait_event(TASK, lambda e: e["summary"] == "Working on it.", timeout=30)
    assert _sleepers(f"STAND_IN_RECORD={world.record}")
    start = time.monotonic()
    runner.proc.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=15) == 0
    elapsed = time.monotonic() - start
    assert elapsed < 10
    terminal = api.terminal(TASK)
    assert terminal["event"] == "failed"
    assert terminal["message"].startswith("terminated (SIGTERM)")
    assert terminal["details"]["reported_by"] == "shepherd-runner"
    # The hook the agent ran on SIGTERM stood down instead of reporting "completed".
    assert [
        s for s in api.statuses(TASK) if s.get("details", {}).get("reported_by") == "stop-hook"
    ] == []
    assert _sleepers(f"STAND_IN_RECORD={world.record}") == []
    assert github.pulls == []  # the grace period is for reporting, not for pushing


def test_sigterm_with_the_api_down_exits_1_naming_the_lost_status_before_sigkill(world, api):
    runner = world.start("hang")
    runner.assign(TASK, api.url)
    api.wait_event(TASK, lambda e: e["summary"] == "Working on it.", timeout=30)
    api.fail_for("/status", 600)
    start = time.monotonic()
    runner.proc.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=30) == 1
    assert time.monotonic() - start < sr.POD_GRACE - 1  # before the SIGKILL, with room
    assert "ERROR terminal status lost event=failed" in runner.output
    assert api.terminal(TASK) is None


def test_deadline_stops_the_agent_and_fails_with_timed_out(world, api, github):
    terminal = world.run("hang", SHEPHERD_TASK_TIMEOUT="2s")
    assert terminal["event"] == "failed"
    assert terminal["message"].startswith("timed out after 2s (SHEPHERD_TASK_TIMEOUT); ")
    assert terminal["details"]["reported_by"] == "shepherd-runner"
    # The agent had committed before it hung: that work is kept, as a draft.
    assert [p["draft"] for p in github.pulls] == [True]
    assert _sleepers(f"STAND_IN_RECORD={world.record}") == []
