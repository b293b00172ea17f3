"""The command line: configuration, the serve process's life, the hook's refusals.

Configuration errors are checked in-process through `main(argv, environ=...)`;
the process's behaviour (log format, signals, exit codes) is checked by
running `python -m shepherd_runner` as production does. The package is
installed in the venv, so the subprocesses run from a temporary directory.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import shepherd_runner as sr

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
ENV_VARS = [
    "SHEPHERD_RUNNER_ADDR",
    "SHEPHERD_WORK_DIR",
    "SHEPHERD_CONFIG_DIR",
    "SHEPHERD_CLAUDE_BIN",
    "SHEPHERD_MAX_TURNS",
    "SHEPHERD_MAX_BUDGET_USD",
    "SHEPHERD_MODEL",
    "SHEPHERD_TASK_TIMEOUT",
    "SHEPHERD_ALLOWED_API_URLS",
    "SHEPHERD_CLONE_FILTER",
    "SHEPHERD_GITHUB_API_URL",
    "SHEPHERD_PR_DRAFT",
    "SHEPHERD_SETUP_COMMAND",
    "SHEPHERD_SETUP_TIMEOUT",
]
# The contract's sample Stop hook input (shared/contract/samples/stop-hook-input.json).
HOOK_INPUT = {
    "session_id": "68c5f753-288e-4eec-b8cc-904845d89cd9",
    "transcript_path": "/home/shepherd/.claude/projects/-workspace-repo/68c5f753.jsonl",
    "cwd": "/workspace/repo",
    "permission_mode": "bypassPermissions",
    "hook_event_name": "Stop",
    "stop_hook_active": False,
    "last_assistant_message": "I updated the greeting in README.md and committed it.",
}


@pytest.fixture(autouse=True)
def logger_restored():
    """main() points the runner's logger at its stdout: put the old handlers back."""
    logger = logging.getLogger("shepherd_runner")
    state = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = state


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SHEPHERD_MAX_TURNS", "abc"),
        ("SHEPHERD_MAX_TURNS", "0"),
        ("SHEPHERD_MAX_TURNS", "-3"),
        ("SHEPHERD_MAX_BUDGET_USD", "-1"),
        ("SHEPHERD_MAX_BUDGET_USD", "nan"),
        ("SHEPHERD_MAX_BUDGET_USD", "inf"),
        ("SHEPHERD_TASK_TIMEOUT", "5x"),
        ("SHEPHERD_TASK_TIMEOUT", "0"),
        ("SHEPHERD_RUNNER_ADDR", "nope"),
        ("SHEPHERD_RUNNER_ADDR", "127.0.0.1:99999"),
        ("SHEPHERD_ALLOWED_API_URLS", "ftp://x"),
        ("SHEPHERD_ALLOWED_API_URLS", "http://ok:8081,http://user:pw@bad:8081"),
        ("SHEPHERD_CLONE_FILTER", "bad"),
        ("SHEPHERD_PR_DRAFT", "maybe"),
    ],
)
def test_invalid_env_value_exits_2_with_one_stderr_line(capsys, name, value):
    out = io.StringIO()
    code = sr.main([], environ={name: value}, stdout=out)
    assert code == sr.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("shepherd-runner: error: ")
    assert "Traceback" not in err
    # Nothing was started: no "starting" line.
    assert out.getvalue() == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-turns", "abc"],
        ["serve", "--max-budget-usd", "0"],
        ["--task-timeout", "1d"],
        ["--addr", "host-without-port"],
        ["--pr-draft", "perhaps"],
        ["--bogus"],
        ["serve", "extra-argument"],
    ],
)
def test_invalid_flag_exits_2_with_one_stderr_line(capsys, argv):
    code = sr.main(argv, environ={}, stdout=io.StringIO())
    assert code == sr.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("shepherd-runner: error: "), err


def test_flag_overrides_an_invalid_env_value():
    cfg = sr.parse_config(["serve", "--max-turns", "7"], {"SHEPHERD_MAX_TURNS": "abc"})
    assert cfg.max_turns == 7


