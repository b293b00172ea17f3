"""A scripted Anthropic Messages API server for driving the real Claude Code CLI.

Stdlib only.  Point the CLI at it with ``ANTHROPIC_BASE_URL=model.url``.

Script steps (a list of dicts, played in order)::

    {"text": "Let me look."}                               # text block
    {"tool": "Read", "input": {"file_path": "README.md"}}  # tool_use block
    {"text": "Editing.", "tool": "Edit", "input": {...}}   # text block, then tool_use block
    {"tools": [{"tool": "Read", "input": {...}}, ...]}     # several tool_use blocks in one reply
    {"text": "All done.", "end": True}                     # final end_turn answer
    {"error": 500}                                         # HTTP 500, api_error body
    {"error": 529, "type": "overloaded_error"}             # HTTP 529, overloaded_error body

A step without a tool is an ``end_turn`` reply; a step with one is ``tool_use``.
Optional keys on any step: ``"usage": {"input_tokens": N, "output_tokens": M}``
(reported in message_start/message_delta, e.g. to trip --max-budget-usd) and
``"delay": seconds`` (answer late).  Optional keys on error steps:
``"message"``, ``"times": N`` (answer the error N times, then go on with the
script; default: forever), ``"should_retry": False`` (send the
``x-should-retry: false`` header, which makes the CLI give up at once instead
of retrying 5xx/529 ten times with backoff) and ``"headers": {...}``.

Which step is played is derived from the conversation, not from a call
counter: the number of assistant messages already in the request's
``messages`` selects the n-th non-error step.  Retries of the same request
therefore replay the same step, and a Stop hook that blocks (which adds a user
message after the final answer) moves on to the next step.  Error steps belong
to the non-error step that follows them (or to the end of the script) and are
answered first, while their ``times`` last.  Once the script is exhausted every
request gets a final end_turn "Done.".

Requests without ``tools`` (side requests: titles, summaries, ...) get a short
text (``side_text``) and do not advance the script.

Run standalone for a demo::

    python tests/fake_model.py --port 8765 --script script.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler
from typing import Any

from loopback import LoopbackServer

DEFAULT_USAGE = {"input_tokens": 10, "output_tokens": 5}
FINAL_TEXT = "Done."
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _is_error_step(step: dict) -> bool:
    return "error" in step


class FakeModel(LoopbackServer):
    """Scripted Messages API server; see the module docstring."""

    def __init__(
        self,
        script: list[dict],
        *,
        side_text: str = "ok",
        host: str = "127.0.0.1",
        port: int = 0,
        model: str | None = None,
    ):
        for step in script:
            if not isinstance(step, dict):
                raise TypeError(f"script step must be a dict, not {step!r}")
        self.script = [dict(s) for s in script]
        self.side_text = side_text
        self.host = host
        self.port = port
        self.model = model
        self.url = ""
        self.requests: list[dict] = []  # every JSON body POSTed to /v1/messages
        self.received: list[float] = []  # when each of them came (time.time())
        self.log: list[tuple[str, str]] = []  # (method, path) of every HTTP request
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self.handler = _Handler
        # play steps, each with the error steps that precede it; plus trailing errors
        self._plays: list[dict] = []
        self._pre_errors: list[list[dict]] = []
        pending: list[dict] = []
        for step in self.script:
            if _is_error_step(step):
                step["_left"] = step.get("times")  # None = forever
                pending.append(step)
            else:
                self._plays.append(step)
                self._pre_errors.append(pending)
                pending = []
        self._trailing_errors = pending

    # ------------------------------------------------------------------ helpers for tests
    def wait_for(self, predicate, timeout: float = 30.0) -> bool:
        """Block until ``predicate(self.requests)`` is true (re-checked on every request)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.requests), timeout=timeout)

    def wait_for_requests(self, n: int, timeout: float = 30.0) -> bool:
        return self.wait_for(lambda reqs: len(reqs) >= n, timeout)

    @property
    def main_requests(self) -> list[dict]:
        """Requests that took part in the script (i.e. carried tools)."""
        return [r for r in list(self.requests) if not self.is_side_request(r)]

    # ------------------------------------------------------------------ the model
    @staticmethod
    def is_side_request(body: dict) -> bool:
        return not body.get("tools")

    @staticmethod
    def conversation_index(body: dict) -> int:
        """Number of assistant turns already in the conversation."""
        return sum(1 for m in body.get("messages", []) if m.get("role") == "assistant")

    def _record(self, body: dict) -> None:
        with self._cond:
            self.received.append(time.time())
            self.requests.append(body)
            self._cond.notify_all()

    def choose(self, body: dict) -> dict:
        """Return the step to answer ``body`` with (an error step, a play step, a side reply)."""
        if self.is_side_request(body):
            return {"text": self.side_text, "_side": True}
        k = self.conversation_index(body)
        errors = self._pre_errors[k] if k < len(self._plays) else self._trailing_errors
        with self._cond:
            for err in errors:
                left = err["_left"]
                if left is None:
                    return err
                if left > 0:
                    err["_left"] = left - 1
                    return err
        if k < len(self._plays):
            return self._plays[k]
        return {"text": FINAL_TEXT, "end": True}

    def new_message_id(self) -> str:
        return f"msg_fake_{next(self._ids):04d}_{uuid.uuid4().hex[:12]}"

    @staticmethod
    def new_tool_id() -> str:
        return f"toolu_fake_{uuid.uuid4().hex[:20]}"

    def build_message(self, step: dict, body: dict) -> dict:
        content: list[dict] = []
        if step.get("text"):
            content.append({"type": "text", "text": step["text"]})
        tools = list(step.get("tools", []))
        if "tool" in step:
            tools.insert(0, {"tool": step["tool"], "input": step.get("input", {})})
        for t in tools:
            content.append(
                {
                    "type": "tool_use",
                    "id": self.new_tool_id(),
                    "name": t["tool"],
                    "input": t.get("input", {}),
                }
            )
        if not content:
            content.append({"type": "text", "text": FINAL_TEXT})
        usage = dict(DEFAULT_USAGE)
        usage.update(step.get("usage", {}))
        return {
            "id": self.new_message_id(),
            "type": "message",
            "role": "assistant",
            "model": self.model or body.get("model") or "claude-sonnet-4-5",
            "content": content,
            "stop_reason": "tool_use" if tools else "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": usage["input_tokens"],
                "output_tokens": usage["output_tokens"],
                "cache_creation_input_tokens": usage.get("cache_creation_input_tokens", 0),
                "cache_read_input_tokens": usage.get("cache_read_input_tokens", 0),
            },
        }


