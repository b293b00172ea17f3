"""The HTTP clients: `ShepherdAPI` (contract section 2) and `GitHub` (section 4).

Most tests answer through `responses`, which also plays urllib3's status
retries, so one test per status-code path of the contract is cheap. What
`responses` cannot play (a refused connection, which it does not retry, and a
connection dropped after the server acted) is tested against the loopback
FakeShepherd.
"""

from __future__ import annotations

import errno
import json
import re
import threading

import pytest
import requests
import responses
import urllib3.util.connection
from responses import matchers

import shepherd_runner as sr

API = "http://api.test:8081"
TASK = "fix-greeting-1"
BASE = f"{API}/api/v1/tasks/{TASK}"
TOKEN = "ghs_" + "a1B2c3D4e5" * 3 + "f6G7h8"
TASK_DATA = {
    "description": "Fix the greeting",
    "context": "Some context",
    "sourceURL": "https://github.com/acme/widgets/issues/1",
    "repo": {"url": "https://github.com/acme/widgets", "ref": "main"},
}


def make_api(task_id: str = TASK, redact: sr.Redactor | None = None) -> sr.ShepherdAPI:
    # Fast retries: the policy (which answers are retried) is what is under test,
    # not the waiting between tries.
    return sr.ShepherdAPI(
        API,
        task_id,
        retry=sr.api_retry(total=3, backoff=0),
        token_retries=sr.token_retry(total=2, backoff=0),
        redact=redact,
    )


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


class Flaky:
    """A server that answers `status` to its first `failures` requests, then 200.

    State lives in the fake server (like a restarting API), not in a replay
    list: every request is answered from what the server has seen so far.
    """

    def __init__(self, failures: int, status: int, ok_body: object, headers=None) -> None:
        self.failures, self.status, self.ok_body = failures, status, ok_body
        self.headers = headers or {}
        self.seen = 0
        self.lock = threading.Lock()

    def __call__(self, request):
        with self.lock:
            self.seen += 1
            failing = self.seen <= self.failures
        if failing:
            return self.status, self.headers, json.dumps({"error": "temporarily broken"})
        return 200, {}, json.dumps(self.ok_body)


def error_body(error: str, details: str = "") -> dict:
    return {"error": error, "details": details}


# ---------------------------------------------------------------------------
# GET /data
# ---------------------------------------------------------------------------


def test_data_200_returns_the_task_data(rsps):
    rsps.get(f"{BASE}/data", json=TASK_DATA)
    assert make_api().fetch_task_data() == TASK_DATA


def test_data_404_is_an_api_error_naming_the_task(rsps):
    rsps.get(f"{BASE}/data", status=404, json=error_body("task not found"))
    with pytest.raises(sr.ApiError) as caught:
        make_api().fetch_task_data()
    assert caught.value.status == 404
    assert TASK in str(caught.value)
    # A 4xx is an answer, not an outage: asking again cannot change it.
    assert len(rsps.calls) == 1


def test_data_410_means_the_task_is_gone(rsps):
    rsps.get(f"{BASE}/data", status=410, json=error_body("task is terminal"))
    with pytest.raises(sr.TaskGone):
        make_api().fetch_task_data()
    assert len(rsps.calls) == 1


def test_data_500_then_200_is_retried_and_succeeds(rsps):
    server = Flaky(failures=1, status=500, ok_body=TASK_DATA)
    rsps.add_callback(responses.GET, f"{BASE}/data", callback=server)
    assert make_api().fetch_task_data() == TASK_DATA
    assert server.seen == 2


def test_data_500_every_time_gives_up_after_the_retries(rsps):
    server = Flaky(failures=100, status=500, ok_body=TASK_DATA)
    rsps.add_callback(responses.GET, f"{BASE}/data", callback=server)
    with pytest.raises(sr.ApiError) as caught:
        make_api().fetch_task_data()
    assert caught.value.status == 500
    assert "HTTP 500" in str(caught.value)
    assert server.seen == 4  # the first try and total=3 retries


