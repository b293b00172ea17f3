"""The assignment server (:8888), the real one on a loopback port.

Requests go through http.client or raw sockets, never `requests`, so nothing
can intercept them: what is tested is what the operator's HTTP client sees.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import os
import signal
import socket
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shepherd_runner as sr
from harness import Runner, runner_env

API_URL = "http://shepherd-api.shepherd.svc.cluster.local:8081"
VALID = {"taskID": "fix-greeting-1", "apiURL": API_URL}


@contextlib.contextmanager
def running_server(allowed: tuple[str, ...] = ()):
    server = sr.AssignmentServer(("127.0.0.1", 0), allowed, threading.Event())
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def server():
    with running_server() as srv:
        yield srv


def request(server, method, path, body=None, headers=None):
    """(status, headers, body) of one request over http.client."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=15)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def post_task(server, payload, content_type="application/json"):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, _, data = request(server, "POST", "/task", body, {"Content-Type": content_type})
    return status, data


def raw(server, data: bytes, *, shut_write: bool = True) -> tuple[int | None, bytes]:
    """Sends raw bytes, returns (status or None, whole answer).

    The bytes are sent from another thread while this one reads: a server that
    answers before reading everything (413) must still be heard.
    """
    sock = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=15)

    def send():
        with contextlib.suppress(OSError):  # the server may close early: that is allowed
            sock.sendall(data)
            if shut_write:
                sock.shutdown(socket.SHUT_WR)  # EOF: a short body ends here

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass  # what came before the reset is the answer
    finally:
        sender.join(15)
        sock.close()
    answer = b"".join(chunks)
    first = answer.split(b"\r\n", 1)[0].split()
    status = int(first[1]) if len(first) >= 2 and first[0].startswith(b"HTTP/") else None
    return status, answer


def healthy(server) -> bool:
    status, _, body = request(server, "GET", "/healthz")
    return status == 200 and body == b"ok"


# ---------------------------------------------------------------------------
# /healthz and the happy path
# ---------------------------------------------------------------------------


def test_healthz_get_answers_200_ok(server):
    status, headers, body = request(server, "GET", "/healthz")
    assert (status, body) == (200, b"ok")
    assert headers["Content-Type"].startswith("text/plain")


def test_healthz_head_answers_200_without_a_body(server):
    status, _, body = request(server, "HEAD", "/healthz")
    assert (status, body) == (200, b"")


def test_valid_assignment_is_accepted_and_wakes_the_runner(server):
    assert not server.wake.is_set()
    status, body = post_task(server, VALID)
    assert status == 200
    assert json.loads(body) == {"status": "accepted"}
    # The handler sets the Event after its answer is written: wait for it.
    assert server.wake.wait(10)
    assert server.assignment == sr.Assignment("fix-greeting-1", API_URL)


def test_api_url_trailing_slash_is_removed(server):
    status, _ = post_task(server, {"taskID": "t", "apiURL": API_URL + "/"})
    assert status == 200
    assert server.assignment.api_url == API_URL


def test_longest_valid_task_id_is_accepted(server):
    task_id = "a" * 253  # DNS-1123 subdomains go up to 253 characters
    status, _ = post_task(server, {"taskID": task_id, "apiURL": API_URL})
    assert status == 200
    assert server.assignment.task_id == task_id


def test_second_assignment_gets_409(server):
    assert post_task(server, VALID)[0] == 200
    status, body = post_task(server, {"taskID": "other-task", "apiURL": API_URL})
    assert status == 409
    assert json.loads(body)["taskID"] == "fix-greeting-1"
    # The first assignment stands.
    assert server.assignment.task_id == "fix-greeting-1"


def test_operator_retry_of_the_same_assignment_gets_409(server):
    # 409 is success to the operator: it re-sends after a crash.
    assert post_task(server, VALID)[0] == 200
    assert post_task(server, VALID)[0] == 409


