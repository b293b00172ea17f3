"""The repository's setup end to end: `.shepherd/setup.sh` before the real Claude Code CLI.

As tests/test_e2e.py: the runner runs as production does, the CLI talks to
the scripted model, the Shepherd API and GitHub are the loopback fakes. The
repository on the fake GitHub carries the setup script, committed executable.
"""

from __future__ import annotations

import datetime
import json
import secrets
import signal

import pytest

from fake_model import FakeModel
from harness import Runner, processes, runner_env

pytestmark = pytest.mark.e2e
TASK = "setup-task"
SCRIPT = ".shepherd/setup.sh"


def bash(command):
    return {"tool": "Bash", "input": {"command": command, "description": "run"}}


def end(text):
    return {"text": text, "end": True}


READ = {"tool": "Read", "input": {"file_path": "README.md"}}
CHANGE = [READ, {"tool": "Edit", "input": {"file_path": "README.md", "old_string": "hello",
                                           "new_string": "hello world"}}]  # fmt: skip
COMMIT = bash("git add -A && git commit -qm 'Update greeting'")


@pytest.fixture
def task(tmp_path, home, api, github, token, claude_bin):
    """A task whose repository has `setup` as its .shepherd/setup.sh; `finish` runs it."""

    class Task:
        api_key = "sk-ant-test-" + secrets.token_hex(12)
        model = runner = None

        def finish(self, setup, script, runner_class=Runner, files=None, **extra):
            files = {"README.md": "hello\n", **(files or {})}
            if setup is not None:
                files[SCRIPT] = "#!/bin/bash\n" + setup
            repo_url = github.create_repo("acme", "widgets", files=files, executable=(SCRIPT,))
            api.add_task(TASK, repo_url=repo_url, token=token, context="Greeting in README.md.")
            self.model = FakeModel(script).start()
            env = runner_env(
                tmp_path, claude_bin=claude_bin, github=github, HOME=str(home),
                ANTHROPIC_BASE_URL=self.model.url, ANTHROPIC_API_KEY=self.api_key,
                IS_SANDBOX="1", CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
                CLAUDE_CODE_MAX_RETRIES="0", **extra,
            )  # fmt: skip
            self.runner = runner_class(env)
            self.runner.assign(TASK, api.url)
            self.code = self.runner.wait(timeout=180)
            return api.terminal(TASK)

        def setup_events(self):
            return [e for e in api.events(TASK) if e.get("tool") == "setup"]

        def model_saw(self):
            """Everything the model was sent: the prompt, the tool results."""
            return json.dumps([r["messages"] for r in self.model.requests])

    world = Task()
    yield world
    if world.runner:
        world.runner.kill()
    if world.model:
        world.model.stop()


INSTALL = """\
set -e
cat > "$HOME/.local/bin/greeter" <<'EOF'
#!/bin/sh
echo "greeter says hi"
EOF
chmod +x "$HOME/.local/bin/greeter"
echo "FOO=bar" >> "$SHEPHERD_ENV"
echo "installed greeter"
"""


def test_setup_installs_a_command_and_a_variable_that_the_agent_then_uses_by_name(task, api):
    terminal = task.finish(INSTALL, [bash('greeter && echo "FOO is $FOO"'), end("Checked.")])
    assert task.code == 0, task.runner.output
    assert terminal["details"]["setup"]["status"] == "ok"
    assert terminal["details"]["setup"]["exit_code"] == 0
    # The Bash tool's result, as the model received it.
    saw = task.model_saw()
    assert "greeter says hi" in saw and "FOO is bar" in saw, saw[-2000:]
    assert "setup failed" not in saw


def test_without_a_setup_the_report_says_none_and_no_setup_event_is_sent(task, api):
    terminal = task.finish(None, [end("Nothing to do.")])
    assert terminal["details"]["setup"] == {"status": "none", "exit_code": None, "seconds": 0.0}
    assert task.setup_events() == []
    assert " setup started" not in task.runner.output


def test_setup_runs_before_the_first_model_request_and_its_lines_reach_the_api(task, api):
    terminal = task.finish(INSTALL + "echo second line >&2\n", [end("Nothing to do.")])
    assert terminal["details"]["setup"]["status"] == "ok"
    events = api.events(TASK)
    setup = task.setup_events()
    # Setup's events come first, as a command the UI shows: its call, its lines, its end.
    assert events[: len(setup)] == setup
    assert (setup[0]["type"], setup[0]["summary"], setup[0]["input"]) == (
        "tool_call", SCRIPT, {"command": SCRIPT},
    )  # fmt: skip
    lines = [e["metadata"]["text"] for e in setup[1:-1]]
    assert "\n".join(lines) == "installed greeter\nsecond line"
    assert setup[-1]["type"] == "tool_result" and setup[-1]["output"]["success"] is True
    ended = datetime.datetime.fromisoformat(setup[-1]["timestamp"].replace("Z", "+00:00"))
    assert ended.timestamp() < task.model.received[0]
    assert ' INFO setup output line="installed greeter"' in task.runner.output


