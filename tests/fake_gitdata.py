"""The fake GitHub's Git Data API, and the repository rules it enforces.

Mixed into FakeGitHub (tests/fake_github.py), over the same bare repositories
that `git http-backend` serves, with git's own plumbing (hash-object -w, a
temporary index with read-tree/update-index/write-tree, commit-tree,
update-ref): a clone and a pull request see the commits made here.

- Blobs, trees (`base_tree`, inline `content`, modes 100644/100755/120000/
  160000/040000, `sha: null` deletes), commits, refs (create; PATCH with or
  without `force`, 422 on a non-fast-forward), `GET .../git/ref/heads/{b}`
  and `GET .../commits/{sha}` with `verification`.
- A commit made here without `author`, `committer` or `signature` is signed
  by GitHub, as for an App: `verification.verified` is true. So is one made
  by `commit_to()` (someone who signs). Everything else is unsigned.
- Rules, per repository: `require_signatures()` and `restrict_paths()`. The
  git server refuses a push that breaks one with GitHub's GH013 text (a
  pre-receive hook in the bare repository), the API a ref update with 422
  "Repository rule violations found".
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

ZERO = "0" * 40
SHA = re.compile(r"[0-9a-f]{40}")
MODES = {"100644": "blob", "100755": "blob", "120000": "blob", "160000": "commit", "040000": "tree"}
# A route of the Git Data API: (method, the path after /repos/{owner}/{name}/) -> name, and
# whether the rest of the path is the route's argument.
GITDATA_API = re.compile(
    r"/api/v3/repos/([^/]+)/([^/]+)/"
    r"(git/blobs|git/trees|git/commits|git/refs|git/ref/heads/(.+)|git/refs/heads/(.+)|commits/([^/]+))"
)
GITDATA_ROUTES = (
    "git_blobs", "git_trees", "git_commits", "git_refs_create", "git_ref_get", "git_refs_update",
    "commit_get",
)  # fmt: skip
APP = ("shepherd-app[bot]", "1+shepherd-app[bot]@users.noreply.github.com")
WEB_FLOW = ("GitHub", "noreply@github.com")  # the committer of what GitHub signs
VERIFIED_FILE = "fake-verified"  # in the bare repository: the shas GitHub counts as signed
SIGNATURE_RULE = "Commits must have verified signatures."
PATH_RULE = "File path is restricted"


def gitdata_route(method, path):
    """(route, match with owner and name in groups 1 and 2, argument) or (None, None, None)."""
    match = GITDATA_API.fullmatch(path)
    if match is None:
        return None, None, None
    rest, arg = match[3], match[4] or match[5] or match[6]
    route = {
        ("POST", "git/blobs"): "git_blobs",
        ("POST", "git/trees"): "git_trees",
        ("POST", "git/commits"): "git_commits",
        ("POST", "git/refs"): "git_refs_create",
    }.get((method, rest))
    if route is None and arg is not None:
        kind = "commits" if rest.startswith("commits/") else "/".join(rest.split("/")[:2])
        route = {
            ("GET", "git/ref"): "git_ref_get",
            ("PATCH", "git/refs"): "git_refs_update",
            ("GET", "commits"): "commit_get",
        }.get((method, kind))
    return (route, match, arg) if route else (None, None, None)


def _env(extra=None):
    # Like fake_github._server_env: none of the test's git settings leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    return {**env, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, **(extra or {})}


def _git(bare, *args, input=None, env=None, check=True):
    """git in the bare repository `bare`; stdout as text (stripped) or a CalledProcessError."""
    out = subprocess.run(
        ["git", "--git-dir", str(bare), *map(str, args)],
        input=input, capture_output=True, env=env if env is not None else _env(), timeout=60,
        check=False,
    )  # fmt: skip
    if check and out.returncode != 0:
        raise subprocess.CalledProcessError(out.returncode, args, out.stdout, out.stderr)
    return out.stdout.decode(errors="replace").strip() if out.returncode == 0 else None


def _kind(bare, sha, env=None):
    if not isinstance(sha, str) or not SHA.fullmatch(sha):
        return None
    return _git(bare, "cat-file", "-t", sha, env=env, check=False)


def _invalid(message, code=422):
    return code, {"message": message, "documentation_url": "https://docs.github.com/rest/git"}


def _request(body):
    try:
        req = json.loads(body or b"{}")
    except ValueError:
        return None
    return req if isinstance(req, dict) else None


# ---------------------------------------------------------------------------
# rules: shared by the pre-receive hook (a process of its own) and the API
# ---------------------------------------------------------------------------


def verified_shas(bare):
    path = Path(bare, VERIFIED_FILE)
    return set(path.read_text().split()) if path.exists() else set()


def violations(bare, new, env=None):
    """[(rule title, lines under it)] a ref update to `new` breaks; [] when none does.

    The commits it brings are those no ref reaches yet (`--not --all`); in a
    pre-receive hook `env` carries git's quarantine, where they are.
    """
    if new == ZERO:
        return []
    commits = (_git(bare, "rev-list", new, "--not", "--all", env=env) or "").split()
    broken = []
    if _git(bare, "config", "--get", "fake.requireSignatures", env=env, check=False) == "true":
        signed = verified_shas(bare)
        if unsigned := [c for c in commits if c not in signed]:
            broken.append((SIGNATURE_RULE, unsigned))
    restricted = (_git(bare, "config", "--get-all", "fake.restrictedPath", env=env, check=False)
                  or "").split()  # fmt: skip
    if restricted:
        paths = set()
        for commit in commits:
            changed = _git(bare, "diff-tree", "-r", "--name-only", "--no-commit-id", "--root",
                           commit, env=env)  # fmt: skip
            paths |= {p for p in changed.splitlines() if any(p.startswith(r) for r in restricted)}
        if paths:
            broken.append((PATH_RULE, sorted(paths)))
    return broken


def gh013_text(ref, broken, rules_url):
    """What GitHub's receive-pack prints (git shows each line after `remote: `)."""
    lines = [
        f"error: GH013: Repository rule violations found for {ref}.",
        f"Review all repository rules at {rules_url}?ref={quote(ref, safe='')}",
        "",
    ]
    for title, found in broken:
        if title == PATH_RULE:
            lines.append("- GITHUB PUSH PROTECTION")
        lines += [f"- {title}", f"  Found {len(found)} violation{'s' if len(found) > 1 else ''}:",
                  "", *(f"  {item}" for item in found), ""]  # fmt: skip
    return "\n".join(lines) + "\n"


