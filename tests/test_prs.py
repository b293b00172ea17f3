"""A task written on a pull request: recognising it, fetching it and its review
comments, and concluding onto its branch without ever forcing it.

The REST calls answer through `responses`; the conclusion runs on a real clone
against the loopback fake GitHub. tests/test_e2e_prs.py runs the whole thing
with the real CLI.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import pytest
import responses
from responses import matchers
from test_client import GH, GH_TOKEN, Flaky, make_github

import shepherd_runner as sr

REPO = sr.parse_repo_url("https://github.com/acme/widgets.git")


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


# ---------------------------------------------------------------------------
# which source URL names a pull request of the task's repository
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "number"),
    [
        ("https://github.com/acme/widgets/pull/7", 7),
        ("https://github.com/acme/widgets/pull/7/", 7),
        ("https://github.com/acme/widgets/pull/7/files", 7),
        ("https://github.com/acme/widgets/pull/7/commits/0a1b2c3", 7),
        ("https://github.com/acme/widgets/pull/7#issuecomment-123", 7),
        ("https://github.com/acme/widgets/pull/7?notification_referrer_id=x", 7),
        ("https://GitHub.COM/Acme/Widgets/pull/12345", 12345),
        ("  https://github.com/acme/widgets/pull/7\n", 7),
        ("http://github.com/acme/widgets/pull/7", 7),
    ],
)
def test_pull_request_url_of_the_tasks_repository_is_recognised(url, number):
    assert sr.pull_number(url, REPO) == number


@pytest.mark.parametrize(
    "url",
    [
        "",
        "https://github.com/acme/widgets/issues/7",
        "https://github.com/acme/widgets/pulls/7",
        "https://github.com/acme/widgets/pull/",
        "https://github.com/acme/widgets/pull/0",
        "https://github.com/acme/widgets/pull/07",
        "https://github.com/acme/widgets/pull/-7",
        "https://github.com/acme/widgets/pull/7a",
        "https://github.com/acme/widgets/pull/\u0663",  # a digit, but not an ASCII one
        "https://github.com/acme/widgets/pull/99999999999",
        "https://github.com/acme/gadgets/pull/7",
        "https://github.com/other/widgets/pull/7",
        "https://github.com/acme/widgets.git/pull/7",
        "https://ghe.example.com/acme/widgets/pull/7",
        "https://github.com:8443/acme/widgets/pull/7",
        "https://github.com.evil.example/acme/widgets/pull/7",
        "ftp://github.com/acme/widgets/pull/7",
        "github.com/acme/widgets/pull/7",
        "https://[not-a-host/acme/widgets/pull/7",
        "https://github.com/acme/widgets",
    ],
)
def test_anything_but_a_pull_request_of_the_tasks_repository_is_not(url):
    assert sr.pull_number(url, REPO) is None


def test_enterprise_host_with_port_matches_only_itself():
    repo = sr.parse_repo_url("https://GHE.example.com:8443/acme/widgets")
    assert sr.pull_number("https://ghe.example.com:8443/acme/widgets/pull/3", repo) == 3
    assert sr.pull_number("https://ghe.example.com/acme/widgets/pull/3", repo) is None


# ---------------------------------------------------------------------------
# GitHub: the pull request and its review comments
# ---------------------------------------------------------------------------


def pull_json(state="open", head_repo="acme/widgets", merged=False, **extra):
    return {
        "number": 7,
        "html_url": "https://github.com/acme/widgets/pull/7",
        "state": state,
        "merged": merged,
        "merged_at": "2026-11-23T10:00:00Z" if merged else None,
        "head": {"ref": "feature/x", "sha": "a" * 40,
                 "repo": head_repo and {"full_name": head_repo}},
        "base": {"ref": "main", "sha": "b" * 40, "repo": {"full_name": "acme/widgets"}},
        **extra,
    }  # fmt: skip


def test_get_pull_fetches_the_pull_request_with_the_bearer_token(rsps):
    rsps.get(
        f"{GH}/pulls/7",
        json=pull_json(),
        match=[matchers.header_matcher({"Authorization": f"Bearer {GH_TOKEN}"})],
    )
    assert make_github().get_pull(7)["head"]["ref"] == "feature/x"


@pytest.mark.parametrize(("status", "words"), [(404, "cannot see"), (403, "permission")])
def test_get_pull_refused_is_a_github_error_with_the_status(rsps, status, words):
    rsps.get(f"{GH}/pulls/7", status=status, json={"message": "nope"})
    with pytest.raises(sr.GitHubError) as caught:
        make_github().get_pull(7)
    assert caught.value.status == status and words in str(caught.value)
    assert GH_TOKEN not in str(caught.value)


def test_get_pull_answering_something_else_than_an_object_is_an_error(rsps):
    rsps.get(f"{GH}/pulls/7", json=[1, 2])
    with pytest.raises(sr.GitHubError, match="no pull request"):
        make_github().get_pull(7)


def test_review_comments_asks_for_the_newest_hundred_and_keeps_objects_only(rsps):
    comment = {"id": 1, "path": "a.py", "line": 3, "body": "rename this"}
    rsps.get(
        f"{GH}/pulls/7/comments",
        json=[comment, "junk", None],
        match=[matchers.query_param_matcher(
            {"sort": "created", "direction": "desc", "per_page": "100"}
        )],
    )  # fmt: skip
    assert make_github().review_comments(7) == [comment]


def test_review_comments_not_a_list_is_none(rsps):
    rsps.get(f"{GH}/pulls/7/comments", json={"message": "odd"})
    assert make_github().review_comments(7) == []


def test_pull_context_retries_a_5xx_of_the_comments(rsps):
    server = Flaky(failures=4, status=502, ok_body=[{"path": "a.py", "line": 1, "body": "hm"}])
    rsps.add_callback(responses.GET, f"{GH}/pulls/7/comments", callback=server)
    text = sr.pull_context(make_github(), 7)
    assert "hm" in text and server.seen == 5  # 4 urllib3 tries, then `retrying` once more


def test_pull_context_without_the_comments_says_so(rsps):
    rsps.get(f"{GH}/pulls/7/comments", status=403, json={"message": "Forbidden"})
    assert "(they could not be fetched)" in sr.pull_context(make_github(), 7)


# ---------------------------------------------------------------------------
# the review comments in ~/task-context.md
# ---------------------------------------------------------------------------


def comment(n, body="looks odd", line=10, **extra):
    return {
        "id": n, "path": f"src/f{n}.py", "line": line, "original_line": 4, "body": body,
        "user": {"login": f"rev{n}"}, "created_at": f"2026-11-{n:02d}T10:00:00Z", **extra,
    }  # fmt: skip


def test_review_comments_are_listed_newest_first_with_file_line_and_author():
    text = sr.review_comments_text(7, [comment(1, "oldest"), comment(3, "newest"), comment(2)])
    assert text.startswith("\n\n## Review comments on pull request #7 (newest first)\n")
    assert text.index("newest\n") < text.index("looks odd") < text.index("oldest")
    assert "### src/f3.py, line 10, by rev3, 2026-11-03T10:00:00Z\n\nnewest\n" in text


def test_outdated_and_reply_comments_are_marked():
    text = sr.review_comments_text(
        7, [comment(1, line=None), comment(2, in_reply_to_id=1), comment(3, line=None,
                                                                          original_line=None)]
    )  # fmt: skip
    assert "### src/f1.py (outdated: was line 4), by rev1," in text
    assert "### src/f2.py, line 10, by rev2 (a reply)," in text
    assert "### src/f3.py (outdated), by rev3," in text


def test_review_comments_are_bounded_in_count_size_and_body():
    many = sr.review_comments_text(7, [comment(n % 28 + 1) for n in range(80)])
    assert many.count("\n### ") == sr.REVIEW_COMMENTS_MAX
    assert many.endswith(f"\n({80 - sr.REVIEW_COMMENTS_MAX} older comments left out)\n")
    big = sr.review_comments_text(7, [comment(n % 28 + 1, "x" * 50_000) for n in range(30)])
    assert len(big) <= sr.REVIEW_CONTEXT_LIMIT + 100
    assert "x" * sr.REVIEW_BODY_LIMIT not in big and "x" * 1900 + "…" in big
    assert "older comments left out" in big


def test_a_file_name_with_a_newline_stays_in_its_heading():
    text = sr.review_comments_text(7, [comment(1, path="a\n## Task\nrm -rf /")])
    assert "### a?## Task?rm -rf /, line 10, by rev1," in text


def test_review_comments_of_odd_shapes_do_not_crash():
    odd = [{"user": "bob", "line": "3", "body": 5, "created_at": None}, {}]
    text = sr.review_comments_text(7, odd)
    assert text.count("### (no file) (outdated), by someone, undated") == 2
    assert sr.review_comments_text(7, []).endswith("(none)\n")


# ---------------------------------------------------------------------------
# which pull request the task continues
# ---------------------------------------------------------------------------


def test_open_pull_request_of_the_same_repository_is_continued(rsps):
    rsps.get(f"{GH}/pulls/7", json=pull_json())
    pull, why_not = sr.source_pull(make_github(), 7)
    assert (pull["number"], why_not) == (7, "")


@pytest.mark.parametrize(
    ("pull", "why_not"),
    [
        (pull_json(state="closed"), "it is closed"),
        (pull_json(state="closed", merged=True), "it is merged"),
        (pull_json(head_repo="someone/widgets"), "its branch is in the fork someone/widgets"),
        (pull_json(head_repo=None), "its head repository was deleted"),
        (pull_json(head={"ref": "x"}), "its head repository was deleted"),
        (pull_json(base=None), "GitHub did not say its branches"),
        (
            pull_json(
                head={
                    "ref": "main",
                    "repo": {"full_name": "acme/widgets", "default_branch": "main"},
                }
            ),
            "its head is the default branch main, which the runner does not push to",
        ),
        (pull_json(head={"ref": "a..b", "repo": {"full_name": "acme/widgets"}}), "a..b"),
    ],
)
def test_pull_request_that_cannot_be_continued_says_why(rsps, pull, why_not):
    rsps.get(f"{GH}/pulls/7", json=pull)
    got, reason = sr.source_pull(make_github(), 7)
    assert got is not None and why_not in reason


def test_same_repository_compares_whatever_the_case(rsps):
    rsps.get(f"{GH}/pulls/7", json=pull_json(head_repo="ACME/Widgets"))
    assert sr.source_pull(make_github(), 7)[1] == ""


def test_missing_pull_request_is_the_usual_flow(rsps):
    rsps.get(f"{GH}/pulls/7", status=404, json={"message": "Not Found"})
    assert sr.source_pull(make_github(), 7) == (None, "")


def test_pull_request_lookup_retries_transient_failures(rsps):
    server = Flaky(failures=4, status=503, ok_body=pull_json())
    rsps.add_callback(responses.GET, f"{GH}/pulls/7", callback=server)
    assert sr.source_pull(make_github(), 7)[1] == ""
    assert server.seen == 5


def test_pull_request_lookup_refused_fails_the_task_naming_it(rsps):
    rsps.get(f"{GH}/pulls/7", status=403, json={"message": "Resource not accessible"})
    with pytest.raises(sr.Failure, match=r"fetching pull request #7, which the task was "):
        sr.source_pull(make_github(), 7)


# ---------------------------------------------------------------------------
# concluding onto a pull request's branch: never forced
# ---------------------------------------------------------------------------

TASK = "pr-task"
FEATURE = "feature/greeting"


@pytest.fixture
def on_pull(tmp_path, home, github, token):
    """A clone on the head branch of open PR #1, as the runner leaves it."""
    repo_url = github.create_repo("acme", "widgets", files={"README.md": "hello\n",
                                                            "NOTES.md": "notes\n"})  # fmt: skip
    github.commit_to("acme", "widgets", FEATURE, {"feature.txt": "one\n"}, "Start the feature")
    pull = github.add_pull("acme", "widgets", FEATURE, title="Feature")
    env = sr.git_env(
        {"PATH": "/usr/bin:/bin", "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1"}, repo_url, token
    )
    repo_dir = str(tmp_path / "widgets")
    git = sr.Git(repo_dir, env, sr.Redactor([token]))
    sr.clone(sr.parse_repo_url(repo_url), FEATURE, repo_dir, git, "blob:none")
    state = sr.TaskState(
        task_id=TASK, repo_url=repo_url, repo_dir=repo_dir, branch=FEATURE, base_ref="main",
        base_sha=git("rev-parse", "HEAD"), description="Greet the world",
        source_url=pull["html_url"], github_api_url=github.api_url, owns_branch=False,
        pull_url=pull["html_url"], pull_number=1,
    )  # fmt: skip
    return state, git, sr.GitHub(sr.parse_repo_url(repo_url), token, api_url=github.api_url)


