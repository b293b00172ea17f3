"""Commits made through the GitHub API (SHEPHERD_COMMIT_SIGNING), against a git push.

    .venv/bin/python bench/signing.py            # 7 repetitions, about 1 min on 2 cores
    .venv/bin/python bench/signing.py --reps 3   # quicker
    .venv/bin/python bench/signing.py --json     # the raw numbers

A clone (partial, as the runner makes it) of a repository of 50 text files
(about 2 KB each) on tests/fake_github.py, on loopback. The agent's work is
10 commits, each changing all 50 files. Each repetition, interleaved so that
the machine's noise hits all alike:

- baseline: `Branch.push` with git (SHEPHERD_COMMIT_SIGNING=off) of the 10
  commits to a new branch;
- api, one push: the same 10 commits recreated through the fake's Git Data
  API in one `Branch.push` (a conclusion after a long silence);
- api, per commit: 10 pushes of one commit each (the backup's way);

each with a fresh map (nothing made before). It counts the API calls and the
content-creating requests (POSTs) per recreated commit, and checks that every
copy has its commit's tree and is verified. The fake answers in about a
millisecond; GitHub takes longer per call: the calls per commit are the
figure that carries over, the times are this machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import shepherd_runner as sr  # noqa: E402
from fake_github import FakeGitHub  # noqa: E402

COMMITS, FILES = 10, 50


class TimedGitHub(sr.GitHub):
    """The runner's GitHub client, counting the time spent waiting for the API's answers."""

    waited = 0.0

    def _call(self, method, path, **kwargs):
        start = time.perf_counter()
        try:
            return super()._call(method, path, **kwargs)
        finally:
            TimedGitHub.waited += time.perf_counter() - start


def module(index: int, version: int) -> str:
    lines = [f"def function_{index}_{n}(value):  # version {version}" for n in range(40)]
    return "\n".join(f"{line}\n    return value + {n}\n" for n, line in enumerate(lines))


def prepare(root: Path, github: FakeGitHub, token: str) -> tuple[sr.Git, str, list[str]]:
    files = {f"src/module_{i:02}.py": module(i, 0) for i in range(FILES)}
    url = github.create_repo("acme", "widgets", files)
    env = sr.git_env({"PATH": os.environ["PATH"], "HOME": str(root), "GIT_CONFIG_NOSYSTEM": "1",
                      "GIT_AUTHOR_NAME": "Agent", "GIT_AUTHOR_EMAIL": "agent@example.invalid",
                      "GIT_COMMITTER_NAME": "Agent",
                      "GIT_COMMITTER_EMAIL": "agent@example.invalid"}, url, token)  # fmt: skip
    git = sr.Git(str(root / "widgets"), env, sr.Redactor([token]))
    sr.clone(sr.parse_repo_url(url), "", git.cwd, git, "blob:none")
    base = git("rev-parse", "HEAD")
    for version in range(1, COMMITS + 1):
        for i in range(FILES):
            Path(git.cwd, f"src/module_{i:02}.py").write_text(module(i, version))
        git("commit", "-q", "-am", f"Change every module, round {version}")
    commits = git("rev-list", "--reverse", f"{base}..HEAD").split()
    return git, base, commits


def pusher(git: sr.Git, github: FakeGitHub, base: str, name: str, mode: str) -> sr.Branch:
    url = f"{github.url}/acme/widgets.git"
    state = sr.TaskState("bench", url, git.cwd, name, "main", base,
                         github_api_url=github.api_url, commit_signing=mode)  # fmt: skip
    branch = sr.Branch(git, state)  # no record: a fresh map in memory
    token = git.env["GH_TOKEN"]
    branch.signing._github = TimedGitHub(sr.parse_repo_url(url), token, api_url=github.api_url)
    return branch


def timed_push(git, github, base, name, *, mode, heads) -> tuple[float, int, sr.Branch]:
    """Seconds and API requests to bring branch `name` to each of `heads` in turn."""
    before, TimedGitHub.waited = len(github.api_requests), 0.0
    branch = pusher(git, github, base, name, mode)
    start = time.perf_counter()
    for head in heads:
        git("branch", "--force", name, head)
        branch.push(time.monotonic() + 300)
    elapsed = time.perf_counter() - start
    return elapsed, TimedGitHub.waited, len(github.api_requests) - before, branch


def check(github: FakeGitHub, git: sr.Git, branch: sr.Branch, commits: list[str]) -> None:
    bare = github.root / "acme" / "widgets.git"
    for local in commits:
        copy = branch.signing.commits[local]
        argv = ["git", "--git-dir", str(bare), "rev-parse", f"{copy}^{{tree}}"]
        tree = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
        assert tree == git("rev-parse", f"{local}^{{tree}}"), local
        assert github.is_verified("acme", "widgets", copy), copy


def repetition(n, git, github, base, commits) -> dict:
    head = commits[-1]
    git_s, _, _, _ = timed_push(git, github, base, f"git-{n}", mode="off", heads=[head])
    # Commits a git push put on the remote are there as they are: the API pushes below
    # must not know that, or they would have nothing to make.
    git("update-ref", "-d", f"refs/remotes/origin/git-{n}")
    posts = len([r for r in github.api_requests if r["method"] == "POST"])
    one_s, one_waited, one_calls, branch = timed_push(
        git, github, base, f"api-{n}", mode="api", heads=[head]
    )
    one_posts = len([r for r in github.api_requests if r["method"] == "POST"]) - posts
    check(github, git, branch, commits)
    each_s, _, each_calls, branch = timed_push(
        git, github, base, f"each-{n}", mode="api", heads=commits
    )
    check(github, git, branch, commits)
    return {"git_s": git_s, "api_one_push_s": one_s, "api_one_push_own_s": one_s - one_waited,
            "api_one_push_calls": one_calls,
            "api_one_push_posts": one_posts, "api_per_commit_s": each_s,
            "api_per_commit_calls": each_calls}  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    token = "ghs_" + secrets.token_hex(18)
    with tempfile.TemporaryDirectory() as tmp, FakeGitHub(Path(tmp, "gh"), token) as github:
        os.environ["HOME"] = tmp  # no ~/.gitconfig of the machine's
        git, base, commits = prepare(Path(tmp), github, token)
        repetition(0, git, github, base, commits)  # warm up
        runs = [repetition(n, git, github, base, commits) for n in range(1, args.reps + 1)]
    if args.json:
        print(json.dumps(runs, indent=2))
        return 0
    med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    print(f"{COMMITS} commits x {FILES} files (~2 KB each), medians of {args.reps} repetitions:")
    print(f"  git push (baseline, same run)  {med['git_s'] * 1000:7.0f} ms")
    print(f"  api, one push                  {med['api_one_push_s'] * 1000:7.0f} ms  "
          f"({med['api_one_push_s'] / med['git_s']:.2f}x)  "
          f"{med['api_one_push_calls']:.0f} calls, "
          f"{med['api_one_push_posts']:.0f} POSTs")  # fmt: skip
    print(
        f"    of which the runner's own work (not waiting for the API) "
        f"{med['api_one_push_own_s'] * 1000:.0f} ms"
    )
    print(f"  api, a push per commit         {med['api_per_commit_s'] * 1000:7.0f} ms  "
          f"({med['api_per_commit_s'] / med['git_s']:.2f}x)  "
          f"{med['api_per_commit_calls']:.0f} calls")  # fmt: skip
    per = (med["api_one_push_calls"] - 3) / COMMITS
    print(
        f"  API calls per recreated commit: {per:.1f} (+3 per push: read the ref, move it, "
        "read one copy back)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