@pytest.mark.parametrize(
    "body",
    [
        b"<html>not json</html>",
        b"[1, 2]",
        json.dumps({"context": "no description"}).encode(),
        json.dumps({"description": "x", "repo": "https://github.com/a/b"}).encode(),
        json.dumps({"description": "x", "repo": {"url": ""}}).encode(),
        json.dumps(
            {"description": "x", "repo": {"url": "https://github.com/a/b", "ref": 3}}
        ).encode(),
        json.dumps({"description": "x", "context": 5, "repo": {"url": "https://h/a/b"}}).encode(),
    ],
    ids=["html", "array", "no-repo", "repo-string", "empty-url", "ref-int", "context-int"],
)
def test_data_malformed_body_is_an_api_error(rsps, body):
    rsps.get(f"{BASE}/data", body=body, content_type="application/json")
    with pytest.raises(sr.ApiError):
        make_api().fetch_task_data()


# ---------------------------------------------------------------------------
# GET /token
# ---------------------------------------------------------------------------


def test_token_200_returns_it_and_adds_it_to_the_redactor(rsps):
    rsps.get(f"{BASE}/token", json={"token": TOKEN, "expiresAt": "2026-11-23T11:00:00Z"})
    redact = sr.Redactor()
    assert make_api(redact=redact).fetch_token().value == TOKEN
    # From now on every log line and status the runner sends hides it.
    assert redact(f"git push https://x:{TOKEN}@h failed, token={TOKEN}") == (
        f"git push https://{sr.Redactor.MASK}@h failed, token={sr.Redactor.MASK}"
    )


def test_token_409_is_an_api_error_saying_already_issued(rsps):
    rsps.get(f"{BASE}/token", status=409, json=error_body("token already issued"))
    with pytest.raises(sr.ApiError) as caught:
        make_api().fetch_token()
    assert caught.value.status == 409
    assert "token already issued" in str(caught.value)
    assert len(rsps.calls) == 1


def test_token_410_means_the_task_is_gone(rsps):
    rsps.get(f"{BASE}/token", status=410, json=error_body("task is terminal"))
    with pytest.raises(sr.TaskGone):
        make_api().fetch_token()
    assert len(rsps.calls) == 1


def test_token_503_says_the_github_app_is_not_configured(rsps):
    rsps.get(f"{BASE}/token", status=503, json=error_body("GitHub App not configured"))
    with pytest.raises(sr.ApiError) as caught:
        make_api().fetch_token()
    assert caught.value.status == 503
    assert "GitHub App is not configured" in str(caught.value)


def test_token_502_says_github_refused_with_the_servers_reason(rsps):
    rsps.get(
        f"{BASE}/token", status=502, json=error_body("GitHub failed", "installation suspended")
    )
    with pytest.raises(sr.ApiError) as caught:
        make_api().fetch_token()
    assert caught.value.status == 502
    assert "GitHub" in str(caught.value) and "installation suspended" in str(caught.value)


def test_token_200_without_a_token_is_an_api_error(rsps):
    rsps.get(f"{BASE}/token", json={"expiresAt": "2026-11-23T11:00:00Z"})
    with pytest.raises(sr.ApiError):
        make_api().fetch_token()


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
def test_token_is_never_retried_after_an_http_answer(rsps, status):
    # The server burns the token before it answers: whatever came back, a
    # second request could only get 409.
    server = Flaky(failures=100, status=status, ok_body={"token": TOKEN})
    rsps.add_callback(responses.GET, f"{BASE}/token", callback=server)
    with pytest.raises(sr.ApiError) as caught:
        make_api().fetch_token()
    assert caught.value.status == status
    assert server.seen == 1


def test_token_is_not_retried_even_when_the_answer_carries_retry_after(rsps):
    # urllib3 retries a 503 with Retry-After even without a status_forcelist.
    server = Flaky(failures=100, status=503, ok_body={"token": TOKEN}, headers={"Retry-After": "0"})
    rsps.add_callback(responses.GET, f"{BASE}/token", callback=server)
    with pytest.raises(sr.ApiError):
        make_api().fetch_token()
    assert server.seen == 1