def pre_receive(stdin=sys.stdin, stderr=sys.stderr):
    """The bare repository's pre-receive hook: refuse what a rule forbids, as GitHub does."""
    bare = Path.cwd()
    for line in stdin:
        _old, new, ref = line.split()
        broken = violations(bare, new, env=dict(os.environ))
        if broken:
            base = _git(bare, "config", "--get", "fake.url", env=dict(os.environ), check=False)
            url = f"{base}/{bare.parent.name}/{bare.name.removesuffix('.git')}/rules"
            stderr.write(gh013_text(ref, broken, url))
            return 1
    return 0


HOOK = """#!{python}
import sys
sys.path.insert(0, {tests!r})
import fake_gitdata
sys.exit(fake_gitdata.pre_receive())
"""


# ---------------------------------------------------------------------------
# the mixin: test-facing helpers and the API's handlers
# ---------------------------------------------------------------------------


class GitData:
    """The Git Data API of FakeGitHub (which provides _bare, _lock, _push_lock,
    _refs and _record_pushes, and dispatches the routes of GITDATA_ROUTES here)."""

    # -- test-facing -------------------------------------------------------

    def require_signatures(self, owner, name):
        """From now on every commit a push or a ref update brings must be signed."""
        self._rule(owner, name, "fake.requireSignatures", "true")

    def restrict_paths(self, owner, name, *prefixes):
        """From now on no commit may touch a path that starts with one of `prefixes`."""
        for prefix in prefixes:
            self._rule(owner, name, "fake.restrictedPath", prefix, "--add")

    def is_verified(self, owner, name, sha):
        return sha in verified_shas(self._bare(owner, name))

    def entries(self, owner, name, ref):
        """{path: mode} of every file of `ref` in the bare repository."""
        out = _git(self._bare(owner, name), "ls-tree", "-r", "-z", ref)
        return {
            path: meta.split()[0]
            for meta, _, path in (e.partition("\t") for e in out.split("\0") if e)
        }

    def mark_verified(self, bare, sha):
        with self._lock, open(Path(bare, VERIFIED_FILE), "a") as f:
            f.write(sha + "\n")

    def _rule(self, owner, name, key, value, *flags):
        bare = self._bare(owner, name)
        _git(bare, "config", *flags, key, value)
        _git(bare, "config", "fake.url", self.url)
        hook = Path(bare, "hooks", "pre-receive")
        hook.parent.mkdir(exist_ok=True)
        hook.write_text(HOOK.format(python=sys.executable, tests=str(Path(__file__).parent)))
        hook.chmod(0o755)

    # -- handlers: (owner, name, arg, query, body) -> (code, payload) ------

    def _git_blobs(self, owner, name, _arg, _query, body):
        req = _request(body)
        if req is None or not isinstance(req.get("content"), str):
            return _invalid("Invalid request: content is not a string", 422)
        if req.get("encoding", "utf-8") == "base64":
            try:
                data = base64.b64decode(req["content"], validate=True)
            except binascii.Error:
                return _invalid("Invalid request: content is not valid Base64")
        else:
            data = req["content"].encode()
        sha = _git(self._bare(owner, name), "hash-object", "-w", "--stdin", input=data)
        return 201, {"sha": sha, "url": f"{self._repo_api(owner, name)}/git/blobs/{sha}"}

    def _git_trees(self, owner, name, _arg, _query, body):
        req, bare = _request(body), self._bare(owner, name)
        if req is None or not isinstance(req.get("tree"), list) or not req["tree"]:
            return _invalid("Invalid request: tree is not a non-empty array")
        base = req.get("base_tree")
        if base is not None and _kind(bare, base) != "tree":
            return _invalid("base_tree is not a valid tree oid")
        with tempfile.TemporaryDirectory() as tmp:
            env = _env({"GIT_INDEX_FILE": str(Path(tmp, "index"))})
            if base:
                _git(bare, "read-tree", base, env=env)
            problem, lines = self._tree_lines(bare, req["tree"], env, tmp)
            if problem:
                return _invalid(problem)
            out = subprocess.run(
                ["git", "--git-dir", str(bare), "update-index", "-z", "--index-info"],
                input=b"".join(lines), capture_output=True, env=env, timeout=60, check=False,
            )  # fmt: skip
            sha = _git(bare, "write-tree", env=env, check=False) if out.returncode == 0 else None
            if sha is None:
                return _invalid(f"GitRPC::BadObjectState {out.stderr.decode(errors='replace')}")
        top = _git(bare, "ls-tree", sha).splitlines()
        tree = [{"path": e.split("\t", 1)[1], "mode": e.split()[0], "type": e.split()[1],
                 "sha": e.split()[2]} for e in top]  # fmt: skip
        return 201, {"sha": sha, "url": f"{self._repo_api(owner, name)}/git/trees/{sha}",
                     "tree": tree, "truncated": False}  # fmt: skip

    def _tree_lines(self, bare, entries, env, tmp):
        """(a problem, or "", and the `update-index -z --index-info` records: removals first)."""
        present = set((_git(bare, "ls-files", "-z", env=env) or "").split("\0"))
        removals, additions, contents = [], [], []  # contents: written to files, hashed at once
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                return f"tree[{index}] has no path", []
            path, mode, kind = entry["path"], entry.get("mode"), entry.get("type")
            parts = path.split("/")
            if path.startswith("/") or any(p in ("", ".", "..", ".git") for p in parts):
                return f"tree[{index}].path {path!r} is invalid", []
            if MODES.get(mode) is None or MODES[mode] != kind:
                return f"tree[{index}]: mode {mode!r} does not go with type {kind!r}", []
            if "content" in entry and "sha" in entry:
                return f"tree[{index}] has both content and sha", []
            if "sha" in entry and entry["sha"] is None:
                if path not in present:
                    return f"GitRPC::BadObjectState: {path} is not in base_tree", []
                removals.append(f"0 {ZERO}\t{path}\0".encode())
                continue
            if "content" in entry:
                if kind != "blob" or not isinstance(entry["content"], str):
                    return f"tree[{index}].content is not a string", []
                contents.append(Path(tmp, f"content-{index}"))
                contents[-1].write_bytes(entry["content"].encode())
                sha = len(contents) - 1  # its place among the hashed files
            else:
                sha = entry.get("sha")
                if kind != "commit" and _kind(bare, sha) != kind:
                    return f"tree.sha {sha} is not a valid {kind}", []
                if kind == "commit" and not (isinstance(sha, str) and SHA.fullmatch(sha)):
                    return f"tree.sha {sha} is not a valid commit id", []
            additions.append((mode, sha, path))
        hashed = _git(bare, "hash-object", "-w", "--no-filters", "--", *contents).split()
        records = [
            f"{mode} {hashed[sha] if isinstance(sha, int) else sha}\t{path}\0".encode()
            for mode, sha, path in additions
        ]
        return "", removals + records

    def _git_commits(self, owner, name, _arg, _query, body):
        req, bare = _request(body), self._bare(owner, name)
        if req is None or not isinstance(req.get("message"), str):
            return _invalid("Invalid request: message is not a string")
        if _kind(bare, req.get("tree")) != "tree":
            return _invalid("Tree SHA does not exist")
        parents = req.get("parents", [])
        if not isinstance(parents, list) or any(_kind(bare, p) != "commit" for p in parents):
            return _invalid("Parent SHA does not exist or is not a commit object")
        # GitHub signs what an App makes without naming anyone (or a signature).
        signed = not any(req.get(k) for k in ("author", "committer", "signature"))
        now = f"@{int(time.time())} +0000"
        author = req.get("author") if isinstance(req.get("author"), dict) else {}
        committer = req.get("committer") if isinstance(req.get("committer"), dict) else author
        who = {
            "GIT_AUTHOR_NAME": author.get("name") or APP[0],
            "GIT_AUTHOR_EMAIL": author.get("email") or APP[1],
            "GIT_AUTHOR_DATE": author.get("date") or now,
            "GIT_COMMITTER_NAME": committer.get("name") or (WEB_FLOW[0] if signed else APP[0]),
            "GIT_COMMITTER_EMAIL": committer.get("email") or (WEB_FLOW[1] if signed else APP[1]),
            "GIT_COMMITTER_DATE": committer.get("date") or now,
        }
        args = ["commit-tree", req["tree"], *(a for p in parents for a in ("-p", p))]
        sha = _git(bare, *args, input=req["message"].encode(), env=_env(who))
        if signed:
            self.mark_verified(bare, sha)
        return 201, self._commit_json(owner, name, sha)["commit"] | {
            "sha": sha, "parents": [{"sha": p} for p in parents],
        }  # fmt: skip

    def _git_ref_get(self, owner, name, branch, _query, _body):
        sha = _git(self._bare(owner, name), "rev-parse", "-q", "--verify",
                   f"refs/heads/{branch}", check=False)  # fmt: skip
        if not sha:
            return 404, {"message": "Not Found"}
        return 200, self._ref_json(owner, name, f"refs/heads/{branch}", sha)

    def _git_refs_create(self, owner, name, _arg, _query, body):
        req, bare = _request(body), self._bare(owner, name)
        ref, sha = (req or {}).get("ref"), (req or {}).get("sha")
        if not isinstance(ref, str) or not ref.startswith("refs/") or ref.count("/") < 2:
            return _invalid(f"{ref!r} is not a valid ref name.")
        if _kind(bare, sha) != "commit":
            return _invalid("Object does not exist")
        return self._update_ref(owner, name, ref, sha, ZERO, 201)

    def _git_refs_update(self, owner, name, branch, _query, body):
        req, bare, ref = _request(body), self._bare(owner, name), f"refs/heads/{branch}"
        sha, force = (req or {}).get("sha"), (req or {}).get("force", False)
        old = _git(bare, "rev-parse", "-q", "--verify", ref, check=False)
        if not old:
            return _invalid("Reference does not exist")
        if _kind(bare, sha) != "commit":
            return _invalid("Object does not exist")
        if force is not True and _git(bare, "merge-base", "--is-ancestor", old, sha,
                                      check=False) is None:  # fmt: skip
            return _invalid("Update is not a fast forward")
        return self._update_ref(owner, name, ref, sha, old, 200)

    def _update_ref(self, owner, name, ref, sha, old, code):
        bare = self._bare(owner, name)
        with self._push_lock:  # one ref change at a time: exact before/after in `pushes`
            before = self._refs(owner, name)
            if old == ZERO and ref in before:
                return _invalid("Reference already exists")
            if broken := violations(bare, sha):
                titles = "\n\n".join(title for title, _ in broken)
                return _invalid(f"Repository rule violations found\n\n{titles}\n\n")
            if _git(bare, "update-ref", ref, sha, old, check=False) is None:
                return _invalid("Reference cannot be updated")
            self._record_pushes(owner, name, before)
        return code, self._ref_json(owner, name, ref, sha)

    def _commit_get(self, owner, name, sha, _query, _body):
        found = _git(self._bare(owner, name), "rev-parse", "-q", "--verify", f"{sha}^{{commit}}",
                     check=False)  # fmt: skip
        if not found:
            return _invalid(f"No commit found for SHA: {sha}")
        return 200, self._commit_json(owner, name, found)

    # -- shapes --------------------------------------------------------------

    def _repo_api(self, owner, name):
        return f"{self.api_url}/repos/{owner}/{name}"

    def _ref_json(self, owner, name, ref, sha):
        url = f"{self._repo_api(owner, name)}/git/{ref}"
        return {"ref": ref, "node_id": f"REF_{sha[:12]}", "url": url,
                "object": {"type": "commit", "sha": sha,
                           "url": f"{self._repo_api(owner, name)}/git/commits/{sha}"}}  # fmt: skip

    def _commit_json(self, owner, name, sha):
        """As GET .../commits/{sha} answers: the commit, its verification, its parents."""
        bare = self._bare(owner, name)
        fmt = "%an%x00%ae%x00%aI%x00%cn%x00%ce%x00%cI%x00%T%x00%P%x00%B"
        an, ae, ad, cn, ce, cd, tree, parents, message = _git(
            bare, "show", "-s", f"--format={fmt}", sha
        ).split("\0", 8)  # fmt: skip
        verified = sha in verified_shas(bare)
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "sha": sha,
            "node_id": f"C_{sha[:12]}",
            "html_url": f"{self.url}/{owner}/{name}/commit/{sha}",
            "commit": {
                "author": {"name": an, "email": ae, "date": ad},
                "committer": {"name": cn, "email": ce, "date": cd},
                "message": message,
                "tree": {"sha": tree},
                "verification": {
                    "verified": verified,
                    "reason": "valid" if verified else "unsigned",
                    "signature": None,
                    "payload": None,
                    "verified_at": stamp if verified else None,
                },  # fmt: skip
            },
            "author": {"login": APP[0], "type": "Bot"} if ae == APP[1] else None,
            "parents": [{"sha": p} for p in parents.split()],
        }
