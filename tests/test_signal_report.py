"""The terminal report after a signal: it waits for a slow adapter, and fits the pod's grace.

The real API forwards each /status to its adapter and answers only after it,
up to 10 s later (contract, section 5); the pod is SIGKILLed 30 s after
SIGTERM. The reporter is built in-process by a signalled TaskRun and talks to
the loopback fake API.
"""

from __future__ import annotations

import signal
import time

import pytest

import shepherd_runner as sr

TASK = "signal-task"
ADAPTER_WAIT = 10.0  # the API's timeout on its adapter's callback


@pytest.fixture
def reporter(api):
    """A signalled task's reporter, with `budget` seconds left before REPORT_BY."""
    api.add_task(TASK, repo_url="https://github.com/acme/widgets")

    def make(budget: float = sr.REPORT_BY) -> sr.ShepherdAPI:
        ctx = sr.Context(environ={}, home="/nonexistent")
        ctx.stop.trigger(signal.SIGTERM)
        ctx.stop.at -= sr.REPORT_BY - budget  # the signal came that much earlier
        cfg = sr.parse_config(["serve"], {})
        return sr.TaskRun(cfg, sr.Assignment(TASK, api.url), ctx)._reporter()

    return make


def test_the_budget_leaves_room_for_the_adapter_and_fits_the_grace_period():
    connect, read = sr.SIGNAL_STATUS_TIMEOUT
    assert read > ADAPTER_WAIT and sr.API_TIMEOUT[1] > ADAPTER_WAIT
    # Before the report: the agent's processes get KILL_GRACE, events 2 s, the last push its
    # own; one whole try of the report still fits before REPORT_BY, and that before the SIGKILL.
    assert sr.KILL_GRACE + 2 + sr.LAST_PUSH_BUDGET + connect + read <= sr.REPORT_BY < sr.POD_GRACE


def test_after_a_signal_a_status_the_adapter_holds_10s_is_delivered(reporter, api):
    api.set_delay("/status", ADAPTER_WAIT)
    start = time.monotonic()
    assert reporter().report_status("failed", "terminated (SIGTERM)", {"error": "x"})
    took = time.monotonic() - start
    assert ADAPTER_WAIT <= took < sr.REPORT_BY
    assert api.terminal(TASK)["message"] == "terminated (SIGTERM)"
    assert len(api.statuses(TASK)) == 1  # one try: no read timeout cut it short


def test_after_a_signal_a_silent_api_is_given_up_within_the_budget(reporter, api):
    api.set_delay("/status", 600)  # the fake never answers in time
    start = time.monotonic()
    assert reporter(budget=3.0).report_status("failed", "terminated (SIGTERM)") is False
    took = time.monotonic() - start
    assert 2.5 < took < 4.0, took


def test_after_a_signal_5xx_are_retried_until_the_budget_is_spent(reporter, api):
    api.fail_for("/status", 600)
    start = time.monotonic()
    assert reporter(budget=4.0).report_status("failed", "terminated (SIGTERM)") is False
    took = time.monotonic() - start
    assert 2.5 < took < 4.5, took
    tries = [r for r in api.requests if r[1].endswith("/status")]
    assert len(tries) >= 3  # 0, 0, ~2 s... backoff, cut to the budget


def test_after_a_signal_a_5xx_then_an_answer_is_delivered(reporter, api):
    api.fail_next(TASK, "/status", [503, 502])
    assert reporter().report_status("failed", "terminated (SIGTERM)") is True
    assert api.terminal(TASK)["message"] == "terminated (SIGTERM)"


def test_deadline_retry_keeps_its_deadline_across_tries():
    retry = sr.api_retry(deadline=time.monotonic() + 60)
    after = retry.increment("POST", "/status", error=ConnectionResetError())
    deadline_retry, _ = sr._deadline_types()
    assert isinstance(after, deadline_retry) and after.deadline == retry.deadline
    assert after.total == retry.total - 1
