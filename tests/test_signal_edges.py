"""Signals at the edges of a run: after the report, and during the API's retries.

The runner runs as production does (tests/harness.py), the agent is
tests/stand_in_agent.py, the API and GitHub are the loopback fakes.
"""

from __future__ import annotations

import signal
import time

import pytest
from test_flow import TASK, world  # noqa: F401

import shepherd_runner as sr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("delay_ms", [0, 5, 10, 20])
def test_a_signal_after_the_task_summary_leaves_the_exit_code_0(world, api, signum, delay_ms):
    # The pod is often deleted as soon as the operator sees the terminal status,
    # while the runner is still exiting: CPython restores the default handlers
    # as it shuts down, so without care a late signal turned 0 into 143 or 130.
    runner = world.start("commit")
    runner.assign(TASK, api.url)
    runner.wait_for(r" INFO task summary ")
    time.sleep(delay_ms / 1000)  # the delay is the point of the test, not a synchronisation
    runner.proc.send_signal(signum)  # nothing when it has exited already
    assert runner.wait(timeout=30) == sr.EXIT_OK, runner.output
    assert api.terminal(TASK)["event"] == "completed"