def agent_commits(git, path="README.md", text="hello world\n", message="Greet the world"):
    with open(f"{git.cwd}/{path}", "w") as f:
        f.write(text)
    git("commit", "-qam", message)
    return git("rev-parse", "HEAD")


def conclude(state, git, github):
    return sr.conclude(state, git, github, last_message="Done.", may_block=False,
                       deadline=time.monotonic() + 30)  # fmt: skip


def test_commits_go_onto_the_pull_requests_branch_and_it_is_named(on_pull, github):
    state, git, gh = on_pull
    sha = agent_commits(git)
    outcome = conclude(state, git, gh)
    assert outcome.event == "completed", outcome
    assert outcome.details["pr_url"] == github.pulls[0]["html_url"]
    assert outcome.message == f"pull request {github.pulls[0]['html_url']}"
    assert "pr_opened_by" not in outcome.details and len(github.pulls) == 1
    assert github.branch_sha("acme", "widgets", FEATURE) == sha
    assert [p["forced"] for p in github.pushes] == [False]


def test_branch_that_moved_gets_the_commits_rebased_onto_it_without_force(on_pull, github):
    state, git, gh = on_pull
    agent_commits(git)
    theirs = github.commit_to("acme", "widgets", FEATURE, {"NOTES.md": "more\n"}, "Their fix")
    outcome = conclude(state, git, gh)
    assert outcome.event == "completed", outcome
    assert outcome.details["pr_url"] == github.pulls[0]["html_url"] and len(github.pulls) == 1
    assert github.log("acme", "widgets", FEATURE)[:3] == [
        "Greet the world", "Their fix", "Start the feature"
    ]  # fmt: skip
    assert git("rev-parse", "HEAD~1") == theirs
    assert not any(p["forced"] for p in github.pushes)


