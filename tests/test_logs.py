"""The log lines: the task id on every line, the json format, the summary line, the PR link.

Whole runs go through tests/harness.py (the runner as a subprocess, the
stand-in agent running the real Stop hook); the formatter is also checked
in-process.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import re

import pytest
import requests
import responses
from hypothesis import given, settings
from hypothesis import strategies as st
from test_flow import STAND_IN
from test_hook import TASK as HOOK_TASK
from test_hook import call_hook, commit, stop_payload, task  # noqa: F401 - task is a fixture

import shepherd_runner as sr
from harness import Runner, runner_env

TASK = "log-task-1"
TOKEN = "ghs_" + "a1B2" * 9
SUMMARY_KEYS = {
    "outcome", "seconds", "turns", "cost_usd", "input_tokens", "output_tokens",
    "events_sent", "events_dropped", "pr_url",
}  # fmt: skip


class JsonRunner(Runner):
    LISTENING = r'"msg": "listening"'
    PORT = r'"addr": "[^"]*:(\d+)"'


@pytest.fixture(autouse=True)
def logger_restored():
    """setup_logging points the runner's logger elsewhere: put the old handlers back."""
    logger = logging.getLogger("shepherd_runner")
    state = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = state
    sr.setup_logging(io.StringIO(), sr.Redactor())  # also empties the log context
    logger.handlers[:] = state[0]


@pytest.fixture
def run(tmp_path, home, api, github, token):
    """Runs one task (the stand-in agent commits) with the runner as a subprocess."""
    api.add_task(TASK, repo_url=github.create_repo("acme", "widgets"), token=token)
    started = []

    def run(runner_class=Runner, argv=(), **extra):
        env = runner_env(
            tmp_path, claude_bin=STAND_IN, github=github, HOME=str(home),
            STAND_IN_SCENARIO="commit", **extra,
        )  # fmt: skip
        runner = runner_class(env, argv=argv)
        started.append(runner)
        runner.assign(TASK, api.url)
        assert runner.wait() == 0, runner.output
        assert api.terminal(TASK)["event"] == "completed", api.statuses(TASK)
        return runner.output.splitlines()[:-1]  # without the harness's "<eof>"

    yield run
    for runner in started:
        runner.kill()


def capture(fmt: str, redact: sr.Redactor | None = None) -> io.StringIO:
    stream = io.StringIO()
    sr.setup_logging(stream, redact or sr.Redactor(), fmt)
    return stream


# ---------------------------------------------------------------------------
# whole runs
# ---------------------------------------------------------------------------


def test_every_line_from_the_assignment_on_carries_the_task_id_once(run, api):
    lines = run()
    start = next(i for i, line in enumerate(lines) if " INFO task assigned " in line)
    after = lines[start:]
    for line in after:
        assert line.count(" task_id=") == 1 and f" task_id={TASK}" in line, line
    # Step lines and the Stop hook's lines among them.
    assert any(" INFO fetch task data done " in line for line in after)
    assert any(" INFO stop hook " in line for line in after)
    assert any(" INFO task text sanitized " in line for line in after)
    assert not any(" task_id=" in line for line in lines[:start])


def test_the_task_ends_with_one_summary_line(run, api, github):
    lines = run()
    summaries = [line for line in lines if " INFO task summary " in line]
    assert len(summaries) == 1 and lines[-1] == summaries[0], lines
    fields = dict(re.findall(r" (\w+)=(\S+)", summaries[0]))
    assert set(fields) >= SUMMARY_KEYS
    assert fields["outcome"] == "completed"
    assert fields["turns"] == "3" and fields["cost_usd"] == "0.0123"  # the stand-in's result
    assert fields["pr_url"] == github.pulls[0]["html_url"]
    assert int(fields["events_sent"]) == len(api.events(TASK))
    assert fields["events_dropped"] == "0"
    assert float(fields["seconds"]) > 0
    assert fields["input_tokens"] == fields["output_tokens"] == "0"  # the stand-in has no usage


def summary_of(runner):
    summaries = [ln for ln in runner.output.splitlines() if " INFO task summary " in ln]
    assert len(summaries) == 1, runner.output
    return dict(re.findall(r" (\w+)=(\S+)", summaries[0]))


