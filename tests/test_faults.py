"""Faults across the flow, in-process with fast retries: each ends in one precise status.

The task runs in this process (TaskRun), so the API client's retry policy can
be shortened; the agent is the stand-in, the servers are the loopback fakes.
"""

from __future__ import annotations

import io
import json
import signal
import threading
import time

import pytest
from test_flow import STAND_IN

import shepherd_runner as sr
from harness import runner_env

TASK = "fault-task"


@pytest.fixture
def run_task(tmp_path, home, api, github, token):
    repo_url = github.create_repo("acme", "widgets")
    api.add_task(TASK, repo_url=repo_url, token=token)

    def run(scenario="commit", *, retry=None, home_dir=None, stop=None, **extra):
        environ = runner_env(
            tmp_path, claude_bin=STAND_IN, github=github, HOME=str(home_dir or home),
            STAND_IN_SCENARIO=scenario, **extra,
        )  # fmt: skip
        cfg = sr.parse_config(["serve"], environ)
        ctx = sr.Context(
            environ=environ, home=str(home_dir or home),
            retry=retry or sr.api_retry(total=2, backoff=0),
            token_retries=sr.token_retry(total=1, backoff=0), stop=stop or sr.Stop(),
        )  # fmt: skip
        log = io.StringIO()
        sr.setup_logging(log, ctx.redact)
        ending = sr.TaskRun(cfg, sr.Assignment(TASK, api.url), ctx).execute()
        return ending, log.getvalue(), api.terminal(TASK)

    return run


def only_terminal(api):
    return [s for s in api.statuses(TASK) if s["event"] in ("completed", "failed")]


def test_data_answering_500_until_the_retries_run_out_fails(run_task, api, github):
    api.fail_next(TASK, "/data", [500] * 3)
    ending, log, terminal = run_task()
    assert ending is sr.Ending.REPORTED
    assert (
        terminal["message"]
        == "fetching the task data failed: HTTP 500: injected fault: fail_next(/data)"
    )
    assert len(only_terminal(api)) == 1
    assert github.git_requests == []


def test_git_server_failing_the_clone_fails_with_its_status(run_task, api, github):
    github.fail_next("git", [500] * 10)
    ending, log, terminal = run_task()
    assert terminal["event"] == "failed"
    assert terminal["message"].startswith("cloning http://") and "500" in terminal["message"]


def test_agent_killed_mid_line_fails_naming_the_signal(run_task, api):
    ending, log, terminal = run_task("killed")
    assert terminal["message"] == "the agent was killed by SIGKILL"
    assert any(e["type"] == "error" for e in api.events(TASK))  # the partial line


def test_garbage_and_a_20mb_line_do_not_break_the_run(run_task, api):
    ending, log, terminal = run_task("noisy")
    assert terminal["event"] == "completed", terminal
    errors = [e["summary"] for e in api.events(TASK) if e["type"] == "error"]
    assert any(s.startswith("unreadable agent output line") for s in errors)
    assert f"agent output line over {sr.MAX_LINE_BYTES} bytes skipped" in errors


def test_home_not_writable_fails(run_task, api, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where HOME's parent should be\n")
    ending, log, terminal = run_task(home_dir=blocker / "home")
    assert terminal["event"] == "failed"
    assert terminal["message"].startswith("HOME is not writable")


@pytest.mark.parametrize(
    "ref", ["--upload-pack=touch /tmp/pwned", "../../etc", "a..b", "-b", "x.lock"]
)
def test_refs_that_could_inject_git_options_are_refused_before_git_runs(run_task, api, github, ref):
    api.add_task(TASK, repo_url=github.url + "/acme/widgets.git", ref=ref, token=github.token)
    ending, log, terminal = run_task()
    assert terminal["event"] == "failed"
    assert "is not an acceptable branch or tag name" in terminal["message"]
    assert github.git_requests == []


def test_events_endpoint_failing_does_not_delay_the_terminal_status(run_task, api):
    api.fail_next(TASK, "/events", [500] * 1000)
    start = time.monotonic()
    ending, log, terminal = run_task("commit")
    assert terminal["event"] == "completed"
    runner_report = api.statuses(TASK)[-1]
    assert runner_report["details"]["events_sent"] == 0
    assert runner_report["details"]["events_dropped"] > 0
    assert time.monotonic() - start < 10, "waited on a dead events endpoint"


def test_status_outage_of_60s_around_the_terminal_report_is_survived(run_task, api):
    # The production retry policy, against a real 60 s outage of /status.
    api.fail_for("/status", 60)
    start = time.monotonic()
    ending, log, terminal = run_task("crash", retry=sr.api_retry())
    took = time.monotonic() - start
    assert ending is sr.Ending.REPORTED, log
    assert terminal["event"] == "failed" and "code 3" in terminal["message"]
    assert took >= 60
    print(f"terminal status delivered {took:.1f} s after the outage began")
    assert json.dumps(terminal)


def test_a_step_failing_after_a_signal_is_reported_as_the_signal_not_the_symptom(run_task, api):
    stop = sr.Stop()
    api.fail_next(TASK, "/data", [500] * 50)  # the API answers 500 while the pod is deleted

    def signal_at_the_first_try():
        api.wait_requests("/data", 1)
        stop.trigger(signal.SIGTERM)

    threading.Thread(target=signal_at_the_first_try, daemon=True).start()
    ending, log, terminal = run_task(stop=stop, retry=sr.api_retry(total=50, backoff=0.2))
    assert ending is sr.Ending.REPORTED
    assert terminal["message"] == stop.reason
    assert "ERROR fetch task data failed" in log  # the symptom is logged, the signal reported
    assert api.wait_requests("/data", 1) < 50  # the signal ended the retries


def test_after_a_signal_no_step_starts(run_task, api, github):
    stop = sr.Stop()
    stop.trigger(signal.SIGTERM)  # during the `started` status
    ending, log, terminal = run_task(stop=stop)
    assert ending is sr.Ending.REPORTED
    assert terminal["message"] == stop.reason
    assert "fetch task data" not in log and github.git_requests == []