def test_uncommitted_changes_do_not_stop_the_rebase_and_are_left_as_they_were(on_pull, github):
    state, git, gh = on_pull
    agent_commits(git)
    with open(f"{git.cwd}/feature.txt", "w") as f:
        f.write("scratch\n")
    github.commit_to("acme", "widgets", FEATURE, {"NOTES.md": "more\n"}, "Their fix")
    outcome = conclude(state, git, gh)
    assert outcome.event == "completed" and len(github.pulls) == 1, outcome
    assert outcome.details["uncommitted"] == ["feature.txt"]
    assert github.log("acme", "widgets", FEATURE)[:2] == ["Greet the world", "Their fix"]
    assert git("status", "--porcelain") == " M feature.txt"


def test_conflicting_push_keeps_the_work_on_the_runners_branch_with_a_linking_pr(on_pull, github):
    state, git, gh = on_pull
    sha = agent_commits(git)
    theirs = github.commit_to("acme", "widgets", FEATURE, {"README.md": "bye\n"}, "Their fix")
    outcome = conclude(state, git, gh)
    assert outcome.event == "completed", outcome
    original, new = github.pulls
    assert outcome.details["pr_url"] == new["html_url"]
    assert outcome.details["branch"] == new["head"] == f"shepherd/{TASK}"
    assert outcome.message == (
        f"pull request {new['html_url']}; the work is not on pull request "
        f"{original['html_url']}: its branch moved while the agent worked and the agent's "
        "commits did not rebase cleanly onto it"
    )
    assert (
        f"The task was written on pull request {original['html_url']}; its branch" in (new["body"])
    )
    assert github.branch_sha("acme", "widgets", f"shepherd/{TASK}") == sha
    assert github.branch_sha("acme", "widgets", FEATURE) == theirs
    assert not any(p["forced"] for p in github.pushes)
    assert git("status", "--porcelain") == ""  # the rebase was aborted, not left half-done
    # Idempotent: the runner concluding again opens no third pull request.
    assert conclude(state, git, gh).details["pr_url"] == new["html_url"]
    assert len(github.pulls) == 2


