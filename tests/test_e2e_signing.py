"""A repository that requires signed commits, end to end with the real Claude Code CLI.

Same setup as tests/test_e2e.py. The fake GitHub's git server refuses unsigned
commits with GitHub's GH013 text, its API signs the commits an App makes
without author or committer (tests/fake_gitdata.py): the work lands only if
the runner recreates the agent's commits through the API.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from test_e2e import BRANCH, CHANGE, COMMIT, TASK, bash, e2e, end  # noqa: F401
from test_e2e_edges import wait_until
from test_e2e_prs import FEATURE, open_feature_pull, written_on  # noqa: F401

from harness import processes

pytestmark = pytest.mark.e2e
SCRIPT_AND_LINK = bash(
    "printf '#!/bin/sh\\necho hi\\n' > run.sh && chmod +x run.sh && ln -s README.md link"
    " && git add -A && git commit -qm 'Add a script and a link'"
)


def receive_packs(github):
    """The pushes git made (refused or not): the POSTs to git-receive-pack."""
    return [r for r in github.git_requests
            if r["service"] == "git-receive-pack" and r["method"] == "POST"]  # fmt: skip


def remote_commits(github, branch, base="refs/heads/main"):
    bare = github.root / "acme" / "widgets.git"
    out = subprocess.run(["git", "--git-dir", str(bare), "rev-list", "--reverse",
                          f"{base}..refs/heads/{branch}"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.split()


def local_commits(tmp_path, branch=BRANCH, base="origin/main"):
    out = subprocess.run(["git", "-C", str(tmp_path / "workspace" / "widgets"), "rev-list",
                          "--reverse", f"{base}..refs/heads/{branch}"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.split()


def test_auto_backup_conclusion_and_pr_land_verified_where_signatures_are_required(
    e2e, api, github, tmp_path
):
    github.require_signatures("acme", "widgets")
    gate = tmp_path / "backed-up"
    runner = e2e.run([SCRIPT_AND_LINK, bash(f"until [ -e {gate} ]; do sleep 0.1; done"),
                      *CHANGE, COMMIT, end("Added a script, a link and a greeting.")])  # fmt: skip
    # The backup: the first commit reaches GitHub, recreated, while the agent works.
    runner.wait_for(r"INFO branch backed up branch=shepherd/e2e-task", timeout=90)
    assert github.branch_sha("acme", "widgets", BRANCH) is not None
    gate.touch()
    assert runner.wait(timeout=180) == 0
    terminal = api.terminal(TASK)
    assert terminal["event"] == "completed", (terminal, runner.output)
    details = terminal["details"]
    assert details["decided_by"] == "stop-hook"
    assert details["signed"] == {"mode": "api", "commits": 2, "verified": True, "reason": "valid"}
    [pull] = github.pulls
    assert details["pr_url"] == pull["html_url"]

    copies, originals = remote_commits(github, BRANCH), local_commits(tmp_path)
    assert len(copies) == len(originals) == 2 and not set(copies) & set(originals)
    assert all(github.is_verified("acme", "widgets", sha) for sha in copies)
    assert github.log("acme", "widgets", BRANCH)[:2] == [
        "Update greeting",
        "Add a script and a link",
    ]
    modes = github.entries("acme", "widgets", BRANCH)
    assert (modes["run.sh"], modes["link"], modes["README.md"]) == ("100755", "120000", "100644")
    # One refused push, by the backup; the Stop hook knew from the state dir.
    assert len(receive_packs(github)) == 1
    assert runner.output.count("GitHub requires signed commits") == 1
    body = pull["body"]
    assert body.startswith("Added a script, a link and a greeting.")
    assert "The GitHub App recreated the agent's commits through the GitHub API" in body
    assert "GitHub verified their signature" in body
    for original, copy in zip(originals, copies, strict=True):
        assert f"`{original[:7]}` → `{copy[:7]}`" in body


def test_api_mode_lands_verified_commits_without_any_refused_push(e2e, api, github, tmp_path):
    github.require_signatures("acme", "widgets")
    terminal = e2e.finish([*CHANGE, COMMIT, end("Greeted the world.")],
                          SHEPHERD_COMMIT_SIGNING="api")  # fmt: skip
    assert terminal["event"] == "completed", (terminal, e2e.runner.output)
    assert terminal["details"]["signed"]["mode"] == "api"
    assert terminal["details"]["signed"]["verified"] is True
    assert receive_packs(github) == []
    [copy] = remote_commits(github, BRANCH)
    assert github.is_verified("acme", "widgets", copy)
    assert github.log("acme", "widgets", BRANCH)[0] == "Update greeting"
    assert "GitHub requires signed commits" not in e2e.runner.output


def test_continued_pull_request_gets_verified_commits_on_its_own_branch_fast_forward(
    e2e, api, github, tmp_path, written_on
):
    pull = open_feature_pull(github)
    github.require_signatures("acme", "widgets")
    start = github.branch_sha("acme", "widgets", FEATURE)
    written_on(pull)
    terminal = e2e.finish([*CHANGE, COMMIT, end("Greeted the world.")])
    assert terminal["event"] == "completed", (terminal, e2e.runner.output)
    assert terminal["details"]["pr_url"] == pull["html_url"] and len(github.pulls) == 1
    assert github.log("acme", "widgets", FEATURE)[:2] == ["Update greeting", "Start the feature"]
    [copy] = remote_commits(github, FEATURE, base=start)
    assert github.is_verified("acme", "widgets", copy)
    assert github.branch_sha("acme", "widgets", BRANCH) is None
    feature = [p for p in github.pushes if p["ref"] == f"refs/heads/{FEATURE}"]
    assert [(p["old"], p["new"], p["forced"]) for p in feature] == [(start, copy, False)]


def test_sigterm_after_a_commit_in_auto_mode_leaves_it_on_the_remote_verified(
    e2e, api, github, tmp_path
):
    github.require_signatures("acme", "widgets")
    marker = b"sleep\x00618\x00"
    runner = e2e.run([*CHANGE, bash("git commit -qam 'Quick one' && sleep 618"), end("Slept.")])
    wait_until(lambda: processes(marker), 60, "the agent's long command", runner)
    runner.proc.send_signal(signal.SIGTERM)  # the backup may not have run yet
    assert runner.wait(timeout=30) == 0
    terminal = api.terminal(TASK)
    assert terminal["message"].startswith("terminated (SIGTERM)"), terminal
    assert f"its work (1 commit) is on branch {BRANCH}" in terminal["message"]
    assert terminal["details"]["signed"]["verified"] is True
    [copy] = remote_commits(github, BRANCH)
    assert github.is_verified("acme", "widgets", copy)
    assert github.log("acme", "widgets", BRANCH)[0] == "Quick one"
    assert processes(marker) == []


def test_push_refused_by_a_file_path_rule_fails_quoting_it_with_a_bundle(
    e2e, api, github, tmp_path, home
):
    github.restrict_paths("acme", "widgets", "secrets/")
    terminal = e2e.finish([
        bash("mkdir -p secrets && echo not-a-secret > secrets/key.txt && git add -A"
             " && git commit -qm 'Add a key'"),
        end("Added the key."),
    ])  # fmt: skip
    assert terminal["event"] == "failed", (terminal, e2e.runner.output)
    bundle = str(home / ".shepherd" / "shepherd-e2e-task.bundle")
    message = terminal["message"]
    assert message.startswith(f"GitHub refused the push of {BRANCH} under a repository rule: ")
    assert "GH013: Repository rule violations found for refs/heads/shepherd/e2e-task." in message
    assert "File path is restricted" in message and "secrets/key.txt" in message
    assert message.endswith(
        f"the work (1 commit) is only in the pod; all of it is saved as the git bundle {bundle}"
    )
    assert terminal["details"]["bundle"] == bundle and terminal["details"]["error"] == message
    assert github.branch_sha("acme", "widgets", BRANCH) is None and github.pulls == []
    heads = subprocess.run(["git", "bundle", "list-heads", bundle], capture_output=True,
                           text=True, check=True).stdout.split()  # fmt: skip
    assert heads == [*local_commits(tmp_path)[-1:], f"refs/heads/{BRANCH}"]


@pytest.fixture(autouse=True)
def _no_stray_sleepers():
    yield
    for pid in processes(b"sleep\x00618\x00"):
        os.kill(pid, signal.SIGKILL)
