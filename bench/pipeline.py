"""The runner's own overhead, seen from outside: start, idle memory, assignment to agent.

    .venv/bin/python bench/pipeline.py                # every figure, about 2 min on 2 cores
    .venv/bin/python bench/pipeline.py --quick        # about 35 s; the RSS ratios mean little
    .venv/bin/python bench/pipeline.py --no-events    # only the start and task figures
    .venv/bin/python bench/pipeline.py --json         # the raw numbers instead of the table

The runner runs as the pod runs it: `python -m shepherd_runner serve` in a
subprocess (SHEPHERD_RUNNER_ADDR=127.0.0.1:0), with bench/exec_agent.sh as the
agent (it writes the time of its exec to a file first thing),
tests/fake_github.py as GitHub (real `git http-backend`, checks the token) and
tests/fake_shepherd.py as the Shepherd API, all on loopback. Each repetition
measures, interleaved so that the machine's noise hits both alike:

- the baseline `python -c 'import http.server, json, socket'` (wall time);
- a bare `git clone --filter=blob:none` of the task's repository over the same
  fake GitHub, with the token from the same kind of credential helper;
- a runner: start -> first `GET /healthz` 200, its RSS after a second of
  waiting for the assignment, then `POST /task` -> the agent's exec;
- the two baselines again (each figure is compared with their mean);
- a runner that gets the assignment right after its first healthz 200;
- a runner that gets SIGTERM while it waits (exit code and time to exit).

The figures are medians over the repetitions of what each repetition gave
(the start's ratio to the baseline, the time to the agent's exec less that
repetition's bare clone). The event-path figures come from bench/events.py's
`measure` (one fresh process per configuration). The runner's .pyc files are
written first, as `pip install` writes them in the image.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests")]

import events  # noqa: E402

from fake_github import FakeGitHub  # noqa: E402
from fake_shepherd import FakeShepherd  # noqa: E402

AGENT = os.path.join(HERE, "exec_agent.sh")
BASELINE_IMPORT = "import http.server, json, socket"
IDLE_SECONDS = 1.0  # the operator waits for readiness; the runner has settled by then
OWNER, REPO = "acme", "widgets"
FILES = {  # a small project: the clone is about the git round trips, not the bytes
    "README.md": "# widgets\n\nhello\n",
    **{f"src/widgets/mod{i}.py": f"def f{i}(x):\n    return x + {i}\n" * 40 for i in range(20)},
    **{f"tests/test_mod{i}.py": f"from widgets.mod{i} import f{i}\n" for i in range(20)},
}
STEP_DONE = re.compile(r" INFO (.+?) done seconds=([\d.]+)")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read())[1]) / 1024


def healthz(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    finally:
        conn.close()


def post_task(port: int, task_id: str, api_url: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        body = json.dumps({"taskID": task_id, "apiURL": api_url})
        conn.request("POST", "/task", body, {"Content-Type": "application/json"})
        return conn.getresponse().status
    finally:
        conn.close()


def no_delay(fake):
    """`fake` with TCP_NODELAY on its connections, as Go's net/http (the real API) has.

    Without it a keep-alive response written in two parts (headers, body) waits
    for the client's delayed ACK: 40 ms on a request that takes 5.
    """
    fake.handler = type(fake.handler.__name__, (fake.handler,), {"disable_nagle_algorithm": True})
    return fake


VENV_RUNNER = (sys.executable, "-m", "shepherd_runner")


class Runner:
    """`python -m shepherd_runner serve` (or `command serve`) as the pod starts it;
    `started` is when Popen began."""

    def __init__(self, env: dict[str, str], command: tuple[str, ...] = VENV_RUNNER) -> None:
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [*command, "serve"], cwd=ROOT, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        for line in self.proc.stdout:
            self.lines.append(line)
            if m := re.search(r" listening addr=\S*:(\d+)", line):
                self.port = int(m[1])
                break
        else:
            sys.exit("the runner exited before listening:\n" + "".join(self.lines))
        self.reader = threading.Thread(target=self.lines.extend, args=(self.proc.stdout,))
        self.reader.start()

    def first_health(self) -> float:
        """Seconds from the start of the process to its first healthz 200."""
        if healthz(self.port) != 200:
            sys.exit("healthz did not answer 200")
        return time.perf_counter() - self.started

    def wait(self, timeout: float = 60) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            sys.exit("the runner did not finish:\n" + "".join(self.lines))
        self.reader.join()
        return code

    def steps(self) -> dict[str, float]:
        return {m[1]: float(m[2]) for ln in self.lines if (m := STEP_DONE.search(ln))}


class Bench:
    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.token = "ghs_" + secrets.token_hex(18)
        self.github = no_delay(FakeGitHub(os.path.join(tmp, "github"), self.token)).start()
        self.api = no_delay(FakeShepherd()).start()
        self.repo_url = self.github.create_repo(OWNER, REPO, FILES)
        self.count = 0

    def close(self) -> None:
        self.github.stop()
        self.api.stop()

    def fresh_dir(self, name: str) -> str:
        self.count += 1
        path = os.path.join(self.tmp, f"{name}-{self.count}")
        os.makedirs(path)
        return path

    def env(self, home: str) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("SHEPHERD_", "GIT_", "GH_", "ANTHROPIC_", "PYTHON"))
        }  # fmt: skip
        env.update(HOME=home, GIT_CONFIG_NOSYSTEM="1", LC_ALL="C")
        return env

    def runner_env(self) -> tuple[dict[str, str], str]:
        home = self.fresh_dir("home")
        work = os.path.join(home, "workspace")
        os.makedirs(work)
        stamp = os.path.join(home, "exec-stamp")
        env = self.env(home) | {
            "SHEPHERD_RUNNER_ADDR": "127.0.0.1:0",
            "SHEPHERD_WORK_DIR": work,
            "SHEPHERD_CONFIG_DIR": ROOT,
            "SHEPHERD_CLAUDE_BIN": AGENT,
            "SHEPHERD_GITHUB_API_URL": self.github.api_url,
            "ANTHROPIC_API_KEY": "sk-ant-bench-not-used",
            "BENCH_EXEC_STAMP": stamp,
        }
        return env, stamp

    def baseline_import(self) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", BASELINE_IMPORT], cwd=ROOT, check=True)
        return time.perf_counter() - start

    def bare_clone(self) -> float:
        home = self.fresh_dir("clone")
        scope = self.github.url
        helper = (
            '!f() { test "$1" = get || return 0; '
            'echo username=x-access-token; echo "password=$T"; }; f'
        )
        env = self.env(home) | {
            "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": f"credential.{scope}.helper",
            "GIT_CONFIG_VALUE_0": helper, "T": self.token, "GIT_TERMINAL_PROMPT": "0",
        }  # fmt: skip
        cmd = ["git", "clone", "--quiet", "--filter=blob:none", self.repo_url, "repo"]
        start = time.perf_counter()
        subprocess.run(cmd, cwd=home, env=env, check=True)
        took = time.perf_counter() - start
        shutil.rmtree(home)
        return took

    def task(self, runner: Runner, stamp: str) -> dict:
        """POST /task, wait for the run to end; seconds from the POST to the agent's exec."""
        self.count += 1
        task_id = f"bench-{self.count}"
        self.api.add_task(task_id, repo_url=self.repo_url, token=self.token)
        posted = time.time()
        status = post_task(runner.port, task_id, self.api.url)
        code = runner.wait()
        terminal = self.api.terminal(task_id) or {}
        if status != 200 or code != 0 or terminal.get("message") != "no changes made":
            sys.exit(f"task run went wrong ({status}, exit {code}, {terminal}):\n"
                     + "".join(runner.lines))  # fmt: skip
        with open(stamp) as f:
            executed = float(f.read().strip().replace(",", "."))
        return {"to_exec": executed - posted, "steps": runner.steps()}

    def repetition(self) -> dict:
        imports, clones = [self.baseline_import()], [self.bare_clone()]
        env, stamp = self.runner_env()
        runner = Runner(env)
        out = {"start": runner.first_health()}
        time.sleep(IDLE_SECONDS)
        out["idle_rss_mb"] = rss_mb(runner.proc.pid)
        out |= self.task(runner, stamp)
        # The baselines again: their mean brackets the runner's figures in time.
        clones.append(self.bare_clone())
        imports.append(self.baseline_import())
        out["import"], out["clone"] = statistics.mean(imports), statistics.mean(clones)
        env, stamp = self.runner_env()
        runner = Runner(env)
        runner.first_health()
        out["to_exec_eager"] = self.task(runner, stamp)["to_exec"]
        env, _ = self.runner_env()
        runner = Runner(env)
        runner.first_health()
        start = time.perf_counter()
        runner.proc.send_signal(signal.SIGTERM)
        out["sigterm_exit_code"] = runner.wait(10)
        out["sigterm_exit"] = time.perf_counter() - start
        # Paired within the repetition: the machine's noise drifts slower than that.
        out["start_ratio"] = out["start"] / out["import"]
        out["beyond_clone"] = out["to_exec"] - out["clone"]
        out["beyond_clone_eager"] = out["to_exec_eager"] - out["clone"]
        out["beyond_own_clone"] = out["to_exec"] - out["steps"]["clone"]
        return out