def test_agent_rewriting_the_branch_is_not_force_pushed(on_pull, github):
    state, git, gh = on_pull
    git("commit", "-q", "--amend", "-m", "Start the feature, reworded")
    agent_commits(git)
    outcome = conclude(state, git, gh)
    assert outcome.event == "completed", outcome
    assert outcome.details["branch"] == f"shepherd/{TASK}"
    assert "the agent rewrote commits of its branch" in outcome.message
    assert github.log("acme", "widgets", FEATURE)[0] == "Start the feature"
    assert not any(p["forced"] for p in github.pushes)


def test_backup_of_a_moved_branch_saves_the_work_on_the_runners_branch(on_pull, github):
    state, git, gh = on_pull
    sha = agent_commits(git)
    theirs = github.commit_to("acme", "widgets", FEATURE, {"NOTES.md": "more\n"}, "Their fix")
    branch = sr.Branch(git, state)
    backup = sr.Backup(branch, gh)
    backup.tick()
    assert github.branch_sha("acme", "widgets", f"shepherd/{TASK}") == sha
    assert github.branch_sha("acme", "widgets", FEATURE) == theirs  # never forced
    more = agent_commits(git, "README.md", "hello world, again\n", "More work")
    backup.tick()  # from now on straight to the runner's branch
    assert github.branch_sha("acme", "widgets", f"shepherd/{TASK}") == more
    backup.tick()  # nothing new: no push
    assert [p["ref"] for p in github.pushes] == [f"refs/heads/shepherd/{TASK}"] * 2
    assert not any(p["forced"] for p in github.pushes)
    # The conclusion still rebases onto the pull request's branch when that is clean.
    outcome = sr.conclude(state, git, gh, last_message="Done.", may_block=False,
                          deadline=time.monotonic() + 30, branch=branch)  # fmt: skip
    assert outcome.event == "completed" and outcome.details["pr_url"] == github.pulls[0]["html_url"]
    assert github.log("acme", "widgets", FEATURE)[:3] == [
        "More work",
        "Greet the world",
        "Their fix",
    ]