@pytest.fixture
def refuse_connections(monkeypatch):
    """Refuses the next N connection attempts (to any host), then connects for real.

    A refused connection never reached the server, which is the one case in
    which /token may be asked again. `responses` does not retry raised
    errors, so this runs against the real loopback FakeShepherd.
    """
    real = urllib3.util.connection.create_connection
    state = {"left": 0, "refused": 0}
    lock = threading.Lock()

    def create_connection(address, *args, **kwargs):
        with lock:
            refuse = state["left"] > 0
            if refuse:
                state["left"] -= 1
                state["refused"] += 1
        if refuse:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", create_connection)

    def refuse(count: int) -> dict:
        state["left"] = count
        return state

    return refuse


def token_requests(api) -> int:
    return sum(1 for _, path, _ in api.requests if path.endswith("/token"))


def test_token_is_retried_after_a_refused_connection(api, refuse_connections):
    token = api.add_task(TASK, repo_url="https://github.com/acme/widgets")
    state = refuse_connections(1)
    client = sr.ShepherdAPI(
        api.url, TASK, token_retries=sr.token_retry(total=2, backoff=0),
        retry=sr.api_retry(total=3, backoff=0),
    )  # fmt: skip
    assert client.fetch_token().value == token
    assert state["refused"] == 1
    assert token_requests(api) == 1


def test_token_gives_up_when_every_connection_is_refused(api, refuse_connections):
    api.add_task(TASK, repo_url="https://github.com/acme/widgets")
    state = refuse_connections(100)
    client = sr.ShepherdAPI(api.url, TASK, token_retries=sr.token_retry(total=2, backoff=0))
    with pytest.raises(sr.ApiError) as caught:
        client.fetch_token()
    assert "unreachable" in str(caught.value)
    assert state["refused"] == 3  # the first try and total=2 retries
    assert not api.token_issued(TASK)


def test_token_is_not_asked_again_when_the_answer_is_lost(api):
    # The contract's trap: the server marked the token issued, then the
    # connection died. A retry could only get 409 and hide the real story.
    api.add_task(TASK, repo_url="https://github.com/acme/widgets")
    api.fail_next(TASK, "/token", ["drop-after"])
    client = sr.ShepherdAPI(api.url, TASK, token_retries=sr.token_retry(total=2, backoff=0))
    with pytest.raises(sr.ApiError):
        client.fetch_token()
    assert api.token_issued(TASK)
    assert token_requests(api) == 1


# ---------------------------------------------------------------------------
# POST /status
# ---------------------------------------------------------------------------


def test_status_body_has_event_message_and_details_as_json(rsps):
    rsps.post(f"{BASE}/status", json={"status": "accepted"})
    assert make_api().report_status("completed", "pull request x", {"pr_url": "https://p/1"})
    [call] = rsps.calls
    assert call.request.headers["Content-Type"] == "application/json"
    assert json.loads(call.request.body) == {
        "event": "completed",
        "message": "pull request x",
        "details": {"pr_url": "https://p/1", "prURL": "https://p/1"},  # prURL: the adapter's
    }


def test_status_without_details_sends_event_and_message(rsps):
    rsps.post(f"{BASE}/status", json={"status": "accepted"})
    assert make_api().report_status("started", "runner started the task")
    body = json.loads(rsps.calls[0].request.body)
    assert body["event"] == "started" and body["message"] == "runner started the task"
    assert set(body) <= {"event", "message", "details"}


def test_status_redacts_the_token_in_message_and_details(rsps):
    rsps.post(f"{BASE}/status", json={"status": "accepted"})
    redact = sr.Redactor([TOKEN])
    api = make_api(redact=redact)
    details = {
        "error": f"push to https://x-access-token:{TOKEN}@github.com/a/b failed",
        "nested": {"list": [TOKEN, {"deeper": f"Authorization: Bearer {TOKEN}"}]},
    }
    assert api.report_status("failed", f"git said {TOKEN}", details)
    body = rsps.calls[0].request.body
    body = body.decode() if isinstance(body, bytes) else body
    assert TOKEN not in body
    assert "x-access-token:" not in body  # the URL's credentials are blanked too
    sent = json.loads(body)
    assert sr.Redactor.MASK in sent["message"]
    assert sent["details"]["nested"]["list"][0] == sr.Redactor.MASK


