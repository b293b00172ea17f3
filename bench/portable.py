"""The portable runner (PyInstaller) against the venv runner, side by side in one run.

    make portable && .venv/bin/python bench/portable.py   # here: about 70 s on 2 cores
    .venv/bin/python bench/portable.py --image localhost/shepherd-runner:dev   # in the image
    .venv/bin/python bench/portable.py --reps 21 --json   # more repetitions, the raw numbers

Here, the two are `python -m shepherd_runner` with this venv's interpreter and
`build/portable/shepherd-runner/shepherd-runner` (`make portable`, built with
the same Python). With --image, both are the image's own, run inside it by
its /usr/bin/python3 (podman, --network host, the checkout mounted read-only):
the entrypoint `/opt/shepherd/venv/bin/shepherd-runner` on Debian's python3.11
and `/opt/shepherd-runner/shepherd-runner` on the libpython3.11 it bundles.

Each repetition starts both, one after the other (which one goes first
alternates), as the pod starts them, with bench/pipeline.py's environment
(bench/exec_agent.sh as the agent, tests/fake_github.py and
tests/fake_shepherd.py on loopback) and measures: process start -> first GET
/healthz 200, VmRSS after a second of waiting, then POST /task -> the agent's
exec (task data, token, clone, branch; the flow runs to `failed`, "no changes
made"). The figures are medians of the ratios portable / venv taken within
each repetition, and the portable directory's size on disk (its blocks, each
file once; MB = 10^6 bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests")]

import events  # noqa: E402
import pipeline  # noqa: E402

PORTABLE_DIR = os.path.join(ROOT, "build", "portable", "shepherd-runner")
IMAGE_PORTABLE_DIR = "/opt/shepherd-runner"
IMAGE_VENV_RUNNER = ("/opt/shepherd/venv/bin/shepherd-runner",)  # the image's entrypoint
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


def run(kinds: dict[str, tuple[str, ...]], reps: int) -> dict:
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


def podman_args(image: str) -> list[str]:
    """The `podman run` flags this machine needs (as tests/test_image.py finds them)."""
    if "SHEPHERD_PODMAN_RUN_ARGS" in os.environ:
        return shlex.split(os.environ["SHEPHERD_PODMAN_RUN_ARGS"])
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    constrained = ["--runtime", "runc", "--ulimit", f"nofile={nofile}:{nofile}",
                   "--ulimit", "nproc=32768:32768"]  # fmt: skip
    for candidate in ([], constrained):
        probe = ["podman", "run", "--rm", *candidate, "--entrypoint", "true", image]
        if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
            return candidate
    sys.exit(f"podman cannot run {image} here")


def in_image(image: str, reps: int) -> dict:
    """This script's --inside run in `image`, as the image's user, on its python3."""
    cmd = [
        "podman", "run", "--rm", "--network", "host", *podman_args(image),
        "-v", f"{ROOT}:/src:ro", "--entrypoint", "python3", image,
        "/src/bench/portable.py", "--inside", "--reps", str(reps),
    ]  # fmt: skip
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, check=False, text=True)
    if proc.returncode != 0:
        sys.exit(f"the bench in {image} failed (exit {proc.returncode})")
    return json.loads(proc.stdout)


def table(f: dict, where: str) -> str:
    ms = lambda s: f"{1000 * s:.0f} ms"  # noqa: E731
    size = f["size_mb"]
    rows = [
        ("start -> first GET /healthz 200", ms(f["portable_start"]), ms(f["venv_start"]),
         f"{f['start_ratio']:.2f}x", f"<= {START_TARGET}x", f["start_ratio"] <= START_TARGET),
        ("idle RSS, waiting for the assignment", f"{f['portable_idle_rss_mb']:.1f} MB",
         f"{f['venv_idle_rss_mb']:.1f} MB", f"{f['idle_rss_mb_ratio']:.2f}x", "-", None),
        ("POST /task -> agent exec (clone included)", ms(f["portable_to_exec"]),
         ms(f["venv_to_exec"]), f"{f['to_exec_ratio']:.2f}x", "-", None),
        ("the portable directory on disk", f"{size:.1f} MB ({f['files']} files)", "", "",
         f"<= {SIZE_TARGET_MB:g} MB", size <= SIZE_TARGET_MB),
    ]  # fmt: skip
    head = ("figure", "portable", "venv", "portable / venv", "target", "result")
    verdict = {None: "", True: "PASS", False: "FAIL"}
    cells = [head] + [(*r[:5], verdict[r[5]]) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    lines = [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt(r) for r in cells[1:]]
    lines.append(f"{where}, {f['reps']} repetitions (medians of the ratios within each)")
    return "\n".join(lines)


def here(directory: str, reps: int) -> dict:
    executable = os.path.join(directory, "shepherd-runner")
    if not os.access(executable, os.X_OK):
        sys.exit(f"{executable} is missing: `make portable` builds it")
    sources = (os.path.join(ROOT, name) for name in ("shepherd_runner.py", "hook.py"))
    if max(map(os.path.getmtime, sources)) > os.path.getmtime(executable):
        sys.exit(f"{executable} is older than the runner's sources: `make portable`")
    events.compile_runner()  # the venv runner's .pyc files, as pip writes them in the image
    return run({"venv": pipeline.VENV_RUNNER, "portable": (executable,)}, reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=PORTABLE_DIR, help="the portable runner's directory, here")
    ap.add_argument("--image", help="measure the image's two runners inside it (podman)")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # --image's own
    ap.add_argument("--reps", type=int, default=21, help="repetitions (default 21)")
    ap.add_argument("--json", action="store_true", help="print the raw numbers as JSON")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 2:  # as in the pod (limits: 2 CPU)
        os.sched_setaffinity(0, cpus[:2])
    if args.image:
        figures = in_image(args.image, args.reps)
        where = f"in {args.image} (its python3 {figures['python']})"
    elif args.inside:
        kinds = {"venv": IMAGE_VENV_RUNNER, "portable": (f"{IMAGE_PORTABLE_DIR}/shepherd-runner",)}
        figures = run(kinds, args.reps) | {"python": sys.version.split()[0]}
        figures["size_mb"], figures["files"] = disk_mb(IMAGE_PORTABLE_DIR)
        print(json.dumps(figures))
        return
    else:
        figures = here(args.dir, args.reps)
        figures["size_mb"], figures["files"] = disk_mb(args.dir)
        where = f"here, Python {sys.version.split()[0]}"
    where = f"{len(cpus[:2])} CPUs, {where}"
    print(json.dumps(figures, indent=1) if args.json else table(figures, where))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
