"""The Claude Code Stop hook: ``python -m shepherd_runner hook``.

Claude Code runs it when the agent ends its turn (``Stop``) or when an API
error ends it (``StopFailure``), with the hook's JSON on stdin and the CLI's
environment. It decides the task's outcome while the agent's last words are
known, with the same code as the runner (``shepherd_runner.conclude``): it
may send the agent back once (uncommitted changes), pushes the branch and
opens the pull request. It hands the outcome to the runner through the state
dir; the runner reports it after the last event, with the run's metrics. The
hook reports by itself only when the runner is gone, so that a crashed runner
still ends in a status.

Exit codes: 0 in every expected case, an unreachable API included; 1 for
unusable input or an unexpected error. Never 2: to Claude Code a Stop hook's
exit 2 means "do not stop".
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

import shepherd_runner as sr

EXIT_OK = 0
EXIT_BAD_INPUT = 1

# The hook has 30 s (settings.json); its API calls must leave room for a push
# and a pull request, so they retry briefly and leave the rest to the runner.
HOOK_RETRY = {"total": 3, "backoff": 0.5}


def _log_stream(environ: Mapping[str, str]) -> IO[str]:
    # SHEPHERD_LOG_FILE is the runner's stdout (/proc/<pid>/fd/1): the hook's
    # lines then reach `kubectl logs` beside the runner's. Our own stdout is
    # read by Claude Code as the hook's answer, so it is never used for logs.
    path = environ.get("SHEPHERD_LOG_FILE")
    if path:
        try:
            return open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        except OSError:
            pass
    return sys.stderr


def _read_payload(stdin: IO[bytes]) -> dict[str, Any]:
    raw = stdin.read()
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError(f"stdin is not JSON ({len(raw)} bytes)") from None
    if not isinstance(payload, dict):
        raise ValueError("stdin is not a JSON object")
    return payload


def main(
    argv: list[str] | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    stdin: IO[bytes] | None = None,
    stdout: IO[str] | None = None,
    budget: float = sr.HOOK_BUDGET,
) -> int:
    redact = sr.Redactor([environ.get("GH_TOKEN", ""), environ.get("ANTHROPIC_API_KEY", "")])
    # Written as the runner writes its own (SHEPHERD_LOG_FORMAT comes from it), task id included.
    sr.setup_logging(_log_stream(environ), redact, environ.get("SHEPHERD_LOG_FORMAT", "text"))
    sr.log_context(task_id=environ.get("SHEPHERD_TASK_ID") or None)
    try:
        stdin = stdin or sys.stdin.buffer
        return _hook(argv or [], environ, stdin, stdout or sys.stdout, redact, budget=budget)
    except Exception as exc:  # a traceback would be noise to Claude Code; say why
        sr.error("stop hook failed", error=f"{type(exc).__name__}: {exc}")
        return EXIT_BAD_INPUT


def _hook(
    argv: list[str], environ: Mapping[str, str], stdin: IO[bytes], stdout: IO[str],
    redact: sr.Redactor, *, budget: float,
) -> int:  # fmt: skip
    if argv:
        sr.error("stop hook takes no arguments", argv=argv)
        return EXIT_BAD_INPUT
    try:
        payload = _read_payload(stdin)
    except ValueError as exc:
        sr.error("stop hook input unusable", error=str(exc))
        return EXIT_BAD_INPUT
    api_url, task_id = environ.get("SHEPHERD_API_URL"), environ.get("SHEPHERD_TASK_ID")
    if not api_url or not task_id:
        sr.error("stop hook needs SHEPHERD_API_URL and SHEPHERD_TASK_ID in its environment")
        return EXIT_BAD_INPUT
    event = str(payload.get("hook_event_name") or "Stop")
    again = bool(payload.get("stop_hook_active"))
    sr.info(
        "stop hook", task_id=task_id, hook_event=event, stop_hook_active=again,
        executable=sys.executable,  # the venv's python or the portable runner
    )  # fmt: skip

    state_dir = environ.get("SHEPHERD_STATE_DIR") or sr.state_dir(environ.get("HOME", "~"))
    if os.path.exists(os.path.join(state_dir, sr.STOP_FILE)):
        sr.info("stop hook standing down: the runner has decided the outcome")
        return EXIT_OK
    try:
        state = sr.TaskState.load(os.path.join(state_dir, sr.STATE_FILE))
    except (OSError, ValueError, TypeError) as exc:
        sr.error("stop hook has no task state; the runner will decide", error=str(exc))
        return EXIT_OK

    if event == "StopFailure":
        # An API error ended the turn: `error` is its kind (server_error,
        # unknown...), the CLI's own words are the last assistant message.
        kind = str(payload.get("error") or "unknown")
        words = str(payload.get("last_assistant_message") or "").strip()
        message = sr.clip(f"the agent stopped on a model API error ({kind}): {words}", 600)
        outcome = sr.Outcome("failed", message, {"error": message})
    else:
        git = sr.Git(state.repo_dir, environ, redact)
        branch = sr.Branch(git, state, os.path.join(state_dir, sr.BRANCH_FILE))
        outcome = sr.conclude(
            state, git, sr.github_for(state, environ.get("GH_TOKEN", "")),
            last_message=str(payload.get("last_assistant_message") or ""),
            may_block=not again, deadline=time.monotonic() + budget, branch=branch,
        )  # fmt: skip
    if outcome.event == "block":
        sr.info("stop hook asks the agent to go on", reason=outcome.message)
        print(json.dumps({"decision": "block", "reason": outcome.message}), file=stdout)
        return EXIT_OK
    outcome.save(os.path.join(state_dir, sr.OUTCOME_FILE))
    sr.info("stop hook decided", event=outcome.event, transient=outcome.transient)
    if _alive(environ.get("SHEPHERD_RUNNER_PID", "")):
        return EXIT_OK  # the runner reports it, after the last event
    sr.warn("the runner is gone; the stop hook reports by itself")
    api = sr.ShepherdAPI(
        api_url, task_id, retry=sr.api_retry(**HOOK_RETRY), redact=redact,
        token_retries=sr.token_retry(total=0),
    )  # fmt: skip
    api.report_status(
        outcome.event, outcome.message, {**outcome.details, "reported_by": "stop-hook"}
    )
    return EXIT_OK


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