def test_env_values_become_the_configuration():
    env = {
        "SHEPHERD_RUNNER_ADDR": "127.0.0.1:9999",
        "SHEPHERD_MAX_TURNS": "12",
        "SHEPHERD_MAX_BUDGET_USD": "2.5",
        "SHEPHERD_TASK_TIMEOUT": "25m",
        "SHEPHERD_ALLOWED_API_URLS": "http://a:8081/, http://b:8081",
        "SHEPHERD_CLONE_FILTER": "none",
        "SHEPHERD_PR_DRAFT": "true",
        "SHEPHERD_GITHUB_API_URL": "https://ghe.example.com/api/v3/",
    }
    cfg = sr.parse_config(["serve"], env)
    assert (cfg.host, cfg.port) == ("127.0.0.1", 9999)
    assert (cfg.max_turns, cfg.max_budget_usd, cfg.task_timeout) == (12, 2.5, 1500)
    assert cfg.allowed_api_urls == ("http://a:8081", "http://b:8081")
    assert cfg.clone_filter == "" and cfg.pr_draft is True
    assert cfg.github_api_url == "https://ghe.example.com/api/v3"


def test_defaults_match_the_documentation():
    cfg = sr.parse_config(["serve"], {})
    assert (cfg.host, cfg.port) == ("", 8888)
    assert (cfg.max_turns, cfg.max_budget_usd, cfg.task_timeout) == (50, 10.0, None)
    assert cfg.clone_filter == "blob:none" and cfg.pr_draft is False


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("90", 90), ("30s", 30), ("25m", 1500), ("1h", 3600), ("1.5h", 5400), (" 2m ", 120),
     ("", None)],
)  # fmt: skip
def test_parse_timeout_accepts_the_documented_forms(value, seconds):
    assert sr.parse_timeout(value) == seconds


@pytest.mark.parametrize("value", ["5x", "0", "0s", "-1", "1d", "m", "1 h 2", "1e3"])
def test_parse_timeout_refuses_other_forms(value):
    with pytest.raises(Exception) as caught:
        sr.parse_timeout(value)
    assert value.strip() in str(caught.value)


def run_cli(args, env, cwd, stdin=b"", timeout=30):
    return subprocess.run(
        [sys.executable, "-m", "shepherd_runner", *args],
        input=stdin, env=env, cwd=cwd, capture_output=True, timeout=timeout, check=False,
    )  # fmt: skip


def base_env(home, **extra) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(home), **extra}