def test_conflicting_work_saved_by_the_backup_ends_on_the_linking_pull_request(on_pull, github):
    state, git, gh = on_pull
    sha = agent_commits(git)
    github.commit_to("acme", "widgets", FEATURE, {"README.md": "bye\n"}, "Their fix")
    branch = sr.Branch(git, state)
    sr.Backup(branch, gh).tick()
    outcome = sr.conclude(state, git, gh, last_message="Done.", may_block=False,
                          deadline=time.monotonic() + 30, branch=branch)  # fmt: skip
    assert outcome.event == "completed", outcome
    _, new = github.pulls
    assert new["head"] == f"shepherd/{TASK}" and outcome.details["pr_url"] == new["html_url"]
    assert github.branch_sha("acme", "widgets", f"shepherd/{TASK}") == sha
    assert not any(p["forced"] for p in github.pushes)


def test_push_refused_on_a_moved_branch_saves_the_work_on_the_runners_branch(on_pull, github):
    state, git, gh = on_pull
    sha = agent_commits(git)
    theirs = github.commit_to("acme", "widgets", FEATURE, {"NOTES.md": "more\n"}, "Their fix")
    branch = sr.Branch(git, state)
    kept = sr.save_work(branch, time.monotonic() + 5)
    assert kept is branch.own and kept.state.branch == f"shepherd/{TASK}"
    assert kept.state.owns_branch and kept.remote == sha
    assert github.branch_sha("acme", "widgets", f"shepherd/{TASK}") == sha
    assert github.branch_sha("acme", "widgets", FEATURE) == theirs
    details = {}
    assert kept.where(details) == f"branch shepherd/{TASK} ({details['compare_url']})"
    assert details["compare_url"].endswith(f"/acme/widgets/compare/main...shepherd/{TASK}")


