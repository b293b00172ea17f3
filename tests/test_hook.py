"""The Stop hook, in-process, on a real clone against the loopback servers."""

from __future__ import annotations

import io
import json
import subprocess

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import hook
import shepherd_runner as sr

TASK = "hook-task"


@pytest.fixture
def task(tmp_path, home, api, github, token):
    """A cloned repository on branch shepherd/hook-task, as the runner leaves it."""
    repo_url = github.create_repo("acme", "widgets")
    api.add_task(TASK, repo_url=repo_url, token=token)
    env = sr.git_env(
        {"PATH": "/usr/bin:/bin", "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1"},
        repo_url,
        token,
    )
    repo_dir = str(tmp_path / "widgets")
    git = sr.Git(repo_dir, env, sr.Redactor([token]))
    sr.clone(sr.parse_repo_url(repo_url), "", repo_dir, git, "blob:none")
    base_sha = git("rev-parse", "HEAD")
    git("switch", "-q", "-c", f"shepherd/{TASK}")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    sr.TaskState(
        task_id=TASK, repo_url=repo_url, repo_dir=repo_dir, branch=f"shepherd/{TASK}",
        base_ref="main", base_sha=base_sha, description="Fix the greeting\nin detail",
        source_url="https://example.com/issue/1", github_api_url=github.api_url,
    ).save(str(state_dir / "task.json"))  # fmt: skip
    log = tmp_path / "runner.log"
    env |= {
        "SHEPHERD_API_URL": api.url, "SHEPHERD_TASK_ID": TASK,
        "SHEPHERD_STATE_DIR": str(state_dir), "SHEPHERD_LOG_FILE": str(log),
    }  # fmt: skip

    class Task:
        pass

    t = Task()
    t.env, t.git, t.dir, t.state_dir, t.log = env, git, repo_dir, state_dir, log
    return t


def call_hook(env, payload, **kwargs):
    out = io.StringIO()
    stdin = io.BytesIO(payload if isinstance(payload, bytes) else json.dumps(payload).encode())
    code = hook.main([], environ=env, stdin=stdin, stdout=out, **kwargs)
    return code, out.getvalue()


def stop_payload(**extra):
    payload = {"hook_event_name": "Stop", "stop_hook_active": False,
               "last_assistant_message": "I fixed the greeting."}  # fmt: skip
    return payload | extra


def commit(task, text="hello world\n"):
    with open(f"{task.dir}/README.md", "a") as f:
        f.write(text)
    task.git("commit", "-qam", "Fix greeting")


def test_commits_are_pushed_and_a_pr_opened(task, api, github):
    commit(task)
    code, out = call_hook(task.env, stop_payload())
    assert (code, out) == (0, "")
    terminal = api.terminal(TASK)
    assert terminal["event"] == "completed"
    assert terminal["details"]["reported_by"] == "stop-hook"
    [pull] = github.pulls
    assert terminal["details"]["pr_url"] == pull["html_url"]
    assert pull["title"] == "Fix the greeting"
    assert pull["body"].startswith("I fixed the greeting.")
    assert github.branch_sha("acme", "widgets", f"shepherd/{TASK}") == task.git("rev-parse", "HEAD")
    assert "stop hook" in task.log.read_text()


def test_second_stop_finds_the_pr_and_opens_no_other(task, api, github):
    commit(task)
    call_hook(task.env, stop_payload())
    call_hook(task.env, stop_payload())
    assert len(github.pulls) == 1
    assert [s["_accepted_as"] for s in api.statuses(TASK)] == ["first-terminal", "already-notified"]


def test_draft_pr_when_configured(task, api, github):
    state = sr.TaskState.load(str(task.state_dir / "task.json"))
    state.pr_draft = True
    state.save(str(task.state_dir / "task.json"))
    commit(task)
    call_hook(task.env, stop_payload())
    assert github.pulls[0]["draft"] is True


def test_no_commits_fails_with_the_last_message(task, api, github):
    code, out = call_hook(
        task.env, stop_payload(last_assistant_message="Impossible: no such file.")
    )
    assert (code, out) == (0, "")
    terminal = api.terminal(TASK)
    assert (terminal["event"], terminal["message"]) == ("failed", "no changes made")
    assert terminal["details"]["error"] == "Impossible: no such file."


def test_uncommitted_changes_block_the_first_stop_only(task, api, github):
    commit(task)
    with open(f"{task.dir}/notes.txt", "w") as f:
        f.write("scratch\n")
    code, out = call_hook(task.env, stop_payload())
    assert code == 0
    answer = json.loads(out)
    assert answer["decision"] == "block" and "notes.txt" in answer["reason"]
    assert api.statuses(TASK) == []
    code, out = call_hook(task.env, stop_payload(stop_hook_active=True))
    assert (code, out) == (0, "")
    terminal = api.terminal(TASK)
    assert terminal["event"] == "completed"
    assert terminal["details"]["uncommitted"] == ["notes.txt"]


def test_commits_on_another_branch_are_reported_truthfully(task, api, github):
    task.git("switch", "-q", "-c", "my-own-branch")
    commit(task)
    call_hook(task.env, stop_payload())
    terminal = api.terminal(TASK)
    assert terminal["event"] == "failed"
    assert "my-own-branch" in terminal["message"] and github.pulls == []


