"""Commits recreated through the GitHub API, so that GitHub signs them.

A real clone (partial, as the runner makes it) pushes to the loopback fake
GitHub, whose Git Data API writes into the same bare repository its git
server serves (tests/fake_gitdata.py) and whose receive-pack enforces the
repository's rules with GitHub's GH013 text. tests/test_e2e_signing.py runs
the same with the real CLI.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time

import pytest

import shepherd_runner as sr

BRANCH = "shepherd/t-1"
FILES = {"README.md": "hello\n", "old.txt": "old\n", "src/app.py": "print('hi')\n"}
GH013 = """\
remote: error: GH013: Repository rule violations found for refs/heads/shepherd/t-1.        
remote: Review all repository rules at https://github.com/acme/widgets/rules?ref=refs%2Fheads%2Fshepherd%2Ft-1        
remote: 
remote: - Commits must have verified signatures.        
remote:   Found 1 violation:        
remote: 
remote:   027faa7121ee9df79db623e1a2848d2cc88a8dba        
remote: 
To https://github.com/acme/widgets
 ! [remote rejected] HEAD -> shepherd/t-1 (push declined due to repository rule violations)
error: failed to push some refs to 'https://github.com/acme/widgets'
"""  # noqa: W291 - GitHub pads its lines


class Clone:
    """The task's clone on BRANCH, its state dir, and pushes as the runner makes them."""

    def __init__(self, tmp_path, github, token, mode, *, owns=True, branch=BRANCH, ref=""):
        self.github, self.token = github, token
        self.url = github.create_repo("acme", "widgets", FILES)
        env = sr.git_env(
            {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], "GIT_CONFIG_NOSYSTEM": "1"},
            self.url, token,
        )  # fmt: skip
        self.dir = tmp_path / "widgets"
        self.git = sr.Git(str(self.dir), env, sr.Redactor([token]))
        self.state_dir = tmp_path / "state"
        self.state_dir.mkdir()
        self.mode, self.owns, self.branch, self.ref = mode, owns, branch, ref
        self.base = ""

    def clone(self):
        sr.clone(sr.parse_repo_url(self.url), self.ref, str(self.dir), self.git, "blob:none")
        self.base = self.git("rev-parse", "HEAD")
        if self.owns:
            self.git("switch", "-q", "-c", self.branch)
        return self

    @property
    def state(self):
        return sr.TaskState(
            "t-1", self.url, str(self.dir), self.branch, "main", self.base,
            github_api_url=self.github.api_url, owns_branch=self.owns, commit_signing=self.mode,
        )  # fmt: skip

    def branch_pusher(self):
        """A Branch as a new process makes it (the Stop hook's): state from the state dir."""
        return sr.Branch(self.git, self.state, str(self.state_dir / sr.BRANCH_FILE))

    def push(self, branch=None, budget=20):
        branch = branch or self.branch_pusher()
        branch.push(time.monotonic() + budget)
        return branch

    def write(self, path, data, mode=None):
        target = self.dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data) if isinstance(data, bytes) else target.write_text(data)
        if mode is not None:
            target.chmod(mode)

    def commit(self, message):
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD")

    def local_commits(self):
        return self.git("rev-list", "--reverse", f"{self.base}..HEAD").split()

    def remote(self, ref=None):
        return self.github.branch_sha("acme", "widgets", ref or self.branch)

    def bare(self, *args):
        bare = self.github.root / "acme" / "widgets.git"
        return subprocess.run(["git", "--git-dir", str(bare), *args], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip

    def calls(self, method, suffix):
        return [r for r in self.github.api_requests if r["method"] == method
                and r["path"].endswith(suffix)]  # fmt: skip

    def git_pushes(self):
        return [r for r in self.github.git_requests
                if r["service"] == "git-receive-pack" and r["method"] == "POST"]  # fmt: skip

    def mapping(self):
        return json.loads((self.state_dir / sr.SIGNING_FILE).read_text())["commits"]


@pytest.fixture
def clone(tmp_path, github, token):
    def make(mode="api", **kwargs):
        return Clone(tmp_path, github, token, mode, **kwargs)

    return make


def same_commit(c, local, remote):
    """The copy has the local commit's tree and message, and GitHub verified it."""
    assert c.bare("rev-parse", f"{remote}^{{tree}}") == c.git("rev-parse", f"{local}^{{tree}}")
    assert c.bare("log", "-1", "--format=%B", remote) == c.git("log", "-1", "--format=%B", local)
    assert c.github.is_verified("acme", "widgets", remote)


# ---------------------------------------------------------------------------
# the recreation
# ---------------------------------------------------------------------------


def test_modes_symlinks_deletions_renames_and_binary_files_are_recreated_exactly(clone):
    c = clone("api").clone()
    c.write("run.sh", "#!/bin/sh\necho hi\n", mode=0o755)
    os.symlink("README.md", c.dir / "link")
    c.write("logo.png", b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256)))
    c.write("crlf.txt", "one\r\ntwo\r\n")
    c.git("rm", "-q", "old.txt")
    c.git("mv", "src/app.py", "src/main.py")
    first = c.commit("Add a script, a link and a logo\n\nWith a body.")
    c.write("README.md", "hello world\n")
    c.write("run.sh", "#!/bin/sh\necho bye\n", mode=0o644)  # no longer executable
    second = c.commit("Say hello world")
    branch = c.push()

    tip = c.remote()
    mapping = c.mapping()
    assert set(mapping) == {first, second} and tip == mapping[second]
    assert c.bare("rev-parse", f"{tip}^") == mapping[first]
    assert c.bare("rev-parse", f"{mapping[first]}^") == c.base
    same_commit(c, first, mapping[first])
    same_commit(c, second, tip)
    assert c.github.entries("acme", "widgets", mapping[first]) == {
        "README.md": "100644", "crlf.txt": "100644", "link": "120000", "logo.png": "100644",
        "run.sh": "100755", "src/main.py": "100644",
    }  # fmt: skip
    assert c.github.entries("acme", "widgets", tip)["run.sh"] == "100644"
    # No author or committer was sent: the App is the author.
    assert c.bare("log", "-1", "--format=%an", tip) == "shepherd-app[bot]"
    # One blob (the binary file; the rename reuses GitHub's), a tree and a commit each.
    assert len(c.calls("POST", "/git/blobs")) == 1
    assert len(c.calls("POST", "/git/trees")) == len(c.calls("POST", "/git/commits")) == 2
    assert c.git_pushes() == []  # `api` never tries git
    assert sr.signed_details(branch) == {
        "mode": "api", "commits": 2, "verified": True, "reason": "valid"
    }  # fmt: skip
    note = sr.recreated_note(branch)
    assert f"- `{first[:7]}` → `{mapping[first][:7]}` Add a script, a link and a logo" in note
    assert f"- `{second[:7]}` → `{tip[:7]}` Say hello world" in note
    assert "GitHub verified their signature" in note


