"""The fixture servers behave like the contract, proved with real clients."""

import json
import os
import re
import socket
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
import requests

from fake_github import FakeGitHub
from fake_shepherd import FakeShepherd

TOKEN = "ghs_fixture_token_0123456789"
CREDENTIAL_HELPER = (
    '!f() { test "$1" = get && echo username=x-access-token && echo "password=$GH_TOKEN"; }; f'
)
EVENT = {
    "sequence": 1,
    "timestamp": "2026-11-23T10:00:00Z",
    "type": "tool_call",
    "summary": "Read README.md",
    "tool": "Read",
    "input": {"file_path": "README.md"},
    "output": {"success": True, "summary": "12 lines"},
    "metadata": {"id": "toolu_1"},
}


# -- shared helpers ------------------------------------------------------------


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[user]\n\tname = Test\n\temail = test@example.invalid\n")
    return home


def git_env(home, token=None):
    """A clean environment; with a token, git gets it from a credential helper."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
    }
    if token is not None:
        env |= {
            "GH_TOKEN": token,
            "GIT_CONFIG_COUNT": "2",
            "GIT_CONFIG_KEY_0": "credential.helper",
            "GIT_CONFIG_VALUE_0": "",  # drops any helper configured elsewhere
            "GIT_CONFIG_KEY_1": "credential.helper",
            "GIT_CONFIG_VALUE_1": CREDENTIAL_HELPER,
        }
    return env


def git(*args, env, cwd=None, check=True):
    out = subprocess.run(
        ["git", *map(str, args)],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if check and out.returncode != 0:
        raise AssertionError(f"git {' '.join(map(str, args))} failed:\n{out.stderr}")
    return out


# -- FakeShepherd --------------------------------------------------------------


@pytest.fixture
def shepherd():
    with FakeShepherd() as server:
        yield server


def task_url(shepherd, task_id, suffix):
    return f"{shepherd.url}/api/v1/tasks/{task_id}{suffix}"


def post(shepherd, task_id, suffix, body, **kwargs):
    return requests.post(task_url(shepherd, task_id, suffix), json=body, timeout=5, **kwargs)


def test_healthz_and_unknown_task(shepherd):
    health = requests.get(shepherd.url + "/healthz", timeout=5)
    assert (health.status_code, health.text) == (200, "ok")
    for suffix in ("/data", "/token"):
        r = requests.get(task_url(shepherd, "nope", suffix), timeout=5)
        assert r.status_code == 404
        assert set(r.json()) == {"error", "details"}
    assert post(shepherd, "nope", "/status", {"event": "started"}).status_code == 404
    assert post(shepherd, "nope", "/events", {"events": [EVENT]}).status_code == 404


def test_data_leaves_out_empty_optional_fields(shepherd):
    shepherd.add_task("t1", repo_url="https://github.com/o/r.git", ref="dev")
    shepherd.add_task("t2", repo_url="https://github.com/o/r.git", source_url="")
    data = requests.get(task_url(shepherd, "t1", "/data"), timeout=5).json()
    assert data == {
        "description": "Fix the greeting",
        "context": "Some context",
        "sourceURL": "https://github.com/o/r/issues/1",
        "repo": {"url": "https://github.com/o/r.git", "ref": "dev"},
    }
    data = requests.get(task_url(shepherd, "t2", "/data"), timeout=5).json()
    assert "sourceURL" not in data
    assert data["repo"] == {"url": "https://github.com/o/r.git"}


def test_token_is_one_time(shepherd):
    token = shepherd.add_task("t", repo_url="u")
    first = requests.get(task_url(shepherd, "t", "/token"), timeout=5)
    assert first.status_code == 200
    assert first.json()["token"] == token
    assert token.startswith("ghs_")
    expires = datetime.fromisoformat(first.json()["expiresAt"].replace("Z", "+00:00"))
    assert expires.tzinfo is not None
    second = requests.get(task_url(shepherd, "t", "/token"), timeout=5)
    assert second.status_code == 409
    assert second.json()["error"] == "token already issued"


def test_terminal_task_is_gone(shepherd):
    shepherd.add_task("t", repo_url="u")
    assert post(shepherd, "t", "/status", {"event": "failed", "details": {"error": "x"}}).ok
    for suffix in ("/data", "/token"):
        assert requests.get(task_url(shepherd, "t", suffix), timeout=5).status_code == 410
    assert post(shepherd, "t", "/events", {"events": [EVENT]}).status_code == 410
    assert shepherd.events("t") == []
    assert not shepherd.token_issued("t")


def test_first_terminal_wins(shepherd):
    shepherd.add_task("t", repo_url="u")
    answers = [
        post(shepherd, "t", "/status", body).json()
        for body in (
            {"event": "started", "message": "cloning"},
            {"event": "completed", "details": {"pr_url": "https://x/pull/1"}},
            {"event": "failed", "details": {"error": "late"}},
            {"event": "progress", "message": "still here"},
        )
    ]
    assert answers == [
        {"status": "accepted"},
        {"status": "accepted"},
        {"status": "accepted", "note": "already notified"},
        {"status": "accepted"},
    ]
    kinds = [s["_accepted_as"] for s in shepherd.statuses("t")]
    assert kinds == ["non-terminal", "first-terminal", "already-notified", "non-terminal"]
    assert shepherd.terminal("t") == {
        "event": "completed",
        "details": {"pr_url": "https://x/pull/1"},
    }


def test_posts_need_json_content_type(shepherd):
    shepherd.add_task("t", repo_url="u")
    body = json.dumps({"event": "started"})
    for suffix in ("/status", "/events"):
        url = task_url(shepherd, "t", suffix)
        for headers in ({"Content-Type": "text/plain"}, {}):
            r = requests.post(url, data=body, headers=headers, timeout=5)
            assert r.status_code == 415, (suffix, headers)
            assert r.json()["error"] == "Content-Type must be application/json"
    r = requests.post(
        task_url(shepherd, "t", "/status"),
        data=body,
        headers={"Content-Type": "application/json; charset=utf-8"},
        timeout=5,
    )
    assert r.status_code == 200
    # Rejected requests are recorded too, with their headers.
    rejected = [r for r in shepherd.requests if r[0] == "POST"][:4]
    assert [h.get("Content-Type") for _, _, h in rejected] == ["text/plain", None] * 2


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"\xff\xfe",
        b"[]",
        b'{"message": "no event"}',
        b'{"event": "finished"}',
        b'{"event": ["started"]}',
        b'{"event": "started", "details": "not an object"}',
        b'{"event": "started", "message": 3}',
    ],
)
def test_bad_status_is_400(shepherd, body):
    shepherd.add_task("t", repo_url="u")
    r = requests.post(
        task_url(shepherd, "t", "/status"),
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=5,
    )
    assert r.status_code == 400
    assert set(r.json()) == {"error", "details"}
    assert shepherd.statuses("t") == []


@pytest.mark.parametrize(
    "change",
    [
        {"sequence": 0},
        {"sequence": -1},
        {"sequence": 1.0},
        {"sequence": True},
        {"sequence": "1"},
        {"sequence": 2**63},
        {"timestamp": "yesterday"},
        {"timestamp": "2026-11-23"},
        {"timestamp": "2026-11-23T10:00:00"},  # no offset
        {"timestamp": "2026-13-23T10:00:00Z"},
        {"timestamp": 1700000000},
        {"type": "text"},
        {"type": ["thinking"]},
        {"summary": ""},
        {"summary": None},
        {"tool": 1},
        {"input": "x"},
        {"input": None},
        {"output": {"summary": "no success"}},
        {"output": {"success": "yes"}},
        {"output": {"success": True, "summary": 1}},
        {"output": []},
        {"metadata": []},
    ],
)
def test_invalid_event_is_400(shepherd, change):
    shepherd.add_task("t", repo_url="u")
    bad = {**EVENT, **change}
    r = post(shepherd, "t", "/events", {"events": [{**EVENT, "sequence": 1}, bad]})
    assert r.status_code == 400, change
    assert shepherd.events("t") == []
    assert shepherd.event_posts("t") == 0


@pytest.mark.parametrize("key", ["sequence", "timestamp", "type", "summary"])
def test_event_missing_required_field_is_400(shepherd, key):
    shepherd.add_task("t", repo_url="u")
    event = {k: v for k, v in EVENT.items() if k != key}
    assert post(shepherd, "t", "/events", {"events": [event]}).status_code == 400


def test_events_accepted_in_order(shepherd):
    shepherd.add_task("t", repo_url="u")
    minimal = {
        "sequence": 2,
        "timestamp": "2026-11-23T10:00:01.123456789+01:00",
        "type": "thinking",
        "summary": "hmm",
    }
    assert post(shepherd, "t", "/events", {"events": [EVENT, minimal]}).json() == {
        "status": "accepted"
    }
    assert post(shepherd, "t", "/events", {"events": [{**minimal, "sequence": 3}]}).ok
    for body in ({"events": []}, {}, {"events": "x"}, []):
        assert post(shepherd, "t", "/events", body).status_code == 400
    assert [e["sequence"] for e in shepherd.events("t")] == [1, 2, 3]
    assert shepherd.event_posts("t") == 2


def test_events_over_10_mib_are_413(shepherd):
    shepherd.add_task("t", repo_url="u")
    huge = {"events": [{**EVENT, "summary": "x" * (10 << 20)}]}
    assert post(shepherd, "t", "/events", huge).status_code == 413
    assert post(shepherd, "t", "/events", {"events": [EVENT]}).ok


def test_fail_next(shepherd):
    shepherd.add_task("t", repo_url="u")
    shepherd.fail_next("t", "/token", [503, "drop"])
    url = task_url(shepherd, "t", "/token")
    assert requests.get(url, timeout=5).status_code == 503
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=5)
    assert not shepherd.token_issued("t")
    assert requests.get(url, timeout=5).status_code == 200

    shepherd.fail_next("t", "/status", [500])
    assert post(shepherd, "t", "/status", {"event": "completed"}).status_code == 500
    assert shepherd.terminal("t") is None
    assert len(shepherd.requests) == 4


def test_drop_after_acts_then_loses_the_response(shepherd):
    shepherd.add_task("t", repo_url="u")
    shepherd.fail_next("t", "/token", ["drop-after"])
    shepherd.fail_next("t", "/status", ["drop-after"])
    with pytest.raises(requests.ConnectionError):
        requests.get(task_url(shepherd, "t", "/token"), timeout=5)
    assert requests.get(task_url(shepherd, "t", "/token"), timeout=5).status_code == 409
    with pytest.raises(requests.ConnectionError):
        post(shepherd, "t", "/status", {"event": "failed"})
    assert shepherd.terminal("t") == {"event": "failed"}


def test_set_delay(shepherd):
    shepherd.add_task("t", repo_url="u")
    shepherd.set_delay("/data", 5)
    with pytest.raises(requests.ReadTimeout):
        requests.get(task_url(shepherd, "t", "/data"), timeout=0.2)
    shepherd.set_delay("/data", 0)
    assert requests.get(task_url(shepherd, "t", "/data"), timeout=5).ok


def test_wait_terminal(shepherd):
    shepherd.add_task("t", repo_url="u")
    with pytest.raises(AssertionError, match="no terminal status"):
        shepherd.wait_terminal("t", timeout=0.05)
    poster = threading.Thread(target=post, args=(shepherd, "t", "/status", {"event": "completed"}))
    poster.start()
    assert shepherd.wait_terminal("t", timeout=10)["event"] == "completed"
    poster.join()


def test_survives_garbage(shepherd):
    shepherd.add_task("t", repo_url="u")
    with socket.create_connection(("127.0.0.1", int(shepherd.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"\x00\x01 / HTTP/1.1\r\n\r\n")
        assert sock.makefile("rb").read().startswith(b"HTTP/1.1 501")
    assert requests.put(task_url(shepherd, "t", "/status"), timeout=5).status_code == 405
    assert (
        requests.get(shepherd.url + "/api/v1/tasks/t%2F..%2Fx/data", timeout=5).status_code == 404
    )
    nested = {}
    for _ in range(100):
        nested = {"x": nested}
    assert post(shepherd, "t", "/events", {"events": [{**EVENT, "input": nested}]}).ok
    r = requests.post(
        task_url(shepherd, "t", "/events"),
        data="[" * 100_000,
        headers={"Content-Type": "application/json"},
        timeout=5,
    )
    assert r.status_code == 400
    assert requests.get(shepherd.url + "/healthz", timeout=5).ok


# -- FakeGitHub ------------------------------------------------------------------


@pytest.fixture
def github(tmp_path):
    with FakeGitHub(tmp_path / "github", TOKEN) as server:
        yield server


def list_pulls(github, **params):
    return api(github, "GET", "/repos/o/r/pulls", params=params).json()


def api_headers(token=TOKEN):
    return {"Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json"}


def api(github, method, path, token=TOKEN, **kwargs):
    headers = api_headers(token)
    return requests.request(method, github.api_url + path, headers=headers, timeout=5, **kwargs)


def test_anonymous_or_wrong_token_clone_is_refused(github, home, tmp_path):
    url = github.create_repo("o", "r")
    out = git("clone", url, tmp_path / "anon", env=git_env(home), check=False)
    assert out.returncode != 0
    assert github.git_requests[0]["authorized"] is False
    assert github.git_requests[0]["status"] == 401
    out = git("clone", url, tmp_path / "wrong", env=git_env(home, "ghs_wrong"), check=False)
    assert out.returncode != 0
    assert {r["status"] for r in github.git_requests} == {401}


def test_clone_with_token_uses_protocol_v2(github, home, tmp_path):
    url = github.create_repo("o", "r", files={"src/app.py": "print('hi')\n"})
    git("clone", url, tmp_path / "r", env=git_env(home, TOKEN))
    assert (tmp_path / "r/src/app.py").read_text() == "print('hi')\n"
    assert TOKEN not in (tmp_path / "r/.git/config").read_text()
    first, *rest = github.git_requests
    assert (first["authorized"], first["status"]) == (False, 401)
    assert all(r["authorized"] and r["status"] == 200 for r in rest)
    assert all(r["headers"].get("Git-Protocol") == "version=2" for r in github.git_requests)
    assert {r["service"] for r in rest} == {"git-upload-pack"}


def test_token_can_be_rotated(github, home, tmp_path):
    url = github.create_repo("o", "r")
    github.token = "ghs_new"
    assert git("clone", url, tmp_path / "a", env=git_env(home, TOKEN), check=False).returncode
    git("clone", url, tmp_path / "b", env=git_env(home, "ghs_new"))


def test_blobless_clone(github, home, tmp_path):
    url = github.create_repo("o", "r", files={"a.txt": "a\n", "b/c.txt": "c\n"})
    env = git_env(home, TOKEN)
    git("clone", "--filter=blob:none", "--no-checkout", url, tmp_path / "r", env=env)
    config = git("config", "remote.origin.partialclonefilter", cwd=tmp_path / "r", env=env)
    assert config.stdout.strip() == "blob:none"
    objects = git("rev-list", "--objects", "--all", "--missing=print", cwd=tmp_path / "r", env=env)
    assert sum(line.startswith("?") for line in objects.stdout.splitlines()) == 2
    # Checking out fetches the missing blobs lazily, through the same helper.
    git("checkout", "main", cwd=tmp_path / "r", env=env)
    assert (tmp_path / "r/b/c.txt").read_text() == "c\n"


def test_server_without_filter_support_gives_a_full_clone(github, home, tmp_path):
    url = github.create_repo("o", "r", allow_filter=False)
    env = git_env(home, TOKEN)
    out = git("clone", "--filter=blob:none", url, tmp_path / "r", env=env)
    assert "filtering not recognized by server" in out.stderr
    # The config claims a partial clone all the same: it proves nothing.
    config = git("config", "remote.origin.partialclonefilter", cwd=tmp_path / "r", env=env)
    assert config.stdout.strip() == "blob:none"
    objects = git("rev-list", "--objects", "--all", "--missing=print", cwd=tmp_path / "r", env=env)
    assert not any(line.startswith("?") for line in objects.stdout.splitlines())


def test_push_and_fetch_with_gzip_and_chunked_bodies(github, home, tmp_path):
    url = github.create_repo("o", "r")
    env = git_env(home, TOKEN)
    work = tmp_path / "r"
    git("clone", url, work, env=env)
    git("switch", "-c", "shepherd/t1", cwd=work, env=env)
    (work / "big.bin").write_bytes(os.urandom(2 << 20))  # beyond http.postBuffer: chunked
    git("add", "big.bin", cwd=work, env=env)
    git("commit", "-m", "Add big file", cwd=work, env=env)
    git("push", "origin", "shepherd/t1", cwd=work, env=env)
    head = git("rev-parse", "HEAD", cwd=work, env=env).stdout.strip()
    assert github.branch_sha("o", "r", "shepherd/t1") == head
    assert github.log("o", "r", "shepherd/t1") == ["Add big file", "Initial commit"]
    assert github.branch_sha("o", "r", "nope") is None
    pushes = [r for r in github.git_requests if r["service"] == "git-receive-pack"]
    assert any(r["headers"].get("Transfer-Encoding") == "chunked" for r in pushes)

    # git gzips an upload-pack request over 1 KiB, but only in protocol v0
    # (v2 never does): 16 "have" lines from local commits plus a few "want"
    # lines for new upstream branches get past that.
    git("switch", "-q", "main", cwd=work, env=env)
    script = "for i in $(seq 20); do git commit -q --allow-empty -m local$i; done"
    subprocess.run(["sh", "-c", script], cwd=work, env=env, check=True, timeout=30)
    other = tmp_path / "other"
    git("clone", url, other, env=env)
    for i in range(4):
        git("commit", "-q", "--allow-empty", "-m", f"upstream {i}", cwd=other, env=env)
        git("push", "-q", "origin", f"HEAD:refs/heads/up{i}", cwd=other, env=env)
    git("-c", "protocol.version=0", "fetch", "origin", cwd=work, env=env)
    assert git("log", "-1", "--format=%s", "origin/up3", cwd=work, env=env).stdout == "upstream 3\n"
    assert any(r["headers"].get("Content-Encoding") == "gzip" for r in github.git_requests)


def test_git_fail_next(github, home, tmp_path):
    url = github.create_repo("o", "r")
    github.fail_next("git", [503])
    out = git("clone", url, tmp_path / "a", env=git_env(home, TOKEN), check=False)
    assert out.returncode != 0
    assert github.git_requests[0]["status"] == 503
    git("clone", url, tmp_path / "b", env=git_env(home, TOKEN))


def test_rest_auth_and_repo(github):
    github.create_repo("o", "r", default_branch="trunk")
    for token in ("wrong", ""):
        r = api(github, "GET", "/repos/o/r", token=token)
        assert (r.status_code, r.json()) == (401, {"message": "Bad credentials"})
    r = requests.get(github.api_url + "/repos/o/r", timeout=5)
    assert r.status_code == 401
    r = requests.get(
        github.api_url + "/repos/o/r", headers={"Authorization": f"token {TOKEN}"}, timeout=5
    )
    assert r.json()["default_branch"] == "trunk"
    assert r.json()["full_name"] == "o/r"
    assert api(github, "GET", "/repos/o/missing").status_code == 404
    assert [(q["authorized"], q["status"]) for q in github.api_requests] == [
        (False, 401),
        (False, 401),
        (False, 401),
        (True, 200),
        (True, 404),
    ]


def test_keep_alive_requests_are_recorded_apart(github):
    github.create_repo("o", "r")
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        assert session.get(github.api_url + "/repos/o/r", timeout=5).status_code == 200
        assert session.get(github.url + "/elsewhere", timeout=5).status_code == 404
    assert [q["status"] for q in github.api_requests] == [200]


def push_branch(github, home, tmp_path, branch):
    env = git_env(home, TOKEN)
    work = tmp_path / f"work-{branch.replace('/', '-')}"
    git("clone", f"{github.url}/o/r.git", work, env=env)
    git("switch", "-c", branch, cwd=work, env=env)
    (work / "greeting.txt").write_text("hello, world\n")
    git("add", "-A", cwd=work, env=env)
    git("commit", "-m", "Fix the greeting", cwd=work, env=env)
    git("push", "origin", branch, cwd=work, env=env)


def test_pull_requests(github, home, tmp_path):
    github.create_repo("o", "r")
    push_branch(github, home, tmp_path, "shepherd/t1")
    assert list_pulls(github, head="o:shepherd/t1", state="all") == []

    pr = {"title": "Fix", "head": "shepherd/t1", "base": "main", "body": "Closes #1"}
    created = api(github, "POST", "/repos/o/r/pulls", json=pr)
    assert created.status_code == 201
    assert created.json()["html_url"] == f"{github.url}/o/r/pull/1"
    assert created.json()["number"] == 1
    assert github.pulls[0] | {"repo": "o/r"} == {
        "number": 1,
        "html_url": f"{github.url}/o/r/pull/1",
        "head": "shepherd/t1",
        "base": "main",
        "title": "Fix",
        "body": "Closes #1",
        "draft": False,
        "state": "open",
        "repo": "o/r",
    }

    [found] = list_pulls(github, head="o:shepherd/t1", state="all")
    assert (found["number"], found["state"], found["head"]["ref"], found["base"]["ref"]) == (
        1,
        "open",
        "shepherd/t1",
        "main",
    )
    assert list_pulls(github, head="o:other") == []

    again = api(github, "POST", "/repos/o/r/pulls", json={**pr, "head": "o:shepherd/t1"})
    assert again.status_code == 422
    [error] = again.json()["errors"]
    assert error["message"] == "A pull request already exists for o:shepherd/t1."
    for change in ({"head": "shepherd/missing"}, {"base": "missing"}, {"head": "x:shepherd/t1"}):
        r = api(github, "POST", "/repos/o/r/pulls", json={**pr, **change})
        assert r.status_code == 422, change
        assert r.json()["message"] == "Validation Failed"
    assert len(github.pulls) == 1


def test_pull_request_needs_commits(github, home, tmp_path):
    github.create_repo("o", "r")
    env = git_env(home, TOKEN)
    git("clone", f"{github.url}/o/r.git", tmp_path / "w", env=env)
    git("push", "origin", "main:refs/heads/empty", cwd=tmp_path / "w", env=env)
    r = api(
        github, "POST", "/repos/o/r/pulls", json={"title": "t", "head": "empty", "base": "main"}
    )
    assert r.status_code == 422
    assert r.json()["errors"][0]["message"] == "No commits between main and empty"


def test_pre_existing_pulls_and_head_filter(github):
    github.create_repo("o", "r")
    github.add_pull("o", "r", "shepherd/old")
    github.add_pull("o", "r", "feature", title="other")
    github.pulls[0]["state"] = "closed"
    assert [p["number"] for p in list_pulls(github, head="o:shepherd/old", state="all")] == [1]
    assert list_pulls(github, head="o:shepherd/old") == []
    # Like GitHub, a head without "owner:" filters nothing.
    assert [p["number"] for p in list_pulls(github, head="shepherd/old", state="all")] == [1, 2]


def test_rest_fail_next(github, home, tmp_path):
    github.create_repo("o", "r")
    push_branch(github, home, tmp_path, "b")
    github.fail_next("pulls_create", [502])
    github.fail_next("pulls_list", [500])
    github.fail_next("repo", [503])
    assert api(github, "GET", "/repos/o/r").status_code == 503
    assert api(github, "GET", "/repos/o/r").status_code == 200
    assert api(github, "GET", "/repos/o/r/pulls").status_code == 500
    pr = {"title": "t", "head": "b", "base": "main"}
    assert api(github, "POST", "/repos/o/r/pulls", json=pr).status_code == 502
    assert github.pulls == []
    assert api(github, "POST", "/repos/o/r/pulls", json=pr).status_code == 201
    with pytest.raises(ValueError):
        github.fail_next("nope", [500])


# -- token expiry ------------------------------------------------------------------


def parse_rfc3339(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_token_expires_after_its_ttl(shepherd):
    shepherd.add_task("t", repo_url="u", token_ttl=20)
    assert shepherd.token_expires_at("t") is None  # fixed when the token is issued
    before = datetime.now(UTC)
    answer = requests.get(task_url(shepherd, "t", "/token"), timeout=5).json()
    after = datetime.now(UTC)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", answer["expiresAt"])
    expires = parse_rfc3339(answer["expiresAt"])
    assert expires == shepherd.token_expires_at("t")
    # Cut to whole seconds, like GitHub's expires_at.
    assert before + timedelta(seconds=19) <= expires <= after + timedelta(seconds=20)


def test_fixed_token_expiry_is_known_before_the_token_is_issued(shepherd):
    when = datetime(2031, 5, 6, 7, 8, 9, 654321, tzinfo=timezone(timedelta(hours=2)))
    shepherd.add_task("t", repo_url="u", expires_at=when)
    assert shepherd.token_expires_at("t") == when.replace(microsecond=0)
    answer = requests.get(task_url(shepherd, "t", "/token"), timeout=5).json()
    assert answer["expiresAt"] == "2031-05-06T05:08:09Z"
    with pytest.raises(ValueError, match="timezone-aware"):
        shepherd.add_task("naive", repo_url="u", expires_at=datetime(2031, 1, 1))


def test_expired_token_is_refused_by_git_and_rest(github, home, tmp_path):
    url = github.create_repo("o", "r")
    env = git_env(home, TOKEN)
    github.expire_token_at(time.monotonic() + 600)
    git("clone", url, tmp_path / "w", env=env)
    assert api(github, "GET", "/repos/o/r").status_code == 200
    assert github.requests_after_expiry() == []

    n_git, n_api = len(github.git_requests), len(github.api_requests)
    github.expire_token_at(datetime.now(UTC))
    git("commit", "--allow-empty", "-m", "late", cwd=tmp_path / "w", env=env)
    out = git("push", "origin", "HEAD:refs/heads/late", cwd=tmp_path / "w", env=env, check=False)
    assert out.returncode != 0
    assert github.branch_sha("o", "r", "late") is None
    r = api(github, "GET", "/repos/o/r/pulls")
    assert (r.status_code, r.json()) == (401, {"message": "Bad credentials"})
    # GitHub answers a bad password with the Basic challenge again.
    r = requests.get(
        f"{url}/info/refs?service=git-upload-pack", auth=("x-access-token", TOKEN), timeout=5
    )
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Basic ")

    late = github.requests_after_expiry()
    made_later = github.git_requests[n_git:] + github.api_requests[n_api:]
    assert sorted(map(id, late)) == sorted(map(id, made_later))
    assert [r["at"] for r in late] == sorted(r["at"] for r in late)
    assert {r["status"] for r in late} == {401}
    assert [r["path"] for r in late if r["token_expired"]] == [
        "/o/r.git/info/refs",  # the push, after its anonymous first try
        "/api/v3/repos/o/r/pulls",
        "/o/r.git/info/refs",
    ]
    assert not any(r["authorized"] for r in late)

    github.expire_token_at(None)
    assert api(github, "GET", "/repos/o/r").status_code == 200
    with pytest.raises(ValueError, match="timezone-aware"):
        github.expire_token_at(datetime(2030, 1, 1))
    with pytest.raises(TypeError):
        github.expire_token_at("soon")


def test_github_expiry_can_be_tied_to_the_api_expires_at(shepherd, github):
    github.create_repo("o", "r")
    shepherd.add_task(
        "t", repo_url="u", token=TOKEN, expires_at=datetime.now(UTC) + timedelta(seconds=20)
    )
    github.expire_token_at(shepherd.token_expires_at("t"))
    answer = requests.get(task_url(shepherd, "t", "/token"), timeout=5).json()
    assert github.token_valid_until == parse_rfc3339(answer["expiresAt"])
    assert api(github, "GET", "/repos/o/r", token=answer["token"]).status_code == 200
    # The same token, once that instant has passed.
    github.expire_token_at(time.monotonic() - 1)
    assert api(github, "GET", "/repos/o/r", token=answer["token"]).status_code == 401


# -- pull requests in full, review comments ---------------------------------------


def test_get_pull_shows_current_head_and_base(github):
    github.create_repo("o", "r")
    head_sha = github.commit_to("o", "r", "feature", {"a.txt": "a\n"}, message="Add a")
    added = github.add_pull("o", "r", "feature", title="Add a", body="Why", draft=True)
    assert added["number"] == 1

    r = api(github, "GET", "/repos/o/r/pulls/1")
    assert r.status_code == 200
    pull = r.json()
    assert {k: pull[k] for k in ("number", "state", "merged", "draft", "title", "body")} == {
        "number": 1,
        "state": "open",
        "merged": False,
        "draft": True,
        "title": "Add a",
        "body": "Why",
    }
    assert pull["html_url"] == f"{github.url}/o/r/pull/1"
    assert (pull["merged_at"], pull["closed_at"]) == (None, None)
    assert parse_rfc3339(pull["created_at"]).tzinfo is not None
    assert pull["head"] == {
        "label": "o:feature",
        "ref": "feature",
        "sha": head_sha,
        "repo": {
            "full_name": "o/r",
            "name": "r",
            "owner": {"login": "o"},
            "fork": False,
            "html_url": f"{github.url}/o/r",
            "clone_url": f"{github.url}/o/r.git",
        },
    }
    assert pull["base"]["ref"] == "main" and pull["base"]["label"] == "o:main"
    assert pull["base"]["sha"] == github.branch_sha("o", "r", "main")
    assert pull["base"]["repo"]["full_name"] == "o/r"

    # The shas are read when asked: a later push shows.
    newer = github.commit_to("o", "r", "feature", {"b.txt": "b\n"})
    assert api(github, "GET", "/repos/o/r/pulls/1").json()["head"]["sha"] == newer
    [listed] = list_pulls(github, head="o:feature")
    assert listed["head"]["sha"] == newer and listed["head"]["repo"]["full_name"] == "o/r"
    assert (listed["merged_at"], listed["draft"]) == (None, True)
    assert "merged" not in listed  # only the single pull request has it, as on GitHub

    for path in ("/repos/o/r/pulls/2", "/repos/o/missing/pulls/1"):
        r = api(github, "GET", path)
        assert (r.status_code, r.json()) == (404, {"message": "Not Found"})
    assert api(github, "GET", "/repos/o/r/pulls/1", token="wrong").status_code == 401


def test_closed_and_merged_pulls(github):
    github.create_repo("o", "r")
    github.add_pull("o", "r", "open-one")
    github.add_pull("o", "r", "closed-one", state="closed")
    github.add_pull("o", "r", "merged-one", state="closed", merged=True)
    closed = github.close_pull("o", "r", 1, merged=True)
    assert closed["state"] == "closed"

    pulls = [api(github, "GET", f"/repos/o/r/pulls/{n}").json() for n in (1, 2, 3)]
    assert [(p["state"], p["merged"]) for p in pulls] == [
        ("closed", True),
        ("closed", False),
        ("closed", True),
    ]
    assert pulls[1]["merged_at"] is None and pulls[1]["closed_at"] is not None
    assert pulls[2]["merged_at"] == pulls[2]["closed_at"]
    assert list_pulls(github) == []
    listed = list_pulls(github, state="closed")
    assert [(p["number"], p["merged_at"] is not None) for p in listed] == [
        (1, True),
        (2, False),
        (3, True),
    ]
    assert [p["state"] for p in github.pulls] == ["closed"] * 3

    with pytest.raises(ValueError, match="closed"):
        github.add_pull("o", "r", "x", merged=True)
    with pytest.raises(ValueError, match="state"):
        github.add_pull("o", "r", "x", state="merged")
    with pytest.raises(KeyError):
        github.close_pull("o", "r", 9)


def test_pull_from_a_fork(github):
    github.create_repo("o", "r")
    github.create_repo("forker", "r")
    fork_sha = github.commit_to("forker", "r", "patch-1", {"fix.txt": "fix\n"})
    github.add_pull("o", "r", "patch-1", head_repo="forker/r")
    github.add_pull("o", "r", "gone", head_repo="ghost/r")

    head = api(github, "GET", "/repos/o/r/pulls/1").json()["head"]
    assert (head["label"], head["ref"], head["sha"]) == ("forker:patch-1", "patch-1", fork_sha)
    assert head["repo"]["full_name"] == "forker/r" and head["repo"]["fork"] is True
    assert head["repo"]["clone_url"] == f"{github.url}/forker/r.git"
    # A fork that is just a name has no branch to read.
    head = api(github, "GET", "/repos/o/r/pulls/2").json()["head"]
    assert (head["label"], head["sha"], head["repo"]["full_name"]) == (
        "ghost:gone",
        None,
        "ghost/r",
    )

    assert [p["number"] for p in list_pulls(github, head="forker:patch-1")] == [1]
    assert list_pulls(github, head="o:patch-1") == []


def test_review_comments(github):
    github.create_repo("o", "r")
    sha = github.commit_to("o", "r", "feature", {"app.py": "x = 1\n"})
    github.add_pull("o", "r", "feature")
    github.add_pull("o", "r", "other")
    first = github.add_review_comment("o", "r", 1, "app.py", 1, "Name this better", user="ana")
    reply = github.add_review_comment(
        "o", "r", 1, "app.py", 1, "Agreed", user="bo", in_reply_to=first["id"]
    )
    old = github.add_review_comment(
        "o",
        "r",
        1,
        "gone.py",
        None,
        "Outdated",
        original_line=7,
        created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )

    r = api(github, "GET", "/repos/o/r/pulls/1/comments")
    assert r.status_code == 200
    assert r.json() == [first, reply, old]
    assert first["html_url"] == f"{github.url}/o/r/pull/1#discussion_r{first['id']}"
    assert {k: first[k] for k in ("path", "line", "original_line", "body", "commit_id")} == {
        "path": "app.py",
        "line": 1,
        "original_line": 1,
        "body": "Name this better",
        "commit_id": sha,
    }
    assert first["user"]["login"] == "ana" and first["created_at"] == first["updated_at"]
    assert "in_reply_to_id" not in first and reply["in_reply_to_id"] == first["id"]
    assert (old["line"], old["original_line"], old["created_at"]) == (
        None,
        7,
        "2026-01-02T03:04:05Z",
    )
    assert len({first["id"], reply["id"], old["id"]}) == 3

    assert api(github, "GET", "/repos/o/r/pulls/2/comments").json() == []
    r = api(github, "GET", "/repos/o/r/pulls/3/comments")
    assert (r.status_code, r.json()) == (404, {"message": "Not Found"})
    with pytest.raises(KeyError):
        github.add_review_comment("o", "r", 3, "a", 1, "b")


def test_lists_are_paged_like_github(github):
    github.create_repo("o", "r")
    github.add_pull("o", "r", "feature")
    for i in range(35):
        github.add_review_comment("o", "r", 1, "a.py", i + 1, f"comment {i}")
    path = "/repos/o/r/pulls/1/comments"
    first = api(github, "GET", path)
    assert len(first.json()) == 30  # GitHub's default page size
    assert first.links["next"]["url"] == f"{github.api_url}{path}?page=2"
    assert first.links["last"]["url"] == f"{github.api_url}{path}?page=2"
    second = requests.get(first.links["next"]["url"], headers=api_headers(), timeout=5)
    assert [c["body"] for c in second.json()] == [f"comment {i}" for i in range(30, 35)]
    assert "next" not in second.links and "prev" in second.links
    everything = api(github, "GET", path, params={"per_page": 100})
    assert len(everything.json()) == 35 and "Link" not in everything.headers


# -- more faults -------------------------------------------------------------------


def test_fail_next_for_pull_reads(github):
    github.create_repo("o", "r")
    github.add_pull("o", "r", "feature")
    github.fail_next("pulls_get", [500])
    github.fail_next("pull_comments", [503, "drop"])
    assert api(github, "GET", "/repos/o/r/pulls/1").status_code == 500
    assert api(github, "GET", "/repos/o/r/pulls/1").status_code == 200
    assert api(github, "GET", "/repos/o/r/pulls/1/comments").status_code == 503
    with pytest.raises(requests.ConnectionError):
        api(github, "GET", "/repos/o/r/pulls/1/comments")
    assert api(github, "GET", "/repos/o/r/pulls/1/comments").status_code == 200
    assert [q["fault"] for q in github.api_requests] == [500, None, 503, "drop", None]
    for kind, fault in (("pulls_get", "later"), ("git_push", "lost"), ("git", "drop-after")):
        with pytest.raises(ValueError, match="bad fault"):
            github.fail_next(kind, [fault])


def test_lost_answer_to_pull_creation_still_creates_it(github, home, tmp_path):
    github.create_repo("o", "r")
    push_branch(github, home, tmp_path, "one")
    push_branch(github, home, tmp_path, "two")
    github.fail_next("pulls_create", ["lost", "drop-after"])
    r = api(github, "POST", "/repos/o/r/pulls", json={"title": "t", "head": "one", "base": "main"})
    assert (r.status_code, r.json()) == (502, {"message": "Server Error"})
    with pytest.raises(requests.ConnectionError):
        api(github, "POST", "/repos/o/r/pulls", json={"title": "t", "head": "two", "base": "main"})
    assert [(p["number"], p["head"]) for p in github.pulls] == [(1, "one"), (2, "two")]
    # So a client that asks again is told it exists, and can find it.
    r = api(github, "POST", "/repos/o/r/pulls", json={"title": "t", "head": "one", "base": "main"})
    assert r.status_code == 422
    assert [p["number"] for p in list_pulls(github, head="o:two")] == [2]


def test_git_push_fault_spares_clone_and_fetch(github, home, tmp_path):
    url = github.create_repo("o", "r")
    env = git_env(home, TOKEN)
    work = tmp_path / "w"
    github.fail_next("git_push", [503, "drop"])
    git("clone", url, work, env=env)
    git("fetch", "origin", cwd=work, env=env)
    assert not any(r["fault"] for r in github.git_requests)
    git("commit", "--allow-empty", "-m", "c", cwd=work, env=env)
    for fault in (503, "drop"):
        out = git("push", "origin", "HEAD:refs/heads/b", cwd=work, env=env, check=False)
        assert out.returncode != 0, fault
        assert github.git_requests[-1]["fault"] == fault
        assert github.branch_sha("o", "r", "b") is None
    git("push", "origin", "HEAD:refs/heads/b", cwd=work, env=env)
    assert (
        github.branch_sha("o", "r", "b")
        == git("rev-parse", "HEAD", cwd=work, env=env).stdout.strip()
    )


# -- pushes and someone else's commits ------------------------------------------------


def test_pushes_are_recorded_with_forced_updates(github, home, tmp_path):
    url = github.create_repo("o", "r")
    env = git_env(home, TOKEN)
    work = tmp_path / "w"
    git("clone", url, work, env=env)

    def head():
        return git("rev-parse", "HEAD", cwd=work, env=env).stdout.strip()

    git("commit", "--allow-empty", "-m", "one", cwd=work, env=env)
    first = head()
    git("push", "origin", "HEAD:b", "HEAD:refs/heads/c", cwd=work, env=env)
    git("commit", "--allow-empty", "-m", "two", cwd=work, env=env)
    second = head()
    git("push", "origin", "HEAD:b", cwd=work, env=env)
    git("commit", "--amend", "--allow-empty", "-m", "two, amended", cwd=work, env=env)
    amended = head()
    git("push", "--force", "origin", "HEAD:b", cwd=work, env=env)
    git("push", "origin", ":c", cwd=work, env=env)

    assert [{k: p[k] for k in ("repo", "ref", "old", "new", "forced")} for p in github.pushes] == [
        {"repo": "o/r", "ref": "refs/heads/b", "old": None, "new": first, "forced": False},
        {"repo": "o/r", "ref": "refs/heads/c", "old": None, "new": first, "forced": False},
        {"repo": "o/r", "ref": "refs/heads/b", "old": first, "new": second, "forced": False},
        {"repo": "o/r", "ref": "refs/heads/b", "old": second, "new": amended, "forced": True},
        {"repo": "o/r", "ref": "refs/heads/c", "old": first, "new": None, "forced": False},
    ]
    assert all(p["at"].tzinfo is not None for p in github.pushes)


def test_commit_to_races_a_clone(github, home, tmp_path):
    url = github.create_repo("o", "r")
    env = git_env(home, TOKEN)
    work = tmp_path / "w"
    base = github.commit_to("o", "r", "pr", {"src/a.txt": "a\n"}, message="Start the PR")
    assert github.log("o", "r", "pr") == ["Start the PR", "Initial commit"]
    git("clone", "--branch", "pr", url, work, env=env)
    assert (work / "src/a.txt").read_text() == "a\n"

    theirs = github.commit_to("o", "r", "pr", {"b.txt": "b\n"}, message="Theirs")
    assert github.branch_sha("o", "r", "pr") == theirs
    assert github.log("o", "r", "pr")[:2] == ["Theirs", "Start the PR"]
    author = git("log", "-1", "--format=%an", theirs, cwd=github.root / "o/r.git", env=env)
    assert author.stdout.strip() == "Someone Else"
    assert github.pushes == []  # someone else's pushes are not the client's

    git("commit", "--allow-empty", "-m", "mine", cwd=work, env=env)
    out = git("push", "origin", "pr", cwd=work, env=env, check=False)
    assert out.returncode != 0 and "rejected" in out.stderr
    out = git(
        "push", f"--force-with-lease=pr:{base}", "origin", "pr", cwd=work, env=env, check=False
    )
    assert out.returncode != 0  # the lease is stale: their commit stays
    out = git("push", "--force-with-lease", "origin", "pr", cwd=work, env=env, check=False)
    assert out.returncode != 0
    assert github.branch_sha("o", "r", "pr") == theirs and github.pushes == []
