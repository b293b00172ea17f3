"""End to end with the real Claude Code CLI, driven by a scripted model.

The runner runs as production does (`python -m shepherd_runner serve`, the
repository's settings.json and CLAUDE.md as its config dir); the CLI talks to
tests/fake_model.py; the Shepherd API and GitHub are the loopback fakes.
"""

from __future__ import annotations

import json
import secrets
import signal
import time

import pytest

from fake_model import FakeModel
from harness import Runner, processes, runner_env

pytestmark = pytest.mark.e2e
TASK = "e2e-task"
BRANCH = f"shepherd/{TASK}"


def bash(command):
    return {"tool": "Bash", "input": {"command": command, "description": "run"}}


def end(text):
    return {"text": text, "end": True}


def long_command(seconds):
    """A long, silent command, as a slow build or test run is: `sleep N` runs in it.

    The CLI refuses a Bash command that starts with a long `sleep` (2.1.332,
    tests/CLI_FINDINGS.md), so the sleep comes second.
    """
    return bash(f"echo working && sleep {seconds}")


COMMIT = bash("git add -A && git commit -qm 'Update greeting' && git log --oneline | head -3")
READ = {"tool": "Read", "input": {"file_path": "README.md"}}
# The CLI refuses to edit a file it has not read: a change is two steps.
CHANGE = [READ, {"tool": "Edit", "input": {"file_path": "README.md", "old_string": "hello",
                                           "new_string": "hello world"}}]  # fmt: skip


@pytest.fixture
def e2e(tmp_path, home, api, github, token, claude_bin):
    class E2E:
        repo_url = github.create_repo("acme", "widgets")
        api_key = "sk-ant-test-" + secrets.token_hex(12)
        model = None

        def __init__(self):
            api.add_task(TASK, repo_url=self.repo_url, token=token,
                         context="The greeting lives in README.md.")  # fmt: skip

        def run(self, script, **extra):
            self.model = FakeModel(script).start()
            env = runner_env(
                tmp_path, claude_bin=claude_bin, github=github, HOME=str(home),
                ANTHROPIC_BASE_URL=self.model.url, ANTHROPIC_API_KEY=self.api_key,
                IS_SANDBOX="1",  # CI runs as root; the CLI refuses to skip permissions there
                CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
                CLAUDE_CODE_MAX_RETRIES="0",  # a failing model fails now, not in 3 minutes
                **extra,
            )  # fmt: skip
            self.runner = Runner(env)
            self.runner.assign(TASK, api.url)
            return self.runner

        def finish(self, script, **extra):
            self.run(script, **extra)
            self.code = self.runner.wait(timeout=180)
            return api.terminal(TASK)

    world = E2E()
    yield world
    if hasattr(world, "runner"):
        world.runner.kill()
    if world.model:
        world.model.stop()