def test_submodule_link_keeps_mode_160000_and_a_deleted_one_goes(clone):
    c = clone("api").clone()
    link = "a" * 40
    c.git("update-index", "--add", "--cacheinfo", f"160000,{link},vendor/lib")
    c.git("commit", "-q", "-m", "Add a submodule")
    c.push()
    assert c.github.entries("acme", "widgets", c.remote())["vendor/lib"] == "160000"
    assert c.bare("rev-parse", f"{c.remote()}:vendor/lib") == link
    c.git("update-index", "--force-remove", "vendor/lib")
    c.git("commit", "-q", "-m", "Drop it")
    c.push()
    assert "vendor/lib" not in c.github.entries("acme", "widgets", c.remote())


def test_merge_commit_keeps_both_parents_mapped_to_their_copies(clone):
    c = clone("api").clone()
    c.write("one.txt", "1\n")
    one = c.commit("One")
    c.git("switch", "-q", "-c", "side", c.base)
    c.write("two.txt", "2\n")
    two = c.commit("Two")
    c.git("switch", "-q", BRANCH)
    c.git("merge", "-q", "--no-ff", "-m", "Merge side", "side")
    merge = c.git("rev-parse", "HEAD")
    c.push()
    mapping = c.mapping()
    assert set(mapping) == {one, two, merge}
    parents = c.bare("rev-parse", f"{c.remote()}^@").split()
    assert parents == [mapping[one], mapping[two]]
    same_commit(c, merge, c.remote())


