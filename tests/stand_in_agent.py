#!/usr/bin/env python3
"""A stand-in for the Claude Code CLI, for the flow tests (SHEPHERD_CLAUDE_BIN).

Like the CLI it prints stream-json on stdout, works in its cwd, runs the Stop
hooks of ~/.claude/settings.json before its `result` line (honouring a
`{"decision": "block"}` once, then calling them again with stop_hook_active)
and exits. STAND_IN_SCENARIO picks what it does; STAND_IN_RECORD names a file
where it writes what a test needs to see from inside (argv, environment facts,
a `ps` snapshot).
"""

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time

_ids = itertools.count(1)


def emit(message):
    print(json.dumps(message), flush=True)


def say(text):
    emit({"type": "assistant", "message": {"id": f"msg_{next(_ids)}", "role": "assistant",
          "content": [{"type": "text", "text": text}]}})  # fmt: skip


def tool(name, args, output, is_error=False):
    tool_id = f"toolu_{next(_ids)}"
    use = {"type": "tool_use", "id": tool_id, "name": name, "input": args}
    emit({"type": "assistant", "message": {"id": f"msg_{next(_ids)}", "content": [use]}})
    done = {"tool_use_id": tool_id, "type": "tool_result", "content": output, "is_error": is_error}
    emit({"type": "user", "message": {"role": "user", "content": [done]}})


def bash(command):
    proc = subprocess.run(command, shell=True, capture_output=True, text=True, check=False)
    tool("Bash", {"command": command}, (proc.stdout + proc.stderr).strip(), proc.returncode != 0)
    return proc


def run_hooks(event, payload):
    """Runs the hooks for `event` like the CLI: the block reason, or None."""
    path = os.path.expanduser("~/.claude/settings.json")
    with open(path) as f:
        groups = json.load(f).get("hooks", {}).get(event, [])
    for hook in (h for g in groups for h in g.get("hooks", [])):
        proc = subprocess.run(
            hook["command"], shell=True, input=json.dumps(payload), capture_output=True,
            text=True, timeout=hook.get("timeout", 60), check=False,
        )  # fmt: skip
        if proc.returncode == 2:
            return proc.stderr.strip()
        if proc.stdout.strip():
            answer = json.loads(proc.stdout)
            if answer.get("decision") == "block":
                return answer["reason"]
    return None


def stop(last_message, on_block=None):
    payload = {"session_id": "stand-in", "cwd": os.getcwd(), "hook_event_name": "Stop",
               "stop_hook_active": False, "last_assistant_message": last_message}  # fmt: skip
    reason = run_hooks("Stop", payload)
    if reason is not None:
        say(f"The hook says: {reason}")
        on_block()
        run_hooks("Stop", payload | {"stop_hook_active": True})


def result(text, subtype="success", is_error=False):
    emit({"type": "result", "subtype": subtype, "is_error": is_error, "num_turns": 3,
          "total_cost_usd": 0.0123, "duration_ms": 1500, "session_id": "stand-in",
          "result": text})  # fmt: skip


def record():
    path = os.environ.get("STAND_IN_RECORD")
    if not path:
        return
    env = os.environ
    facts = {
        "argv": sys.argv[1:],
        "cwd": os.getcwd(),
        "env": {
            k: env.get(k)
            for k in (
                "SHEPHERD_API_URL",
                "SHEPHERD_TASK_ID",
                "SHEPHERD_BASE_REF",
                "DISABLE_AUTOUPDATER",
                "CI",
            )
        },  # fmt: skip
        "has_gh_token": bool(env.get("GH_TOKEN")),
        "ps": subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout,
        "branch": subprocess.run(
            ["git", "branch", "--show-current"], capture_output=True, text=True
        ).stdout.strip(),  # fmt: skip
    }
    with open(path, "w") as f:
        json.dump(facts, f)


def commit(message="Update greeting"):
    with open("README.md", "a") as f:
        f.write("hello world\n")
    bash(f"git add -A && git commit -qm '{message}'")