def test_concurrent_assignments_exactly_one_wins(server):
    count = 50
    barrier = threading.Barrier(count)
    statuses: list[int | str] = []
    lock = threading.Lock()

    def assign(i):
        barrier.wait()
        try:
            status = post_task(server, {"taskID": f"task-{i}", "apiURL": API_URL})[0]
        except OSError as exc:  # a refused or reset connection is a wrong answer too
            status = repr(exc)
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=assign, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(statuses, key=str) == [200] + [409] * (count - 1), statuses
    assert server.assignment is not None and server.assignment.task_id.startswith("task-")


# ---------------------------------------------------------------------------
# refused assignments
# ---------------------------------------------------------------------------

BAD_BODIES = {
    "not-json": b"taskID=x&apiURL=y",
    "not-utf8": b"\xff\xfe{}",
    "json-array": json.dumps([VALID]).encode(),
    "json-string": b'"fix-greeting-1"',
    "json-null": b"null",
    "empty": b"",
    "deep-nesting": b"[" * 100_000 + b"]" * 100_000,
    "missing-taskID": json.dumps({"apiURL": API_URL}).encode(),
    "missing-apiURL": json.dumps({"taskID": "t"}).encode(),
    "taskID-number": json.dumps({"taskID": 7, "apiURL": API_URL}).encode(),
    "taskID-null": json.dumps({"taskID": None, "apiURL": API_URL}).encode(),
    "apiURL-list": json.dumps({"taskID": "t", "apiURL": [API_URL]}).encode(),
}

BAD_TASK_IDS = {
    "uppercase": "Fix-Greeting",
    "leading-dashes": "--x",
    "slash": "a/b",
    "too-long": "a" * 254,
    "dot-dot": "..",
    "empty": "",
    "trailing-dash": "abc-",
    "space": "a b",
    "newline": "abc\n",
    "unicode": "tâche",
}

BAD_API_URLS = {
    "ftp": "ftp://shepherd-api:8081",
    "relative": "/api/v1",
    "no-host": "http://",
    "credentials": "http://user:pass@shepherd-api:8081",
    "spaces": "http://shepherd-api:8081/a b",
    "bad-port": "http://shepherd-api:99999",
    "query": "http://shepherd-api:8081?x=1",
    "empty": "",
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_malformed_assignment_body_gets_400(server, body):
    status, data = post_task(server, body)
    assert status == 400
    assert json.loads(data)["error"]
    assert server.assignment is None and not server.wake.is_set()


@pytest.mark.parametrize("task_id", BAD_TASK_IDS.values(), ids=BAD_TASK_IDS.keys())
def test_task_id_that_is_not_a_kubernetes_name_gets_400(server, task_id):
    status, data = post_task(server, {"taskID": task_id, "apiURL": API_URL})
    assert status == 400
    assert "taskID" in json.loads(data)["error"]
    assert server.assignment is None


@pytest.mark.parametrize("api_url", BAD_API_URLS.values(), ids=BAD_API_URLS.keys())
def test_api_url_that_is_not_an_absolute_http_url_gets_400(server, api_url):
    status, data = post_task(server, {"taskID": "t", "apiURL": api_url})
    assert status == 400
    assert "apiURL" in json.loads(data)["error"]
    assert server.assignment is None


def test_api_url_outside_the_allowed_list_gets_403():
    with running_server(allowed=(API_URL,)) as srv:
        status, _ = post_task(srv, {"taskID": "t", "apiURL": "http://evil.example:8081"})
        assert status == 403
        assert srv.assignment is None
        # ... and one on the list is taken.
        assert post_task(srv, {"taskID": "t", "apiURL": API_URL + "/"})[0] == 200


def test_body_over_one_mib_gets_413(server):
    size = sr.MAX_ASSIGNMENT_BYTES + 1
    head = (
        b"POST /task HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(size).encode() + b"\r\n\r\n"
    )
    status, _ = raw(server, head + b" " * size)
    assert status == 413
    assert server.assignment is None
    assert healthy(server)


def test_huge_content_length_gets_413_without_waiting_for_the_body(server):
    head = b"POST /task HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n"
    status, _ = raw(server, head + b"{}", shut_write=False)
    assert status == 413


def test_post_without_content_length_gets_411(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=15)
    try:
        # http.client adds Content-Length to a POST by itself: build it by hand.
        conn.putrequest("POST", "/task")
        conn.putheader("Content-Type", "application/json")
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 411
    finally:
        conn.close()
    assert server.assignment is None


@pytest.mark.parametrize("value", ["-1", "abc", "1e3", " ", "+5"])
def test_unusable_content_length_gets_a_4xx(server, value):
    data = f"POST /task HTTP/1.1\r\nHost: x\r\nContent-Length: {value}\r\n\r\n{{}}".encode()
    status, _ = raw(server, data)
    assert status is not None and 400 <= status < 500


@pytest.mark.parametrize("value", ["\u00b2", "\u00b9", "\u00b3"], ids=["sup2", "sup1", "sup3"])
def test_content_length_with_a_superscript_digit_gets_a_4xx(server, value):
    # Header bytes are read as Latin-1; "²" passes str.isdigit() but int()
    # refuses it, which must still end in an answer, not a dropped connection.
    data = b"POST /task HTTP/1.1\r\nHost: x\r\nContent-Length: " + value.encode("latin-1")
    status, _ = raw(server, data + b"\r\n\r\n{}")
    assert status is not None and 400 <= status < 500
    assert healthy(server)


def test_unknown_path_gets_404(server):
    for method in ("GET", "POST", "HEAD"):
        status, _, _ = request(server, method, "/nope", body=b"{}" if method == "POST" else None)
        assert status == 404, method


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/task"),
        ("PUT", "/task"),
        ("DELETE", "/task"),
        ("PATCH", "/task"),
        ("BREW", "/task"),
        ("POST", "/healthz"),
        ("PUT", "/healthz"),
        ("DELETE", "/healthz"),
        ("BREW", "/healthz"),
    ],
)
def test_wrong_method_gets_405(server, method, path):
    body = json.dumps(VALID).encode() if method != "GET" else None
    status, _, _ = request(server, method, path, body=body)
    assert status == 405
    assert server.assignment is None