def test_status_accepted_with_already_notified_note_is_true(rsps):
    rsps.post(f"{BASE}/status", json={"status": "accepted", "note": "already notified"})
    assert make_api().report_status("failed", "late") is True


@pytest.mark.parametrize("status", [400, 404, 409, 413, 415])
def test_status_4xx_returns_false_without_retrying(rsps, status):
    rsps.post(f"{BASE}/status", status=status, json=error_body("no"))
    assert make_api().report_status("completed", "done") is False
    assert len(rsps.calls) == 1


@pytest.mark.parametrize("status", [503, 429, 500])
def test_status_transient_answer_is_retried(rsps, status):
    server = Flaky(failures=2, status=status, ok_body={"status": "accepted"})
    rsps.add_callback(responses.POST, f"{BASE}/status", callback=server)
    assert make_api().report_status("completed", "done") is True
    assert server.seen == 3


def test_status_returns_false_when_the_api_is_unreachable(rsps):
    rsps.post(f"{BASE}/status", body=requests.ConnectionError("refused"))
    assert make_api().report_status("completed", "done") is False


def test_status_returns_false_when_retries_run_out(rsps):
    server = Flaky(failures=100, status=503, ok_body={"status": "accepted"})
    rsps.add_callback(responses.POST, f"{BASE}/status", callback=server)
    assert make_api().report_status("completed", "done") is False
    assert server.seen == 4


# ---------------------------------------------------------------------------
# POST /events
# ---------------------------------------------------------------------------

EVENT = {"sequence": 1, "timestamp": "2026-11-23T10:00:00.000Z", "type": "thinking", "summary": "x"}


@pytest.mark.parametrize("status", [200, 400, 404, 410, 415, 500, 503])
def test_events_returns_the_status_code_after_one_attempt(rsps, status):
    # The EventSender owns retries for events (it must keep the order), so the
    # client makes exactly one attempt.
    rsps.post(f"{BASE}/events", status=status, json={"status": "accepted"})
    assert make_api().post_events([EVENT]) == status
    assert len(rsps.calls) == 1
    call = rsps.calls[0]
    assert call.request.headers["Content-Type"] == "application/json"
    assert json.loads(call.request.body) == {"events": [EVENT]}


def test_events_returns_0_when_the_api_is_unreachable(rsps):
    rsps.post(f"{BASE}/events", body=requests.ConnectionError("refused"))
    assert make_api().post_events([EVENT]) == 0


# ---------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------


def test_task_id_is_url_quoted_in_every_path(rsps):
    anything = re.compile(r"http://api\.test:8081/.*")
    accepted = json.dumps({"status": "accepted"})
    rsps.add_callback(responses.GET, anything, callback=lambda r: (200, {}, json.dumps(TASK_DATA)))
    rsps.add_callback(responses.POST, anything, callback=lambda r: (200, {}, accepted))
    api = make_api(task_id="a b/c?d#e")
    api.fetch_task_data()
    api.report_status("started", "x")
    api.post_events([EVENT])
    paths = [requests.utils.urlparse(c.request.url).path for c in rsps.calls]
    prefix = "/api/v1/tasks/a%20b%2Fc%3Fd%23e/"
    assert paths == [prefix + "data", prefix + "status", prefix + "events"]


def test_api_url_trailing_slash_does_not_double_the_slash(rsps):
    rsps.get(f"{BASE}/data", json=TASK_DATA)
    sr.ShepherdAPI(API + "/", TASK, retry=sr.api_retry(total=0, backoff=0)).fetch_task_data()
    assert rsps.calls[0].request.url == f"{BASE}/data"


# ---------------------------------------------------------------------------
# GitHub
# ---------------------------------------------------------------------------

