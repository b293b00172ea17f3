"""What the repository's setup step costs a task that has none: one stat.

    .venv/bin/python bench/setup_step.py          # a few seconds
    .venv/bin/python bench/setup_step.py --json   # the raw numbers

Times, in this process, the setup step of the task flow (`TaskRun._setup`)
on a clone without `.shepherd/setup.sh` and no SHEPHERD_SETUP_COMMAND,
against the baseline of one `os.stat` of a missing file (what it cannot do
without), best of several rounds each. When strace is on PATH it also runs
the step once in a child process under `strace -e trace=%file` and lists the
file system calls it made.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # the runner of this checkout, not an installed one

import shepherd_runner as sr  # noqa: E402

LOOPS, ROUNDS = 20000, 7
BEGIN, END = "/shepherd-bench-begin", "/shepherd-bench-end"  # markers in the trace


def no_setup_step(home: str) -> tuple[sr.TaskRun, sr.TaskState]:
    """A task run and the state of a clone without a setup, as the flow has them."""
    repo = os.path.join(home, "workspace", "widgets")
    os.makedirs(os.path.join(repo, ".git"))
    cfg = sr.parse_config(["serve"], {})
    ctx = sr.Context(environ={}, home=home)
    run = sr.TaskRun(cfg, sr.Assignment("bench", "http://127.0.0.1:1"), ctx)
    state = sr.TaskState("bench", "http://x/o/widgets.git", repo, "shepherd/bench", "main", "0")
    return run, state


def per_call(func, loops: int = LOOPS) -> float:
    """Best of ROUNDS rounds, in microseconds per call."""
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(loops):
            func()
        best = min(best, (time.perf_counter() - start) / loops)
    return best * 1e6


def stat_missing(path: str) -> None:
    try:  # noqa: SIM105 - as setup_steps does, without a context manager's cost
        os.stat(path)
    except OSError:
        pass


def traced_calls(home: str) -> list[str] | None:
    """The file system calls of one setup step with nothing to run, or None without strace."""
    if shutil.which("strace") is None:
        return None
    child = (
        "import sys; sys.path.insert(0, sys.argv[1]); import setup_step as b\n"
        "run, state = b.no_setup_step(sys.argv[2])\n"
        f"b.stat_missing({BEGIN!r}); run._setup(state, {{}}, ''); b.stat_missing({END!r})\n"
    )
    proc = subprocess.run(
        ["strace", "-qq", "-e", "trace=%file", sys.executable, "-c", child, HERE, home],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = proc.stderr.splitlines()
    begin = next(i for i, ln in enumerate(lines) if BEGIN in ln)
    end = next(i for i, ln in enumerate(lines) if END in ln)
    return lines[begin + 1 : end]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the raw numbers")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as home:
        run, state = no_setup_step(home)
        missing = os.path.join(state.repo_dir, sr.SETUP_SCRIPT)
        baseline = per_call(lambda: stat_missing(missing))
        step = per_call(lambda: run._setup(state, {}, ""))
        assert run._setup(state, {}, "").status == "none"
        calls = traced_calls(os.path.join(home, "traced"))
    figures = {"stat_us": baseline, "setup_step_us": step, "ratio": step / baseline,
               "file_syscalls": calls}  # fmt: skip
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"one os.stat of a missing file (baseline)  {baseline:8.2f} us")
    print(f"the setup step with no setup              {step:8.2f} us  ({step / baseline:.2f}x)")
    if calls is None:
        print("strace not found: no system call listing")
    else:
        print(f"its file system calls ({len(calls)}):")
        for line in calls:
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