def test_success_decided_by_the_hook_is_reported_once_after_every_event_with_metrics(
    e2e, api, github
):
    script = [
        {"text": "Let me look at the README first.", **READ},
        CHANGE[1],
        bash("cat nonexistent-file"),
        COMMIT,
        end("I updated the greeting in README.md and committed it."),
    ]  # fmt: skip
    terminal = e2e.finish(script)
    assert e2e.code == 0, e2e.runner.output
    assert [s["event"] for s in api.statuses(TASK)] == ["started", "completed"]
    assert terminal["event"] == "completed", api.statuses(TASK)
    # The hook decided (its log line is in the pod log); the runner reported.
    details = terminal["details"]
    assert (details["decided_by"], details["reported_by"]) == ("stop-hook", "shepherd-runner")
    assert " INFO stop hook task_id=e2e-task hook_event=Stop" in e2e.runner.output
    [pull] = github.pulls
    assert details["pr_url"] == pull["html_url"]
    assert pull["body"].startswith("I updated the greeting in README.md and committed it.")
    assert github.log("acme", "widgets", BRANCH)[0] == "Update greeting"
    assert details["num_turns"] >= 5 and details["session_id"] and details["cost_usd"] > 0
    assert details["duration_ms"] > 0 and details["events_dropped"] == 0
    # The scripted model reports 10 input tokens per reply (tests/fake_model.py).
    assert details["usage"]["input_tokens"] == 10 * 5, details["usage"]

    events = api.events(TASK)
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert details["events_sent"] == len(events)
    ui = [(e["type"], e.get("tool"), e["summary"]) for e in events]
    assert ui == [
        ("thinking", None, "Let me look at the README first."),
        ("tool_call", "Read", "Reading README.md"),
        ("tool_result", "Read", "Read ok: 1\thello"),
        ("tool_call", "Edit", "Editing README.md"),
        ("tool_result", "Edit", ui[4][2]),
        ("tool_call", "Bash", "cat nonexistent-file"),
        ("tool_result", "Bash", "Bash failed: Exit code 1"),
        ("tool_call", "Bash", COMMIT["input"]["command"]),
        ("tool_result", "Bash", ui[8][2]),
        ("thinking", None, "I updated the greeting in README.md and committed it."),
    ]  # fmt: skip
    assert ui[4][2].startswith("Edit ok: The file README.md has been updated")
    assert events[3]["input"] == {"file_path": "README.md", "edits": 1, "old_chars": 5,
                                  "new_chars": 11}  # fmt: skip
    assert events[6]["output"]["success"] is False


def test_prompt_carries_description_source_and_context_file(e2e, home):
    e2e.finish([end("Nothing to do.")])
    first = json.dumps(e2e.model.requests[0]["messages"])
    assert "Fix the greeting" in first
    assert "https://github.com/o/r/issues/1" in first
    assert str(home / "task-context.md") in first
    assert (home / "task-context.md").read_text() == "The greeting lives in README.md."
    assert (home / ".claude" / "settings.json").exists()


def test_no_changes_fails_with_the_agents_explanation(e2e, api, github):
    terminal = e2e.finish([end("I cannot do this: README.md has no greeting to fix.")])
    assert terminal["event"] == "failed"
    assert terminal["message"] == "no changes made"
    assert terminal["details"]["error"] == "I cannot do this: README.md has no greeting to fix."
    assert terminal["details"]["decided_by"] == "stop-hook"
    assert github.pulls == []
    # The agent's only event reached the API before the status that closes its stream.
    assert [e["type"] for e in api.events(TASK)] == ["thinking"]
    assert terminal["details"]["events_sent"] == 1


def test_turn_limit_fails_naming_it(e2e, api):
    terminal = e2e.finish([bash(f"echo step {i}") for i in range(6)], SHEPHERD_MAX_TURNS="2")
    assert terminal["event"] == "failed"
    assert terminal["message"] == "the agent reached its turn limit (2 turns, SHEPHERD_MAX_TURNS)"
    assert e2e.code == 0


def test_turn_limit_after_a_commit_keeps_the_work_in_a_draft_pr(e2e, api, github):
    script = [*CHANGE, COMMIT, *[bash(f"echo step {i}") for i in range(5)]]
    terminal = e2e.finish(script, SHEPHERD_MAX_TURNS="4")
    assert terminal["event"] == "failed"
    assert terminal["message"].startswith("the agent reached its turn limit (4 turns")
    [pull] = github.pulls
    assert pull["draft"] is True and terminal["details"]["pr_url"] == pull["html_url"]
    assert github.log("acme", "widgets", BRANCH)[0] == "Update greeting"


def test_model_api_error_fails_with_the_clis_error_without_hanging(e2e, api):
    start = time.monotonic()
    terminal = e2e.finish([{"error": 500, "message": "the model is down"}])
    assert time.monotonic() - start < 60
    assert terminal["event"] == "failed"
    # The CLI's StopFailure hook and the runner race; both tell the CLI's error.
    assert "API Error: 500" in terminal["message"], terminal
    assert e2e.code == 0


