"""The pieces behind the edges of a run, one at a time: retries, the token's expiry,
the agent's limits, its usage, and the outcome the hook hands over."""

from __future__ import annotations

import json
import sys
import time

import pytest
import responses

import shepherd_runner as sr

# ---------------------------------------------------------------------------
# retrying
# ---------------------------------------------------------------------------


def flaky(*errors):
    """An action that raises `errors` in turn, then returns "done"; counts its calls."""
    calls = []

    def action():
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return "done"

    return action, calls


def test_transient_failures_are_retried_with_growing_delays():
    action, calls = flaky(sr.GitHubError("502", 502), sr.GitHubError("down", None))
    waits = []
    assert sr.retrying(action, time.monotonic() + 60, "x", sleep=waits.append) == "done"
    assert (len(calls), waits) == (3, [1.0, 2.0])


@pytest.mark.parametrize("status", [401, 403, 404, 422])
def test_permanent_answers_are_not_retried(status):
    action, calls = flaky(sr.GitHubError("no", status))
    with pytest.raises(sr.GitHubError):
        sr.retrying(action, time.monotonic() + 60, "x", sleep=lambda _: None)
    assert len(calls) == 1


def test_retries_stop_at_the_deadline():
    action, calls = flaky(*[sr.PushError("500", transient=True)] * 10)
    now, waits = [0.0], []

    def sleep(seconds):
        waits.append(seconds)
        now[0] += seconds

    with pytest.raises(sr.PushError):
        sr.retrying(action, 5.0, "x", sleep=sleep, clock=lambda: now[0])
    assert waits == [1.0, 2.0]  # a third wait (4 s) would end past the deadline
    assert len(calls) == 3


@pytest.mark.parametrize(
    ("stderr", "transient"),
    [
        ("fatal: unable to access 'https://h/r/': The requested URL returned error: 502", True),
        ("error: RPC failed; HTTP 429 curl 22 The requested URL returned error: 429", True),
        ("fatal: unable to access 'https://h/': Failed to connect to h port 443", True),
        ("fatal: unable to access 'https://h/': Could not resolve host: h", True),
        ("fatal: the remote end hung up unexpectedly", True),
        (" ! [rejected]  x -> x (stale info)", True),
        (" ! [remote rejected] x -> x (cannot lock ref 'refs/heads/x': reference already exists)",
         True),
        ("git: timed out after 120s", True),
        ("fatal: Authentication failed for 'https://h/o/r.git/'", False),
        ("fatal: unable to access 'https://h/': The requested URL returned error: 403", False),
        (" ! [rejected]  x -> x (non-fast-forward)", False),
        ("remote: Repository not found.", False),
    ],
)  # fmt: skip
def test_git_push_failures_are_told_apart(stderr, transient):
    assert bool(sr._TRANSIENT_GIT.search(stderr)) is transient


@pytest.mark.parametrize(
    ("status", "transient"), [(None, True), (429, True), (500, True), (503, True), (422, False)]
)
def test_github_errors_know_whether_a_retry_may_help(status, transient):
    assert sr.GitHubError("x", status).transient is transient


# ---------------------------------------------------------------------------
# the token's expiry
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "epoch"),
    [
        ("2026-11-23T11:00:00Z", 1795431600.0),
        ("2026-11-23T12:00:00+01:00", 1795431600.0),
        ("2026-11-23T11:00:00.500Z", 1795431600.5),
        ("2026-11-23T11:00:00", None),  # no offset: not RFC 3339
        ("tomorrow", None),
        (None, None),
        (1795431600, None),
    ],
)
def test_rfc3339_times_are_read_and_anything_else_is_none(value, epoch):
    assert sr.parse_time(value) == epoch


@responses.activate
def test_the_token_comes_with_its_expiry():
    base = "http://api.test/api/v1/tasks/t"
    responses.get(f"{base}/token", json={"token": "ghs_" + "x" * 36,
                                         "expiresAt": "2026-11-23T11:00:00Z"})  # fmt: skip
    token = sr.ShepherdAPI("http://api.test", "t").fetch_token()
    assert token.expires_at == 1795431600.0