GARBAGE_REQUESTS = {
    "binary": b"\x00\x01\x02garbage\xff\r\n\r\n",
    "one-word": b"HELLO\r\n\r\n",
    "too-many-words": b"GET /healthz HTTP/1.1 extra\r\n\r\n",
    "bad-version": b"GET /healthz HTTP/x.y\r\n\r\n",
    "http-2": b"GET /healthz HTTP/2.0\r\n\r\n",
    "long-line": b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
    "bad-header": b"POST /task HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
    "tls-hello": bytes.fromhex("16030100a5010000a10303") + b"\x00" * 40,
}


@pytest.mark.parametrize("data", GARBAGE_REQUESTS.values(), ids=GARBAGE_REQUESTS.keys())
def test_garbage_request_gets_a_4xx(server, data):
    status, _ = raw(server, data)
    assert status is not None and 400 <= status < 500, status
    assert healthy(server)


def test_server_stays_healthy_and_never_answers_5xx_after_all_bad_input(server):
    statuses = []
    for body in BAD_BODIES.values():
        statuses.append(post_task(server, body)[0])
    for task_id in BAD_TASK_IDS.values():
        statuses.append(post_task(server, {"taskID": task_id, "apiURL": API_URL})[0])
    for api_url in BAD_API_URLS.values():
        statuses.append(post_task(server, {"taskID": "t", "apiURL": api_url})[0])
    for data in GARBAGE_REQUESTS.values():
        statuses.append(raw(server, data)[0])
    for method in ("PUT", "DELETE", "BREW", "OPTIONS"):
        statuses.append(request(server, method, "/task")[0])
    assert all(s is not None and 400 <= s < 500 for s in statuses), statuses
    assert healthy(server)
    assert server.assignment is None
    # ... and it still takes the real assignment.
    assert post_task(server, VALID)[0] == 200


