"""A fake GitHub for tests: git smart HTTP and the few REST calls the runner makes.

Both live on one server, like GitHub Enterprise (REST under /api/v3). Git is
served by the real `git http-backend`, so clone, partial clone and push behave
like the real thing; the fake only adds GitHub's authentication rules.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from loopback import LoopbackServer

GIT_PATH = re.compile(r"/([^/]+)/([^/]+)\.git(/.*)")
REPO_API = re.compile(r"/api/v3/repos/([^/]+)/([^/]+)(/pulls)?")
FAULT_KINDS = ("git", "pulls_create", "pulls_list", "repo")
IDENTITY = {
    "GIT_AUTHOR_NAME": "Fake GitHub",
    "GIT_AUTHOR_EMAIL": "fake@github.invalid",
    "GIT_COMMITTER_NAME": "Fake GitHub",
    "GIT_COMMITTER_EMAIL": "fake@github.invalid",
}


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


class FakeGitHub(LoopbackServer):
    handler = _Handler

    def __init__(self, root: Path, token: str):
        self.root = Path(root)
        self.token = token
        self.url = ""
        self.api_url = ""
        self.pulls: list[dict] = []
        self.git_requests: list[dict] = []
        self.api_requests: list[dict] = []
        self._faults = {kind: [] for kind in FAULT_KINDS}
        self._lock = threading.Lock()

    def start(self) -> FakeGitHub:
        self.root.mkdir(parents=True, exist_ok=True)
        super().start()
        self.api_url = self.url + "/api/v3"
        return self

    # -- test-facing API ------------------------------------------------

    def create_repo(self, owner, name, files=None, default_branch="main", allow_filter=True) -> str:
        """A bare repo with one commit of `files` (default: a README); returns its clone URL."""
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

    def fail_next(self, kind: str, codes: list[int]):
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown kind {kind!r}, expected one of {FAULT_KINDS}")
        with self._lock:
            self._faults[kind].extend(codes)

    def add_pull(self, owner, name, head, base="main", title="x") -> dict:
        """A pre-existing open PR; its head branch need not exist."""
        with self._lock:
            return self._new_pull(
                owner, name, head=head, base=base, title=title, body="", draft=False
            )

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
        return dict(pull)

    def _take_fault(self, kind):
        with self._lock:
            return self._faults[kind].pop(0) if self._faults[kind] else None

    def _handle(self, h):
        url = urlsplit(h.path)
        body = _read_body(h)
        if url.path.startswith("/api/v3/"):
            return self._api(h, url, body)
        match = GIT_PATH.fullmatch(url.path)
        if match:
            return self._git_http(h, url, match, body)
        return h.reply(404, {"message": "Not Found"})

    def _git_http(self, h, url, match, body):
        query = parse_qs(url.query)
        service = query.get("service", [None])[0] or match[3].lstrip("/")
        h.record = {
            "method": h.command,
            "path": url.path,
            "service": service,
            "authorized": self._basic_auth_ok(h.headers.get("Authorization")),
            "status": None,
            "headers": dict(h.headers),
        }
        with self._lock:
            self.git_requests.append(h.record)
        if code := self._take_fault("git"):
            return h.reply(code, b"injected fault\n", [("Content-Type", "text/plain")])
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
        out = _git("http-backend", input=body, env=env, check=False)
        if out.returncode != 0 and not out.stdout:
            return h.reply(500, out.stderr, [("Content-Type", "text/plain")])
        status, headers, payload = _split_cgi(out.stdout)
        return h.reply(status, payload, headers)

    def _basic_auth_ok(self, header):
        scheme, _, value = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return user == "x-access-token" and password == self.token

    def _api(self, h, url, body):
        scheme, _, token = h.headers.get("Authorization", "").partition(" ")
        authorized = scheme.lower() in ("bearer", "token") and token.strip() == self.token
        h.record = {
            "method": h.command,
            "path": url.path,
            "query": {k: v[-1] for k, v in parse_qs(url.query).items()},
            "authorized": authorized,
            "status": None,
        }
        with self._lock:
            self.api_requests.append(h.record)

        match = REPO_API.fullmatch(url.path)
        route = {
            ("GET", None): "repo",
            ("GET", "/pulls"): "pulls_list",
            ("POST", "/pulls"): "pulls_create",
        }.get((h.command, match[3]) if match else None)
        if route is None:
            return h.reply(404, {"message": "Not Found"})
        if code := self._take_fault(route):
            return h.reply(code, {"message": "injected fault"})
        if not authorized:
            return h.reply(401, {"message": "Bad credentials"})
        owner, name = match[1], match[2]
        if not self._bare(owner, name).is_dir():
            return h.reply(404, {"message": "Not Found"})
        code, payload = getattr(self, "_" + route)(owner, name, h.record["query"], body)
        return h.reply(code, payload)

    def _repo(self, owner, name, _query, _body):
        head = _git("--git-dir", self._bare(owner, name), "symbolic-ref", "--short", "HEAD")
        return 200, {
            "full_name": f"{owner}/{name}",
            "default_branch": head.stdout.decode().strip(),
            "clone_url": f"{self.url}/{owner}/{name}.git",
        }

    def _pull_json(self, pull):
        owner = pull["repo"].split("/")[0]
        fields = ("number", "html_url", "state", "title", "body", "draft")
        return {
            **{k: pull[k] for k in fields},
            "head": {"ref": pull["head"], "label": f"{owner}:{pull['head']}"},
            "base": {"ref": pull["base"], "label": f"{owner}:{pull['base']}"},
        }

    def _pulls_list(self, owner, name, query, _body):
        state = query.get("state", "open")
        with self._lock:
            pulls = [p for p in self.pulls if p["repo"] == f"{owner}/{name}"]
        if state != "all":
            pulls = [p for p in pulls if p["state"] == state]
        # GitHub silently ignores a head filter without the "owner:" prefix
        # and lists every PR: a runner that forgets the prefix must notice.
        head = query.get("head", "")
        if ":" in head:
            pulls = [p for p in pulls if f"{owner}:{p['head']}" == head]
        if "base" in query:
            pulls = [p for p in pulls if p["base"] == query["base"]]
        return 200, [self._pull_json(p) for p in pulls]

    def _pulls_create(self, owner, name, _query, body):
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
                and p["head"] == head_branch
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


def _invalid(message, field=None):
    error = {
        "resource": "PullRequest",
        "code": "invalid" if field else "custom",
        "message": message,
    }
    if field:
        error["field"] = field
    return 422, {"message": "Validation Failed", "errors": [error]}
