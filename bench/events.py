"""Benchmark of the runner's event path: agent stdout -> StreamParser -> EventSender -> API.

    .venv/bin/python bench/events.py            # full run, under 2 minutes on 2 cores
    .venv/bin/python bench/events.py --quick    # about 30 s, smaller streams
    .venv/bin/python bench/events.py --json     # the raw numbers instead of the table

Every configuration runs in a fresh Python process (`--worker`), which calls the
real `shepherd_runner.run_agent` on bench/fake_agent.py with a real
`StreamParser` and `EventSender(ShepherdAPI(...).post_events)`; its peak RSS is
that process's ru_maxrss. The fake API (a ThreadingHTTPServer on 127.0.0.1:0)
lives in this process, counts requests and events, and takes each event's delay
from the `@t=<write time>` the fake agent stamps into text blocks and tool
results. The baseline is the upstream Go runner's design, one POST per line,
each from its own thread (goroutine), run on the same stream and sink.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import py_compile
import re
import resource
import secrets
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # the runner of this checkout, not an installed one

import shepherd_runner as sr  # noqa: E402

FAKE_AGENT = os.path.join(HERE, "fake_agent.py")
TASK = "bench-task"
STAMP = re.compile(r"@t=(\d+\.\d+)")


# ---------------------------------------------------------------------------
# the fake Shepherd API
# ---------------------------------------------------------------------------


class Sink(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 4096  # the baseline opens thousands of connections at once

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), SinkHandler)
        self.delay = delay
        self.lock = threading.Lock()
        self.requests = self.events = 0
        self.delays: list[float] = []  # receive time - agent write time, seconds
        self.received: list[tuple[int, float]] = []  # (sequence, receive time)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request, client_address) -> None:
        pass  # a worker that exits mid-request (close() deadline passed) breaks the pipe

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class SinkHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real API server does
    disable_nagle_algorithm = True  # as Go's net/http; else 40 ms delayed-ACK stalls

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        now = time.time()
        sink: Sink = self.server  # type: ignore[assignment]
        if self.path != f"/api/v1/tasks/{TASK}/events":
            return self._reply(404, {"error": "not found"})
        events = json.loads(body)["events"]
        with sink.lock:
            sink.requests += 1
            sink.events += len(events)
            for event in events:
                sink.received.append((event["sequence"], now))
                if m := STAMP.search(event["summary"]):
                    sink.delays.append(now - float(m[1]))
        if sink.delay:
            time.sleep(sink.delay)
        self._reply(200, {"status": "accepted"})

    def _reply(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


# ---------------------------------------------------------------------------
# the worker: one pipeline run in a fresh process
# ---------------------------------------------------------------------------


class ThreadPerEvent:
    """The baseline: every event is POSTed alone, from a thread of its own."""

    def __init__(self, post) -> None:
        self.post = post
        self.cond = threading.Condition()
        self.put_count = self.sent = self.requests = self.in_flight = self.peak = 0

    def put(self, event: dict) -> None:
        with self.cond:
            self.put_count += 1
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        threading.Thread(target=self._one, args=(event,), daemon=True).start()

    def _one(self, event: dict) -> None:
        status = self.post([event])
        with self.cond:
            self.requests += 1
            self.sent += status == 200
            self.in_flight -= 1
            self.cond.notify_all()

    def close(self, timeout: float) -> dict[str, int]:
        with self.cond:
            self.cond.wait_for(lambda: self.in_flight == 0, timeout)
            return {"events_sent": self.sent, "events_dropped": self.put_count - self.sent}


def worker(cfg: dict) -> dict:
    api = sr.ShepherdAPI(cfg["url"], TASK)
    ours = cfg["sender"] == "ours"
    sender = sr.EventSender(api.post_events) if ours else ThreadPerEvent(api.post_events)
    # As in production: the redactor knows the task's token and API key.
    parser = sr.StreamParser(sr.Redactor(["ghs_" + "a1B2" * 9, "sk-ant-api03-" + "x9" * 20]))
    fd, stats = tempfile.mkstemp(prefix="fake-agent-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, FAKE_AGENT, "--lines", str(cfg["lines"]), "--rate", str(cfg["rate"])]
    cmd += ["--big-every", str(cfg.get("big_every", 500))]
    env = dict(os.environ, SHEPHERD_RUN_ID=secrets.token_hex(8))
    start = time.perf_counter()
    run = sr.run_agent(
        cmd + ["--stats", stats], cwd=HERE, env=env, sender=sender, parser=parser,
        stop=sr.Stop(), limits=sr.Limits(),
    )  # fmt: skip
    read_done = time.perf_counter()
    counts = sender.close(cfg.get("close_timeout", sr.EVENT_FLUSH_DEADLINE))
    done = time.perf_counter()
    with open(stats) as f:
        agent = json.load(f)
    os.unlink(stats)
    return {
        **cfg,
        "exit_code": run.exit_code,
        "events_made": parser.sequence,
        **counts,
        "requests_sender": sender.requests,
        "peak_threads_in_flight": getattr(sender, "peak", None),
        "read_seconds": read_done - start,  # until the agent exited and its stdout was parsed
        "total_seconds": done - start,  # until close() returned (all sent or dropped)
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpu_seconds": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),  # user + system
        "vmhwm_mb": vmhwm_kb() / 1024,  # the same peak from /proc, as a cross-check
        "agent": agent,
    }


def vmhwm_kb() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read())[1])


def compile_runner() -> None:
    """Writes the runner's .pyc files, as `pip install` does in the image.

    Under PYTHONDONTWRITEBYTECODE a stale .pyc stays stale and every process
    would compile the module again (tens of ms and a few MB).
    """
    for name in ("shepherd_runner.py", "hook.py"):
        py_compile.compile(os.path.join(ROOT, name), doraise=True)


def measure(sender: str, lines: int, rate: float = 0.0, delay: float = 0.0, **extra) -> dict:
    """One pipeline run in a fresh process against a fresh sink; merged results."""
    sink = Sink(delay)
    cfg = {"sender": sender, "lines": lines, "rate": rate, "url": sink.url, **extra}
    # Not spawned directly: after vfork+exec Linux keeps the parent's peak RSS
    # in the child's ru_maxrss. A shell that forks first gives a clean count.
    argv = [sys.executable, __file__, "--worker", json.dumps(cfg)]
    sh = ["/bin/sh", "-c", '"$@"; exit $?', "sh"]
    proc = subprocess.run(sh + argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"worker failed ({cfg}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    time.sleep(0.2)  # events are counted on receipt; let the last handlers do so
    with sink.lock:
        delays = sorted(sink.delays)
        result.update(sink_requests=sink.requests, sink_events=sink.events)
        result["out_of_order"] = out_of_order([seq for seq, _ in sink.received])
    sink.shutdown()
    sink.server_close()
    result["delay_p50_ms"] = 1000 * pct(delays, 0.50) if delays else None
    result["delay_p95_ms"] = 1000 * pct(delays, 0.95) if delays else None
    result["delay_max_ms"] = 1000 * delays[-1] if delays else None
    result["delay_samples"] = len(delays)
    result["requests_per_1000_events"] = 1000 * sink.requests / max(sink.events, 1)
    result["lines_per_s"] = lines / result["total_seconds"]
    return result


def out_of_order(sequences: list[int]) -> int:
    """Events that arrived after one with a higher sequence (the UI's ?after=N skips them)."""
    late, top = 0, 0
    for seq in sequences:
        late, top = late + (seq < top), max(top, seq)
    return late


def pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# ---------------------------------------------------------------------------
# the runs and the table
# ---------------------------------------------------------------------------


def run_all(quick: bool) -> dict:
    # The baseline does ~500 lines/s here (a thread and a request per line), so
    # its throughput stream is shorter: lines/s and requests/event stay comparable.
    sizes = {"ours": 10_000, "baseline": 2_000} if quick else {"ours": 100_000, "baseline": 10_000}
    paced = 4 if quick else 15  # seconds at the normal pace
    slow = 2_000 if quick else 10_000  # lines against the 2 s sink
    kw = {"close_timeout": 2.0} if quick else {}  # else the runner's EVENT_FLUSH_DEADLINE
    runs = {}
    for name in ("ours", "baseline"):
        for key, what, args in (
            ("fast", f"{sizes[name]} lines as fast as possible", {"lines": sizes[name]}),
            ("small", "1 000 lines as fast as possible", {"lines": 1000}),
            ("paced", f"20 lines/s for {paced} s", {"lines": 20 * paced, "rate": 20}),
            ("slow_sink", f"{slow} lines, sink 2 s per request", {"lines": slow, "delay": 2, **kw}),
        ):
            print(f"[{name}] {what} ...", file=sys.stderr)
            runs[f"{name}_{key}"] = measure(name, **args)
    return runs


def table(runs: dict, quick: bool) -> str:
    o, b = (lambda k: runs[f"ours_{k}"]), (lambda k: runs[f"baseline_{k}"])
    n, nb = o("fast")["lines"], b("fast")["lines"]
    ratio = lambda r: r("fast")["maxrss_mb"] / r("small")["maxrss_mb"]  # noqa: E731
    per_k = lambda r, k: r(k)["requests_per_1000_events"]  # noqa: E731
    ms = lambda r, k, key: f"{r(k)[key]:.0f}"  # noqa: E731
    wmax = lambda r, k: 1000 * r(k)["agent"]["write_max_s"]  # noqa: E731
    counts = lambda r: f"{r['events_sent']} / {r['events_dropped']} of {r['events_made']}"  # noqa: E731
    slow, slow_b = o("slow_sink"), b("slow_sink")
    rows = [
        # metric, ours, baseline, target, pass (None: for information)
        (f"throughput, lines/s (as fast as possible; {n} / {nb} lines)",
         f"{o('fast')['lines_per_s']:.0f}", f"{b('fast')['lines_per_s']:.0f}", "-", None),
        ("  events sent / dropped of made, that run",
         counts(o("fast")), counts(b("fast")), "-", None),
        ("  events arriving out of sequence order, that run",
         str(o("fast")["out_of_order"]), str(b("fast")["out_of_order"]), "0",
         o("fast")["out_of_order"] == 0),
        ("HTTP requests per 1 000 events, as fast as possible",
         f"{per_k(o, 'fast'):.1f}", f"{per_k(b, 'fast'):.1f}", "< baseline",
         per_k(o, "fast") < per_k(b, "fast")),
        ("HTTP requests per 1 000 events, 20 lines/s",
         f"{per_k(o, 'paced'):.1f}", f"{per_k(b, 'paced'):.1f}", "< baseline",
         per_k(o, "paced") < per_k(b, "paced")),
        ("runner peak RSS, 1 000 lines (MB)",
         f"{o('small')['maxrss_mb']:.1f}", f"{b('small')['maxrss_mb']:.1f}", "-", None),
        (f"runner peak RSS, {n} / {nb} lines (MB)",
         f"{o('fast')['maxrss_mb']:.1f}", f"{b('fast')['maxrss_mb']:.1f}", "-", None),
        (f"  RSS ratio, {n} / {nb} vs 1 000 lines", f"{ratio(o):.2f}", f"{ratio(b):.2f}",
         "<= 1.1", ratio(o) <= 1.1),
        ("write -> sink delay p50, 20 lines/s (ms)",
         ms(o, "paced", "delay_p50_ms"), ms(b, "paced", "delay_p50_ms"), "-", None),
        ("write -> sink delay p95, 20 lines/s (ms)",
         ms(o, "paced", "delay_p95_ms"), ms(b, "paced", "delay_p95_ms"), "<= 300",
         o("paced")["delay_p95_ms"] <= 300),
        (f"agent write+flush max, sink 2 s/request, {slow['lines']} lines (ms)",
         f"{wmax(o, 'slow_sink'):.1f}", f"{wmax(b, 'slow_sink'):.1f}", "< 50",
         wmax(o, "slow_sink") < 50),
        ("  same, fast sink (the throughput run) (ms)",
         f"{wmax(o, 'fast'):.1f}", f"{wmax(b, 'fast'):.1f}", "-", None),
        ("  agent write+flush total, sink 2 s/request (ms)",
         f"{1000 * slow['agent']['write_total_s']:.0f}",
         f"{1000 * slow_b['agent']['write_total_s']:.0f}", "-", None),
        ("events sent / dropped of made, sink 2 s/request", counts(slow), counts(slow_b),
         "sent+dropped = made",
         slow["events_sent"] + slow["events_dropped"] == slow["events_made"]),
        ("  events that reached the sink, that run",
         str(slow["sink_events"]), str(slow_b["sink_events"]), "-", None),
        ("  runner peak RSS (MB) / requests in flight, sink 2 s/request",
         f"{slow['maxrss_mb']:.1f} / 1",
         f"{slow_b['maxrss_mb']:.1f} / {slow_b['peak_threads_in_flight']}", "-", None),
    ]  # fmt: skip
    head = ("metric", "ours", "baseline", "target", "pass/fail")
    verdict = {None: "", True: "PASS", False: "FAIL"}
    cells = [head] + [(m, u, v, t, verdict[p]) for m, u, v, t, p in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(5)]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    lines = [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt(r) for r in cells[1:]]
    note = " (--quick: smaller streams, 2 s flush deadline)" if quick else ""
    return "\n".join(lines) + f"\n{os.cpu_count()} CPUs, Python {sys.version.split()[0]}{note}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~30 s version with smaller streams")
    ap.add_argument("--json", action="store_true", help="print the raw numbers as JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    compile_runner()
    runs = run_all(args.quick)
    print(json.dumps(runs, indent=1) if args.json else table(runs, args.quick))


if __name__ == "__main__":
    main()