@pytest.mark.parametrize(
    ("task", "code", "outcome"),
    [(TASK, sr.EXIT_OK, "nothing_to_do"), ("no-such-task", sr.EXIT_UNDELIVERED, "unreported")],
    ids=["410", "404"],
)
def test_a_task_the_api_says_is_terminal_or_unknown_still_gets_its_summary_line(
    tmp_path, home, api, github, token, task, code, outcome
):
    api.add_task(TASK, repo_url=github.create_repo("acme", "widgets"), token=token)
    cancelled = {"event": "failed", "message": "cancelled"}  # /data answers 410 from now on
    requests.post(f"{api.url}/api/v1/tasks/{TASK}/status", json=cancelled, timeout=5)
    env = runner_env(tmp_path, claude_bin=STAND_IN, github=github, HOME=str(home))
    runner = Runner(env)
    try:
        runner.assign(task, api.url)
        assert runner.wait() == code, runner.output
    finally:
        runner.kill()
    fields = summary_of(runner)
    assert set(fields) >= SUMMARY_KEYS and fields["task_id"] == task
    assert fields["outcome"] == outcome and float(fields["seconds"]) > 0
    assert (fields["turns"], fields["events_sent"], fields["pr_url"]) == ("0", "0", "null")
    assert " INFO task summary " in runner.output.splitlines()[-2]  # the last line ("<eof>" ends)


def test_json_format_by_flag_writes_every_line_as_json_the_hooks_too(run, api, github):
    lines = run(JsonRunner, argv=("--log-format", "json"))
    records = [json.loads(line) for line in lines]  # every line, or this fails
    for record in records:
        assert list(record)[:3] == ["time", "level", "msg"], record
        stamp = datetime.datetime.fromisoformat(record["time"])
        assert record["time"].endswith("Z") and stamp.utcoffset() == datetime.timedelta(0)
        assert record["level"] in ("INFO", "WARNING", "ERROR")
    start = next(i for i, r in enumerate(records) if r["msg"] == "task assigned")
    assert all(r.get("task_id") == TASK for r in records[start:]), records[start:]
    hook = [r for r in records if r["msg"] == "stop hook"]
    assert hook and hook[0]["hook_event"] == "Stop" and hook[0]["stop_hook_active"] is False
    [summary] = [r for r in records if r["msg"] == "task summary"]
    assert summary["outcome"] == "completed" and summary["turns"] == 3
    assert summary["cost_usd"] == 0.0123 and summary["events_dropped"] == 0
    assert summary["pr_url"] == github.pulls[0]["html_url"]
    assert summary["input_tokens"] == summary["output_tokens"] == 0
    listening = next(r for r in records if r["msg"] == "listening")
    assert isinstance(listening["pid"], int)


def test_json_format_from_the_environment(tmp_path, api):
    env = runner_env(tmp_path, claude_bin=STAND_IN, SHEPHERD_LOG_FORMAT="json")
    runner = JsonRunner(env)
    try:
        status, _ = runner.post(b"not json")
        assert status == 400
        runner.proc.terminate()
        assert runner.wait(timeout=20) == 0
    finally:
        runner.kill()
    records = [json.loads(line) for line in runner.output.splitlines()[:-1]]
    assert records[0]["msg"] == "shepherd-runner starting"
    [refused] = [r for r in records if r["msg"] == "assignment refused"]
    assert refused["level"] == "WARNING" and refused["status"] == 400
    assert refused["error"] == "body is not JSON"
    assert records[-1]["msg"] == "stopped before a task was assigned"


def test_both_pr_keys_reach_the_api_in_the_terminal_status(run, api, github):
    run()
    url = github.pulls[0]["html_url"]
    terminal = api.terminal(TASK)
    assert terminal["details"]["pr_url"] == terminal["details"]["prURL"] == url
    for status in api.statuses(TASK):
        details = status.get("details", {})
        assert details.get("pr_url") == details.get("prURL"), status


def test_hook_reporting_alone_writes_json_lines_and_sends_both_pr_keys(task, api, github):
    # No runner (SHEPHERD_RUNNER_PID unset): the hook reports by itself.
    commit(task)
    code, out = call_hook(task.env | {"SHEPHERD_LOG_FORMAT": "json"}, stop_payload())
    assert (code, out) == (0, "")
    terminal = api.terminal(HOOK_TASK)
    assert terminal["details"]["reported_by"] == "stop-hook"
    assert terminal["details"]["pr_url"] == terminal["details"]["prURL"]
    assert terminal["details"]["prURL"] == github.pulls[0]["html_url"]
    records = [json.loads(line) for line in task.log.read_text().splitlines()]
    assert records and all(r["task_id"] == HOOK_TASK for r in records), records
    assert {"stop hook", "status reported"} <= {r["msg"] for r in records}


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "environ"),
    [(["--log-format", "xml"], {}), ([], {"SHEPHERD_LOG_FORMAT": "logfmt"})],
    ids=["flag", "env"],
)
def test_bad_log_format_is_a_usage_error_naming_flag_and_env(capsys, argv, environ):
    out = io.StringIO()
    assert sr.main(argv, environ=environ, stdout=out) == sr.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("shepherd-runner: error: argument --log-format (SHEPHERD_LOG_FORMAT): ")
    assert "is not one of text, json" in err
    assert out.getvalue() == ""