def test_failing_setup_still_runs_the_agent_which_is_told_why(task, api, github, home):
    setup = 'echo "fetching deps"\necho "error: libfoo not found" >&2\nexit 3\n'
    terminal = task.finish(setup, [*CHANGE, COMMIT, end("Done despite setup.")])
    assert terminal["event"] == "completed", api.statuses(TASK)
    assert len(github.pulls) == 1
    assert terminal["details"]["setup"]["status"] == "failed"
    assert terminal["details"]["setup"]["exit_code"] == 3
    prompt = json.dumps(task.model.requests[0]["messages"])
    assert "The repository's setup failed (.shepherd/setup.sh exited with 3)" in prompt
    context = (home / "task-context.md").read_text()
    assert context.startswith("Greeting in README.md.")
    assert "## The repository's setup failed" in context
    assert "fetching deps\nerror: libfoo not found\n" in context
    assert task.setup_events()[-1]["output"]["success"] is False


def test_what_setup_installs_or_rewrites_is_not_sent_back_as_uncommitted_work(task, api, github):
    setup = (
        "mkdir -p node_modules/left-pad && echo x > node_modules/left-pad/index.js\n"
        "echo '{\"lockfileVersion\": 3}' > package-lock.json\n"
        "echo 1 > generated.txt && git add generated.txt && git commit -qm 'setup: generate'\n"
    )
    commit = bash("git add README.md && git commit -qm 'Update greeting'")
    terminal = task.finish(
        setup, [*CHANGE, commit, end("Greeting updated.")], files={"package-lock.json": "{}\n"}
    )
    assert terminal["event"] == "completed", api.statuses(TASK)
    assert "uncommitted" not in terminal["details"]
    assert terminal["details"]["commits"] == 1  # the agent's, not setup's
    assert "You left uncommitted changes" not in task.model_saw()
    assert "setup committed; the agent's commits count from its head" in task.runner.output


def test_hanging_setup_is_stopped_at_its_timeout_and_leaves_no_process(task, api):
    setup = "sleep 611 &\nsetsid sleep 612 &\necho waiting\nsleep 613\n"
    terminal = task.finish(setup, [end("Nothing to do.")], SHEPHERD_SETUP_TIMEOUT="2s")
    details = terminal["details"]["setup"]
    assert (details["status"], details["exit_code"]) == ("timeout", None)
    assert 2 <= details["seconds"] < 8, details
    for seconds in (b"611", b"612", b"613"):
        assert processes(b"sleep\x00" + seconds + b"\x00") == []
    prompt = json.dumps(task.model.requests[0]["messages"])
    assert "(.shepherd/setup.sh timed out after 2s (SHEPHERD_SETUP_TIMEOUT))" in prompt
    # The agent still ran: its answer is the task's outcome.
    assert terminal["message"] == "no changes made"


def test_the_token_never_shows_in_setup_events_or_logs_even_when_printed(
    task, api, home, tmp_path, token
):
    setup = 'echo "token=$GH_TOKEN"\nenv | grep GH_TOKEN >&2\nexit 1\n'
    terminal = task.finish(setup, [end("Nothing to do.")], SHEPHERD_SETUP_COMMAND="echo $GH_TOKEN")
    assert terminal["details"]["setup"]["status"] == "failed"
    text = json.dumps(task.setup_events())
    assert "[REDACTED]" in text and "token=[REDACTED]" in task.runner.output
    leaks = {
        "events": json.dumps(api.events(TASK)), "statuses": json.dumps(api.statuses(TASK)),
        "log": task.runner.output, "model": task.model_saw(),
    }  # fmt: skip
    for where, seen in leaks.items():
        assert token not in seen, where
    work = tmp_path / "workspace"
    for path in [*home.rglob("*"), *work.rglob("*")]:
        if path.is_file() and not path.is_symlink():
            assert token.encode() not in path.read_bytes(), path


def test_a_task_deadline_reached_in_setup_fails_the_task_before_the_agent(task, api):
    terminal = task.finish("sleep 614\n", [end("Never asked.")], SHEPHERD_TASK_TIMEOUT="2s")
    assert terminal["event"] == "failed"
    assert terminal["message"] == (
        ".shepherd/setup.sh timed out after 2s (SHEPHERD_TASK_TIMEOUT), before the agent started"
    )
    assert terminal["details"]["setup"]["status"] == "timeout"
    assert task.model.requests == []
    assert processes(b"sleep\x00614\x00") == []


def test_a_signal_during_setup_ends_the_task_like_anywhere_else(task, api):
    class Signalling(Runner):
        """Sends SIGTERM once the runner logs the setup's first line."""

        def on_line(self, line):
            if " setup output line=ready " in line:
                self.proc.send_signal(signal.SIGTERM)

    terminal = task.finish("echo ready\nsleep 615\n", [end("Never asked.")], Signalling)
    assert task.code == 0
    assert terminal["event"] == "failed"
    assert terminal["message"].startswith("terminated (SIGTERM)"), task.runner.output
    assert terminal["details"]["setup"]["status"] == "failed"
    assert task.model.requests == []
    assert processes(b"sleep\x00615\x00") == []