def test_each_commit_is_recreated_once_whichever_process_pushes(clone):
    c = clone("api").clone()
    c.write("a.txt", "a\n")
    first = c.commit("A")
    c.push()  # the backup, in the runner
    copy = c.mapping()[first]
    c.write("b.txt", "b\n")
    second = c.commit("B")
    hook = c.push()  # the Stop hook: a process of its own, same state dir
    assert c.mapping()[first] == copy and c.remote() == c.mapping()[second]
    assert len(c.calls("POST", "/git/commits")) == 2
    assert hook.pushed(second) and not hook.pushed(first)
    c.push()  # nothing new: one read of the ref, nothing made
    assert len(c.calls("POST", "/git/commits")) == 2
    assert c.git("rev-parse", "HEAD") == second  # the local branch is never rewritten


@pytest.mark.parametrize("route", ["git_refs_create", "git_refs_update"])
def test_a_lost_answer_to_the_ref_update_is_read_back_not_made_twice(clone, github, route):
    c = clone("api").clone()
    c.write("a.txt", "a\n")
    c.commit("A")
    if route == "git_refs_update":
        c.push()
        c.write("b.txt", "b\n")
        c.commit("B")
    made = len(c.calls("POST", "/git/commits"))
    github.fail_next(route, ["lost"])  # the update is made, its answer is a 502
    c.push()
    assert c.remote() == c.mapping()[c.git("rev-parse", "HEAD")]
    assert len(c.calls("POST", "/git/commits")) == made + 1
    assert [r["status"] for r in github.api_requests if r["fault"] == "lost"] == [502]


def test_transient_failures_of_the_api_are_retried(clone, github):
    c = clone("api").clone()
    c.write("a.txt", "a\n")
    c.commit("A")
    github.fail_next("git_trees", [502])
    github.fail_next("git_commits", ["drop"])
    slept = []
    branch = sr.Branch(c.git, c.state, str(c.state_dir / sr.BRANCH_FILE), sleep=slept.append)
    c.push(branch)
    assert slept == [1.0, 2.0]
    assert c.remote() == c.mapping()[c.git("rev-parse", "HEAD")]


def test_the_runners_own_branch_moved_by_someone_else_is_read_again_then_replaced(clone, github):
    c = clone("api").clone()
    c.write("a.txt", "a\n")
    c.commit("A")
    branch = c.push()
    github.commit_to("acme", "widgets", BRANCH, {"x.txt": "x\n"}, "Someone's")
    c.write("b.txt", "b\n")
    c.commit("B")
    slept = []
    branch.sleep = slept.append
    c.push(branch)
    assert slept == [1.0]  # the lease failed once: the branch was read again
    assert c.remote() == c.mapping()[c.git("rev-parse", "HEAD")]


def test_commits_the_agent_pushed_itself_to_the_runners_branch_are_replaced_by_copies(clone):
    c = clone("api").clone()
    c.write("a.txt", "a\n")
    first = c.commit("A")
    c.git("push", "-q", "origin", f"HEAD:refs/heads/{BRANCH}")  # unsigned, by the agent
    assert c.remote() == first
    c.write("b.txt", "b\n")
    second = c.commit("B")
    c.push()
    assert set(c.mapping()) == {first, second} and c.remote() == c.mapping()[second]
    same_commit(c, first, c.mapping()[first])
    assert c.github.pushes[-1]["forced"] is True


