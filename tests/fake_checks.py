"""GitHub's checks for tests/fake_github.py, with a CI that really runs.

What the runner reads of a pull request's CI, answered as GitHub does:
check runs, check suites, the combined commit status, Actions workflow runs,
job logs (a 302 to a download URL that refuses a token, as GitHub's blob
storage does) and the branch rules (`required_status_checks`). Every 200 has
an ETag; a request carrying it in If-None-Match gets a 304.

The CI: each push of a branch head starts, in one worker thread, every job
configured with `add_job` on a checkout of the pushed commit; a job is a
command (the repository's tests), its exit code the conclusion, its output
the log. So a fix pushed by the agent really turns the checks green.

    github.checks.add_job("tests", [sys.executable, "test_greet.py"])
    github.checks.required = ["tests"]          # a branch rule requires it
    github.checks.mode = "action_required"      # the run waits for approval
    github.checks.mode = "none"                 # no CI: only an app's empty suite
    github.checks.denied = {"checks"}           # the App lacks checks: read
    github.checks.limit_next(429, retry_after=2)

Wired into FakeGitHub with three lines: `route` for REST paths, `download`
for log URLs, `pushed` after a push.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import queue
import re
import secrets
import subprocess
import tarfile
import tempfile
import threading
from datetime import UTC, datetime

# Groups: owner, name, the rest of the path.
CHECKS_PATH = re.compile(
    r"/api/v3/repos/([^/]+)/([^/]+)/(commits/[^/]+/(?:check-runs|check-suites|status)"
    r"|rules/branches/.+|actions/runs|actions/jobs/\d+/logs)"
)
LOG_PATH = re.compile(r"/_logs/([A-Za-z0-9_-]+)")
ACTIONS_APP = {"id": 15368, "slug": "github-actions", "name": "GitHub Actions"}
# An app that creates a suite on every push and never reports (GitHub does this
# for installed apps with checks permission).
IDLE_APP = {"id": 4242, "slug": "idle-app", "name": "Idle App"}
OTHER_APP = {"id": 777, "slug": "other-ci", "name": "Other CI"}
NOT_ACCESSIBLE = {
    "message": "Resource not accessible by integration",
    "documentation_url": "https://docs.github.com/rest",
}
MODES = ("run", "action_required", "none")
JOB_TIMEOUT = 120
PRIVATE_ENV = ("GIT_", "SHEPHERD_", "GH_")  # the CI runs without the test's settings


def _now():
    return datetime.now(UTC)


def _stamp(when):
    return when.strftime("%Y-%m-%dT%H:%M:%SZ") if when else None


class FakeChecks:
    def __init__(self, github):
        self.github = github
        self.mode = "run"
        self.jobs: list[dict] = []  # {"name", "command", "kind"}
        self.required: list[str] | None = None  # the branch rule's contexts; None: no rule
        self.denied: set[str] = set()  # permissions the App lacks: checks, statuses, actions
        self.idle_suites = True  # every push also gets an idle app's empty suite
        self.runs: dict[int, dict] = {}  # check runs by id
        self.suites: dict[int, dict] = {}
        self.statuses: list[dict] = []  # in creation order; the newest per context wins
        self.workflow_runs: dict[int, dict] = {}
        self.logs: dict[str, str] = {}  # download key -> log text
        self.log_keys: dict[int, str] = {}  # job id -> download key
        self.downloads: list[dict] = []  # every log download: had it a token? a Range?
        self.completed: list[dict] = []  # {"sha", "name", "conclusion", "at"} as jobs finish
        self._limits: list[dict] = []
        self._ids = itertools.count(9000001)
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._job: subprocess.Popen | None = None  # the job running now, killed by stop()
        self._stopping = False

    # -- test-facing API ------------------------------------------------

    def add_job(self, name, command, kind="actions"):
        """A CI job run on every pushed head: `command` (argv) in a checkout of it.

        `kind` "actions" is a GitHub Actions job (its log is read through the
        jobs API), "app" another app's check run (the log is its output),
        "status" a legacy commit status.
        """
        if kind not in ("actions", "app", "status"):
            raise ValueError(f"unknown job kind {kind!r}")
        self.jobs.append({"name": name, "command": list(command), "kind": kind})

    def limit_next(self, code=429, *, retry_after=None, reset_in=None, count=1):
        """The next `count` checks requests are rate limited (403 or 429)."""
        headers = {}
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        if reset_in is not None:
            headers["x-ratelimit-remaining"] = "0"
            headers["x-ratelimit-reset"] = str(int(_now().timestamp() + reset_in))
        with self._lock:
            self._limits += [{"code": code, "headers": headers}] * count

    def wait_idle(self, timeout=60):
        """Until every push so far has been run by the CI."""
        with self._done:
            return self._done.wait_for(lambda: self._queue.unfinished_tasks == 0, timeout)

    def conclusions(self, sha):
        """{job name: conclusion or status} of the check runs and statuses of `sha`."""
        with self._lock:
            found = {r["name"]: r["conclusion"] or r["status"] for r in self.runs.values()
                     if r["head_sha"] == sha}  # fmt: skip
            for s in self.statuses:
                if s["sha"] == sha:
                    found[s["context"]] = s["state"]
            return found

    def stop(self):
        with self._lock:
            self._stopping = True
            if self._job is not None:
                self._job.kill()
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(JOB_TIMEOUT)
            self._worker = None

    # -- wiring (called by FakeGitHub) ----------------------------------

    def pushed(self, repo, ref, sha):
        """A branch head was pushed: the CI starts on it."""
        if not ref.startswith("refs/heads/") or not sha:
            return
        branch = ref.removeprefix("refs/heads/")
        with self._lock:
            if self.idle_suites:
                self._suite(repo, sha, branch, IDLE_APP, "queued")
            if self.mode == "none":
                return
            if self.mode == "action_required":
                suite = self._suite(repo, sha, branch, ACTIONS_APP, "completed", "action_required")
                self._workflow_run(repo, sha, branch, suite, "completed", "action_required")
                return
            if not self.jobs:
                return
            work = self._queue_jobs(repo, sha, branch)
        self._start_worker()
        self._queue.put(work)

    def route(self, h, path, query, authorized):
        """Answers a checks request; False when `path` is not one."""
        match = CHECKS_PATH.fullmatch(path)
        if match is None:
            return False
        limit = self._take_limit()
        if limit is not None:
            h.reply(limit["code"], {"message": "API rate limit exceeded"}, limit["headers"].items())
            return True
        if not authorized:
            h.reply(401, {"message": "Bad credentials"})
            return True
        repo, rest = f"{match[1]}/{match[2]}", match[3]
        code, payload, headers = self._answer(repo, rest, query)
        if code == 200:
            body = json.dumps(payload).encode()
            etag = f'W/"{hashlib.sha1(body).hexdigest()}"'  # noqa: S324 - an ETag, not security
            if h.headers.get("If-None-Match") == etag:
                h.reply(304, b"", [("ETag", etag)])
                return True
            headers = [*headers, ("ETag", etag)]
        h.reply(code, payload, headers)
        return True

    def download(self, h, path):
        """A job log's download URL: no token wanted (blob storage refuses one)."""
        match = LOG_PATH.fullmatch(path)
        if match is None:
            return False
        record = {
            "authorization": h.headers.get("Authorization"),
            "range": h.headers.get("Range"),
            "at": _now(),
        }
        with self._lock:
            self.downloads.append(record)
            text = self.logs.get(match[1])
        if text is None:
            h.reply(404, b"BlobNotFound\n", [("Content-Type", "text/plain")])
        elif record["authorization"]:
            h.reply(400, b"InvalidAuthenticationInfo\n", [("Content-Type", "text/plain")])
        else:
            data = text.encode()
            tail = re.fullmatch(r"bytes=-(\d+)", record["range"] or "")
            if tail:
                part = data[-int(tail[1]) :] if int(tail[1]) else b""
                start = len(data) - len(part)
                extra = [("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")]
                h.reply(206, part, [("Content-Type", "text/plain"), *extra])
            else:
                h.reply(200, data, [("Content-Type", "text/plain")])
        return True

    # -- REST answers ---------------------------------------------------

    def _answer(self, repo, rest, query):
        """(code, payload, headers) for a checks path under /repos/{repo}/."""
        if rest.startswith("rules/branches/"):
            return 200, self._rules(repo), []
        if rest.startswith("actions/"):
            if "actions" in self.denied:
                return 403, NOT_ACCESSIBLE, []
            if rest == "actions/runs":
                return 200, self._workflow_runs(repo, query.get("head_sha")), []
            return self._job_log(int(rest.split("/")[2]))
        _, ref, what = rest.split("/")
        if (what == "status" and "statuses" in self.denied) or (
            what != "status" and "checks" in self.denied
        ):
            return 403, NOT_ACCESSIBLE, []
        sha = self._resolve(repo, ref)
        if sha is None:
            return 422, {"message": f"No commit found for SHA: {ref}"}, []
        with self._lock:
            if what == "check-runs":
                runs = [dict(r) for r in self.runs.values() if r["head_sha"] == sha]
                return 200, self._page("check_runs", runs, query), []
            if what == "check-suites":
                suites = [dict(s) for s in self.suites.values() if s["head_sha"] == sha]
                for suite in suites:
                    suite["latest_check_runs_count"] = sum(
                        r["check_suite"]["id"] == suite["id"] for r in self.runs.values()
                    )
                return 200, self._page("check_suites", suites, query), []
            return 200, self._combined(sha), []

    def _page(self, key, items, query):
        per_page = min(int(query.get("per_page", 30)), 100)
        page = max(int(query.get("page", 1)), 1)
        items.sort(key=lambda item: item["id"])
        return {"total_count": len(items), key: items[(page - 1) * per_page : page * per_page]}

    def _resolve(self, repo, ref):
        if re.fullmatch(r"[0-9a-f]{40}", ref):
            out = subprocess.run(
                ["git", "--git-dir", str(self.github._bare(*repo.split("/"))), "cat-file",
                 "-e", f"{ref}^{{commit}}"], capture_output=True, check=False,
            )  # fmt: skip
            return ref if out.returncode == 0 else None
        return self.github.branch_sha(*repo.split("/"), ref)

    def _combined(self, sha):
        latest = {}
        for status in self.statuses:
            if status["sha"] == sha:
                latest[status["context"]] = status
        statuses = [{k: v for k, v in s.items() if k != "sha"} for s in latest.values()]
        states = {s["state"] for s in statuses}
        if states & {"failure", "error"}:
            state = "failure"
        elif not statuses or "pending" in states:
            state = "pending"  # GitHub says pending when there are none
        else:
            state = "success"
        return {"state": state, "sha": sha, "total_count": len(statuses), "statuses": statuses}

    def _rules(self, _repo):
        if self.required is None:
            return []
        return [{
            "type": "required_status_checks", "ruleset_source_type": "Repository",
            "ruleset_id": 1, "parameters": {
                "strict_required_status_checks_policy": False,
                "required_status_checks": [
                    {"context": name, "integration_id": ACTIONS_APP["id"]} for name in self.required
                ],
            },
        }, {"type": "pull_request", "ruleset_id": 1, "parameters": {}}]  # fmt: skip

    def _workflow_runs(self, _repo, head_sha):
        with self._lock:
            runs = [dict(r) for r in self.workflow_runs.values()
                    if head_sha is None or r["head_sha"] == head_sha]  # fmt: skip
        return {"total_count": len(runs), "workflow_runs": runs}

    def _job_log(self, job_id):
        with self._lock:
            key = self.log_keys.get(job_id)
        if key is None:
            return 404, {"message": "Not Found"}, []
        return 302, b"", [("Location", f"{self.github.url}/_logs/{key}")]

    # -- the CI ---------------------------------------------------------

    def _suite(self, repo, sha, branch, app, status, conclusion=None):
        suite = {
            "id": next(self._ids), "head_sha": sha, "head_branch": branch, "status": status,
            "conclusion": conclusion, "app": dict(app), "repo": repo,
            "created_at": _stamp(_now()), "latest_check_runs_count": 0,
        }  # fmt: skip
        self.suites[suite["id"]] = suite
        return suite

    def _workflow_run(self, repo, sha, branch, suite, status, conclusion=None):
        run = {
            "id": next(self._ids), "name": "CI", "head_sha": sha, "head_branch": branch,
            "status": status, "conclusion": conclusion, "event": "push",
            "check_suite_id": suite["id"],
            "html_url": f"{self.github.url}/{repo}/actions/runs/{suite['id']}",
        }  # fmt: skip
        self.workflow_runs[run["id"]] = run
        return run

    def _queue_jobs(self, repo, sha, branch):
        """The check runs and statuses of `sha`, queued; what the worker runs. Holds _lock."""
        actions = app = workflow = None
        work = {"repo": repo, "sha": sha, "jobs": []}
        for job in self.jobs:
            entry = {**job}
            if job["kind"] == "status":
                entry["status"] = self._status(sha, job["name"], "pending", "queued")
            else:
                if job["kind"] == "actions":
                    actions = actions or self._suite(repo, sha, branch, ACTIONS_APP, "queued")
                    workflow = workflow or self._workflow_run(repo, sha, branch, actions, "queued")
                    suite = actions
                else:
                    app = app or self._suite(repo, sha, branch, OTHER_APP, "queued")
                    suite = app
                entry["run"] = self._check_run(repo, sha, job, suite)
            entry["workflow"] = workflow if job["kind"] == "actions" else None
            work["jobs"].append(entry)
        return work

    def _check_run(self, repo, sha, job, suite):
        run_id = next(self._ids)
        url = (
            f"{self.github.url}/{repo}/actions/runs/{suite['id']}/job/{run_id}"
            if job["kind"] == "actions"
            else f"{self.github.url}/other-ci/{repo}/builds/{run_id}"
        )
        run = {
            "id": run_id, "name": job["name"], "head_sha": sha, "status": "queued",
            "conclusion": None, "started_at": None, "completed_at": None,
            "html_url": url, "details_url": url, "app": dict(suite["app"]),
            "check_suite": {"id": suite["id"]},
            "output": {"title": None, "summary": None, "text": None, "annotations_count": 0},
        }  # fmt: skip
        self.runs[run_id] = run
        return run

    def _status(self, sha, context, state, description):
        status = {
            "id": next(self._ids), "sha": sha, "context": context, "state": state,
            "description": description, "created_at": _stamp(_now()),
            "target_url": f"{self.github.url}/legacy-ci/{sha[:12]}/{context}",
        }  # fmt: skip
        self.statuses.append(status)
        return status

    def _take_limit(self):
        with self._lock:
            return self._limits.pop(0) if self._limits else None

    def _start_worker(self):
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="fake-ci", daemon=True)
            self._worker.start()

    def _work(self):
        while (work := self._queue.get()) is not None:
            try:
                self._run(work)
            finally:
                with self._done:
                    self._queue.task_done()
                    self._done.notify_all()
        self._queue.task_done()

    def _run(self, work):
        with tempfile.TemporaryDirectory() as checkout:
            self._checkout(work["repo"], work["sha"], checkout)
            for job in work["jobs"]:
                self._run_job(work, job, checkout)
        with self._lock:
            for suite in self.suites.values():
                runs = [r for r in self.runs.values() if r["check_suite"]["id"] == suite["id"]]
                if suite["head_sha"] == work["sha"] and runs:
                    bad = any(r["conclusion"] != "success" for r in runs)
                    suite["status"] = "completed"
                    suite["conclusion"] = "failure" if bad else "success"
            for run in self.workflow_runs.values():
                suite = self.suites[run["check_suite_id"]]
                if run["head_sha"] == work["sha"] and suite["status"] == "completed":
                    run["status"], run["conclusion"] = "completed", suite["conclusion"]

    def _execute(self, command, cwd, env):
        """(exit code, output) of a job's command; stop() kills it."""
        with self._lock:
            if self._stopping:
                return 143, "the CI was stopped\n"
            try:
                self._job = proc = subprocess.Popen(
                    command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True, errors="replace",
                )  # fmt: skip
            except OSError as exc:
                return 127, f"{exc}\n"
        try:
            output, _ = proc.communicate(timeout=JOB_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0] + f"the job timed out after {JOB_TIMEOUT}s\n"
        with self._lock:
            self._job = None
        return proc.returncode, output

    def _checkout(self, repo, sha, dest):
        archive = subprocess.run(
            ["git", "--git-dir", str(self.github._bare(*repo.split("/"))), "archive", sha],
            capture_output=True, check=True, timeout=60,
        )  # fmt: skip
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(dest, filter="data")

    def _run_job(self, work, job, checkout):
        with self._lock:
            if "run" in job:
                job["run"].update(status="in_progress", started_at=_stamp(_now()))
            if job.get("workflow"):
                job["workflow"]["status"] = "in_progress"
        env = {k: v for k, v in os.environ.items() if not k.startswith(PRIVATE_ENV)}
        code, output = self._execute(job["command"], checkout, env)
        conclusion = "success" if code == 0 else "failure"
        stamp = _now().strftime("%Y-%m-%dT%H:%M:%S.0000000Z")
        log = "".join(f"{stamp} {line}\n" for line in [
            f"##[group]Run {' '.join(job['command'])}", *output.splitlines(),
            f"##[error]Process completed with exit code {code}." if code else "Done.",
        ])  # fmt: skip
        with self._lock:
            if job["kind"] == "status":
                state = "success" if code == 0 else "failure"
                self._status(work["sha"], job["name"], state, f"exit code {code}")
            else:
                run = job["run"]
                run.update(status="completed", conclusion=conclusion, completed_at=_stamp(_now()))
                if job["kind"] == "actions":
                    key = secrets.token_urlsafe(16)
                    self.logs[key], self.log_keys[run["id"]] = log, key
                else:
                    title = "Build passed" if code == 0 else f"Build failed (exit code {code})"
                    run["output"] = {"title": title, "summary": f"`{job['name']}`: {title}",
                                     "text": output[-20000:], "annotations_count": 0}  # fmt: skip
            self.completed.append(
                {"sha": work["sha"], "name": job["name"], "conclusion": conclusion, "at": _now()}
            )