def test_work_on_a_branch_that_did_not_move_is_saved_on_it(on_pull, github):
    state, git, gh = on_pull
    sha = agent_commits(git)
    branch = sr.Branch(git, state)
    assert sr.save_work(branch, time.monotonic() + 5) is branch and branch.own is None
    assert github.branch_sha("acme", "widgets", FEATURE) == sha
    assert github.branch_sha("acme", "widgets", f"shepherd/{TASK}") is None


def test_state_with_the_pull_request_survives_the_state_file(on_pull, tmp_path):
    state, _, _ = on_pull
    state.save(str(tmp_path / "task.json"))
    assert sr.TaskState.load(str(tmp_path / "task.json")) == state
    assert json.loads((tmp_path / "task.json").read_text())["owns_branch"] is False


class ScriptedGit:
    """Stands in for `Git` in Branch: answers each command from `answers`, records argv."""

    def __init__(self, answers):
        self.answers, self.calls, self.timeouts = answers, [], {}

    def __call__(self, *args, timeout=60):
        self.calls.append(args)
        self.timeouts[args[0]] = timeout
        answer = self.answers[args[0]].pop(0)
        if isinstance(answer, sr.CommandError):
            raise answer
        return answer


@pytest.mark.parametrize("owns_branch", [True, False])
def test_push_colliding_with_a_concurrent_push_of_the_branch_is_tried_again(owns_branch):
    # The hook's push and the backup's run in two processes: the remote
    # refuses the later one when both update the ref at the same moment.
    local = "c" * 40
    collided = sr.CommandError(
        ["git", "push"], 1, "",
        "remote: error: cannot lock ref 'refs/heads/b': reference already exists\n"
        " ! [remote rejected] b -> b (failed to update ref)", sr.Redactor(),
    )  # fmt: skip
    git = ScriptedGit({
        "rev-parse": [local, local],
        "ls-remote": ["", f"{local}\trefs/heads/b"],
        "push": [collided],
    })  # fmt: skip
    state = sr.TaskState("t", "https://github.com/acme/widgets", "/x", "b", "main", "0" * 40,
                         owns_branch=owns_branch)  # fmt: skip
    slept = []
    branch = sr.Branch(git, state)
    branch_push = sr.retrying(branch._push, time.monotonic() + 30, "push", sleep=slept.append)
    assert branch_push == local and slept == [1.0]
    [push] = [c for c in git.calls if c[0] == "push"]
    assert any(a.startswith("--force-with-lease") for a in push) is owns_branch


def test_a_push_after_a_signal_gives_git_no_longer_than_its_budget():
    local = "c" * 40
    git = ScriptedGit({"rev-parse": [local], "ls-remote": [""], "push": [""]})
    state = sr.TaskState("t", "https://github.com/acme/widgets", "/x", "b", "main", "0" * 40)
    sr.Branch(git, state).push(time.monotonic() + sr.LAST_PUSH_BUDGET)
    assert 1 <= git.timeouts["push"] <= sr.LAST_PUSH_BUDGET
    assert 1 <= git.timeouts["ls-remote"] <= sr.LAST_PUSH_BUDGET


def test_a_push_past_its_deadline_still_gives_git_a_second():
    local = "c" * 40
    git = ScriptedGit({"rev-parse": [local], "ls-remote": [""], "push": [""]})
    state = sr.TaskState("t", "https://github.com/acme/widgets", "/x", "b", "main", "0" * 40)
    sr.Branch(git, state)._push(time.monotonic() - 10)
    assert git.timeouts["push"] == git.timeouts["ls-remote"] == 1.0


def test_work_moved_to_the_runners_branch_is_retried_with_the_branchs_sleep(on_pull, github):
    state, git, _ = on_pull
    sha = agent_commits(git)
    github.commit_to("acme", "widgets", FEATURE, {"README.md": "bye\n"}, "Their fix")
    slept = []
    branch = sr.Branch(git, state, sleep=slept.append)
    with pytest.raises(sr.BranchMoved):
        branch.push(time.monotonic() + 30)
    github.fail_next("git_push", [503])
    own_state, kept = sr.onto_moved_branch(state, git, branch, time.monotonic() + 30)
    assert slept == [1.0]  # a signal's Event.wait, not time.sleep
    assert kept is branch.own and kept.sleep == branch.sleep
    assert own_state.branch == f"shepherd/{TASK}"
    assert "did not rebase cleanly" in own_state.pull_note
    assert github.branch_sha("acme", "widgets", f"shepherd/{TASK}") == sha