def main():
    scenario = os.environ.get("STAND_IN_SCENARIO", "commit")
    emit({"type": "system", "subtype": "init", "cwd": os.getcwd(), "session_id": "stand-in"})
    record()
    say("Let me look at the README first.")
    tool("Read", {"file_path": "README.md"}, "1\thello\n")
    if scenario == "commit":
        commit()
        stop("I updated the greeting in README.md and committed it.")
        result("I updated the greeting in README.md and committed it.")
    elif scenario == "nothing":
        text = "I cannot do this: the file the task names does not exist."
        say(text)
        stop(text)
        result(text)
    elif scenario == "crash":
        print("fatal: the agent crashed", file=sys.stderr, flush=True)
        sys.exit(3)
    elif scenario == "killed":
        # Dies mid-line, as an agent killed by the OOM killer would.
        sys.stdout.write('{"type": "assistant", "message": {"content": [{"type": "te')
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    elif scenario == "noisy":
        out = sys.stdout.buffer
        out.write(b"\x00\xff\xfe garbage \x80\n")
        out.write(b'{"type": "user", "message": {"content": "' + b"x" * (20 << 20) + b'"}}\n')
        out.flush()
        commit()
        stop("Done despite the noise.")
        result("Done despite the noise.")
        out.write(b'{"type": "assistant", "mess')  # a partial last line
    elif scenario == "max-turns":
        commit()
        result("", subtype="error_max_turns", is_error=True)
        sys.exit(1)
    elif scenario == "uncommitted":
        with open("README.md", "a") as f:
            f.write("hello world\n")
        stop("I changed the README.", on_block=lambda: bash("git commit -qam 'Commit it'"))
        result("I changed the README and committed it.")
    elif scenario == "own-pr":
        commit()
        bash("git push -q origin HEAD")
        api = os.environ["SHEPHERD_GITHUB_API_URL"]
        owner_repo = os.environ["STAND_IN_REPO"]
        bash(
            f'curl -sf -H "Authorization: Bearer $GH_TOKEN" -d \'{{"title":"t",'
            f'"head":"{record_branch()}","base":"main","body":"b"}}\' '
            f"{api}/repos/{owner_repo}/pulls"
        )
        stop("I opened the pull request myself.")
        result("I opened the pull request myself.")
    elif scenario == "secrets":
        for command in ("env", "git remote -v", "cat .git/config",
                        "git config --list --show-origin"):  # fmt: skip
            bash(command)
        commit()
        stop("Done.")
        result("Done.")
    elif scenario == "wreck":
        commit()
        bash("rm -rf .git")
        stop("I removed the repository's history.")
        result("I removed the repository's history.")
    elif scenario == "hang":
        # A command in a session of its own, as the CLI's Bash tool does, and
        # the Stop hook run on SIGTERM, as the CLI may.
        subprocess.Popen(["sleep", "600"], start_new_session=True)
        commit()
        done = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: done.set())
        say("Working on it.")
        done.wait(600)
        stop("I updated the greeting.")
        result("interrupted", subtype="error_during_execution", is_error=True)
        sys.exit(143)
    elif scenario == "gated-hang":
        # Commits once STAND_IN_GATE exists, then works until SIGTERM; with
        # STAND_IN_TERM_RUNNER it signals the runner itself right after the
        # commit, before the branch backup's next look (every 2 s).
        while not os.path.exists(os.environ["STAND_IN_GATE"]):
            time.sleep(0.05)
        done = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: done.set())
        commit()
        if os.environ.get("STAND_IN_TERM_RUNNER"):
            os.kill(int(os.environ["SHEPHERD_RUNNER_PID"]), signal.SIGTERM)
        say("Working on it.")
        done.wait(600)
        sys.exit(143)


def record_branch():
    return subprocess.run(["git", "branch", "--show-current"], capture_output=True,
                          text=True).stdout.strip()  # fmt: skip


if __name__ == "__main__":
    main()