def test_a_pull_requests_branch_is_moved_fast_forward_only(clone, github):
    c = clone("api", owns=False, branch="feature", ref="feature")
    github.commit_to("acme", "widgets", "feature", {"f.txt": "f\n"}, "Start the feature")
    c.clone()
    c.write("a.txt", "a\n")
    mine = c.commit("Mine")
    c.push()
    assert c.bare("rev-parse", f"{c.remote('feature')}^") == c.base
    same_commit(c, mine, c.remote("feature"))
    theirs = github.commit_to("acme", "widgets", "feature", {"g.txt": "g\n"}, "Theirs")
    c.write("b.txt", "b\n")
    c.commit("More")
    with pytest.raises(sr.BranchMoved, match="through the GitHub API was rejected: Update is not"):
        c.push()
    assert c.remote("feature") == theirs
    assert not any(p["forced"] for p in github.pushes)


# ---------------------------------------------------------------------------
# auto: git first, the API once GitHub asks for signatures
# ---------------------------------------------------------------------------


def test_auto_pushes_with_git_while_nothing_requires_signatures(clone):
    c = clone("auto").clone()
    c.write("a.txt", "a\n")
    head = c.commit("A")
    branch = c.push()
    assert c.remote() == head and len(c.git_pushes()) == 1
    assert not (c.state_dir / sr.SIGNING_FILE).exists()
    assert sr.signed_details(branch) == {"mode": "git", "commits": 1, "verified": False}
    assert sr.recreated_note(branch) == ""


def test_auto_switches_to_the_api_on_the_signature_rule_for_every_later_push(clone, github):
    c = clone("auto").clone()
    github.require_signatures("acme", "widgets")
    c.write("a.txt", "a\n")
    first = c.commit("A")
    c.push()
    assert len(c.git_pushes()) == 1  # refused once
    assert c.remote() == c.mapping()[first]
    same_commit(c, first, c.remote())
    assert json.loads((c.state_dir / sr.SIGNING_FILE).read_text())["switched"] is True
    c.write("b.txt", "b\n")
    second = c.commit("B")
    c.push()  # another process: it knows from the state dir
    assert len(c.git_pushes()) == 1
    same_commit(c, second, c.remote())


def test_off_never_recreates_and_fails_quoting_the_signature_rule(clone, github):
    c = clone("off").clone()
    github.require_signatures("acme", "widgets")
    c.write("a.txt", "a\n")
    c.commit("A")
    with pytest.raises(sr.RuleRefused, match="Commits must have verified signatures") as refused:
        c.push()
    assert c.calls("POST", "/git/commits") == [] and c.remote() is None
    assert refused.value.transient is False


