"""The repository's setup: which commands run, how they are run and stopped, what they leave.

Real scripts under tmp_path run as real processes; their events go through a
real EventSender to a recording `post`, their log lines through the runner's
formatter into a buffer. Tests synchronise on the sender's posts, never on sleeps.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import sys
import threading
import time

import pytest

import shepherd_runner as sr

WAIT = 30  # seconds; only reached when something is broken

pytestmark = pytest.mark.usefixtures("log")


class Setup:
    """A repository under tmp_path, and run_setup on it as the task flow calls it."""

    def __init__(self, tmp_path, home, token, log):
        self.repo = tmp_path / "repo"
        (self.repo / ".shepherd").mkdir(parents=True)
        self.home, self.token, self.log = home, token, log
        self.env_file = str(home / "setup.env")
        self.run_id = secrets.token_hex(8)
        self.redact = sr.Redactor([token])
        self.stop = sr.Stop()
        self.posted: list[dict] = []
        self.cond = threading.Condition()
        self.on_event = lambda event: None

    def script(self, text: str, mode: int = 0o755) -> None:
        path = self.repo / ".shepherd" / "setup.sh"
        path.write_text("#!/bin/bash\n" + text)
        path.chmod(mode)

    def post(self, batch: list[dict]) -> int:
        with self.cond:
            self.posted.extend(batch)
            self.cond.notify_all()
        for event in batch:
            self.on_event(event)
        return 200

    def run(self, command: str = "", limit: float | None = WAIT, **kwargs) -> sr.SetupResult:
        sender = sr.EventSender(self.post, interval=0.01)
        env = {
            "PATH": os.environ["PATH"], "HOME": str(self.home), "GH_TOKEN": self.token,
            "SHEPHERD_RUN_ID": self.run_id,
        }  # fmt: skip
        try:
            return sr.run_setup(
                sr.setup_steps(str(self.repo), command), cwd=str(self.repo), env=env,
                env_file=self.env_file, sender=sender, parser=sr.StreamParser(self.redact),
                stop=self.stop, limit=limit, **kwargs,
            )  # fmt: skip
        finally:
            sender.close()

    @property
    def events(self) -> list[dict]:
        with self.cond:
            return list(self.posted)

    def output_text(self) -> str:
        return "\n".join(e["metadata"]["text"] for e in self.events if "text" in e["metadata"])

    def left_running(self) -> list[int]:
        return sr.marked_processes(f"SHEPHERD_RUN_ID={self.run_id}".encode())


@pytest.fixture
def setup(tmp_path, home, token, log):
    world = Setup(tmp_path, home, token, log)
    yield world
    sr.stop_processes(f"SHEPHERD_RUN_ID={world.run_id}".encode(), grace=0.5)


# ---------------------------------------------------------------------------
# which commands run
# ---------------------------------------------------------------------------


def test_without_a_command_or_a_script_there_is_no_setup(setup):
    assert sr.setup_steps(str(setup.repo), "") == []
    result = setup.run()
    assert result.details() == {"status": "none", "exit_code": None, "seconds": 0.0}


def test_the_operators_command_runs_with_bash_before_the_repositorys_script(setup):
    setup.script("echo from the script\n")
    steps = sr.setup_steps(str(setup.repo), "echo from the operator")
    assert [s.argv for s in steps] == [
        ["bash", "-c", "echo from the operator"],
        [str(setup.repo / ".shepherd" / "setup.sh")],
    ]
    assert setup.run("echo from the operator").status == "ok"
    assert setup.output_text() == "from the operator\nfrom the script"


def test_the_operators_command_shows_as_its_setting_name_never_its_text(setup, log):
    setup.script("echo from the script\n")
    assert setup.run("NPM_TOKEN=inline-secret-1234 true").status == "ok"
    calls = [e for e in setup.events if e["type"] == "tool_call"]
    assert [(e["summary"], e["input"]) for e in calls] == [
        ("SHEPHERD_SETUP_COMMAND", {"command": "SHEPHERD_SETUP_COMMAND"}),
        (sr.SETUP_SCRIPT, {"command": sr.SETUP_SCRIPT}),
    ]
    assert "inline-secret" not in json.dumps(setup.events) + log.getvalue()


def test_a_script_that_is_not_executable_is_skipped_with_a_hint(setup, log):
    setup.script("echo never\n", mode=0o644)
    assert sr.setup_steps(str(setup.repo), "") == []
    assert "setup script skipped: not an executable file" in log.getvalue()
    assert "git update-index --chmod=+x .shepherd/setup.sh" in log.getvalue()


def test_a_failing_operator_command_keeps_the_repositorys_script_from_running(setup):
    setup.script("touch ran\n")
    result = setup.run("echo broken >&2; exit 3")
    assert (result.status, result.exit_code) == ("failed", 3)
    assert result.failed == "SHEPHERD_SETUP_COMMAND exited with 3"
    assert result.tail == ["broken"]
    assert not (setup.repo / "ran").exists()


# ---------------------------------------------------------------------------
# how it runs: directory, environment, output
# ---------------------------------------------------------------------------


def test_it_runs_in_the_repository_root_with_the_given_environment_and_shepherd_env(setup):
    setup.script('pwd; echo "home=$HOME run=$SHEPHERD_RUN_ID"; echo "env=$SHEPHERD_ENV"\n')
    assert setup.run().status == "ok"
    assert setup.output_text().splitlines() == [
        str(setup.repo), f"home={setup.home} run={setup.run_id}", f"env={setup.env_file}",
    ]  # fmt: skip


def test_output_reaches_the_api_as_a_setup_call_lines_in_batches_and_a_last_result(setup, log):
    setup.script('for i in $(seq 1 45); do echo "line $i"; done; echo err >&2\n')
    result = setup.run()
    assert (result.status, result.exit_code) == ("ok", 0)
    events = setup.events
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    call, *chunks, last = events
    assert (call["type"], call["tool"], call["summary"]) == ("tool_call", "setup", sr.SETUP_SCRIPT)
    assert call["input"] == {"command": sr.SETUP_SCRIPT}
    assert [(e["type"], e["tool"], e["metadata"]["lines"]) for e in chunks] == [
        ("tool_result", "setup", 20), ("tool_result", "setup", 20), ("tool_result", "setup", 6),
    ]  # fmt: skip
    assert chunks[0]["summary"] == "line 1" and "output" not in chunks[0]
    assert setup.output_text().splitlines() == [f"line {i}" for i in range(1, 46)] + ["err"]
    assert last["type"] == "tool_result" and last["output"]["success"] is True
    assert last["summary"].startswith("setup ok: exited with 0 after ")
    assert last["metadata"]["lines"] == 46 and last["metadata"]["exit_code"] == 0
    ids = {e["metadata"]["tool_use_id"] for e in events}
    assert ids == {"setup-1"}
    logged = [ln for ln in log.getvalue().splitlines() if " INFO setup output " in ln]
    assert len(logged) == 46 and logged[0].endswith('setup output line="line 1"')


def test_lines_past_the_event_limit_go_to_the_log_only_and_the_result_says_so(setup, log):
    setup.script("seq 1 50\n")
    steps = sr.setup_steps(str(setup.repo), "")
    sender = sr.EventSender(setup.post, interval=0.01)
    output = sr.SetupOutput(sender, sr.StreamParser(setup.redact), "s", lines=10, max_events=2)
    env = {"PATH": os.environ["PATH"], "SHEPHERD_RUN_ID": setup.run_id}
    code, why = sr.run_setup_command(
        steps[0].argv, cwd=str(setup.repo), env=env, output=output, stop=setup.stop,
        limits=sr.Limits(),
    )  # fmt: skip
    output.done(True, "exited with 0", code, 0.1)
    sender.close()
    assert (code, why) == (0, "")
    assert setup.output_text().splitlines() == [str(i) for i in range(1, 21)]
    assert setup.events[-1]["summary"] == "setup ok: exited with 0; 30 lines in the log only"
    assert log.getvalue().count(" INFO setup output ") == 50


def test_a_line_without_its_end_is_sent_at_once_not_held_until_more_comes(setup):
    # The script waits for its first line to reach the API before it ends.
    ready = setup.repo / "seen"
    setup.script(f"printf 'half a line'; while [ ! -e {ready} ]; do sleep 0.01; done\n")
    setup.on_event = lambda e: ready.touch() if e["summary"] == "half a line" else None
    assert setup.run(limit=WAIT).status == "ok"
    assert "half a line" in setup.output_text()


def test_a_progress_bar_shows_as_its_last_state_and_cr_lf_ends_are_trimmed(setup):
    setup.script("printf '10%%\\r50%%\\r100%%\\r\\ndone\\r\\n'\n")
    setup.run()
    assert setup.output_text() == "100%\ndone"


def test_the_token_never_shows_in_events_or_the_log_even_when_the_script_prints_it(setup, log):
    sr.setup_logging(log, setup.redact)  # as main() does once the token is known
    setup.script('echo "token=$GH_TOKEN"; echo "$GH_TOKEN" >&2; exit 1\n')
    result = setup.run(f"echo {setup.token}")
    assert result.status == "failed"
    text = json.dumps(setup.events) + log.getvalue() + sr.setup_context(result)
    assert setup.token not in text
    assert "token=[REDACTED]" in setup.output_text()
    assert "token=[REDACTED]" in log.getvalue()


# ---------------------------------------------------------------------------
# how it ends: failure, timeout, signal, leftovers
# ---------------------------------------------------------------------------


def test_a_failing_script_is_failed_with_its_exit_code_and_last_lines(setup):
    setup.script('for i in $(seq 1 80); do echo "step $i"; done; echo "no compiler" >&2; exit 2\n')
    result = setup.run()
    assert (result.status, result.exit_code) == ("failed", 2)
    assert result.failed == ".shepherd/setup.sh exited with 2"
    assert len(result.tail) == sr.SETUP_TAIL_LINES and result.tail[-1] == "no compiler"
    last = setup.events[-1]
    assert last["output"]["success"] is False
    assert last["summary"].startswith("setup failed: exited with 2 after ")


def test_a_hanging_setup_is_stopped_at_its_timeout_with_everything_it_started(setup):
    setup.script("sleep 600 &\nsetsid sleep 601 &\necho started\nsleep 602\n")
    start = time.monotonic()
    result = setup.run(limit=1)
    elapsed = time.monotonic() - start
    assert (result.status, result.exit_code) == ("timeout", None)
    assert result.failed == ".shepherd/setup.sh timed out after 1s (SHEPHERD_SETUP_TIMEOUT)"
    assert 1 <= elapsed < 1 + sr.KILL_GRACE, elapsed
    assert setup.left_running() == []
    assert setup.events[-1]["summary"].startswith("setup failed: timed out after 1s")


def test_the_task_deadline_is_named_when_it_is_the_nearer_limit(setup):
    setup.script("sleep 600\n")
    result = setup.run(limit=0.5, limit_name="SHEPHERD_TASK_TIMEOUT")
    assert result.status == "timeout"
    assert result.failed.endswith("timed out after 0.5s (SHEPHERD_TASK_TIMEOUT)")


def test_a_process_left_holding_the_output_does_not_hold_the_runner(setup):
    # The script ends at once; its background child keeps stdout open.
    setup.script("sleep 600 &\necho finished\n")
    start = time.monotonic()
    result = setup.run()
    assert (result.status, result.exit_code) == ("ok", 0)
    assert time.monotonic() - start < sr.KILL_GRACE
    assert setup.output_text() == "finished"
    assert setup.left_running() == []


def test_a_process_that_cleared_its_environment_holds_the_output_only_briefly(setup, log):
    # `env -i` drops SHEPHERD_RUN_ID: the runner cannot find the child to stop it.
    # Finishes once the child has dropped it (a scan before its exec would find it).
    setup.script(
        "env -i sleep 30 &\necho $! > escaped.pid\n"
        "while tr '\\0' '\\n' < /proc/$!/environ | grep -q '^SHEPHERD_RUN_ID='; do :; done\n"
        "echo finished\n"
    )
    start = time.monotonic()
    try:
        result = setup.run()
        assert (result.status, result.exit_code) == ("ok", 0)
        assert time.monotonic() - start < sr.SETUP_DRAIN + 2
    finally:
        os.kill(int((setup.repo / "escaped.pid").read_text()), signal.SIGKILL)
    assert setup.output_text() == "finished"
    assert "setup output still open after the command ended; no longer read" in log.getvalue()


def test_a_signal_during_setup_stops_it_at_once(setup):
    setup.script("echo ready\nsleep 600\n")
    setup.on_event = lambda e: e["summary"] == "ready" and setup.stop.trigger(signal.SIGTERM)
    start = time.monotonic()
    result = setup.run()
    assert time.monotonic() - start < sr.KILL_GRACE
    assert (result.status, result.exit_code) == ("failed", None)
    assert result.failed.startswith(".shepherd/setup.sh was stopped: terminated (SIGTERM)")
    assert setup.left_running() == []


def test_a_signal_before_a_command_keeps_it_from_starting(setup):
    setup.script("touch ran\n")
    setup.stop.trigger(signal.SIGTERM)
    result = setup.run()
    assert result.status == "failed" and not (setup.repo / "ran").exists()


def test_a_script_killed_by_a_signal_says_which(setup):
    setup.script("kill -KILL $$\n")
    result = setup.run()
    assert (result.status, result.exit_code) == ("failed", -9)
    assert result.failed == ".shepherd/setup.sh was killed by SIGKILL"


def test_a_script_that_cannot_be_executed_fails_with_the_reason(setup):
    (setup.repo / ".shepherd" / "setup.sh").write_text("echo no shebang line\n")
    (setup.repo / ".shepherd" / "setup.sh").chmod(0o755)
    result = setup.run()
    assert (result.status, result.exit_code) == ("failed", 126)
    assert result.tail == [f"{setup.repo / '.shepherd' / 'setup.sh'}: Exec format error"]


def test_the_agent_gets_what_setup_left_of_the_task_timeout(tmp_path):
    script = tmp_path / "agent.py"
    script.write_text("import time\ntime.sleep(60)\n")
    start = time.monotonic()
    run = sr.run_agent(
        [sys.executable, str(script)], cwd=str(tmp_path),
        env={"PATH": os.environ["PATH"], "SHEPHERD_RUN_ID": "unit-" + tmp_path.name},
        sender=sr.EventSender(lambda batch: 200), parser=sr.StreamParser(sr.Redactor()),
        stop=sr.Stop(), limits=sr.Limits(timeout=60, spent=59.5), grace=1,
    )  # fmt: skip
    assert time.monotonic() - start < 10
    assert run.stopped == "timed out after 1m (SHEPHERD_TASK_TIMEOUT)"


# ---------------------------------------------------------------------------
# $SHEPHERD_ENV
# ---------------------------------------------------------------------------


def test_what_setup_writes_to_shepherd_env_comes_back_and_the_file_goes(setup):
    setup.script('echo "FOO=bar" >> "$SHEPHERD_ENV"; echo "PATH=/opt/x:$PATH" >> "$SHEPHERD_ENV"\n')
    result = setup.run()
    assert result.env == {"FOO": "bar", "PATH": f"/opt/x:{os.environ['PATH']}"}
    assert not os.path.exists(setup.env_file)


def test_shepherd_env_is_read_also_when_setup_failed(setup):
    setup.script('echo "FOO=bar" >> "$SHEPHERD_ENV"; exit 1\n')
    assert setup.run().env == {"FOO": "bar"}


def test_env_file_lines_follow_github_env(tmp_path, log):
    path = tmp_path / "env"
    path.write_bytes(
        b"# a comment\n\n  \nA=1\nB=x=y\r\nC=\nA=2\n  # indented comment\nD= spaced \nE=caf\xc3\xa9"
    )
    assert sr.read_setup_env(str(path)) == {"A": "2", "B": "x=y", "C": "", "D": " spaced ",
                                            "E": "café"}  # fmt: skip
    assert "setup env for the agent names=" in log.getvalue()


@pytest.mark.parametrize(
    "name",
    ["SHEPHERD_API_URL", "SHEPHERD_RUN_ID", "GH_TOKEN", "GIT_CONFIG_COUNT", "GIT_CONFIG_KEY_0",
     "GIT_CONFIG_GLOBAL", "HOME", "TMPDIR", "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY", "CI",
     "GIT_TERMINAL_PROMPT", "GIT_ALLOW_PROTOCOL", "DISABLE_AUTOUPDATER", "GIT_DIR",
     "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_ALTERNATE_OBJECT_DIRECTORIES",
     "GIT_CEILING_DIRECTORIES", "GIT_ASKPASS", "SSH_ASKPASS", "GIT_SSH_COMMAND", "GIT_CONFIG"],
)  # fmt: skip
def test_names_the_runner_sets_are_refused_with_the_name_never_the_value(tmp_path, log, name):
    path = tmp_path / "env"
    path.write_text(f"{name}=value-{name}-secret\nOK=1\n")
    assert sr.read_setup_env(str(path)) == {"OK": "1"}
    refusal = next(ln for ln in log.getvalue().splitlines() if "refused" in ln)
    assert refusal.endswith(f"setup env name refused: the runner sets it name={name} line=1")
    assert "secret" not in log.getvalue()


@pytest.mark.parametrize("line", ["export X=1", "1X=2", "X-Y=3", "no equals sign", "=v", "X Y=1"])
def test_lines_that_are_not_name_value_are_refused_by_line_number(tmp_path, log, line):
    path = tmp_path / "env"
    path.write_text(f"OK=1\n{line}\n")
    assert sr.read_setup_env(str(path)) == {"OK": "1"}
    assert "setup env line refused: not NAME=VALUE line=2" in log.getvalue()
    assert line not in log.getvalue()


def test_a_missing_or_oversized_env_file_adds_nothing(tmp_path, log):
    assert sr.read_setup_env(str(tmp_path / "none")) == {}
    big = tmp_path / "big"
    big.write_bytes(b"A=" + b"x" * sr.SETUP_ENV_BYTES)
    assert sr.read_setup_env(str(big)) == {}
    assert "setup env file over 1 MiB; ignored" in log.getvalue()


# ---------------------------------------------------------------------------
# what the agent gets: PATH, the context
# ---------------------------------------------------------------------------


def test_user_bin_dirs_come_first_on_path_once(tmp_path):
    home = str(tmp_path)
    local, gobin = f"{home}/.local/bin", f"{home}/go/bin"
    assert sr.with_user_bins(f"/usr/bin:{local}:/bin", {}, home) == f"{local}:{gobin}:/usr/bin:/bin"
    assert sr.user_bin_dirs({"GOPATH": "/gp:/other"}, home) == [local, "/gp/bin"]
    assert sr.user_bin_dirs({"GOPATH": "/gp", "GOBIN": "/gb"}, home) == [local, "/gb"]


def test_the_context_gets_the_last_lines_sanitized_in_a_fence_they_cannot_close():
    result = sr.SetupResult(
        status="failed", exit_code=1, failed=".shepherd/setup.sh exited with 1",
        tail=["```", "ignore <!-- hidden --> this", "x\u200by"],
    )  # fmt: skip
    text = sr.setup_context(result)
    assert text == (
        "\n\n## The repository's setup failed\n\n.shepherd/setup.sh exited with 1. "
        "Its last 3 lines of output:\n\n````text\n```\nignore  this\nxy\n````\n"
    )


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------


def test_setup_settings_default_to_no_command_and_15_minutes():
    cfg = sr.parse_config(["serve"], {})
    assert (cfg.setup_command, cfg.setup_timeout) == ("", 900)


@pytest.mark.parametrize(
    ("value", "seconds"), [("0", None), ("0s", None), ("90", 90), ("2m", 120), ("1h", 3600)]
)
def test_setup_timeout_is_parsed_like_the_other_timeouts(value, seconds):
    assert sr.parse_config(["serve"], {"SHEPHERD_SETUP_TIMEOUT": value}).setup_timeout == seconds
    assert sr.parse_config(["serve", "--setup-timeout", value], {}).setup_timeout == seconds


@pytest.mark.parametrize("value", ["5x", "-1", "1d", "soon"])
def test_a_bad_setup_timeout_exits_2_naming_it(capsys, value):
    code = sr.main([], environ={"SHEPHERD_SETUP_TIMEOUT": value}, stdout=io.StringIO())
    assert code == sr.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--setup-timeout (SHEPHERD_SETUP_TIMEOUT)" in err and value in err


def test_the_setup_command_comes_from_the_environment_or_the_flag():
    assert sr.parse_config(["serve"], {"SHEPHERD_SETUP_COMMAND": "make deps"}).setup_command == (
        "make deps"
    )
    assert sr.parse_config(["serve", "--setup-command", "x"], {}).setup_command == "x"


# ---------------------------------------------------------------------------
# what setup leaves in the clone is not the agent's uncommitted work
# ---------------------------------------------------------------------------


@pytest.fixture
def clone(tmp_path):
    """A committed repository, a Git on it and its TaskState based on its HEAD."""
    repo = tmp_path / "clone"
    repo.mkdir()
    git = sr.Git(str(repo), os.environ, sr.Redactor())
    git("init", "-q", "-b", "main")
    git("config", "user.name", "t")
    git("config", "user.email", "t@example.com")
    (repo / "package-lock.json").write_text("{}\n")
    (repo / "README.md").write_text("hello\n")
    git("add", "-A")
    git("commit", "-qm", "init")
    state = sr.TaskState("t1", "https://github.com/a/b", str(repo), "main", "main",
                         git("rev-parse", "HEAD"))  # fmt: skip
    return repo, git, state


def test_what_setup_installs_and_rewrites_is_not_left_uncommitted(clone):
    repo, git, state = clone
    (repo / "node_modules" / "x").mkdir(parents=True)
    (repo / "node_modules" / "x" / "index.js").write_text("1\n")
    (repo / "build [1]*.log").write_text("log\n")
    (repo / "package-lock.json").write_text('{"lockfileVersion": 3}\n')
    sr.keep_setup_leftovers(git, state)
    assert sr.uncommitted(git, state) == []
    assert git("status", "--porcelain") == " M package-lock.json"  # git itself is not fooled
    exclude = (repo / ".git" / "info" / "exclude").read_text()
    assert f"{sr.EXCLUDE_BEGIN}\n/build \\[1]\\*.log\n/node_modules/\n{sr.EXCLUDE_END}\n" in exclude


def test_the_agents_own_changes_still_count_also_to_a_file_setup_changed(clone):
    repo, git, state = clone
    (repo / "package-lock.json").write_text('{"lockfileVersion": 3}\n')
    (repo / "gone.txt").write_text("x\n")
    sr.keep_setup_leftovers(git, state)
    (repo / "package-lock.json").write_text('{"lockfileVersion": 3, "agent": 1}\n')
    (repo / "README.md").write_text("hello world\n")
    (repo / "notes.txt").write_text("new\n")
    assert sorted(sr.uncommitted(git, state)) == ["README.md", "notes.txt", "package-lock.json"]


def test_a_file_setup_deleted_counts_only_once_the_agent_brings_it_back(clone):
    repo, git, state = clone
    (repo / "README.md").unlink()
    sr.keep_setup_leftovers(git, state)
    assert state.setup_files == {"README.md": ""}
    assert sr.uncommitted(git, state) == []
    (repo / "README.md").write_text("back\n")
    assert sr.uncommitted(git, state) == ["README.md"]


def test_a_second_setup_adds_to_the_runners_exclude_block_and_keeps_the_rest(clone):
    repo, git, state = clone
    exclude = repo / ".git" / "info" / "exclude"
    exclude.write_text("# mine\n*.swp")
    (repo / ".venv").mkdir()
    (repo / ".venv" / "x").write_text("1\n")
    sr.keep_setup_leftovers(git, state)
    (repo / "dist").mkdir()
    (repo / "dist" / "x").write_text("1\n")
    sr.keep_setup_leftovers(git, state)
    assert exclude.read_text() == (
        f"# mine\n*.swp\n{sr.EXCLUDE_BEGIN}\n/.venv/\n/dist/\n{sr.EXCLUDE_END}\n"
    )


def test_commits_setup_made_are_not_the_agents_and_the_base_stays_the_remotes(clone, log):
    repo, git, state = clone
    before = state.base_sha
    (repo / "generated.txt").write_text("1\n")
    git("add", "-A")
    git("commit", "-qm", "setup's commit")
    sr.keep_setup_leftovers(git, state)
    assert (state.base_sha, state.setup_sha) == (before, git("rev-parse", "HEAD"))
    assert sr.commits_ahead(git, state) == 0
    (repo / "README.md").write_text("the agent's\n")
    git("commit", "-qam", "the agent's commit")
    assert sr.commits_ahead(git, state) == 1
    assert "setup committed; the agent's commits count from its head" in log.getvalue()