def test_work_saved_then_moved_again_reuses_the_runners_branch(on_pull, github):
    state, git, _ = on_pull
    agent_commits(git)
    github.commit_to("acme", "widgets", FEATURE, {"README.md": "bye\n"}, "Their fix")
    branch = sr.Branch(git, state)
    saved = sr.save_work(branch, time.monotonic() + 30)
    more = agent_commits(git, "NOTES.md", "notes, more\n", "More work")
    own_state, kept = sr.onto_moved_branch(state, git, branch, time.monotonic() + 30)
    assert kept is saved is branch.own and kept.state is own_state and kept.remote == more
    assert github.branch_sha("acme", "widgets", f"shepherd/{TASK}") == more


def test_a_concurrent_move_of_the_runners_branch_is_a_transient_failure(on_pull, github):
    # The Stop hook's process and the backup both move shepherd/{taskID} locally.
    state, git, _ = on_pull
    agent_commits(git)
    github.commit_to("acme", "widgets", FEATURE, {"README.md": "bye\n"}, "Their fix")
    lock = f"{git.cwd}/.git/refs/heads/shepherd/{TASK}.lock"
    os.makedirs(os.path.dirname(lock))
    open(lock, "w").close()  # the other process's `git branch --force`, in flight
    with pytest.raises(sr.PushError, match="cannot lock ref") as caught:
        sr.save_work(sr.Branch(git, state), time.monotonic() + 30)
    assert caught.value.transient


def expired(state, now):
    return dataclasses.replace(state, token_expires_at=now - 60, started_at=now - 3600)


def test_expired_token_after_the_backup_saved_a_moved_branch_says_where_the_work_is(
    on_pull, github
):
    state, git, gh = on_pull
    sha = agent_commits(git)
    github.commit_to("acme", "widgets", FEATURE, {"README.md": "bye\n"}, "Their fix")
    branch = sr.Branch(git, state)
    sr.Backup(branch, gh).tick()
    state = expired(state, time.time())
    outcome = sr.conclude(state, git, gh, last_message="Done.", may_block=False,
                          deadline=time.monotonic() + 30, branch=branch)  # fmt: skip
    assert outcome.event == "failed"
    assert f"the work up to {sha[:7]} is in branch shepherd/{TASK}" in outcome.message, outcome
    assert outcome.details["branch"] == f"shepherd/{TASK}"
    assert outcome.details["signed"] == {"mode": "git", "commits": 1, "verified": False}


def test_backup_before_expiry_opens_the_draft_on_the_branch_that_holds_the_work(on_pull, github):
    state, git, gh = on_pull
    sha = agent_commits(git)
    github.commit_to("acme", "widgets", FEATURE, {"README.md": "bye\n"}, "Their fix")
    state = dataclasses.replace(state, token_expires_at=time.time() + 60)
    branch = sr.Branch(git, state)
    sr.Backup(branch, gh).tick()
    original, draft = github.pulls
    assert draft["head"] == f"shepherd/{TASK}" and draft["draft"] is True
    assert f"The task was written on pull request {original['html_url']}" in draft["body"]
    assert branch.own.pull_url == draft["html_url"] and not branch.pull_url
    outcome = sr.expired_outcome(expired(state, time.time()), git, branch, {"commits": 1})
    assert outcome.event == "completed"
    assert outcome.message.startswith(f"pull request {draft['html_url']} (it stays a draft: ")
    assert github.branch_sha("acme", "widgets", f"shepherd/{TASK}") == sha


def test_the_backups_one_try_gives_git_its_usual_time():
    local = "c" * 40
    git = ScriptedGit({"rev-parse": [local, local], "ls-remote": [""], "push": [""]})
    state = sr.TaskState("t", "https://github.com/acme/widgets", "/x", "b", "main", "0" * 40)
    sr.Backup(sr.Branch(git, state), github=None).tick()
    assert git.timeouts["ls-remote"] == 60 and git.timeouts["push"] == 120