def test_log_format_flag_wins_over_the_environment_and_reaches_the_agent():
    cfg = sr.parse_config(["serve", "--log-format", "JSON"], {"SHEPHERD_LOG_FORMAT": "text"})
    assert cfg.log_format == "json"
    assert sr.parse_config(["serve"], {}).log_format == "text"
    capture(cfg.log_format)
    assert sr.log_format() == "json"


# ---------------------------------------------------------------------------
# the formatter
# ---------------------------------------------------------------------------


def test_json_line_has_time_level_msg_then_fields_then_context():
    stream = capture("json")
    sr.log_context(task_id="t-1")
    sr.warn("clone done", seconds=0.5, msg="a field named msg", nested={"a": [1, None]})
    [line] = stream.getvalue().splitlines()
    record = json.loads(line)
    assert list(record) == ["time", "level", "msg", "seconds", "field.msg", "nested", "task_id"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
    assert record["level"] == "WARNING" and record["msg"] == "clone done"
    assert record["nested"] == {"a": [1, None]} and record["field.msg"] == "a field named msg"


def test_text_line_ends_with_the_context_and_has_an_explicit_task_id_once():
    stream = capture("text")
    sr.log_context(task_id="t-1")
    sr.info("stop hook", task_id="t-1", hook_event="Stop")
    sr.info("clone done", seconds=0.5)
    first, second = stream.getvalue().splitlines()
    assert first.endswith(" INFO stop hook task_id=t-1 hook_event=Stop")
    assert second.endswith(" INFO clone done seconds=0.5 task_id=t-1")


def test_json_values_that_are_not_json_become_text():
    stream = capture("json")
    sr.error("odd", exc=ValueError("bad"), nan=float("nan"), pids=(1, 2), flag=True)
    record = json.loads(stream.getvalue())
    assert record["exc"] == "bad" and record["nan"] == "nan"
    assert record["pids"] == [1, 2] and record["flag"] is True


@settings(max_examples=200, deadline=None)
@given(prefix=st.text(), suffix=st.text())
def test_json_lines_never_show_a_secret_and_stay_valid_json(prefix, suffix):
    stream = capture("json", sr.Redactor([TOKEN]))
    secret = prefix + TOKEN + suffix
    sr.error(
        secret, error=secret, nested={"list": [secret, {"deeper": secret}]},
        header=f"Authorization: Bearer {prefix}x{suffix}", exc=RuntimeError(secret),
        **{"key": f"https://user:{TOKEN}@github.com/{suffix}"},
    )  # fmt: skip
    [line] = stream.getvalue().splitlines()
    record = json.loads(line)
    assert TOKEN not in line and TOKEN not in json.dumps(record, ensure_ascii=False)
    assert sr.Redactor.MASK in record["msg"] and sr.Redactor.MASK in record["key"]


def test_summary_sums_input_tokens_with_the_cache_and_gives_null_for_the_unknown():
    stream = capture("json")
    sr.log_context(task_id="t-1")
    usage = {"input_tokens": 10, "output_tokens": 7, "cache_creation_input_tokens": 100,
             "cache_read_input_tokens": 1000}  # fmt: skip
    sr.log_task_summary("failed", {"usage": usage, "num_turns": 2, "events_sent": 4})
    sr.log_task_summary("completed", {"usage": "garbage", "pr_url": ""})
    full, bare = (json.loads(line) for line in stream.getvalue().splitlines())
    assert full["msg"] == "task summary" and full["task_id"] == "t-1"
    assert {k: full[k] for k in SUMMARY_KEYS - {"seconds"}} == {
        "outcome": "failed", "turns": 2, "cost_usd": None, "input_tokens": 1110,
        "output_tokens": 7, "events_sent": 4, "events_dropped": None, "pr_url": None,
    }  # fmt: skip
    assert full["seconds"] >= 0
    assert set(bare) >= SUMMARY_KEYS and bare["input_tokens"] is None and bare["pr_url"] is None


# ---------------------------------------------------------------------------
# the PR link, in one place: report_status
# ---------------------------------------------------------------------------

BASE = "http://api.test:8081/api/v1/tasks/" + TASK


@responses.activate
def test_status_with_a_pr_url_also_sends_it_as_prurl_for_the_adapter():
    responses.post(f"{BASE}/status", json={"status": "accepted"})
    api = sr.ShepherdAPI("http://api.test:8081", TASK, retry=sr.api_retry(total=0))
    details = {"pr_url": "https://github.com/a/b/pull/7", "prURL": "stale", "error": "x"}
    assert api.report_status("failed", "partial work kept", details)
    assert api.report_status("failed", "no changes made", {"error": "none"})
    with_pr, without = (json.loads(c.request.body)["details"] for c in responses.calls)
    assert with_pr == {"pr_url": "https://github.com/a/b/pull/7", "error": "x",
                       "prURL": "https://github.com/a/b/pull/7"}  # fmt: skip
    assert details["prURL"] == "stale"  # the caller's dict is left alone
    assert without == {"error": "none"}