GH = "https://api.github.com/repos/acme/widgets"
GH_TOKEN = "ghs_" + "Zz9Yy8Xx7W" * 3 + "w6Vv5U"
BRANCH = "shepherd/fix-greeting-1"


def make_github(url: str = "https://github.com/acme/widgets.git") -> sr.GitHub:
    return sr.GitHub(sr.parse_repo_url(url), GH_TOKEN)


def test_find_pull_queries_open_pulls_of_head_owner_branch_with_bearer(rsps):
    pull = {"number": 7, "html_url": "https://github.com/acme/widgets/pull/7"}
    rsps.get(
        f"{GH}/pulls",
        json=[pull],
        match=[
            matchers.query_param_matcher({"head": f"acme:{BRANCH}", "state": "open"}),
            matchers.header_matcher({"Authorization": f"Bearer {GH_TOKEN}"}),
        ],
    )
    assert make_github().find_pull(BRANCH) == pull


def test_find_pull_returns_none_when_there_is_no_pull(rsps):
    rsps.get(f"{GH}/pulls", json=[])
    assert make_github().find_pull(BRANCH) is None


def test_find_pull_retries_a_github_5xx(rsps):
    server = Flaky(failures=1, status=502, ok_body=[])
    rsps.add_callback(responses.GET, f"{GH}/pulls", callback=server)
    assert make_github().find_pull(BRANCH) is None
    assert server.seen == 2


def test_create_pull_201_returns_the_pull_and_sends_the_fields(rsps):
    pull = {"number": 8, "html_url": "https://github.com/acme/widgets/pull/8"}
    rsps.post(
        f"{GH}/pulls",
        status=201,
        json=pull,
        match=[matchers.header_matcher({"Authorization": f"Bearer {GH_TOKEN}"})],
    )
    got = make_github().create_pull(title="T", head=BRANCH, base="main", body="B", draft=False)
    assert got == pull
    sent = json.loads(rsps.calls[0].request.body)
    assert {k: sent[k] for k in ("title", "head", "base", "body")} == {
        "title": "T", "head": BRANCH, "base": "main", "body": "B",
    }  # fmt: skip


def test_create_pull_is_not_retried_on_5xx(rsps):
    # A POST that reached GitHub may have opened the PR: a second could open another.
    rsps.post(f"{GH}/pulls", status=502, json={"message": "Server Error"})
    with pytest.raises(sr.GitHubError):
        make_github().create_pull(title="T", head=BRANCH, base="main", body="B", draft=False)
    assert len(rsps.calls) == 1


@pytest.mark.parametrize(
    ("status", "body", "words"),
    [
        (401, {"message": "Bad credentials"}, ["rejected the token", "Bad credentials"]),
        (
            403,
            {"message": "Resource not accessible by integration"},
            ["permission", "Resource not accessible by integration"],
        ),
        (404, {"message": "Not Found"}, ["cannot see the repository", "Not Found"]),
        (
            422,
            {
                "message": "Validation Failed",
                "errors": [{"message": f"A pull request already exists for acme:{BRANCH}."}],
            },
            ["refused to create the pull request", "Validation Failed", "already exists"],
        ),
    ],
    ids=["401", "403", "404", "422"],
)
def test_github_error_messages_are_precise_and_token_free(rsps, status, body, words):
    rsps.post(f"{GH}/pulls", status=status, json=body)
    with pytest.raises(sr.GitHubError) as caught:
        make_github().create_pull(title="T", head=BRANCH, base="main", body="B", draft=False)
    message = str(caught.value)
    assert f"HTTP {status}" in message
    assert "acme/widgets" in message
    for word in words:
        assert word in message
    assert GH_TOKEN not in message
    assert GH_TOKEN[4:12] not in message