def test_stop_failure_reports_the_api_error(task, api):
    # The shape the CLI sends, the same since 2.1.197 (tests/CLI_FINDINGS.md).
    words = "API Error: 529 overloaded (529). This is a server-side issue."
    payload = {"hook_event_name": "StopFailure", "error": "server_error",
               "last_assistant_message": words}  # fmt: skip
    assert call_hook(task.env, payload) == (0, "")
    terminal = api.terminal(TASK)
    assert terminal["event"] == "failed"
    assert terminal["message"] == f"the agent stopped on a model API error (server_error): {words}"


def test_hook_stands_down_once_the_runner_has_decided(task, api):
    commit(task)
    (task.state_dir / "stop").write_text("decided\n")
    assert call_hook(task.env, stop_payload()) == (0, "")
    assert api.statuses(TASK) == []
    assert "standing down" in task.log.read_text()


def test_unreachable_api_exits_0_and_leaves_it_to_the_runner(task, api):
    env = task.env | {"SHEPHERD_API_URL": "http://127.0.0.1:9"}  # discard port: refused
    assert call_hook(env, stop_payload())[0] == 0
    assert "status not delivered" in task.log.read_text()


def test_missing_task_state_exits_0_with_a_log_line(task, api):
    (task.state_dir / "task.json").unlink()
    assert call_hook(task.env, stop_payload()) == (0, "")
    assert "no task state" in task.log.read_text()


@pytest.mark.parametrize("stdin", [b"", b"\xff\xfe", b"[1, 2]", b'"Stop"', b"{"])
def test_unusable_stdin_exits_1_never_2(task, stdin):
    assert call_hook(task.env, stdin)[0] == 1
    assert "stop hook input unusable" in task.log.read_text()


@pytest.mark.parametrize("missing", ["SHEPHERD_API_URL", "SHEPHERD_TASK_ID"])
def test_missing_environment_exits_1(task, missing):
    env = {k: v for k, v in task.env.items() if k != missing}
    assert call_hook(env, stop_payload())[0] == 1
    assert "needs SHEPHERD_API_URL and SHEPHERD_TASK_ID" in task.log.read_text()


def test_hook_subcommand_usage_error_is_exit_1(tmp_path):
    # argparse would exit 2, which Claude Code reads as "do not stop".
    proc = subprocess.run(
        [sr.sys.executable, "-m", "shepherd_runner", "hook", "--bogus"],
        input=b"{}", capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert b"Traceback" not in proc.stderr


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400) | st.text(max_size=200).map(str.encode))
def test_arbitrary_stdin_is_exit_1_never_2_never_a_traceback(data):
    try:
        payload = json.loads(data)
    except ValueError:
        payload = None
    assume(not isinstance(payload, dict))  # a JSON object is a real (if odd) hook input
    env = {"SHEPHERD_API_URL": "http://127.0.0.1:9", "SHEPHERD_TASK_ID": "t"}
    assert hook.main([], environ=env, stdin=io.BytesIO(data), stdout=io.StringIO()) == 1


def test_uncommitted_tracked_file_is_named_exactly(task, api):
    # `git status --porcelain` starts such a line with a space (" M README.md").
    commit(task)
    with open(f"{task.dir}/README.md", "a") as f:
        f.write("more\n")
    code, out = call_hook(task.env, stop_payload())
    assert "(README.md)" in json.loads(out)["reason"]
    call_hook(task.env, stop_payload(stop_hook_active=True))
    assert api.terminal(TASK)["details"]["uncommitted"] == ["README.md"]


def test_pr_text_never_carries_the_token(task, api, github, token):
    commit(task)
    call_hook(task.env, stop_payload(last_assistant_message=f"Done; I used {token} to push."))
    [pull] = github.pulls
    assert token not in pull["body"] + pull["title"]
    assert "Done; I used [REDACTED] to push." in pull["body"]


def test_hook_hands_its_outcome_to_a_live_runner_and_reports_nothing(task, api, github):
    commit(task)
    env = task.env | {"SHEPHERD_RUNNER_PID": str(sr.os.getpid())}  # this process: alive
    assert call_hook(env, stop_payload()) == (0, "")
    assert api.statuses(TASK) == []
    outcome = sr.Outcome.load(str(task.state_dir / sr.OUTCOME_FILE))
    [pull] = github.pulls
    assert (outcome.event, outcome.details["pr_url"]) == ("completed", pull["html_url"])
    assert outcome.transient is False


def test_hook_reports_by_itself_when_the_runner_is_gone(task, api, github):
    commit(task)
    proc = subprocess.Popen(["true"])  # a pid that has exited: the runner's, gone
    proc.wait()
    env = task.env | {"SHEPHERD_RUNNER_PID": str(proc.pid)}
    assert call_hook(env, stop_payload()) == (0, "")
    assert api.terminal(TASK)["details"]["reported_by"] == "stop-hook"
    assert "the runner is gone" in task.log.read_text()


def test_transient_github_failure_is_handed_over_as_transient(task, api, github):
    commit(task)
    github.fail_next("pulls_create", [503] * 50)
    env = task.env | {"SHEPHERD_RUNNER_PID": str(sr.os.getpid())}
    assert call_hook(env, stop_payload(), budget=0.5) == (0, "")  # time for one try
    outcome = sr.Outcome.load(str(task.state_dir / sr.OUTCOME_FILE))
    assert (outcome.event, outcome.transient) == ("failed", True)
    assert "HTTP 503" in outcome.message