def test_token_appears_nowhere_the_agent_could_show_it(e2e, api, github, home, tmp_path, token):
    ps_file = tmp_path / "ps.txt"
    script = [
        bash("env | grep '^GH_TOKEN='"),
        bash("env"),
        bash("git remote -v"),
        bash("cat .git/config"),
        bash("git config --list --show-origin"),
        bash(f"ps -eo pid,args > {ps_file}"),
        *CHANGE,
        COMMIT,
        end("Done."),
    ]
    terminal = e2e.finish(script)
    assert terminal["event"] == "completed", terminal
    # The agent did see the token; the UI sees the mask in its place.
    env_result = next(e for e in api.events(TASK) if e["type"] == "tool_result")
    assert env_result["output"]["summary"] == "GH_TOKEN=[REDACTED]"
    leaks = {
        "statuses": json.dumps(api.statuses(TASK)),
        "events": json.dumps(api.events(TASK)),
        "runner and hook log": e2e.runner.output,
        "ps": ps_file.read_text(),
    }
    for where, text in leaks.items():
        assert token not in text, where
        assert e2e.api_key not in text, where
    work = tmp_path / "workspace"
    for path in [*home.rglob("*"), *work.rglob("*")]:
        if path.is_file() and not path.is_symlink():
            assert token.encode() not in path.read_bytes(), path
    assert len(github.pulls) == 1  # and git still pushed with it


def test_uncommitted_work_is_sent_back_once_then_committed_and_opened(e2e, api, github):
    script = [*CHANGE, end("Done."), bash("git commit -qam 'Commit leftovers'"), end("Committed.")]
    terminal = e2e.finish(script)
    assert terminal["event"] == "completed", api.statuses(TASK)
    assert github.log("acme", "widgets", BRANCH)[0] == "Commit leftovers"
    assert len(github.pulls) == 1
    feedback = [e for e in api.events(TASK) if e.get("metadata", {}).get("role") == "user"]
    assert feedback and feedback[0]["summary"].startswith("Stop hook feedback")


def test_pr_opened_by_the_agent_is_found_and_none_added(e2e, api, github):
    create = (
        'curl -sf -H "Authorization: Bearer $GH_TOKEN" '
        f'-d \'{{"title":"Mine","head":"{BRANCH}","base":"main","body":"b"}}\' '
        "$SHEPHERD_GITHUB_API_URL/repos/acme/widgets/pulls"
    )
    script = [*CHANGE, COMMIT, bash(f"git push -q origin HEAD && {create}"), end("Opened it.")]
    terminal = e2e.finish(script)
    assert terminal["event"] == "completed", api.statuses(TASK)
    [pull] = github.pulls
    assert pull["title"] == "Mine"
    assert terminal["details"]["pr_url"] == pull["html_url"]
    assert "pr_opened_by" not in terminal["details"]


@pytest.mark.parametrize("code", [422, 403])
def test_github_refusing_the_pr_fails_with_its_reason(e2e, api, github, code):
    github.fail_next("pulls_create", [code] * 4)
    terminal = e2e.finish([*CHANGE, COMMIT, end("Done.")])
    assert terminal["event"] == "failed"
    assert f"HTTP {code}" in terminal["message"]
    assert github.pulls == []


def test_sigterm_stops_the_cli_and_its_commands_within_10s(e2e, api):
    marker = b"sleep\x00613\x00"
    runner = e2e.run([long_command(613), end("Slept.")])
    deadline = time.monotonic() + 60
    while not processes(marker):  # the agent's command is up: the CLI is mid-tool
        assert time.monotonic() < deadline and runner.proc.poll() is None, runner.output
        time.sleep(0.05)
    start = time.monotonic()
    runner.proc.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=20) == 0
    elapsed = time.monotonic() - start
    terminal = api.terminal(TASK)
    assert terminal["event"] == "failed"
    assert terminal["message"].startswith("terminated (SIGTERM)")
    assert elapsed < 10, elapsed
    assert processes(marker) == []
    print(f"SIGTERM to exit: {elapsed:.2f}s")
