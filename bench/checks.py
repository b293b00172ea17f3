"""The wait for a pull request's checks: GitHub requests per minute, and how soon a result is seen.

    .venv/bin/python bench/checks.py            # 5 repetitions, about 5 min
    .venv/bin/python bench/checks.py --quick    # 2 repetitions, about 2 min
    .venv/bin/python bench/checks.py --json     # the raw numbers

Each repetition pushes a commit to tests/fake_github.py, whose CI runs one
job that sleeps 50-60 s (spread over the repetitions so that the job ends at
every phase of the poll), and watches it with the runner's own code
(`CheckWatch` and `ChecksAPI`, their real defaults: one request per endpoint
per 10 s, conditional). The baseline, in the same repetition on a second fake
GitHub: a naive poller, the same watch asking every second without ETags.
Measured for both:

- requests per minute while waiting, and those GitHub counts against the
  rate limit (a 304 to a conditional request is free);
- the time from the job's completion (the fake's clock) to the watch seeing
  the check completed (its on_change callback).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import secrets
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import shepherd_runner as sr  # noqa: E402
from fake_github import FakeGitHub  # noqa: E402

BASELINE_INTERVAL = 1.0


class NaiveAPI(sr.ChecksAPI):
    """The baseline: asks again every time, never conditionally."""

    def get(self, path, permission, **params):
        self.answers.clear()
        return super().get(path, permission, **params)


def watch_once(root: pathlib.Path, seconds: float, naive: bool) -> dict:
    """One push and its watch; the figures of that wait."""
    token = "ghs_" + secrets.token_hex(18)
    with FakeGitHub(root, token) as github:
        url = github.create_repo("acme", "widgets")
        job = [sys.executable, "-c", f"import time; time.sleep({seconds})"]
        github.checks.add_job("tests", job)
        sha = github.commit_to("acme", "widgets", "feature", {"x.txt": "x\n"})
        github.checks.pushed("acme/widgets", "refs/heads/feature", sha)
        kind = NaiveAPI if naive else sr.ChecksAPI
        interval = BASELINE_INTERVAL if naive else sr.CHECKS_INTERVAL
        api = kind(sr.parse_repo_url(url), token, api_url=github.api_url, interval=interval)
        seen = {}

        def changed(check):
            if check.completed:
                seen.setdefault(check.name, datetime.now(UTC))

        start = time.monotonic()
        result = sr.CheckWatch(api, on_change=changed).run(sha, time.monotonic() + 120)
        waited = time.monotonic() - start
        [done] = github.checks.completed
        requests = [r for r in github.api_requests if "/commits/" in r["path"]]
    assert result.state == "success", result
    free = sum(r["status"] == 304 for r in requests)
    return {
        "requests_per_min": len(requests) / waited * 60,
        "counted_per_min": (len(requests) - free) / waited * 60,
        "notice_s": (seen["tests"] - done["at"]).total_seconds(),
        "waited_s": waited,
    }


def repetition(index: int, count: int, root: pathlib.Path) -> dict:
    seconds = 50 + 10 * index / count
    out = {}

    def measure(name, naive):
        out[name] = watch_once(root / f"{name}-{index}", seconds, naive)

    threads = [
        threading.Thread(target=measure, args=("runner", False)),
        threading.Thread(target=measure, args=("baseline", True)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repetitions instead of 5")
    parser.add_argument("--json", action="store_true", help="print the raw numbers")
    args = parser.parse_args(argv)
    count = 2 if args.quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        runs = [repetition(i, count, pathlib.Path(tmp)) for i in range(count)]
    if args.json:
        print(json.dumps(runs, indent=2))
        return 0

    def median(who, key):
        return statistics.median(r[who][key] for r in runs)

    def worst(who, key):
        return max(r[who][key] for r in runs)

    print(f"{count} repetitions, job 50-60 s; medians (max)")
    print("| figure | runner (10 s, conditional) | baseline (1 s, unconditional) | ratio |")
    print("|---|---|---|---|")
    for key, label in (
        ("requests_per_min", "requests per minute while waiting"),
        ("counted_per_min", "... counted against the rate limit (not 304)"),
        ("notice_s", "job completed -> watch sees it (s)"),
    ):
        mine, base = median("runner", key), median("baseline", key)
        print(f"| {label} | {mine:.1f} ({worst('runner', key):.1f}) | {base:.1f} "
              f"({worst('baseline', key):.1f}) | {mine / base:.2f}x |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