def test_github_unreachable_is_a_github_error_without_the_token(rsps):
    rsps.get(f"{GH}/pulls", body=requests.ConnectionError("Connection refused"))
    with pytest.raises(sr.GitHubError) as caught:
        make_github().find_pull(BRANCH)
    assert "unreachable" in str(caught.value)
    assert GH_TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "api_base"),
    [
        ("https://github.com/acme/widgets", "https://api.github.com"),
        ("https://github.com/acme/widgets.git", "https://api.github.com"),
        ("https://ghe.example.com/acme/widgets.git", "https://ghe.example.com/api/v3"),
        ("https://ghe.example.com:8443/acme/widgets", "https://ghe.example.com:8443/api/v3"),
    ],
)
def test_github_api_base_is_derived_from_the_repository_host(rsps, url, api_base):
    rsps.get(f"{api_base}/repos/acme/widgets/pulls", json=[])
    assert make_github(url).find_pull(BRANCH) is None
    assert rsps.calls[0].request.url.startswith(f"{api_base}/repos/acme/widgets/pulls?")


def test_github_api_url_setting_overrides_the_derived_base(rsps):
    rsps.get("https://gh.internal/api/repos/acme/widgets/pulls", json=[])
    gh = sr.GitHub(sr.parse_repo_url("https://github.com/acme/widgets"), GH_TOKEN,
                   api_url="https://gh.internal/api/")  # fmt: skip
    assert gh.find_pull(BRANCH) is None


def test_github_com_host_is_recognised_whatever_its_case():
    # Host names are case-insensitive (RFC 3986 3.2.2): GitHub.com is github.com.
    assert sr.parse_repo_url("https://GitHub.com/acme/widgets").api_url == "https://api.github.com"


# ---------------------------------------------------------------------------
# parse_repo_url
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host", "owner", "name"),
    [
        ("https://github.com/acme/widgets", "github.com", "acme", "widgets"),
        ("https://github.com/acme/widgets.git", "github.com", "acme", "widgets"),
        ("https://github.com/acme/widgets/", "github.com", "acme", "widgets"),
        ("https://github.com/my-org/my.repo_2.git", "github.com", "my-org", "my.repo_2"),
        ("https://ghe.example.com:8443/team/tool.git", "ghe.example.com:8443", "team", "tool"),
        ("http://ghe.local/team/tool", "ghe.local", "team", "tool"),
    ],
)
def test_parse_repo_url_accepts_https_repository_urls(url, host, owner, name):
    repo = sr.parse_repo_url(url)
    assert (repo.host, repo.owner, repo.name) == (host, owner, name)
    assert repo.url == url


@pytest.mark.parametrize(
    "url",
    [
        "ssh://git@github.com/acme/widgets.git",
        "git@github.com:acme/widgets.git",
        "file:///srv/git/widgets.git",
        "/srv/git/widgets.git",
        "../widgets",
        "--upload-pack=touch /tmp/pwned",
        "https://user:secret@github.com/acme/widgets",
        "https://x-access-token@github.com/acme/widgets",
        "https://github.com/acme/widgets/tree/main",
        "https://github.com/acme",
        "https://github.com/",
        "https:///acme/widgets",
        "https://github.com/acme/widgets?x=1",
        "https://github.com/acme/widgets#frag",
        "https://github.com/-acme/widgets",
        "https://github.com/acme/..",
        "ext::sh -c touch% /tmp/pwned",
        "",
    ],
)
def test_parse_repo_url_refuses_anything_but_https_owner_repo(url):
    with pytest.raises(sr.Failure) as caught:
        sr.parse_repo_url(url)
    # The reason must not echo credentials back into logs and statuses.
    assert "secret" not in caught.value.message


@pytest.mark.parametrize(
    "url",
    ["https://github.com/acme\n/widgets", "https://git\thub.com/acme/widgets",
     "https://github.com/acme/wid\rgets"],
    ids=["newline", "tab", "carriage-return"],
)  # fmt: skip
def test_parse_repo_url_refuses_control_characters(url):
    # urlsplit silently drops tabs and newlines, so the checks pass on a
    # cleaned URL while the raw one (with the control character) would be
    # handed to git: the URL git gets must be the URL that was checked.
    with pytest.raises(sr.Failure):
        sr.parse_repo_url(url)