@responses.activate
def test_a_token_without_a_readable_expiry_is_taken_for_an_hour():
    base = "http://api.test/api/v1/tasks/t"
    responses.get(f"{base}/token", json={"token": "ghs_" + "x" * 36, "expiresAt": "soon"})
    before = time.time()
    token = sr.ShepherdAPI("http://api.test", "t").fetch_token()
    assert before + 3600 <= token.expires_at <= time.time() + 3600


def test_the_token_counts_as_expired_a_margin_before_its_expiry():
    state = sr.TaskState("t", "u", "d", "b", "main", "sha", token_expires_at=1000.0)
    assert not state.token_expired(1000.0 - sr.TOKEN_SKEW - 1)
    assert state.token_expired(1000.0 - sr.TOKEN_SKEW)
    assert not sr.TaskState("t", "u", "d", "b", "main", "sha").token_expired(1e12)  # unknown


# ---------------------------------------------------------------------------
# the agent's limits, with a real process
# ---------------------------------------------------------------------------

RESULT = json.dumps({"type": "result", "subtype": "success", "is_error": False, "num_turns": 1,
                     "result": "done", "session_id": "s"})  # fmt: skip


def run_script(source, limits, tmp_path):
    script = tmp_path / "agent.py"
    script.write_text(source)
    return sr.run_agent(
        [sys.executable, str(script)], cwd=str(tmp_path),
        env={"PATH": "/usr/bin:/bin", "SHEPHERD_RUN_ID": "unit-" + tmp_path.name},
        sender=sr.EventSender(lambda batch: 200), parser=sr.StreamParser(sr.Redactor()),
        stop=sr.Stop(), limits=limits, grace=1,
    )  # fmt: skip


def test_agent_that_does_not_exit_after_its_result_is_stopped_and_not_a_failure(tmp_path):
    source = f"import time\nprint({RESULT!r}, flush=True)\ntime.sleep(60)\n"
    start = time.monotonic()
    run = run_script(source, sr.Limits(exit_grace=0.5), tmp_path)
    assert time.monotonic() - start < 10
    assert run.hung and not run.stopped
    assert sr.agent_failure(run, None) == ""


def test_a_turn_after_the_result_gets_the_exit_grace_from_its_own_result(tmp_path):
    # CLI 2.1.332: a background command ending after the answer wakes the model
    # again; its second turn ends 2.3 s after the first result, past the grace.
    turn = assistant("m-2", {"input_tokens": 1}, {"type": "text", "text": "Woke again."})
    source = (
        f"import time\nprint({RESULT!r}, flush=True)\ntime.sleep(0.3)\n"
        f"print({turn!r}, flush=True)\ntime.sleep(2.0)\nprint({RESULT!r}, flush=True)\n"
    )
    run = run_script(source, sr.Limits(exit_grace=2.0), tmp_path)
    assert not run.hung and run.exit_code == 0
    assert run.metrics.num_turns == 2


def test_agent_silent_past_the_idle_timeout_is_stopped_with_the_reason(tmp_path):
    source = "import time\nprint('{}', flush=True)\ntime.sleep(60)\n"
    run = run_script(source, sr.Limits(idle=0.5), tmp_path)
    assert run.stopped == "the agent produced no output for 0.5s (SHEPHERD_IDLE_TIMEOUT)"


def test_output_keeps_the_idle_timeout_away(tmp_path):
    source = "import time\nfor _ in range(8):\n    print('{}', flush=True)\n    time.sleep(0.2)\n"
    run = run_script(source + f"print({RESULT!r})\n", sr.Limits(idle=1.0), tmp_path)
    assert run.stopped == "" and run.exit_code == 0 and run.metrics.subtype == "success"


