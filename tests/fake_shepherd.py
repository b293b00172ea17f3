"""A fake Shepherd API (the internal port) for tests.

It follows section 2 of the contract (shared/contract/README.md) and the
`internal` tag of the OpenAPI file, records what the runner sent, and can
inject faults. The check order follows the upstream handlers: for /status
the body is validated before the task is looked up, for /events the task is
looked up (404, 410) before the body is read.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

from loopback import LoopbackServer

MAX_BODY = 10 << 20
TERMINAL = {"completed", "failed"}
STATUS_EVENTS = ("started", "progress", "completed", "failed")
EVENT_TYPES = {"thinking", "tool_call", "tool_result", "error"}
INT64_MAX = 2**63 - 1
# Go's time.Parse(time.RFC3339) is stricter than datetime.fromisoformat: it
# wants the "T", seconds and an offset, so the shape is checked first.
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")
TASK_PATH = re.compile(r"/api/v1/tasks/([^/]+)/(data|token|status|events)")
METHODS = {"/data": "GET", "/token": "GET", "/status": "POST", "/events": "POST"}


@dataclass
class _Task:
    data: dict
    token: str
    token_ttl: float = 3600.0
    expires_at: datetime | None = None  # fixed by add_task, or when the token is issued
    token_issued: bool = False
    terminal: dict | None = None
    statuses: list = field(default_factory=list)
    events: list = field(default_factory=list)
    event_posts: int = 0


def _error(code, error, details=""):
    return code, {"error": error, "details": details}


def _is_rfc3339(value):
    if not isinstance(value, str) or not RFC3339.fullmatch(value):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:  # e.g. month 13
        return False
    return True


def _event_error(event):
    """Why `event` breaks the OpenAPI TaskEvent schema, or None if it does not."""
    if not isinstance(event, dict):
        return "event must be an object"
    seq = event.get("sequence")
    # bool is an int subclass in Python but not a JSON integer.
    if type(seq) is not int or not 0 < seq <= INT64_MAX:
        return "event sequence must be a positive integer"
    if not _is_rfc3339(event.get("timestamp")):
        return "invalid event timestamp: must be RFC3339 date-time format"
    if not isinstance(event.get("type"), str) or event["type"] not in EVENT_TYPES:
        return "invalid event type: must be one of thinking, tool_call, tool_result, error"
    if not isinstance(event.get("summary"), str) or not event["summary"]:
        return "event summary is required"
    if "tool" in event and not isinstance(event["tool"], str):
        return "event tool must be a string"
    for key in ("input", "metadata"):
        if key in event and not isinstance(event[key], dict):
            return f"event {key} must be an object"
    if "output" in event:
        out = event["output"]
        if not isinstance(out, dict) or type(out.get("success")) is not bool:
            return "event output must be an object with a boolean success"
        if "summary" in out and not isinstance(out["summary"], str):
            return "event output summary must be a string"
    return None


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")  # Go's decoder refuses NaN and Infinity too


def _parse_json(body):
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant), None
    except (ValueError, RecursionError) as exc:  # ValueError covers UnicodeDecodeError
        return None, str(exc)


def read_body(handler, limit):
    """The request body, or None when it exceeds `limit`.

    An oversized body is still drained: answering before the client has sent
    everything makes it see a broken pipe instead of the status code.
    """
    chunks, size = [], 0

    def take(data):
        nonlocal size
        size += len(data)
        if size <= limit:
            chunks.append(data)

    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        while (n := int(handler.rfile.readline().split(b";")[0], 16)) > 0:
            take(handler.rfile.read(n))
            handler.rfile.readline()
        while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers
    else:
        left = int(handler.headers.get("Content-Length") or 0)
        while left > 0:
            data = handler.rfile.read(min(left, 1 << 20))
            if not data:
                break
            left -= len(data)
            take(data)
    return b"".join(chunks) if size <= limit else None


class _Handler(BaseHTTPRequestHandler):
    # Keep-alive, so that "drop" hits a pooled connection as in real life.
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        fake = self.server.fake
        try:
            fake._handle(self)
        except Exception as exc:  # the fixture must outlive any input; report instead
            self.close_connection = True
            with contextlib.suppress(OSError):  # the client may be gone already
                self.reply(*_error(500, "fake server error", repr(exc)))

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

    def reply(self, code, payload, content_type="application/json"):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class FakeShepherd(LoopbackServer):
    handler = _Handler

    def __init__(self):
        self.url = ""
        self.requests: list[tuple[str, str, dict]] = []
        self._tasks: dict[str, _Task] = {}
        self._faults: dict[tuple[str, str], list] = {}
        self._delays: dict[str, float] = {}
        self._outages: dict[str, tuple[float, int]] = {}
        self._cond = threading.Condition()
        self._stopping = threading.Event()

    def stop(self):
        self._stopping.set()  # wakes handlers held by set_delay
        super().stop()

    # -- test-facing API ------------------------------------------------

    def add_task(
        self,
        task_id,
        *,
        repo_url,
        ref="",
        description="Fix the greeting",
        context="Some context",
        source_url="https://github.com/o/r/issues/1",
        token=None,
        token_ttl=3600.0,
        expires_at=None,
    ) -> str:
        """Register a task; returns its installation token (random unless given).

        /token announces `expiresAt` as `token_ttl` seconds after it is issued,
        or as the fixed, timezone-aware `expires_at`. Either way it is cut to
        whole seconds, as GitHub's `expires_at` is; token_expires_at() gives the
        exact instant, to hand to FakeGitHub.expire_token_at().
        """
        if expires_at is not None:
            if expires_at.tzinfo is None:
                raise ValueError("expires_at must be timezone-aware")
            expires_at = _whole_seconds(expires_at)
        # Empty optional fields are left out, as the Go server's omitempty does.
        repo = {"url": repo_url, **({"ref": ref} if ref else {})}
        data = {"description": description, "context": context, "repo": repo}
        if source_url:
            data["sourceURL"] = source_url
        token = token or "ghs_" + secrets.token_hex(18)
        with self._cond:
            self._tasks[task_id] = _Task(
                data=data, token=token, token_ttl=token_ttl, expires_at=expires_at
            )
        return token

    def statuses(self, task_id) -> list[dict]:
        with self._cond:
            return copy.deepcopy(self._tasks[task_id].statuses)

    def terminal(self, task_id) -> dict | None:
        with self._cond:
            return copy.deepcopy(self._tasks[task_id].terminal)

    def events(self, task_id) -> list[dict]:
        with self._cond:
            return copy.deepcopy(self._tasks[task_id].events)

    def event_posts(self, task_id) -> int:
        with self._cond:
            return self._tasks[task_id].event_posts

    def token_issued(self, task_id) -> bool:
        with self._cond:
            return self._tasks[task_id].token_issued

    def token_expires_at(self, task_id) -> datetime | None:
        """The `expiresAt` /token announces (UTC): known from add_task when it got
        `expires_at`, otherwise once the token is issued (None before)."""
        with self._cond:
            return self._tasks[task_id].expires_at

    def wait_terminal(self, task_id, timeout=30) -> dict:
        with self._cond:
            task = self._tasks[task_id]
            if not self._cond.wait_for(lambda: task.terminal is not None, timeout):
                raise AssertionError(
                    f"no terminal status for {task_id} within {timeout}s; got {task.statuses}"
                )
            return copy.deepcopy(task.terminal)

    def wait_event(self, task_id, predicate, timeout=30) -> dict:
        """The first accepted event of `task_id` for which `predicate` holds."""
        with self._cond:
            task = self._tasks[task_id]

            def found():
                return next((e for e in task.events if predicate(e)), None)

            if not self._cond.wait_for(found, timeout):
                raise AssertionError(f"no such event within {timeout}s; got {task.events}")
            return copy.deepcopy(found())

    def wait_requests(self, suffix, count, timeout=30) -> int:
        """Waits until `count` requests to `suffix` (any task) have come in; returns how many."""

        def seen():
            return sum(1 for _, path, _ in self.requests if urlsplit(path).path.endswith(suffix))

        with self._cond:
            if not self._cond.wait_for(lambda: seen() >= count, timeout):
                raise AssertionError(f"{seen()} requests to {suffix} in {timeout}s, not {count}")
            return seen()

    def fail_next(self, task_id, suffix, codes: list[int | str]):
        """The next len(codes) requests to `suffix` of `task_id` get these answers.

        An int is answered instead of handling the request. "drop" closes the
        connection without handling it; "drop-after" handles it (the token is
        burnt, the status lands) and then closes without answering, the lost
        response the contract warns about.
        """
        if suffix not in METHODS:
            raise ValueError(f"unknown suffix {suffix!r}")
        with self._cond:
            self._faults.setdefault((task_id, suffix), []).extend(codes)

    def fail_for(self, suffix, seconds, code=503):
        """Every request to `suffix` answers `code` for the next `seconds`: an outage."""
        if suffix not in METHODS:
            raise ValueError(f"unknown suffix {suffix!r}")
        with self._cond:
            self._outages[suffix] = (time.monotonic() + seconds, code)

    def set_delay(self, suffix, seconds):
        if suffix not in METHODS:
            raise ValueError(f"unknown suffix {suffix!r}")
        with self._cond:
            self._delays[suffix] = seconds

    # -- request handling ---------------------------------------------------

    def _handle(self, h):
        with self._cond:
            self.requests.append((h.command, h.path, dict(h.headers)))
            self._cond.notify_all()
        body = read_body(h, MAX_BODY)
        path = urlsplit(h.path).path
        if path == "/healthz" and h.command in ("GET", "HEAD"):
            return h.reply(200, b"ok", "text/plain")
        match = TASK_PATH.fullmatch(path)
        if not match:
            return h.reply(*_error(404, "not found", path))
        task_id, suffix = match[1], "/" + match[2]
        if h.command != METHODS[suffix]:
            return h.reply(*_error(405, "method not allowed", h.command))

        with self._cond:
            delay = self._delays.get(suffix, 0)
            faults = self._faults.get((task_id, suffix))
            fault = faults.pop(0) if faults else None
            until, code = self._outages.get(suffix, (0.0, 0))
            if fault is None and time.monotonic() < until:
                fault = code
        if delay:
            self._stopping.wait(delay)
        if fault == "drop":
            h.close_connection = True
            return None
        if isinstance(fault, int):
            return h.reply(*_error(fault, "injected fault", f"fail_next({suffix})"))

        if suffix in ("/status", "/events") and not _is_json(h.headers.get("Content-Type")):
            code, payload = _error(415, "Content-Type must be application/json")
        else:
            code, payload = getattr(self, "_" + suffix[1:])(task_id, body)
        if fault == "drop-after":
            h.close_connection = True
            return None
        return h.reply(code, payload)

    def _live_task(self, task_id):
        """(task, None), or (None, the 404/410 answer); the caller holds _cond."""
        task = self._tasks.get(task_id)
        if task is None:
            return None, _error(404, "task not found")
        if task.terminal is not None:
            return None, _error(410, "task is terminal")
        return task, None

    def _data(self, task_id, _body):
        with self._cond:
            task, refusal = self._live_task(task_id)
            return refusal or (200, task.data)

    def _token(self, task_id, _body):
        with self._cond:
            task, refusal = self._live_task(task_id)
            if refusal:
                return refusal
            if task.token_issued:
                return _error(409, "token already issued")
            task.token_issued = True  # burnt before answering, like upstream
            if task.expires_at is None:
                task.expires_at = _whole_seconds(
                    datetime.now(UTC) + timedelta(seconds=task.token_ttl)
                )
            expires = task.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")
            return 200, {"token": task.token, "expiresAt": expires}

    def _status(self, task_id, body):
        if body is None:
            return _error(413, "request body too large", f"limit is {MAX_BODY} bytes")
        req, err = _parse_json(body)
        if err:
            return _error(400, "invalid request body", err)
        if not isinstance(req, dict):
            return _error(400, "invalid request body", "must be a JSON object")
        event = req.get("event")
        if not event:
            return _error(400, "event is required")
        if not isinstance(event, str) or event not in STATUS_EVENTS:
            return _error(400, "invalid event type", "must be one of: " + ", ".join(STATUS_EVENTS))
        if not isinstance(req.get("message", ""), str):
            return _error(400, "invalid request body", "message must be a string")
        if not isinstance(req.get("details", {}), dict | None):
            return _error(400, "invalid request body", "details must be an object")
        with self._cond:
            task = self._tasks.get(task_id)
            if task is None:
                return _error(404, "task not found")
            answer = {"status": "accepted"}
            if event not in TERMINAL:
                accepted_as = "non-terminal"
            elif task.terminal is None:
                accepted_as = "first-terminal"
                task.terminal = req
                self._cond.notify_all()
            else:
                accepted_as = "already-notified"
                answer["note"] = "already notified"
            task.statuses.append({**req, "_accepted_as": accepted_as})
            return 200, answer

    def _events(self, task_id, body):
        with self._cond:
            task, refusal = self._live_task(task_id)
            if refusal:
                return refusal
        if body is None:
            return _error(413, "request body too large", f"limit is {MAX_BODY} bytes")
        req, err = _parse_json(body)
        if err:
            return _error(400, "invalid request body", err)
        events = req.get("events") if isinstance(req, dict) else None
        if not isinstance(events, list) or not events:
            return _error(400, "events array is required and must not be empty")
        for i, event in enumerate(events):
            if problem := _event_error(event):
                return _error(400, problem, f"events[{i}]")
        with self._cond:
            # The terminal status may have landed while the body was checked.
            if task.terminal is not None:
                return _error(410, "task is terminal")
            task.events.extend(events)
            task.event_posts += 1
            self._cond.notify_all()
        return 200, {"status": "accepted"}


def _whole_seconds(when):
    return when.astimezone(UTC).replace(microsecond=0)


def _is_json(content_type):
    return (content_type or "").split(";")[0].strip().lower() == "application/json"
