"""The fake GitHub's Git Data API and repository rules hold GitHub's line.

tests/test_signing.py trusts this fake to refuse what GitHub refuses: unsigned
commits pushed with git, a non-fast-forward without `force`, a commit that
names its author (GitHub does not sign it), a malformed tree.
"""

from __future__ import annotations

import base64
import os
import subprocess

import pytest
import requests


@pytest.fixture
def repo(github, token, tmp_path):
    url = github.create_repo("acme", "widgets", {"README.md": "hello\n"})
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    base = f"{github.api_url}/repos/acme/widgets"

    class Repo:
        main = github.branch_sha("acme", "widgets", "main")

        def call(self, method, path, **body):
            resp = session.request(method, base + path, json=body or None, timeout=30)
            return resp.status_code, resp.json()

        def commit(self, content, parents=None, **extra):
            _, tree = self.call("POST", "/git/trees", base_tree=self.tree(self.main),
                                tree=[{"path": "a.txt", "mode": "100644", "type": "blob",
                                       "content": content}])  # fmt: skip
            code, made = self.call("POST", "/git/commits", message=content, tree=tree["sha"],
                                   parents=parents or [self.main], **extra)  # fmt: skip
            assert code == 201, made
            return made

        def tree(self, sha):
            _, commit = self.call("GET", f"/commits/{sha}")
            return commit["commit"]["tree"]["sha"]

    r = Repo()
    r.url, r.tmp = url, tmp_path
    return r


def git_push(repo, token, ref):
    """A commit pushed with git, as the agent or `git push` of the runner would."""
    work = repo.tmp / "work"
    env = {**os.environ, "GIT_ASKPASS": str(repo.tmp / "askpass"), "TOKEN": token,
           "GIT_TERMINAL_PROMPT": "0"}  # fmt: skip
    (repo.tmp / "askpass").write_text('#!/bin/sh\necho "$TOKEN"\n')
    (repo.tmp / "askpass").chmod(0o755)
    url = repo.url.replace("http://", "http://x-access-token@")
    subprocess.run(["git", "clone", "-q", url, str(work)], env=env, check=True)
    (work / "b.txt").write_text("b\n")
    subprocess.run(["git", "-C", str(work), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(work), "commit", "-qm", "B"], check=True)
    return subprocess.run(["git", "-C", str(work), "push", "origin", f"HEAD:{ref}"], env=env,
                          capture_output=True, text=True)  # fmt: skip


def test_git_push_of_an_unsigned_commit_is_refused_with_githubs_gh013_text(repo, github, token):
    github.require_signatures("acme", "widgets")
    out = git_push(repo, token, "refs/heads/topic")
    assert out.returncode != 0
    assert "remote: error: GH013: Repository rule violations found for refs/heads/topic." in (
        out.stderr
    )
    assert "remote: - Commits must have verified signatures." in out.stderr
    assert github.branch_sha("acme", "widgets", "topic") is None


def test_a_file_path_rule_refuses_the_push_naming_the_file(repo, github, token):
    github.restrict_paths("acme", "widgets", "b.")
    out = git_push(repo, token, "refs/heads/topic")
    assert "remote: - File path is restricted" in out.stderr and "remote:   b.txt" in out.stderr


def test_only_a_commit_that_names_nobody_is_verified_and_the_rule_refuses_the_other(repo, github):
    github.require_signatures("acme", "widgets")
    signed = repo.commit("signed")
    named = repo.commit("named", author={"name": "Agent", "email": "agent@example.com"})
    assert signed["verification"]["verified"] is True and signed["author"]["name"].endswith("[bot]")
    assert named["verification"] == {**named["verification"], "verified": False,
                                     "reason": "unsigned"}  # fmt: skip
    code, said = repo.call("POST", "/git/refs", ref="refs/heads/named", sha=named["sha"])
    assert (code, said["message"]) == (
        422, "Repository rule violations found\n\nCommits must have verified signatures.\n\n"
    )  # fmt: skip
    code, _ = repo.call("POST", "/git/refs", ref="refs/heads/signed", sha=signed["sha"])
    assert code == 201 and github.branch_sha("acme", "widgets", "signed") == signed["sha"]


def test_a_ref_moves_fast_forward_unless_forced(repo, github):
    one = repo.commit("one")
    two = repo.commit("two", parents=[one["sha"]])
    other = repo.commit("other")
    assert repo.call("POST", "/git/refs", ref="refs/heads/b", sha=one["sha"])[0] == 201
    code, said = repo.call("POST", "/git/refs", ref="refs/heads/b", sha=one["sha"])
    assert (code, said["message"]) == (422, "Reference already exists")
    assert repo.call("PATCH", "/git/refs/heads/b", sha=two["sha"])[0] == 200
    code, said = repo.call("PATCH", "/git/refs/heads/b", sha=other["sha"])
    assert (code, said["message"]) == (422, "Update is not a fast forward")
    assert repo.call("PATCH", "/git/refs/heads/b", sha=other["sha"], force=True)[0] == 200
    assert github.branch_sha("acme", "widgets", "b") == other["sha"]
    assert [p["forced"] for p in github.pushes] == [False, False, True]
    assert repo.call("GET", "/git/ref/heads/nope")[0] == 404


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"path": "gone.txt", "mode": "100644", "type": "blob", "sha": None}, "not in base_tree"),
        ({"path": "x", "mode": "100644", "type": "blob", "sha": "0" * 40, "content": "x"},
         "both content and sha"),
        ({"path": "x", "mode": "160000", "type": "blob", "content": "x"}, "does not go with"),
        ({"path": "../x", "mode": "100644", "type": "blob", "content": "x"}, "is invalid"),
        ({"path": "x", "mode": "100644", "type": "blob", "sha": "1" * 40}, "not a valid blob"),
    ],
)  # fmt: skip
def test_a_malformed_tree_is_422(repo, entry, words):
    code, said = repo.call("POST", "/git/trees", base_tree=repo.tree(repo.main), tree=[entry])
    assert code == 422 and words in said["message"]


def test_a_base64_blob_is_stored_byte_for_byte(repo):
    data = bytes(range(256)) + b"\r\n\0"
    code, made = repo.call("POST", "/git/blobs", content=base64.b64encode(data).decode(),
                           encoding="base64")  # fmt: skip
    local = subprocess.run(["git", "hash-object", "--stdin"], input=data, capture_output=True,
                           check=True).stdout.decode().strip()  # fmt: skip
    assert (code, made["sha"]) == (201, local)
