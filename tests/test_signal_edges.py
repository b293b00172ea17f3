"""Signals at the edges of a run: after the report, during the API's retries, and
on a continued pull request whose branch moved.

The runner runs as production does (tests/harness.py), the agent is
tests/stand_in_agent.py, the API and GitHub are the loopback fakes.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
import responses
from test_client import GH, GH_TOKEN, refuse_connections  # noqa: F401
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


@pytest.mark.parametrize("path", ["/data", "/status"], ids=["task data", "started status"])
def test_sigterm_during_the_apis_retries_ends_them_and_failed_is_reported_at_once(
    world, api, github, path
):
    # Without a bound the retries go on for ~90 s (0, 2, 4, 8, 15... s) and
    # the pod is SIGKILLed 30 s after the signal, with no report.
    if path == "/data":
        api.fail_for("/data", 600)
    else:
        api.fail_next(TASK, "/status", [503] * 3)  # the `started` status
    runner = world.start("commit")
    runner.assign(TASK, api.url)
    api.wait_requests(path, 3)  # the third try: the next one is ~4 s away
    start = time.monotonic()
    runner.proc.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=sr.POD_GRACE) == sr.EXIT_OK, runner.output
    assert time.monotonic() - start < 3, runner.output  # the next try was 4 s away
    terminal = api.terminal(TASK)
    assert terminal["event"] == "failed", terminal
    assert terminal["message"].startswith("terminated (SIGTERM)"), terminal
    tries = [p for _, p, _ in api.requests if p.endswith(path)]
    assert len(tries) == (3 if path == "/data" else 4), tries  # + the report itself
    assert github.git_requests == []  # before the clone


def test_a_signal_ends_the_token_requests_retries_on_refused_connections(api, refuse_connections):
    api.add_task("token-task", repo_url="https://github.com/acme/widgets")
    state = refuse_connections(100)
    stop = threading.Event()
    client = sr.ShepherdAPI(api.url, "token-task", stop=stop)  # the production retries
    threading.Timer(0.5, stop.set).start()  # the signal, while it waits between tries
    start = time.monotonic()
    with pytest.raises(sr.ApiError, match="unreachable"):
        client.fetch_token()
    assert time.monotonic() - start < 3  # not the ~15 s of five tries with backoff
    assert state["refused"] <= 3
    assert not api.token_issued("token-task")


def test_a_signal_before_any_retry_leaves_one_try(api):
    api.add_task("one-try", repo_url="https://github.com/acme/widgets")
    api.fail_for("/data", 600)
    stop = threading.Event()
    stop.set()
    with pytest.raises(sr.ApiError, match="HTTP 503"):
        sr.ShepherdAPI(api.url, "one-try", stop=stop).fetch_task_data()
    assert api.wait_requests("/data", 1) == 1


@responses.activate
def test_a_signal_ends_the_retries_of_the_tasks_pull_request_on_github(tmp_path):
    ctx = sr.Context(environ={}, home=str(tmp_path))
    run = sr.TaskRun(sr.parse_config(["serve"], {}), sr.Assignment("t", "http://api.test"), ctx)
    calls = []

    def unavailable(request):
        calls.append(request)
        if len(calls) == 2:
            ctx.stop.trigger(signal.SIGTERM)  # while GitHub answers 503
        return 503, {}, "{}"

    responses.add_callback(responses.GET, f"{GH}/pulls/7", callback=unavailable)
    repo = sr.parse_repo_url("https://github.com/acme/widgets")
    github = sr.GitHub(repo, GH_TOKEN, stop=run.signalled)
    start = time.monotonic()
    with pytest.raises(sr.Failure, match=r"^terminated \(SIGTERM\)"):
        sr.source_pull(github, 7, run._sleep)
    assert time.monotonic() - start < 1 and len(calls) == 2  # 60 s of retries otherwise


FEATURE = "feature/greeting"


@pytest.mark.parametrize("saved_by", ["backup", "last push"])
def test_sigterm_on_a_pull_request_whose_branch_moved_keeps_the_work_on_the_runners_branch(
    world, api, github, tmp_path, saved_by
):
    github.commit_to("acme", "widgets", FEATURE, {"feature.txt": "one\n"}, "Start the feature")
    pull = github.add_pull("acme", "widgets", FEATURE, title="Greeting feature")
    api.add_task(TASK, repo_url=world.repo_url, token=github.token, source_url=pull["html_url"])
    gate = tmp_path / "gate"
    # "last push": the agent signals the runner right after its commit, before
    # the backup's next look (every 2 s) could save it.
    extra = {"STAND_IN_TERM_RUNNER": "1"} if saved_by == "last push" else {}
    runner = world.start("gated-hang", STAND_IN_GATE=str(gate), **extra)
    runner.assign(TASK, api.url)
    runner.wait_for(r" INFO agent process started ")  # cloned on the pull request's branch
    theirs = github.commit_to("acme", "widgets", FEATURE, {"NOTES.md": "x\n"}, "Their change")
    gate.touch()  # the agent commits on the branch as it was cloned
    if saved_by == "backup":
        runner.wait_for(rf" INFO branch backed up branch=shepherd/{TASK} ")
        runner.proc.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=sr.POD_GRACE) == sr.EXIT_OK, runner.output
    terminal = api.terminal(TASK)
    compare = f"{github.url}/acme/widgets/compare/main...shepherd/{TASK}"
    assert terminal["message"] == (
        "terminated (SIGTERM): the pod is being deleted (sandbox timeout or cancellation); "
        f"its work (1 commit) is on branch shepherd/{TASK} ({compare}): the branch of pull "
        f"request {pull['html_url']} moved while the agent worked"
    ), runner.output
    assert terminal["details"]["branch"] == f"shepherd/{TASK}"
    assert terminal["details"]["compare_url"] == compare
    assert github.log("acme", "widgets", f"shepherd/{TASK}")[:2] == [
        "Update greeting", "Start the feature"
    ]  # fmt: skip
    assert github.branch_sha("acme", "widgets", FEATURE) == theirs  # untouched
    assert not any(p["forced"] for p in github.pushes), github.pushes
    assert [p["html_url"] for p in github.pulls] == [pull["html_url"]]  # no new one: no time


def test_a_failed_last_push_after_sigterm_still_says_how_commits_reach_github(
    world, api, github, tmp_path
):
    api.add_task(TASK, repo_url=world.repo_url, token=github.token)
    gate = tmp_path / "gate"
    runner = world.start("gated-hang", STAND_IN_GATE=str(gate), STAND_IN_TERM_RUNNER="1")
    runner.assign(TASK, api.url)
    runner.wait_for(r" INFO agent process started ")
    github.fail_next("git_push", [503] * 20)  # every push in the last push's 5 s
    gate.touch()
    assert runner.wait(timeout=sr.POD_GRACE) == sr.EXIT_OK, runner.output
    terminal = api.terminal(TASK)
    assert "its 1 commit could not be pushed" in terminal["message"], terminal
    assert terminal["details"]["signed"] == {"mode": "git", "commits": 0, "verified": False}