def run_pipeline(reps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        bench = Bench(tmp)
        try:
            bench.repetition()  # warm-up: page cache, the fakes' first requests
            runs = []
            for i in range(reps):
                print(f"[pipeline] repetition {i + 1}/{reps} ...", file=sys.stderr)
                runs.append(bench.repetition())
        finally:
            bench.close()
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    steps = {name: statistics.median(r["steps"].get(name, 0.0) for r in runs)
             for name in runs[0]["steps"]}  # fmt: skip
    return {
        "reps": reps,
        **{key: med(key) for key in runs[0] if key not in ("steps", "sigterm_exit_code")},
        "sigterm_exit_codes": sorted({r["sigterm_exit_code"] for r in runs}),
        "steps": steps,
        "runs": runs,
    }


def run_events(quick: bool) -> dict:
    big, small = (10_000, 1_000) if quick else (100_000, 1_000)
    configs = {
        "short_big": {"lines": big, "big_every": 0},
        "short_small": {"lines": small, "big_every": 0},
        "mb_big": {"lines": big},
        "mb_small": {"lines": small},
        "normal_api": {"lines": 10_000},
        "slow_api": {"lines": 10_000, "delay": 2},
        "paced": {"lines": 20 * (4 if quick else 15), "rate": 20},
    }
    out = {}
    for name, cfg in configs.items():
        print(f"[events] {name} {cfg} ...", file=sys.stderr)
        out[name] = events.measure("ours", **cfg)
    return out


def table(p: dict | None, e: dict | None, quick: bool) -> str:
    rows = []  # figure, measured, baseline, target, pass (None: for information)
    if p:
        ms = lambda s: f"{1000 * s:.0f} ms"  # noqa: E731
        ratio, beyond, eager = p["start_ratio"], p["beyond_clone"], p["beyond_clone_eager"]
        rows += [
            ("start -> first GET /healthz 200", f"{ms(p['start'])} ({ratio:.2f}x)",
             f"python -c '{BASELINE_IMPORT}': {ms(p['import'])}", "<= 1.5x", ratio <= 1.5),
            (f"idle RSS, waiting for the assignment ({IDLE_SECONDS:g} s after healthz)",
             f"{p['idle_rss_mb']:.1f} MB", "", "<= 30 MB", p["idle_rss_mb"] <= 30),
            ("POST /task -> agent exec, beyond a bare clone",
             f"{ms(beyond)} ({ms(p['to_exec'])} in all)",
             f"bare git clone --filter=blob:none: {ms(p['clone'])}", "<= 50 ms", beyond <= 0.05),
            ("  same, POST /task right after the first healthz 200",
             f"{ms(eager)} ({ms(p['to_exec_eager'])} in all)", "", "-", None),
            ("  POST /task -> agent exec, less the runner's own clone step",
             ms(p["beyond_own_clone"]), "", "-", None),
            ("  SIGTERM while waiting -> exit (exit codes)",
             f"{ms(p['sigterm_exit'])} ({p['sigterm_exit_codes']})", "", "-", None),
        ]  # fmt: skip
    if e:
        mb = lambda r: r["maxrss_mb"]  # noqa: E731
        n = e["short_big"]["lines"]
        for kind, label in (("short", "short lines"), ("mb", "a 1 MB tool result every 500")):
            big, small = mb(e[f"{kind}_big"]), mb(e[f"{kind}_small"])
            rows.append((f"peak RSS, {n} vs 1 000 lines, {label}",
                         f"{big:.1f} / {small:.1f} MB ({big / small:.2f}x)", "", "<= 1.1x",
                         big / small <= 1.1))  # fmt: skip
        slow, normal = (1000 * e[k]["agent"]["write_total_s"] for k in ("slow_api", "normal_api"))
        paced = e["paced"]
        per_k, per_k_paced = (e[k]["requests_per_1000_events"] for k in ("mb_big", "paced"))
        rows += [
            ("agent write time, API 2 s per request vs a normal one (10 000 lines)",
             f"{slow:.0f} / {normal:.0f} ms ({slow / normal:.2f}x)", "", "<= 1.2x",
             slow / normal <= 1.2),
            ("  events sent / dropped of made, API 2 s per request",
             f"{e['slow_api']['events_sent']} / {e['slow_api']['events_dropped']} of "
             f"{e['slow_api']['events_made']}", "", "-", None),
            ("stdout line -> API, p95 at 20 lines/s",
             f"{paced['delay_p95_ms']:.0f} ms (p50 {paced['delay_p50_ms']:.0f})", "", "<= 300 ms",
             paced["delay_p95_ms"] <= 300),
            (f"POST /events per 1 000 events ({n} lines, as fast as written)",
             f"{per_k:.1f}", "1 000 (one POST per event)", "<= 50", per_k <= 50),
            ("  same, at 20 lines/s", f"{per_k_paced:.1f}", "", "-", None),
        ]  # fmt: skip
    head = ("figure", "measured", "baseline, same run", "target", "result")
    verdict = {None: "", True: "PASS", False: "FAIL"}
    cells = [head] + [(f, m, b, t, verdict[ok]) for f, m, b, t, ok in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(5)]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    lines = [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt(r) for r in cells[1:]]
    if p:
        steps = ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in p["steps"].items() if k != "agent")
        lines.append(f"task steps (medians, the runner's log): {steps}")
    note = " (--quick: fewer repetitions, shorter streams)" if quick else ""
    cpus = len(os.sched_getaffinity(0))
    reps = f", {p['reps']} repetitions (medians)" if p else ""
    lines.append(f"{cpus} CPUs, Python {sys.version.split()[0]}{reps}{note}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=0, help="repetitions (default 9, --quick 3)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, shorter streams")
    ap.add_argument("--no-events", action="store_true", help="skip the event-path figures")
    ap.add_argument("--json", action="store_true", help="print the raw numbers as JSON")
    args = ap.parse_args()
    # As in the pod (limits: 2 CPU): on a bigger machine, two cores.
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 2:
        os.sched_setaffinity(0, cpus[:2])
    events.compile_runner()
    pipeline = run_pipeline(args.reps or (3 if args.quick else 9))
    event_runs = None if args.no_events else run_events(args.quick)
    if args.json:
        print(json.dumps({"pipeline": pipeline, "events": event_runs}, indent=1))
    else:
        print(table(pipeline, event_runs, args.quick))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