# ---------------------------------------------------------------------------
# main(): the address is taken
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def process_state_restored():
    """main() installs signal handlers, a wakeup fd and log handlers: put them back."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    old_fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(old_fd)
    logger = logging.getLogger("shepherd_runner")
    log_state = (list(logger.handlers), logger.level, logger.propagate)
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        ours = signal.set_wakeup_fd(old_fd)
        if ours not in (-1, old_fd):
            with contextlib.suppress(OSError):
                os.close(ours)  # ends the runner's signal thread
        logger.handlers[:], logger.level, logger.propagate = log_state


def test_serve_on_a_busy_port_exits_with_exit_listen_and_says_why():
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        out = io.StringIO()
        with process_state_restored():
            code = sr.main(["serve", "--addr", f"127.0.0.1:{port}"], environ={}, stdout=out)
    finally:
        holder.close()
    assert code == sr.EXIT_LISTEN
    assert "cannot listen" in out.getvalue()
    assert f"127.0.0.1:{port}" in out.getvalue()


def test_the_port_is_closed_once_the_task_flow_has_begun(tmp_path, api):
    api.add_task("fix-greeting-1", repo_url="http://127.0.0.1:9/acme/widgets.git")
    api.set_delay("/status", 60)  # holds the task flow at its first step
    runner = Runner(runner_env(tmp_path, claude_bin="claude"))
    try:
        runner.assign("fix-greeting-1", api.url)
        runner.wait_for(r" INFO task flow started ")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", runner.port), timeout=10).close()
    finally:
        runner.kill()


# ---------------------------------------------------------------------------
# property: whatever arrives, the answer is a 4xx (or the contract's 200/409)
# ---------------------------------------------------------------------------

METHODS = st.one_of(
    st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"]),
    st.from_regex(r"\A[A-Za-z]{1,12}\Z"),
)
# A path always starts with "/" and has no newline, so the request line keeps
# three words: two words would be an HTTP/0.9 request, answered without a
# status line by design of HTTP/0.9.
PATHS = st.one_of(
    st.sampled_from(["/task", "/healthz", "/", "/task?x=1", "/healthz/", "/task/../task"]),
    st.text(
        st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=80
    ).map(lambda s: "/" + s),
)
HEADER_NAMES = st.one_of(
    st.sampled_from(
        ["Content-Length", "Content-Type", "Transfer-Encoding", "Expect", "Connection", "Host"]
    ),
    st.from_regex(r"\A[A-Za-z0-9-]{1,20}\Z"),
)
HEADER_VALUES = st.text(
    st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=60
)
BODIES = st.one_of(
    st.binary(max_size=2000),
    st.sampled_from([json.dumps(VALID).encode(), b"{}", b"[]", b"null"]),
    st.fixed_dictionaries(
        {"taskID": st.one_of(st.text(max_size=30), st.integers()), "apiURL": st.text(max_size=40)}
    ).map(lambda d: json.dumps(d).encode()),
)
CONTENT_LENGTHS = st.one_of(
    st.just("exact"),
    st.none(),
    st.integers(min_value=0, max_value=5000).map(str),
    st.sampled_from(["-1", "abc", "", " 5", "99999999999"]),
)


@st.composite
def http_requests(draw):
    method, path, body = draw(METHODS), draw(PATHS), draw(BODIES)
    headers = draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=5))
    headers = [(n, v) for n, v in headers if n.lower() != "content-length"]
    length = draw(CONTENT_LENGTHS)
    if length == "exact":
        headers.append(("Content-Length", str(len(body))))
    elif length is not None:
        headers.append(("Content-Length", length))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
    return method, path, head.encode("utf-8") + b"\r\n" + body


def test_arbitrary_requests_always_get_a_4xx_or_the_contracts_answers():
    with running_server() as srv:

        @settings(
            max_examples=200,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(http_requests())
        def check(req):
            method, path, data = req
            status, answer = raw(srv, data)
            assert status is not None, (data[:200], answer[:200])
            ok = status in (200, 409) or 400 <= status < 500
            assert ok, (status, data[:200])

        check()
        assert healthy(srv)
