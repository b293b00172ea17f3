"""Starts the runner exactly as production does, as a subprocess, and talks to it."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading

from conftest import ROOT


class Runner:
    """`python -m shepherd_runner serve` on 127.0.0.1:0, its stdout collected."""

    # The "listening" line, and its port, in the text log format.
    LISTENING = r" listening addr="
    PORT = r"addr=\S*:(\d+)"

    def __init__(self, env: dict[str, str], *, argv: tuple[str, ...] = (), echo: bool = False):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shepherd_runner", "serve", *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.echo = echo
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        line = self.wait_for(self.LISTENING)
        self.port = int(re.search(self.PORT, line)[1])

    def on_line(self, line: str) -> None:
        """Called with each output line as it comes, before it is recorded: a test's hook."""

    def _read(self) -> None:
        for line in self.proc.stdout:
            if self.echo:
                print(line, end="", flush=True)
            self.on_line(line)
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.lines.append("<eof>")
            self.cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 60) -> str:
        """The first output line matching `pattern`; fails on timeout or exit."""
        regex = re.compile(pattern)

        def found() -> str | None:
            return next((ln for ln in self.lines if regex.search(ln)), None) or (
                "<eof>" if self.lines and self.lines[-1] == "<eof>" else None
            )

        with self.cond:
            line = self.cond.wait_for(found, timeout)
        assert line and line != "<eof>", f"no line matching {pattern!r}:\n{self.output}"
        return line

    @property
    def output(self) -> str:
        with self.cond:
            return "\n".join(self.lines)

    def post(self, body: bytes | dict, path: str = "/task") -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("POST", path, data, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")
        finally:
            conn.close()

    def assign(self, task_id: str, api_url: str) -> None:
        status, body = self.post({"taskID": task_id, "apiURL": api_url})
        assert (status, body) == (200, {"status": "accepted"}), (status, body)

    def wait(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def runner_env(tmp_path, *, claude_bin: str, github=None, **extra: str) -> dict[str, str]:
    """The environment of a runner pod, on loopback, in `tmp_path`."""
    work = tmp_path / "workspace"
    work.mkdir(exist_ok=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SHEPHERD_", "GIT_CONFIG_", "GH_", "ANTHROPIC_"))
    }
    env.update(
        SHEPHERD_RUNNER_ADDR="127.0.0.1:0",
        SHEPHERD_WORK_DIR=str(work),
        SHEPHERD_CONFIG_DIR=str(ROOT),  # the repository's own settings.json and CLAUDE.md
        SHEPHERD_CLAUDE_BIN=claude_bin,
        PYTHONUNBUFFERED="1",
    )
    if github is not None:
        env["SHEPHERD_GITHUB_API_URL"] = github.api_url
    env.update(extra)
    return env


def processes(cmdline: bytes, home: str | None = None) -> list[int]:
    """Live processes running exactly `cmdline` (its arguments NUL-separated) for this test.

    Only those whose HOME is the test's own (the runner hands it to git, the
    agent and setup): a suite running beside this one has the same commands.
    """
    want = b"HOME=" + os.fsencode(home or os.environ["HOME"])
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read() != cmdline:
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if want in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:  # gone, or not ours to read
            continue
    return found
