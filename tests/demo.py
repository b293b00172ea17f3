"""`make demo`: the runner's whole job on one task, on this machine, no cluster.

Starts the fake Shepherd API, a git + GitHub server holding a small sample
repository and a scripted model; runs the real runner with the real Claude
Code CLI; prints what an operator would see. With ANTHROPIC_API_KEY set and
DEMO_MODEL=real, the real model does the work instead of the script.

`--serve-only` starts the same servers and prints the environment and the
curl command to run the runner yourself (the README's development section),
then waits for the task's terminal status and prints the same report.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from fake_github import FakeGitHub  # noqa: E402
from fake_model import FakeModel  # noqa: E402
from fake_shepherd import FakeShepherd  # noqa: E402
from harness import Runner, runner_env  # noqa: E402

TASK = "demo-task-1"
SCRIPT = [
    {"text": "I'll read the README to see the greeting.", "tool": "Read",
     "input": {"file_path": "README.md"}},
    {"tool": "Edit", "input": {"file_path": "README.md", "old_string": "Hello.",
                               "new_string": "Hello, world!"}},
    {"tool": "Bash", "input": {"command": "grep -c 'world' README.md", "description": "check"}},
    {"tool": "Bash", "input": {"command": "git commit -qam 'Greet the world' && git log --oneline",
                               "description": "commit"}},
    {"text": "The README now greets the world; the change is committed on the task branch.",
     "end": True},
]  # fmt: skip


def main() -> int:
    claude = os.environ.get("SHEPHERD_TEST_CLAUDE_BIN") or "claude"
    real = os.environ.get("DEMO_MODEL") == "real"
    if real and not os.environ.get("ANTHROPIC_API_KEY"):
        print("DEMO_MODEL=real needs ANTHROPIC_API_KEY", file=sys.stderr)
        return 2
    token = "ghs_" + secrets.token_hex(18)
    with tempfile.TemporaryDirectory(prefix="shepherd-demo-") as tmp:
        root = Path(tmp)
        home = root / "home"
        home.mkdir()
        (home / ".gitconfig").write_text("[user]\n\tname = Demo\n\temail = demo@example.com\n")
        with FakeShepherd() as api, FakeGitHub(root / "github", token) as github:
            repo = github.create_repo("acme", "hello", {"README.md": "# hello\n\nHello.\n"})
            api.add_task(
                TASK, repo_url=repo, token=token,
                description="Make the README greet the whole world",
                context="The greeting is the last line of README.md.",
                source_url="https://github.com/acme/hello/issues/7",
            )  # fmt: skip
            model = None if real else FakeModel(SCRIPT).start()
            extra = {"HOME": str(home), "IS_SANDBOX": "1", "CLAUDE_CODE_MAX_RETRIES": "0",
                     "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}  # fmt: skip
            if model:
                extra |= {"ANTHROPIC_BASE_URL": model.url, "ANTHROPIC_API_KEY": "sk-ant-demo"}
            else:
                extra |= {"ANTHROPIC_API_KEY": os.environ["ANTHROPIC_API_KEY"]}
            env = runner_env(root, claude_bin=claude, github=github, **extra)
            if "--serve-only" in sys.argv:
                code = by_hand(env, api)
            else:
                print(f"== runner log (kubectl logs), model: {'real' if real else 'scripted'}")
                runner = Runner(env, echo=True)
                runner.assign(TASK, api.url)
                code = runner.wait(timeout=1800)
            if model:
                model.stop()
            report(api, github, code)
            terminal = api.terminal(TASK)
            return 0 if terminal and terminal["event"] == "completed" else 1


def by_hand(env: dict[str, str], api: FakeShepherd) -> str:
    names = ("HOME", "SHEPHERD_WORK_DIR", "SHEPHERD_CONFIG_DIR", "SHEPHERD_CLAUDE_BIN",
             "SHEPHERD_GITHUB_API_URL", "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY", "IS_SANDBOX",
             "CLAUDE_CODE_MAX_RETRIES", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC")  # fmt: skip
    print("Fixtures are up. In another shell, from the repository:\n")
    print(
        "  "
        + " \\\n  ".join(f"{n}={env[n]}" for n in names)
        + " \\\n  .venv/bin/python -m shepherd_runner\n"
    )
    body = f'{{"taskID": "{TASK}", "apiURL": "{api.url}"}}'
    print(f"  curl -XPOST localhost:8888/task -H 'Content-Type: application/json' -d '{body}'\n")
    print("Waiting for the task's terminal status (Ctrl-C to stop)...")
    api.wait_terminal(TASK, timeout=3600)
    return "(run by hand)"


def report(api: FakeShepherd, github: FakeGitHub, code: int | str) -> None:
    print(f"\n== runner exit code: {code}")
    print("\n== statuses the Shepherd API received (first terminal one wins)")
    for status in api.statuses(TASK):
        details = {k: v for k, v in status.get("details", {}).items() if k != "error"}
        print(f"  {status['event']:<10} {status['_accepted_as']:<17} {status['message']}")
        if details:
            print(textwrap.indent(textwrap.fill(repr(details), 96), "             "))
    print("\n== events, as the web UI lists them")
    for event in api.events(TASK):
        tool = f"[{event['tool']}] " if event.get("tool") else ""
        print(f"  {event['sequence']:>3} {event['type']:<11} {tool}{event['summary'][:90]!r}")
    print("\n== what arrived on GitHub")
    branch = f"shepherd/{TASK}"
    sha = github.branch_sha("acme", "hello", branch)
    print(f"  branch {branch}: {sha or '(not pushed)'}")
    if sha:
        print(f"  commits: {github.log('acme', 'hello', branch)}")
    for pull in github.pulls:
        route = f"{pull['head']} -> {pull['base']}"
        print(f"  pull request {pull['html_url']}: {pull['title']!r} ({route})")


if __name__ == "__main__":
    raise SystemExit(main())
