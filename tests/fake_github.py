"""A fake GitHub for tests: git smart HTTP and the few REST calls the runner makes.

Both live on one server, like GitHub Enterprise (REST under /api/v3). Git is
served by the real `git http-backend`, so clone, partial clone and push behave
like the real thing; the fake only adds GitHub's authentication rules. The Git
Data API and the repository rules (signed commits, file paths) are in
tests/fake_gitdata.py, mixed in over the same bare repositories.

The token can expire like an installation token. To refuse it from the instant
the fake Shepherd API announces as `expiresAt`, fix that instant up front:

    when = datetime.now(UTC) + timedelta(seconds=20)
    api.add_task(TASK, repo_url=..., token=github.token, expires_at=when)
    github.expire_token_at(api.token_expires_at(TASK))

then `github.requests_after_expiry()` lists every git or REST call made later.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import itertools
import json
import os
import re
import subprocess
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

from fake_checks import FakeChecks
from fake_gitdata import GITDATA_ROUTES, GitData, gitdata_route
from loopback import LoopbackServer

GIT_PATH = re.compile(r"/([^/]+)/([^/]+)\.git(/.*)")
# Groups: owner, name, "/pulls", the PR number, "/comments".
REPO_API = re.compile(r"/api/v3/repos/([^/]+)/([^/]+)(/pulls(?:/(\d+)(/comments)?)?)?")
ROUTES = {
    ("GET", "repo"): "repo",
    ("GET", "pulls"): "pulls_list",
    ("POST", "pulls"): "pulls_create",
    ("GET", "pull"): "pulls_get",
    ("GET", "comments"): "pull_comments",
}
# "git" faults every git request, "git_push" only receive-pack ones (pushes).
GIT_FAULT_KINDS = ("git", "git_push")
FAULT_KINDS = (*GIT_FAULT_KINDS, *sorted(set(ROUTES.values()) | set(GITDATA_ROUTES)))
# Beside an int (answered instead of handling): "drop" closes the connection
# unhandled; for REST kinds also "drop-after", which handles the request, then
# closes without answering, and "lost", which handles it, then answers 502 as
# GitHub's front end does when the backend is slow: answers lost after the work.
FAULT_ACTIONS = ("drop", "drop-after", "lost")
PER_PAGE, MAX_PER_PAGE = 30, 100
IDENTITY = {
    "GIT_AUTHOR_NAME": "Fake GitHub",
    "GIT_AUTHOR_EMAIL": "fake@github.invalid",
    "GIT_COMMITTER_NAME": "Fake GitHub",
    "GIT_COMMITTER_EMAIL": "fake@github.invalid",
}
SOMEONE_ELSE = {  # who commit_to() commits as
    "GIT_AUTHOR_NAME": "Someone Else",
    "GIT_AUTHOR_EMAIL": "someone.else@example.invalid",
    "GIT_COMMITTER_NAME": "Someone Else",
    "GIT_COMMITTER_EMAIL": "someone.else@example.invalid",
}


def _now():
    return datetime.now(UTC)


def _timestamp(when):
    return when.strftime("%Y-%m-%dT%H:%M:%SZ") if when else None


def _server_env():
    # The server side must not see the test's git settings (credential
    # helpers, GIT_DIR...) nor the user's ~/.gitconfig.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    return {**env, **IDENTITY, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}


def _git(*args, input=None, env=None, check=True):
    return subprocess.run(
        ["git", *map(str, args)],
        input=input,
        capture_output=True,
        env=env or _server_env(),
        timeout=60,
        check=check,
    )


def _read_body(handler):
    # git sends bodies over http.postBuffer (1 MiB) chunked, without a length.
    rfile = handler.rfile
    if handler.headers.get("Transfer-Encoding", "").lower() != "chunked":
        return rfile.read(int(handler.headers.get("Content-Length") or 0))
    chunks = []
    while (size := int(rfile.readline().split(b";")[0], 16)) > 0:
        chunks.append(rfile.read(size))
        rfile.readline()
    while rfile.readline() not in (b"\r\n", b"\n", b""):
        pass  # trailers
    return b"".join(chunks)


def _split_cgi(output):
    """(status, headers, body) from CGI output (header lines end in CRLF or LF)."""
    head, sep, body = output.partition(b"\r\n\r\n")
    if not sep:
        head, _, body = output.partition(b"\n\n")
    status, headers = 200, []
    for line in head.decode("latin-1").splitlines():
        name, _, value = line.partition(":")
        if name.lower() == "status":
            status = int(value.split()[0])
        elif name:
            headers.append((name, value.strip()))
    return status, headers, body


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    record = None  # the git_requests/api_requests entry whose status reply() fills in

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.record = None  # keep-alive reuses this handler for the next request
        try:
            self.server.fake._handle(self)
        except Exception as exc:  # the fixture must outlive any input; report instead
            self.close_connection = True
            with contextlib.suppress(OSError):  # the client may be gone already
                self.reply(500, {"message": f"fake server error: {exc!r}"})

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def reply(self, code, payload, headers=()):
        if isinstance(payload, bytes):
            body = payload
        else:
            body = json.dumps(payload).encode()
            headers = [("Content-Type", "application/json; charset=utf-8"), *headers]
        if self.record is not None:  # before answering, so the client never sees it unset
            self.record["status"] = code
        self.send_response(code)
        for name, value in headers:
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class FakeGitHub(GitData, LoopbackServer):
    handler = _Handler

    def __init__(self, root: Path, token: str):
        self.root = Path(root)
        self.token = token
        self.url = ""
        self.api_url = ""
        self.pulls: list[dict] = []
        self.git_requests: list[dict] = []
        self.api_requests: list[dict] = []
        # Every ref a push over HTTP changed: {repo, ref, old, new, forced, at};
        # old/new are None for a created/deleted ref.
        self.pushes: list[dict] = []
        self.token_valid_until: datetime | None = None  # set by expire_token_at()
        self._faults = {kind: [] for kind in FAULT_KINDS}
        self._lock = threading.Lock()
        self._push_lock = threading.Lock()  # one push at a time: exact before/after refs
        # What GitHub shows of a PR beyond the `pulls` records, by (repo, number):
        # kept apart so those records keep their shape.
        self._pull_extras: dict[tuple[str, int], dict] = {}
        self._comments: dict[tuple[str, int], list[dict]] = {}
        self._comment_ids = itertools.count(100001)
        self.checks = FakeChecks(self)  # check runs, statuses, job logs, rules; the CI

    def start(self) -> FakeGitHub:
        self.root.mkdir(parents=True, exist_ok=True)
        super().start()
        self.api_url = self.url + "/api/v3"
        return self

    def stop(self) -> None:
        self.checks.stop()
        super().stop()

    # -- test-facing API ------------------------------------------------

    def create_repo(
        self, owner, name, files=None, default_branch="main", allow_filter=True, executable=()
    ) -> str:
        """A bare repo with one commit of `files` (default: a README); returns its clone URL.

        The paths in `executable` are committed with their executable bit.
        """
        if not self.url:
            raise RuntimeError("start() the server before create_repo()")
        files = {"README.md": "hello\n"} if files is None else files
        bare = self._bare(owner, name)
        _git("init", "-q", "--bare", f"--initial-branch={default_branch}", bare)
        with tempfile.TemporaryDirectory() as work:
            _git("init", "-q", f"--initial-branch={default_branch}", work)
            for rel, text in files.items():
                path = Path(work, rel)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                path.chmod(0o755 if rel in executable else 0o644)
            _git("-C", work, "add", "-A")
            _git("-C", work, "commit", "-q", "--allow-empty", "-m", "Initial commit")
            _git("-C", work, "push", "-q", bare, f"HEAD:refs/heads/{default_branch}")
        for key, value in (
            ("http.receivepack", "true"),
            ("uploadpack.allowFilter", str(allow_filter).lower()),
            ("uploadpack.allowAnySHA1InWant", "true"),
        ):
            _git("--git-dir", bare, "config", key, value)
        return f"{self.url}/{owner}/{name}.git"

    def branch_sha(self, owner, name, branch) -> str | None:
        out = _git(
            "--git-dir",
            self._bare(owner, name),
            "rev-parse",
            "--verify",
            "-q",
            f"refs/heads/{branch}^{{commit}}",
            check=False,
        )
        return out.stdout.decode().strip() or None

    def log(self, owner, name, ref) -> list[str]:
        out = _git("--git-dir", self._bare(owner, name), "log", "--format=%s", ref)
        return out.stdout.decode().splitlines()

    def fail_next(self, kind: str, codes: list[int | str]):
        """The next len(codes) requests of `kind` get these answers (see FAULT_ACTIONS)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown kind {kind!r}, expected one of {FAULT_KINDS}")
        actions = ("drop",) if kind in GIT_FAULT_KINDS else FAULT_ACTIONS
        for code in codes:
            if not (type(code) is int or code in actions):
                raise ValueError(f"bad fault {code!r} for {kind}: an int or one of {actions}")
        with self._lock:
            self._faults[kind].extend(codes)

    def expire_token_at(self, when: float | datetime | None):
        """Refuse the token from `when` on, as GitHub refuses an expired one.

        `when` is a time.monotonic() value or an aware datetime (such as
        FakeShepherd.token_expires_at()); None lets the token live for ever.
        """
        if when is None:
            until = None
        elif isinstance(when, datetime):
            if when.tzinfo is None:
                raise ValueError("a datetime for expire_token_at must be timezone-aware")
            until = when.astimezone(UTC)
        elif type(when) in (int, float):
            until = _now() + timedelta(seconds=when - time.monotonic())
        else:
            raise TypeError(f"expected a monotonic time or a datetime, got {when!r}")
        with self._lock:
            self.token_valid_until = until

    def requests_after_expiry(self) -> list[dict]:
        """The git and REST requests that arrived once the token had expired."""
        with self._lock:
            until = self.token_valid_until
            requests = self.git_requests + self.api_requests
        if until is None:
            return []
        return sorted((r for r in requests if r["at"] >= until), key=lambda r: r["at"])

    def add_pull(
        self,
        owner,
        name,
        head,
        base="main",
        title="x",
        *,
        body="",
        draft=False,
        state="open",
        merged=False,
        head_repo=None,
    ) -> dict:
        """A pre-existing PR; its head branch need not exist.

        `head_repo` ("owner/name") makes it a PR from a fork: another repo of
        this server (create_repo) or just a name. A merged PR is closed.
        """
        if state not in ("open", "closed"):
            raise ValueError(f"state must be 'open' or 'closed', not {state!r}")
        if merged and state != "closed":
            raise ValueError("a merged pull request is closed")
        with self._lock:
            pull = self._new_pull(
                owner, name, head=head, base=base, title=title, body=body, draft=draft
            )
            if head_repo:
                self._pull_extras[(pull["repo"], pull["number"])]["head_repo"] = head_repo
        if state == "closed":
            return self.close_pull(owner, name, pull["number"], merged=merged)
        return pull

    def close_pull(self, owner, name, number, merged=False) -> dict:
        """Close a PR (merging it when `merged`), as if someone did it on GitHub."""
        with self._lock:
            pull = self._find_pull(owner, name, number)
            if pull is None:
                raise KeyError(f"no pull request {owner}/{name}#{number}")
            extras = self._pull_extras[(pull["repo"], number)]
            pull["state"] = "closed"
            extras["closed_at"] = extras["updated_at"] = _now()
            if merged:
                extras["merged_at"] = extras["closed_at"]
            return dict(pull)

    def add_review_comment(
        self,
        owner,
        name,
        number,
        path,
        line,
        body,
        user="reviewer",
        *,
        in_reply_to=None,
        original_line=None,
        created_at=None,
    ) -> dict:
        """An inline review comment on PR `number`, as GET .../pulls/{n}/comments lists it.

        An outdated comment (its line gone from the diff) has `line` None and
        an `original_line`. `created_at` (aware datetime) defaults to now.
        """
        with self._lock:
            pull = self._find_pull(owner, name, number)
            if pull is None:
                raise KeyError(f"no pull request {owner}/{name}#{number}")
            head_repo = self._pull_extras[(pull["repo"], number)]["head_repo"]
        sha = self.branch_sha(*head_repo.split("/"), pull["head"])
        when = _timestamp((created_at or _now()).astimezone(UTC))
        comment_id = next(self._comment_ids)
        comment = {
            "id": comment_id,
            "url": f"{self.api_url}/repos/{pull['repo']}/pulls/comments/{comment_id}",
            "pull_request_url": f"{self.api_url}/repos/{pull['repo']}/pulls/{number}",
            "html_url": f"{pull['html_url']}#discussion_r{comment_id}",
            "path": path,
            "line": line,
            "original_line": line if original_line is None else original_line,
            "side": "RIGHT",
            "commit_id": sha,
            "original_commit_id": sha,
            "user": {"login": user, "type": "User"},
            "body": body,
            "created_at": when,
            "updated_at": when,
        }
        if in_reply_to is not None:  # GitHub leaves the key out of top-level comments
            comment["in_reply_to_id"] = in_reply_to
        with self._lock:
            self._comments.setdefault((pull["repo"], number), []).append(comment)
        return dict(comment)

    def commit_to(self, owner, name, branch, files=None, message="Someone else's change") -> str:
        """Commit `files` ({path: text}) onto `branch` of the bare repo, as another
        person pushing directly; creates the branch from the default one if
        needed. Returns the new sha. Not recorded in `pushes`."""
        bare = self._bare(owner, name)
        env = {**_server_env(), **SOMEONE_ELSE}
        with tempfile.TemporaryDirectory() as work:
            _git("clone", "-q", bare, work, env=env)
            if self.branch_sha(owner, name, branch):
                _git("-C", work, "checkout", "-q", "-B", branch, f"origin/{branch}", env=env)
            else:
                _git("-C", work, "checkout", "-q", "-b", branch, env=env)
            for rel, text in (files or {}).items():
                path = Path(work, rel)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            _git("-C", work, "add", "-A", env=env)
            _git("-C", work, "commit", "-q", "--allow-empty", "-m", message, env=env)
            sha = _git("-C", work, "rev-parse", "HEAD", env=env).stdout.decode().strip()
            self.mark_verified(bare, sha)  # someone who signs: a rule requiring it lets it in
            _git("-C", work, "push", "-q", "origin", f"HEAD:refs/heads/{branch}", env=env)
            return sha

    # -- internals --------------------------------------------------------

    def _bare(self, owner, name):
        return self.root / owner / f"{name}.git"

    def _new_pull(self, owner, name, *, head, base, title, body, draft):
        repo = f"{owner}/{name}"
        number = 1 + sum(p["repo"] == repo for p in self.pulls)  # numbers are per repo
        pull = {
            "number": number,
            "html_url": f"{self.url}/{repo}/pull/{number}",
            "head": head,
            "base": base,
            "title": title,
            "body": body,
            "draft": draft,
            "state": "open",
            "repo": repo,
        }
        self.pulls.append(pull)
        now = _now()
        self._pull_extras[(repo, number)] = {
            "head_repo": repo,
            "created_at": now,
            "updated_at": now,
            "closed_at": None,
            "merged_at": None,
        }
        return dict(pull)

    def _find_pull(self, owner, name, number):
        """The `pulls` record of owner/name#number, or None; the caller holds _lock."""
        repo = f"{owner}/{name}"
        return next((p for p in self.pulls if (p["repo"], p["number"]) == (repo, number)), None)

    def _take_fault(self, kind):
        with self._lock:
            return self._faults[kind].pop(0) if self._faults[kind] else None

    def _check_token(self, given):
        """(authorized, expired) for the token a request carried."""
        if given is None or given != self.token:
            return False, False
        with self._lock:
            expired = self.token_valid_until is not None and _now() >= self.token_valid_until
        return not expired, expired

    def _drop(self, h):
        h.close_connection = True  # unanswered: the client sees the connection close

    def _handle(self, h):
        url = urlsplit(h.path)
        body = _read_body(h)
        if url.path.startswith("/api/v3/"):
            return self._api(h, url, body)
        match = GIT_PATH.fullmatch(url.path)
        if match:
            return self._git_http(h, url, match, body)
        if self.checks.download(h, url.path):
            return None
        return h.reply(404, {"message": "Not Found"})

    def _git_http(self, h, url, match, body):
        query = parse_qs(url.query)
        service = query.get("service", [None])[0] or match[3].lstrip("/")
        authorized, expired = self._check_token(_basic_password(h.headers.get("Authorization")))
        h.record = {
            "method": h.command,
            "path": url.path,
            "service": service,
            "authorized": authorized,
            "token_expired": expired,
            "status": None,
            "fault": None,
            "at": _now(),
            "headers": dict(h.headers),
        }
        with self._lock:
            self.git_requests.append(h.record)
        fault = self._take_fault("git")
        if fault is None and service == "git-receive-pack":
            fault = self._take_fault("git_push")
        h.record["fault"] = fault
        if type(fault) is int:
            return h.reply(fault, b"injected fault\n", [("Content-Type", "text/plain")])
        if fault == "drop":
            return self._drop(h)
        if not h.record["authorized"]:
            # Without this challenge git never asks its credential helper.
            return h.reply(401, b"Unauthorized\n", [("WWW-Authenticate", 'Basic realm="fake"')])

        protocol = h.headers.get("Git-Protocol", "")
        env = {
            **_server_env(),
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": h.command,
            "PATH_INFO": url.path,
            "QUERY_STRING": url.query,
            "CONTENT_TYPE": h.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": "x-access-token",
            "REMOTE_ADDR": "127.0.0.1",
            # http-backend inflates gzip bodies itself (gzip and x-gzip).
            "HTTP_CONTENT_ENCODING": h.headers.get("Content-Encoding", ""),
            # The CGI name is what http-backend >= 2.34 reads; GIT_PROTOCOL
            # is what older ones need. Either turns on protocol v2.
            "HTTP_GIT_PROTOCOL": protocol,
            "GIT_PROTOCOL": protocol,
        }
        pushing = h.command == "POST" and service == "git-receive-pack"
        with self._push_lock if pushing else contextlib.nullcontext():
            before = self._refs(match[1], match[2]) if pushing else {}
            out = _git("http-backend", input=body, env=env, check=False)
            if pushing:
                self._record_pushes(match[1], match[2], before)
        if out.returncode != 0 and not out.stdout:
            return h.reply(500, out.stderr, [("Content-Type", "text/plain")])
        status, headers, payload = _split_cgi(out.stdout)
        return h.reply(status, payload, headers)

    def _refs(self, owner, name):
        out = _git(
            "--git-dir",
            self._bare(owner, name),
            "for-each-ref",
            "--format=%(objectname) %(refname)",
            check=False,
        )
        return {
            ref: sha for sha, ref in (line.split() for line in out.stdout.decode().splitlines())
        }

    def _record_pushes(self, owner, name, before):
        after = self._refs(owner, name)
        for ref in sorted(before.keys() | after.keys()):
            old, new = before.get(ref), after.get(ref)
            if old == new:
                continue
            # A forced update is one whose old tip is no longer in the branch.
            forced = bool(old and new) and (
                _git(
                    "--git-dir",
                    self._bare(owner, name),
                    "merge-base",
                    "--is-ancestor",
                    old,
                    new,
                    check=False,
                ).returncode
                != 0
            )
            push = {"repo": f"{owner}/{name}", "ref": ref, "old": old, "new": new}
            with self._lock:
                self.pushes.append({**push, "forced": forced, "at": _now()})
            self.checks.pushed(push["repo"], ref, new)

    def _api(self, h, url, body):
        scheme, _, token = h.headers.get("Authorization", "").partition(" ")
        given = token.strip() if scheme.lower() in ("bearer", "token") else None
        authorized, expired = self._check_token(given)
        h.record = {
            "method": h.command,
            "path": url.path,
            "query": {k: v[-1] for k, v in parse_qs(url.query).items()},
            "authorized": authorized,
            "token_expired": expired,
            "status": None,
            "fault": None,
            "at": _now(),
        }
        with self._lock:
            self.api_requests.append(h.record)

        if self.checks.route(h, url.path, h.record["query"], authorized):
            return None
        match = REPO_API.fullmatch(url.path)
        route = ROUTES.get((h.command, _resource(match))) if match else None
        arg = int(match[4]) if route and match[4] else None  # a pull request's number
        if route is None:  # the Git Data API (tests/fake_gitdata.py)
            route, match, arg = gitdata_route(h.command, url.path)
        if route is None:
            return h.reply(404, {"message": "Not Found"})
        fault = h.record["fault"] = self._take_fault(route)
        if type(fault) is int:
            return h.reply(fault, {"message": "injected fault"})
        if fault == "drop":
            return self._drop(h)
        if not authorized:
            return h.reply(401, {"message": "Bad credentials"})
        owner, name = match[1], match[2]
        if not self._bare(owner, name).is_dir():
            return h.reply(404, {"message": "Not Found"})
        code, payload = getattr(self, "_" + route)(owner, name, arg, h.record["query"], body)
        headers = []
        if route in ("pulls_list", "pull_comments") and code == 200:
            payload, headers = self._page(url.path, h.record["query"], payload)
        if fault == "drop-after":
            return self._drop(h)
        if fault == "lost":
            return h.reply(502, {"message": "Server Error"})
        return h.reply(code, payload, headers)

    def _page(self, path, query, items):
        """One page of `items` and its Link header, as GitHub pages its lists."""
        try:
            per_page = min(max(int(query.get("per_page", PER_PAGE)), 1), MAX_PER_PAGE)
            page = max(int(query.get("page", 1)), 1)
        except ValueError:
            per_page, page = PER_PAGE, 1
        last = max(1, -(-len(items) // per_page))
        rels = [("next", page + 1), ("last", last)] if page < last else []
        if page > 1:
            rels += [("prev", min(page - 1, last)), ("first", 1)]
        links = ", ".join(
            f'<{self.url}{path}?{urlencode({**query, "page": n})}>; rel="{rel}"' for rel, n in rels
        )
        page_items = items[(page - 1) * per_page : page * per_page]
        return page_items, [("Link", links)] if links else []

    def _repo(self, owner, name, _number, _query, _body):
        head = _git("--git-dir", self._bare(owner, name), "symbolic-ref", "--short", "HEAD")
        return 200, {
            "full_name": f"{owner}/{name}",
            "default_branch": head.stdout.decode().strip(),
            "clone_url": f"{self.url}/{owner}/{name}.git",
        }

    def _repo_json(self, full_name, fork):
        owner, name = full_name.split("/")
        return {
            "full_name": full_name,
            "name": name,
            "owner": {"login": owner},
            "fork": fork,
            "html_url": f"{self.url}/{full_name}",
            "clone_url": f"{self.url}/{full_name}.git",
        }

    def _head_label(self, pull):
        head_repo = self._pull_extras[(pull["repo"], pull["number"])]["head_repo"]
        return f"{head_repo.split('/')[0]}:{pull['head']}"

    def _pull_json(self, pull, full=False):
        """A PR as the list shows it or, when `full`, as GET .../pulls/{n} does."""
        owner, name = pull["repo"].split("/")
        extras = self._pull_extras[(pull["repo"], pull["number"])]
        head_repo = extras["head_repo"]
        fields = ("number", "html_url", "state", "title", "body", "draft")
        data = {
            "url": f"{self.api_url}/repos/{pull['repo']}/pulls/{pull['number']}",
            **{k: pull[k] for k in fields},
            **{k: _timestamp(extras[k]) for k in ("created_at", "updated_at", "closed_at")},
            "merged_at": _timestamp(extras["merged_at"]),
            "head": {
                "label": self._head_label(pull),
                "ref": pull["head"],
                "sha": self.branch_sha(*head_repo.split("/"), pull["head"]),
                "repo": self._repo_json(head_repo, fork=head_repo != pull["repo"]),
            },
            "base": {
                "label": f"{owner}:{pull['base']}",
                "ref": pull["base"],
                "sha": self.branch_sha(owner, name, pull["base"]),
                "repo": self._repo_json(pull["repo"], fork=False),
            },
        }
        if full:  # the list leaves this out
            data["merged"] = extras["merged_at"] is not None
        return data

    def _pulls_get(self, owner, name, number, _query, _body):
        with self._lock:
            pull = self._find_pull(owner, name, number)
        if pull is None:
            return 404, {"message": "Not Found"}
        return 200, self._pull_json(pull, full=True)

    def _pull_comments(self, owner, name, number, _query, _body):
        with self._lock:
            if self._find_pull(owner, name, number) is None:
                return 404, {"message": "Not Found"}
            return 200, [dict(c) for c in self._comments.get((f"{owner}/{name}", number), [])]

    def _pulls_list(self, owner, name, _number, query, _body):
        state = query.get("state", "open")
        with self._lock:
            pulls = [p for p in self.pulls if p["repo"] == f"{owner}/{name}"]
        if state != "all":
            pulls = [p for p in pulls if p["state"] == state]
        # GitHub silently ignores a head filter without the "owner:" prefix
        # and lists every PR: a runner that forgets the prefix must notice.
        head = query.get("head", "")
        if ":" in head:
            pulls = [p for p in pulls if self._head_label(p) == head]
        if "base" in query:
            pulls = [p for p in pulls if p["base"] == query["base"]]
        return 200, [self._pull_json(p) for p in pulls]

    def _pulls_create(self, owner, name, _number, _query, body):
        try:
            req = json.loads(body)
        except ValueError:
            return 400, {"message": "Problems parsing JSON"}
        if not isinstance(req, dict):
            return 400, {"message": "Problems parsing JSON"}
        for key in ("title", "head", "base"):
            if not isinstance(req.get(key), str) or not req[key]:
                return _invalid(f'"{key}" wasn\'t supplied.', key)
        head, base = req["head"], req["base"]
        head_owner, _, head_branch = head.rpartition(":")
        if head_owner not in ("", owner) or not self.branch_sha(owner, name, head_branch):
            return _invalid(f"head branch {head} does not exist", "head")
        if not self.branch_sha(owner, name, base):
            return _invalid(f"base branch {base} does not exist", "base")
        ahead = _git(
            "--git-dir",
            self._bare(owner, name),
            "rev-list",
            "--count",
            f"refs/heads/{base}..refs/heads/{head_branch}",
        )
        with self._lock:
            if any(
                p["repo"] == f"{owner}/{name}"
                and p["state"] == "open"
                and self._head_label(p) == f"{owner}:{head_branch}"
                and p["base"] == base
                for p in self.pulls
            ):
                return _invalid(f"A pull request already exists for {owner}:{head_branch}.")
            if ahead.stdout.strip() == b"0":
                return _invalid(f"No commits between {base} and {head_branch}")
            pull = self._new_pull(
                owner,
                name,
                head=head_branch,
                base=base,
                title=req["title"],
                body=req.get("body"),
                draft=bool(req.get("draft", False)),
            )
        return 201, self._pull_json(pull)


def _resource(match):
    """What a REPO_API match names: the repo, its pulls, one pull, or its comments."""
    if match[5]:
        return "comments"
    if match[4]:
        return "pull"
    return "pulls" if match[3] else "repo"


def _basic_password(header):
    """The password of a Basic `header` for user x-access-token, else None."""
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return password if user == "x-access-token" else None


def _invalid(message, field=None):
    error = {
        "resource": "PullRequest",
        "code": "invalid" if field else "custom",
        "message": message,
    }
    if field:
        error["field"] = field
    return 422, {"message": "Validation Failed", "errors": [error]}