def test_help_lists_every_environment_variable(tmp_path, home):
    proc = run_cli(["--help"], base_env(home), tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.decode()
    missing = [name for name in ENV_VARS if name not in text]
    assert missing == [], text


# ---------------------------------------------------------------------------
# the serve process
# ---------------------------------------------------------------------------


class Serve:
    """`python -m shepherd_runner` with its stdout read line by line into a queue."""

    def __init__(self, env, cwd):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shepherd_runner"],
            env=env, cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.stderr = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout: float = 20) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(left, 0.001))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r}: {self.seen}") from None
            if line is None:
                raise AssertionError(f"exited before {pattern!r}: {self.seen} {self.finish()}")
            self.seen.append(line)
            if match := regex.search(line):
                return match

    def rest(self) -> list[str]:
        """Every line after the process has exited."""
        while (line := self.lines.get(timeout=10)) is not None:
            self.seen.append(line)
        return self.seen

    def finish(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.stderr = self.proc.stderr.read()
        return self.stderr


@pytest.fixture
def serve(tmp_path, home):
    started: list[Serve] = []

    def start(**extra):
        settings = {
            "SHEPHERD_RUNNER_ADDR": "127.0.0.1:0",  # the log line tells the port
            "SHEPHERD_WORK_DIR": str(tmp_path),
            "SHEPHERD_CONFIG_DIR": str(tmp_path),
        }
        env = base_env(home, **(settings | extra))
        runner = Serve(env, tmp_path)
        started.append(runner)
        return runner

    yield start
    for runner in started:
        runner.finish()
        runner.proc.stdout.close()
        runner.proc.stderr.close()


def test_startup_lines_are_printed_on_stdout_in_the_documented_format(serve):
    runner = serve()
    starting = runner.wait_for(r"shepherd-runner starting")
    assert re.fullmatch(
        STAMP + r" INFO shepherd-runner starting version=\S+ addr=127\.0\.0\.1:0", starting.string
    ), starting.string
    listening = runner.wait_for(r" listening ")
    match = re.fullmatch(
        STAMP + r" INFO listening addr=127\.0\.0\.1:(\d+) pid=(\d+)", listening.string
    )
    assert match, listening.string
    assert int(match[2]) == runner.proc.pid
    # The port in the log line is the one really served.
    conn = http.client.HTTPConnection("127.0.0.1", int(match[1]), timeout=10)
    try:
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
    finally:
        conn.close()
    runner.proc.send_signal(signal.SIGTERM)
    assert runner.proc.wait(timeout=10) == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_waiting_for_a_task_exits_0_promptly(serve, signum):
    runner = serve()
    runner.wait_for(r" INFO listening addr=")
    start = time.monotonic()
    runner.proc.send_signal(signum)
    assert runner.proc.wait(timeout=10) == 0
    assert time.monotonic() - start < 5
    lines = runner.rest()
    assert any("stopped before a task was assigned" in line for line in lines), lines
    assert all(re.match(STAMP + r" (INFO|WARNING|ERROR) ", line) for line in lines), lines
    stderr = runner.finish()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr


def test_busy_address_exits_with_exit_listen(serve):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        runner = serve(SHEPHERD_RUNNER_ADDR=f"127.0.0.1:{holder.getsockname()[1]}")
        assert runner.proc.wait(timeout=20) == sr.EXIT_LISTEN
        lines = runner.rest()
    finally:
        holder.close()
    assert any(re.match(STAMP + r" ERROR cannot listen ", line) for line in lines), lines


def test_invalid_configuration_exits_2_before_listening(tmp_path, home):
    proc = run_cli([], base_env(home, SHEPHERD_MAX_TURNS="abc"), tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == b""
    assert proc.stderr.decode().count("\n") == 1


# ---------------------------------------------------------------------------
# the hook's refusals (the hook's real work is tested with a repository elsewhere)
# ---------------------------------------------------------------------------

HOOK_ENV = {"SHEPHERD_API_URL": "http://127.0.0.1:9", "SHEPHERD_TASK_ID": "fix-greeting-1"}


def assert_refused(proc, words: str):
    """Exit 1 (never 2: that would tell Claude Code not to stop), one clear line."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert proc.stdout == b""  # Claude Code reads the hook's stdout as its answer
    err = proc.stderr.decode()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert re.match(STAMP + r" ERROR ", lines[0]), err
    assert words in lines[0], err


@pytest.mark.parametrize(
    ("stdin", "words"),
    [
        (b"garbage", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"Stop"', "not a JSON object"),
    ],
    ids=["garbage", "not-utf8", "empty", "array", "string"],
)
def test_hook_with_unusable_stdin_exits_1(tmp_path, home, stdin, words):
    proc = run_cli(["hook"], base_env(home, **HOOK_ENV), tmp_path, stdin=stdin)
    assert_refused(proc, words)


@pytest.mark.parametrize("missing", ["SHEPHERD_API_URL", "SHEPHERD_TASK_ID"])
def test_hook_without_its_environment_exits_1(tmp_path, home, missing):
    env = {k: v for k, v in HOOK_ENV.items() if k != missing}
    proc = run_cli(["hook"], base_env(home, **env), tmp_path, stdin=json.dumps(HOOK_INPUT).encode())
    assert_refused(proc, "SHEPHERD_API_URL and SHEPHERD_TASK_ID")


def test_hook_with_an_unknown_argument_exits_1_not_2(tmp_path, home):
    proc = run_cli(["hook", "--bogus"], base_env(home, **HOOK_ENV), tmp_path,
                   stdin=json.dumps(HOOK_INPUT).encode())  # fmt: skip
    assert_refused(proc, "no arguments")


def test_startup_warns_of_what_would_fail_every_task(serve, tmp_path):
    runner = serve(SHEPHERD_CLAUDE_BIN="no-such-claude", SHEPHERD_WORK_DIR=str(tmp_path / "gone"))
    runner.wait_for(r" INFO listening ")
    warnings = [line for line in runner.seen if " WARNING " in line]
    assert any("agent CLI not found" in w and "claude_bin=no-such-claude" in w for w in warnings)
    assert any("no model credentials" in w for w in warnings)
    assert any("work dir missing or not writable" in w for w in warnings)


def test_startup_is_quiet_when_all_is_in_place(serve, tmp_path):
    runner = serve(SHEPHERD_CLAUDE_BIN=sys.executable, ANTHROPIC_API_KEY="sk-ant-x")
    runner.wait_for(r" INFO listening ")
    assert not [line for line in runner.seen if " WARNING " in line], runner.seen