@pytest.mark.parametrize(("value", "seconds"), [("0", None), ("0s", None), ("20m", 1200.0)])
def test_idle_timeout_setting(value, seconds):
    cfg = sr.parse_config(["serve"], {"SHEPHERD_IDLE_TIMEOUT": value})
    assert cfg.idle_timeout == seconds


def test_idle_timeout_defaults_to_20_minutes_and_a_bad_value_is_a_usage_error(capsys):
    assert sr.parse_config(["serve"], {}).idle_timeout == 1200.0
    assert sr.main(["serve"], environ={"SHEPHERD_IDLE_TIMEOUT": "soon"}) == sr.EXIT_USAGE
    assert "--idle-timeout (SHEPHERD_IDLE_TIMEOUT)" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# usage, counted once per message
# ---------------------------------------------------------------------------


def assistant(message_id, usage, block):
    body = {"id": message_id, "usage": usage, "content": [block]}
    return json.dumps({"type": "assistant", "session_id": "s-1", "message": body})


def test_usage_is_summed_once_per_message_and_reported_without_a_result_line():
    parser = sr.StreamParser(sr.Redactor())
    parser.feed(json.dumps({"type": "system", "subtype": "init", "session_id": "s-1"}))
    usage = {"input_tokens": 10, "output_tokens": 3, "cache_read_input_tokens": 7}
    # One reply with two content blocks is two lines with the same id and usage.
    parser.feed(assistant("m1", usage, {"type": "text", "text": "Let me look."}))
    parser.feed(assistant("m1", usage, {"type": "tool_use", "id": "t1", "name": "Read",
                                        "input": {}}))  # fmt: skip
    parser.feed(assistant("m2", {"input_tokens": 5, "output_tokens": 1},
                          {"type": "text", "text": "Done."}))  # fmt: skip
    report = parser.report(duration_ms=1234)
    assert report == {
        "num_turns": 2, "session_id": "s-1", "duration_ms": 1234,
        "usage": {"input_tokens": 15, "output_tokens": 4, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 7},
    }  # fmt: skip


def test_the_result_lines_figures_win_when_there_is_one():
    parser = sr.StreamParser(sr.Redactor())
    parser.feed(assistant("m1", {"input_tokens": 10, "output_tokens": 1},
                          {"type": "text", "text": "Done."}))  # fmt: skip
    result = {"type": "result", "subtype": "success", "num_turns": 1, "total_cost_usd": 0.5,
              "duration_ms": 99, "session_id": "s-2", "result": "Done.",
              "usage": {"input_tokens": 10, "output_tokens": 25, "junk": "x"}}  # fmt: skip
    parser.feed(json.dumps(result))
    report = parser.report(duration_ms=5000)
    assert (report["cost_usd"], report["duration_ms"], report["session_id"]) == (0.5, 99, "s-2")
    assert report["usage"] == {
        "input_tokens": 10, "output_tokens": 25,
        "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
    }  # fmt: skip


# ---------------------------------------------------------------------------
# the outcome the hook hands over
# ---------------------------------------------------------------------------


def test_outcome_round_trips_through_the_state_dir(tmp_path):
    path = str(tmp_path / sr.OUTCOME_FILE)
    sr.Outcome("failed", "GitHub down", {"error": "x"}, transient=True).save(path)
    assert sr.Outcome.load(path) == sr.Outcome("failed", "GitHub down", {"error": "x"}, True)


@pytest.mark.parametrize(
    "content",
    ["", "{", "[]", '{"event": "block", "message": "m"}', '{"event": "completed"}',
     '{"event": "completed", "message": "m", "details": [], "transient": false}'],
)  # fmt: skip
def test_an_unusable_outcome_file_is_no_outcome(tmp_path, content):
    path = tmp_path / sr.OUTCOME_FILE
    path.write_text(content)
    assert sr.Outcome.load(str(path)) is None
    assert sr.Outcome.load(str(tmp_path / "missing.json")) is None
