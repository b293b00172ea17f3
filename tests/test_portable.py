"""One settings.json for every build: the staged Stop hook runs the runner that staged it.

The venv runner is `python -m shepherd_runner`, the portable one (PyInstaller,
deploy/portable.spec) an executable with no `python` beside it. The image
tests (tests/test_image.py) run both builds whole; these are the pieces.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest

import shepherd_runner as sr
from conftest import ROOT

PORTABLE = ("/opt/shepherd-runner/shepherd-runner",)


def staged(home, config_dir=ROOT, **runner):
    sr.stage_config(str(config_dir), str(home), **runner)
    return json.loads((home / ".claude" / "settings.json").read_text())


def hook_commands(settings) -> dict[str, list[str]]:
    return {
        event: [hook["command"] for group in groups for hook in group["hooks"]]
        for event, groups in settings["hooks"].items()
    }


def test_the_runner_command_is_this_interpreter_isolated_with_m_unless_frozen():
    venv = ("/srv/runner/venv/bin/python", "-I", "-m", "shepherd_runner")
    assert sr.runner_command(venv[0], frozen=False) == venv
    assert sr.runner_command(PORTABLE[0], frozen=True) == PORTABLE
    # Under pytest the runner is the venv's module.
    default = sr.RUNNER_COMMAND
    assert default == (sys.executable, "-I", "-m", "shepherd_runner")


def test_staging_points_the_repository_hooks_at_the_interpreter_that_runs_the_runner(home):
    settings = staged(home)
    command = f"{shlex.quote(sys.executable)} -I -m shepherd_runner hook"
    assert hook_commands(settings) == {"Stop": [command], "StopFailure": [command]}
    repository = json.loads((ROOT / "settings.json").read_text())
    assert settings["hooks"]["Stop"][0]["hooks"][0]["timeout"] == 30
    assert set(settings) == set(repository)
    assert (home / ".claude" / "CLAUDE.md").read_text() == (ROOT / "CLAUDE.md").read_text()


def test_staging_by_the_portable_runner_makes_the_hooks_run_its_executable(home, log):
    settings = staged(home, runner=PORTABLE)
    command = "/opt/shepherd-runner/shepherd-runner hook"
    assert hook_commands(settings) == {"Stop": [command], "StopFailure": [command]}
    assert "hook commands run this runner hooks=2 command=" in log.getvalue()
    assert PORTABLE[0] in log.getvalue()


def test_a_runner_path_with_spaces_is_quoted_for_the_shell(home):
    runner = ("/srv/my runners/bin/python", "-m", "shepherd_runner")
    settings = staged(home, runner=runner)
    assert hook_commands(settings)["Stop"] == [
        "'/srv/my runners/bin/python' -m shepherd_runner hook"
    ]


@pytest.mark.parametrize(
    ("command", "expect"),
    [
        ("python -m shepherd_runner hook", "/opt/shepherd-runner/shepherd-runner hook"),
        ("python3 -m shepherd_runner hook", "/opt/shepherd-runner/shepherd-runner hook"),
        ("  /usr/bin/python3.11  -m shepherd_runner hook 2>>/tmp/hook.log",
         "/opt/shepherd-runner/shepherd-runner hook 2>>/tmp/hook.log"),
        ("shepherd-runner hook", "/opt/shepherd-runner/shepherd-runner hook"),
        ("/usr/local/bin/shepherd-runner hook", "/opt/shepherd-runner/shepherd-runner hook"),
        # not the runner: kept as they are
        ("python -m shepherd_runnerx hook", None),
        ("my-shepherd-runner hook", None),
        ("python -m pytest", None),
        ("echo shepherd-runner", None),
    ],
)  # fmt: skip
def test_only_hook_commands_that_run_the_runner_are_rewritten(tmp_path, home, command, expect):
    settings = {
        "model": "x",
        "hooks": {
            "Stop": [{"hooks": [{"type": "command", "command": command, "timeout": 30}]}],
            "PostToolUse": [{"matcher": "Bash", "hooks": [{"type": "command", "command": "true"}]}],
        },
    }
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    out = staged(home, tmp_path, runner=PORTABLE)
    assert hook_commands(out) == {"Stop": [expect or command], "PostToolUse": ["true"]}
    assert out["model"] == "x"


def test_settings_that_are_not_json_are_staged_as_they_are_with_a_warning(tmp_path, home, log):
    (tmp_path / "settings.json").write_bytes(b'{"hooks": python -m shepherd_runner hook')
    sr.stage_config(str(tmp_path), str(home), runner=PORTABLE)
    staged_bytes = (home / ".claude" / "settings.json").read_bytes()
    assert staged_bytes == b'{"hooks": python -m shepherd_runner hook'
    assert re.search(r"WARNING settings.json is not JSON; staged as it is path=\S+", log.getvalue())


def test_settings_without_runner_hooks_are_copied_byte_for_byte(tmp_path, home, log):
    text = b'{\n    "permissions": {"allow": ["Bash"]}\n}\n'
    (tmp_path / "settings.json").write_bytes(text)
    sr.stage_config(str(tmp_path), str(home), runner=PORTABLE)
    assert (home / ".claude" / "settings.json").read_bytes() == text
    assert "hook commands" not in log.getvalue()


def test_the_staged_hook_command_runs_the_hook_with_no_python_on_path(home, tmp_path):
    """The agent's PATH need not hold the runner's python: the command names it."""
    settings = staged(home)
    command = hook_commands(settings)["Stop"][0]
    env = {"PATH": str(tmp_path / "empty"), "HOME": str(home)}
    proc = subprocess.run(
        ["/bin/sh", "-c", command], input=b"{}", env=env, capture_output=True, timeout=60
    )
    # The hook itself answered: it wants the task's environment, which the runner sets.
    assert proc.returncode == 1, proc.stderr
    assert b"stop hook needs SHEPHERD_API_URL and SHEPHERD_TASK_ID" in proc.stderr


# ---------------------------------------------------------------------------
# the environment the portable build's children get
# ---------------------------------------------------------------------------


def test_unfreeze_restores_the_pods_library_path_and_drops_the_bootloaders_variables():
    environ = {
        "LD_LIBRARY_PATH": "/opt/shepherd-runner/_internal:/usr/local/lib",
        "LD_LIBRARY_PATH_ORIG": "/usr/local/lib",
        "_PYI_ARCHIVE_FILE": "/opt/shepherd-runner/shepherd-runner",
        "_PYI_PARENT_PROCESS_LEVEL": "-1",
        "PATH": "/usr/bin:/bin",
    }
    sr.unfreeze_environ(environ)
    assert environ == {"LD_LIBRARY_PATH": "/usr/local/lib", "PATH": "/usr/bin:/bin"}


def test_unfreeze_removes_a_library_path_that_the_pod_did_not_set():
    environ = {"LD_LIBRARY_PATH": "/opt/shepherd-runner/_internal", "HOME": "/home/shepherd"}
    sr.unfreeze_environ(environ)
    assert environ == {"HOME": "/home/shepherd"}


# ---------------------------------------------------------------------------
# the README's example is the file that `make image-test` builds
# ---------------------------------------------------------------------------


def test_the_readme_example_dockerfile_is_deploy_byoi_dockerfile():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Bring your own image\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```dockerfile\n(.*?)```", section, re.DOTALL)
    example = (ROOT / "deploy" / "byoi.Dockerfile").read_text()
    assert example in blocks, "the section has no dockerfile block that is the file"
    assert re.search(r"^ARG BASE=node:22-slim$", example, re.MULTILINE)
    assert f'ENTRYPOINT ["/usr/bin/tini", "--", "{PORTABLE[0]}"]' in example


def test_the_staged_hook_runs_ours_in_a_repository_with_its_own_hook_module(tmp_path, home):
    # Claude Code runs hooks in the repository's root: plain `python -m` would
    # import the repository's hook.py (or whatever a PYTHONPATH names) first.
    command = hook_commands(staged(home))["Stop"][0]
    repo = tmp_path / "repo"
    repo.mkdir()
    hijack = "import pathlib, sys\npathlib.Path('hijacked').touch()\nsys.exit(2)\n"
    for name in ("hook.py", "shepherd_runner.py"):
        (repo / name).write_text(hijack)
    payload = {"hook_event_name": "Stop", "stop_hook_active": False, "cwd": str(repo)}
    proc = subprocess.run(
        command, shell=True, cwd=repo, input=json.dumps(payload), capture_output=True,
        text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(home),
                                    "PYTHONPATH": str(repo)},
    )  # fmt: skip
    assert not (repo / "hijacked").exists(), proc
    # Ours ran: outside a task it says what it misses (and never exits 2).
    assert proc.returncode == 1 and "stop hook needs SHEPHERD_API_URL" in proc.stderr, proc