def sse_events(msg: dict) -> list[tuple[str, dict]]:
    """The server-sent events that stream ``msg``."""
    start = dict(msg, content=[], stop_reason=None, stop_sequence=None)
    start["usage"] = dict(msg["usage"], output_tokens=1)
    events: list[tuple[str, dict]] = [
        ("message_start", {"type": "message_start", "message": start})
    ]
    for i, block in enumerate(msg["content"]):
        if block["type"] == "text":
            events.append(
                (
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": i,
                        "content_block": {"type": "text", "text": ""},
                    },
                )
            )
            text = block["text"]
            for j in range(0, max(len(text), 1), 64):
                events.append(
                    (
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": i,
                            "delta": {"type": "text_delta", "text": text[j : j + 64]},
                        },
                    )
                )
        else:
            events.append(
                (
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": i,
                        "content_block": {
                            "type": "tool_use",
                            "id": block["id"],
                            "name": block["name"],
                            "input": {},
                        },
                    },
                )
            )
            payload = json.dumps(block["input"])
            for j in range(0, len(payload), 64):
                events.append(
                    (
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": i,
                            "delta": {
                                "type": "input_json_delta",
                                "partial_json": payload[j : j + 64],
                            },
                        },
                    )
                )
        events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    events.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": msg["usage"]["output_tokens"]},
            },
        )
    )
    events.append(("message_stop", {"type": "message_stop"}))
    return events


class _Handler(BaseHTTPRequestHandler):
    @property
    def fake(self) -> FakeModel:
        return self.server.fake

    protocol_version = "HTTP/1.1"
    server_version = "FakeModel/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # quiet

    def _path(self) -> str:
        return self.path.split("?", 1)[0]

    def _send(self, status: int, payload: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("request-id", f"req_fake_{uuid.uuid4().hex[:16]}")
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _json(self, status: int, obj: Any, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def _error(self, status: int, etype: str, message: str, headers: dict | None = None) -> None:
        body = {"type": "error", "error": {"type": etype, "message": message}}
        self._json(status, body, headers)

    def _read_body(self) -> dict | None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def do_HEAD(self) -> None:
        self._send(200, b"", "text/plain")

    def do_GET(self) -> None:
        self.fake.log.append(("GET", self.path))
        if self._path() in ("/", "/health", "/healthz"):
            self._json(200, {"status": "ok"})
        else:
            self._error(404, "not_found_error", f"no such path: {self._path()}")

    def do_POST(self) -> None:
        path = self._path()
        self.fake.log.append(("POST", self.path))
        body = self._read_body()
        if body is None:
            self._error(400, "invalid_request_error", "body is not a JSON object")
            return
        if path == "/v1/messages/count_tokens":
            self._json(200, {"input_tokens": 10})
            return
        if path != "/v1/messages":
            self._error(404, "not_found_error", f"no such path: {path}")
            return
        fake = self.fake
        fake._record(body)
        step = fake.choose(body)
        if step.get("delay"):
            time.sleep(float(step["delay"]))
        if _is_error_step(step):
            status = int(step["error"])
            etype = step.get("type") or _ERROR_TYPES.get(status, "api_error")
            headers = dict(step.get("headers", {}))
            if step.get("should_retry") is not None:
                headers["x-should-retry"] = "true" if step["should_retry"] else "false"
            self._error(status, etype, step.get("message") or f"fake {etype} ({status})", headers)
            return
        msg = fake.build_message(step, body)
        if body.get("stream"):
            out = "".join(
                f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in sse_events(msg)
            ).encode()
            self._send(200, out, "text/event-stream", {"Cache-Control": "no-cache"})
        else:
            self._json(200, msg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--script", help="JSON file with the list of steps (default: empty)")
    ap.add_argument("--side-text", default="ok")
    ap.add_argument("--log", action="store_true", help="print every request body to stderr")
    args = ap.parse_args(argv)
    script: list[dict] = []
    if args.script:
        with open(args.script, encoding="utf-8") as f:
            script = json.load(f)
    fake = FakeModel(script, side_text=args.side_text, host=args.host, port=args.port).start()
    print(f"fake model listening on {fake.url}", flush=True)
    seen = 0
    try:
        while True:
            fake.wait_for_requests(seen + 1, timeout=1.0)
            while seen < len(fake.requests):
                body = fake.requests[seen]
                seen += 1
                kind = "side" if fake.is_side_request(body) else "main"
                print(
                    f"request {seen}: {kind}, {len(body.get('messages', []))} messages,"
                    f" turn {fake.conversation_index(body)}",
                    file=sys.stderr,
                    flush=True,
                )
                if args.log:
                    print(json.dumps(body)[:4000], file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
