"""The portable runner (PyInstaller, `make portable`) against the venv runner, in one run.

    make portable && .venv/bin/python bench/portable.py   # about 45 s on 2 cores
    .venv/bin/python bench/portable.py --reps 21          # more repetitions
    .venv/bin/python bench/portable.py --json             # the raw numbers

Each repetition starts both runners, one after the other (which one goes
first alternates), as the pod starts them: `python -m shepherd_runner serve`
with this venv's interpreter, and `build/portable/shepherd-runner/shepherd-runner
serve`. Both get bench/pipeline.py's environment (bench/exec_agent.sh as the
agent, tests/fake_github.py and tests/fake_shepherd.py on loopback) and the
same measures: process start -> first GET /healthz 200, VmRSS after a second
of waiting, then POST /task -> the agent's exec (the task data, the token, a
clone, the branch: the flow runs to `failed`, "no changes made"). The figures
are medians of the ratios portable / venv taken within each repetition, and
the portable directory's size on disk (blocks, MB = 10^6 bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests")]

import events  # noqa: E402
import pipeline  # noqa: E402

PORTABLE_DIR = os.path.join(ROOT, "build", "portable", "shepherd-runner")
START_TARGET = 1.3  # the portable runner's start, at most this times the venv's
SIZE_TARGET_MB = 30.0


def disk_mb(path: str) -> tuple[float, int]:
    """(MB on disk, files) under `path`, each inode once, symbolic links not followed."""
    seen, blocks = set(), 0
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(top, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                blocks += st.st_blocks
    return blocks * 512 / 1e6, len(seen)


def measure(bench: pipeline.Bench, command: tuple[str, ...]) -> dict:
    env, stamp = bench.runner_env()
    runner = pipeline.Runner(env, command)
    out = {"start": runner.first_health()}
    time.sleep(pipeline.IDLE_SECONDS)
    out["idle_rss_mb"] = pipeline.rss_mb(runner.proc.pid)
    out |= bench.task(runner, stamp)
    return out


def run(portable: tuple[str, ...], reps: int) -> dict:
    kinds = {"venv": pipeline.VENV_RUNNER, "portable": portable}
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-portable-") as tmp:
        bench = pipeline.Bench(tmp)
        try:
            for command in kinds.values():  # warm-up: page cache, the fakes' first requests
                measure(bench, command)
            for i in range(reps):
                print(f"[portable] repetition {i + 1}/{reps} ...", file=sys.stderr)
                order = list(kinds) if i % 2 == 0 else list(reversed(kinds))
                runs.append({kind: measure(bench, kinds[kind]) for kind in order})
        finally:
            bench.close()
    figures = {}
    for key in ("start", "idle_rss_mb", "to_exec"):
        for kind in kinds:
            figures[f"{kind}_{key}"] = statistics.median(r[kind][key] for r in runs)
        figures[f"{key}_ratio"] = statistics.median(
            r["portable"][key] / r["venv"][key] for r in runs
        )
    return {"reps": reps, **figures, "runs": runs}


def table(f: dict, size_mb: float, files: int) -> str:
    ms = lambda s: f"{1000 * s:.0f} ms"  # noqa: E731
    rows = [
        ("start -> first GET /healthz 200", ms(f["portable_start"]), ms(f["venv_start"]),
         f"{f['start_ratio']:.2f}x", f"<= {START_TARGET}x", f["start_ratio"] <= START_TARGET),
        ("idle RSS, waiting for the assignment", f"{f['portable_idle_rss_mb']:.1f} MB",
         f"{f['venv_idle_rss_mb']:.1f} MB", f"{f['idle_rss_mb_ratio']:.2f}x", "-", None),
        ("POST /task -> agent exec (clone included)", ms(f["portable_to_exec"]),
         ms(f["venv_to_exec"]), f"{f['to_exec_ratio']:.2f}x", "-", None),
        ("the portable directory on disk", f"{size_mb:.1f} MB ({files} files)", "", "",
         f"<= {SIZE_TARGET_MB:g} MB", size_mb <= SIZE_TARGET_MB),
    ]  # fmt: skip
    head = ("figure", "portable", "venv", "portable / venv", "target", "result")
    verdict = {None: "", True: "PASS", False: "FAIL"}
    cells = [head] + [(*r[:5], verdict[r[5]]) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    lines = [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt(r) for r in cells[1:]]
    cpus = len(os.sched_getaffinity(0))
    lines.append(
        f"{cpus} CPUs, venv Python {sys.version.split()[0]}, {f['reps']} repetitions "
        "(medians of the ratios within each)"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=PORTABLE_DIR, help="the portable runner's directory")
    ap.add_argument("--reps", type=int, default=11, help="repetitions (default 11)")
    ap.add_argument("--json", action="store_true", help="print the raw numbers as JSON")
    args = ap.parse_args()
    executable = os.path.join(args.dir, "shepherd-runner")
    if not os.access(executable, os.X_OK):
        sys.exit(f"{executable} is missing: `make portable` builds it")
    sources = (os.path.join(ROOT, name) for name in ("shepherd_runner.py", "hook.py"))
    if max(map(os.path.getmtime, sources)) > os.path.getmtime(executable):
        sys.exit(f"{executable} is older than the runner's sources: `make portable`")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 2:  # as in the pod (limits: 2 CPU)
        os.sched_setaffinity(0, cpus[:2])
    events.compile_runner()  # the venv runner's .pyc files, as pip writes them in the image
    figures = run((executable,), args.reps)
    size_mb, files = disk_mb(args.dir)
    if args.json:
        print(json.dumps({**figures, "size_mb": size_mb, "files": files}, indent=1))
    else:
        print(table(figures, size_mb, files))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