# ---------------------------------------------------------------------------
# every other rule, named; limits
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "api"])
def test_another_rule_fails_quoting_it_and_keeps_the_work_in_a_bundle(clone, github, mode):
    c = clone(mode).clone()
    github.restrict_paths("acme", "widgets", "secrets/")
    c.write("secrets/key.txt", "not really\n")
    c.write("a.txt", "a\n")
    head = c.commit("Add a key")
    with pytest.raises(sr.RuleRefused) as refused:
        c.push()
    bundle = str(c.state_dir / "shepherd-t-1.bundle")
    message = str(refused.value)
    assert message.startswith(f"GitHub refused the push of {BRANCH} under a repository rule: ")
    assert "File path is restricted" in message
    assert message.endswith(
        f"the work (1 commit) is only in the pod; all of it is saved as the git bundle {bundle}"
    )
    if mode == "auto":  # git's words, the file named
        assert "GH013: Repository rule violations found for refs/heads/shepherd/t-1." in message
        assert "secrets/key.txt" in message
    assert refused.value.details == {"rule": refused.value.details["rule"], "bundle": bundle}
    assert c.remote() is None
    listed = subprocess.run(["git", "bundle", "list-heads", bundle], capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    assert listed.split() == [head, f"refs/heads/{BRANCH}"]
    # The backup does not push the same refused head again.
    pushes = len(c.git_pushes()) + len(c.calls("POST", "/git/refs"))
    branch = c.branch_pusher()
    with pytest.raises(sr.RuleRefused):
        c.push(branch)
    with pytest.raises(sr.RuleRefused):
        c.push(branch)
    assert len(c.git_pushes()) + len(c.calls("POST", "/git/refs")) == pushes + 1


def test_rule_refusal_after_earlier_work_says_where_that_work_is(clone, github):
    c = clone("api").clone()
    c.write("a.txt", "a\n")
    first = c.commit("A")
    c.push()
    github.restrict_paths("acme", "widgets", "secrets/")
    c.write("secrets/key.txt", "x\n")
    c.commit("B")
    with pytest.raises(sr.RuleRefused) as refused:
        c.push()
    compare = f"{github.url}/acme/widgets/compare/main...{BRANCH}"
    assert f"the work up to {first[:7]} is on branch {BRANCH} ({compare}), later commits only " in (
        str(refused.value)
    )
    assert refused.value.details["compare_url"] == compare


def test_lfs_pointer_fails_naming_the_file(clone):
    c = clone("api").clone()
    pointer = ("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 +
               "\nsize 12345\n")  # fmt: skip
    c.write("big.bin", pointer)
    c.commit("Add a large file")
    with pytest.raises(sr.PushError, match=r"big.bin is a Git LFS pointer: its object needs an "):
        c.push()


def test_file_over_the_blob_limit_fails_naming_it(clone, github):
    c = clone("api").clone()
    c.write("data.bin", b"\0" * (3 << 20))
    head = c.commit("Add data")
    signing = sr.Signing("api")
    commits = sr.ApiCommits(c.git, sr.github_for(c.state, c.token), signing, c.base,
                            blob_limit=2 << 20)  # fmt: skip
    with pytest.raises(sr.PushError, match=r"^data.bin is 3 MB: a commit made through the GitHub "
                       r"API takes files of at most 2 MB$"):  # fmt: skip
        commits.recreate(head, "")
    assert c.calls("POST", "/git/blobs") == []


# ---------------------------------------------------------------------------
# reading GitHub's words
# ---------------------------------------------------------------------------


def test_githubs_refusal_text_is_read_into_its_rules():
    assert sr.push_rules(GH013) == [
        "GH013: Repository rule violations found for refs/heads/shepherd/t-1.",
        "- Commits must have verified signatures.",
        "Found 1 violation:",
        "027faa7121ee9df79db623e1a2848d2cc88a8dba",
    ]
    assert sr._requires_signatures(sr.push_rules(GH013))
    other = GH013.replace(sr.SIGNATURE_RULE, "Cannot update this protected ref.")
    assert not sr._requires_signatures(sr.push_rules(other))
    assert sr.push_rules(" ! [rejected] b -> b (non-fast-forward)\n") == []


def test_the_apis_rule_refusal_is_read_into_its_rules():
    said = "Repository rule violations found\n\nCommits must have verified signatures.\n\n"
    assert sr.api_rules(sr.GitHubError("x", 422, said)) == [
        "Repository rule violations found", "Commits must have verified signatures."
    ]  # fmt: skip
    assert sr.api_rules(sr.GitHubError("x", 422, "Update is not a fast forward")) == []


@pytest.mark.parametrize(("value", "mode"), [("", None), ("api", "api"), (" OFF ", "off")])
def test_commit_signing_setting(value, mode):
    environ = {"SHEPHERD_COMMIT_SIGNING": value} if value else {}
    assert sr.parse_config(["serve"], environ).commit_signing == (mode or "auto")


def test_an_unknown_commit_signing_value_is_a_usage_error():
    with pytest.raises(sr.UsageError, match=r"--commit-signing \(SHEPHERD_COMMIT_SIGNING\): "
                       r"'gpg' is not one of auto, api, off"):  # fmt: skip
        sr.parse_config(["serve"], {"SHEPHERD_COMMIT_SIGNING": "gpg"})


# ---------------------------------------------------------------------------
# a push with a deadline (a signal's last push)
# ---------------------------------------------------------------------------


def test_an_api_push_with_no_time_left_for_the_read_back_pushes_and_says_so(clone):
    c = clone("api").clone()
    c.write("a.txt", "a\n")
    local = c.commit("A")

    def clock():  # the ref update takes what was left of the budget
        return time.monotonic() + (60 if c.calls("POST", "/git/refs") else 0)

    branch = sr.Branch(c.git, c.state, str(c.state_dir / sr.BRANCH_FILE), clock=clock)
    c.push(branch, budget=30)
    assert c.remote() == c.mapping()[local]
    assert not c.calls("GET", f"/commits/{c.remote()}")
    assert sr.signed_details(branch) == {
        "mode": "api", "commits": 1, "verified": False, "reason": "not read back"
    }  # fmt: skip
    branch.clock = time.monotonic
    c.push(branch)  # a later push with the time for it reads it back
    assert sr.signed_details(branch)["verified"] is True


def test_an_api_push_past_its_deadline_makes_no_call(clone):
    c = clone("api").clone()
    c.write("a.txt", "a\n")
    c.commit("A")
    with pytest.raises(sr.PushError, match="no time left for GET"):
        c.push(budget=0)
    assert c.github.api_requests == [] and c.remote() is None


def test_a_push_leaves_the_map_another_thread_is_adding_to(clone):
    c = clone("api").clone()
    c.write("a.txt", "a\n")
    c.commit("A")
    signing = sr.Signing("api", str(c.state_dir))
    signing.save()  # the map as the state dir holds it
    with signing.locked():  # the backup thread, recreating a commit
        held = signing.commits
        held["a" * 40] = "b" * 40
        branch = sr.Branch(c.git, c.state, str(c.state_dir / sr.BRANCH_FILE), signing=signing)
        with pytest.raises(sr.PushError, match="another process is pushing"):
            branch._push()
        assert signing.commits is held
    assert c.mapping() == {"a" * 40: "b" * 40}


def test_a_rule_refusal_whose_commits_cannot_be_counted_still_says_where_they_are(clone):
    c = clone("off").clone()
    c.write("a.txt", "a\n")
    c.commit("A")
    state = dataclasses.replace(c.state, base_sha="f" * 40)  # not in the clone
    branch = sr.Branch(c.git, state, str(c.state_dir / sr.BRANCH_FILE))
    refusal = sr.rule_refusal(branch, ["- Commits must have verified signatures."], None)
    assert isinstance(refusal, sr.RuleRefused)
    assert "the work is only in the pod" in str(refusal)
    assert "no git bundle of it could be saved" in str(refusal)


class GarbledGit(sr.Git):
    """A git whose diff-tree prints what no git version prints."""

    def __call__(self, *args, **kwargs):
        if args[0] == "diff-tree":
            return "M\0garbled"
        return super().__call__(*args, **kwargs)


def test_unexpected_git_output_while_recreating_is_a_clear_push_failure(clone):
    c = clone("api").clone()
    c.write("a.txt", "a\n")
    c.commit("A")
    git = GarbledGit(c.git.cwd, c.git.env, c.git.redact)
    branch = sr.Branch(git, c.state, str(c.state_dir / sr.BRANCH_FILE))
    with pytest.raises(sr.PushError, match="reading the commits to recreate failed") as caught:
        branch.push(time.monotonic() + 20)
    assert not caught.value.transient and c.remote() is None
