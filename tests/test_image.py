"""Checks of the container image, run by `make image-test` (podman, root).

`make image-test` builds the image and names it in SHEPHERD_IMAGE; the
suite's default marker expression (`-m 'not image'`) leaves these tests out
of `make test`, and without the image they fail, never skip.
SHEPHERD_PODMAN_RUN_ARGS (shell words) replaces the flags that `podman run`
is found to need on this machine.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import resource
import secrets
import shlex
import shutil
import socket
import subprocess
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fake_model import FakeModel

pytestmark = pytest.mark.image

IMAGE = os.environ.get("SHEPHERD_IMAGE", "")
DEFAULT_PORT = 8888  # the runner's default listen address is :8888
START_TIMEOUT = 60.0  # seconds for the runner to answer /healthz
STOP_BUDGET = 10.0  # the runner finishes within 10 s of SIGTERM
MAX_IMAGE_BYTES = 900 * 10**6  # the budget with Go (issue 16); podman counts MB as 10**6


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        pytest.fail(f"podman {shlex.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def image() -> str:
    if not IMAGE:
        pytest.fail("SHEPHERD_IMAGE is not set: `make image-test` builds the image and sets it")
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: `make image-deps`")
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        pytest.fail(f"image {IMAGE} does not exist: `make image`")
    return IMAGE


@pytest.fixture(scope="module")
def run_args(image: str) -> list[str]:
    """The extra `podman run` flags this machine needs, found by trying.

    As root, podman asks the OCI runtime for nofile/nproc limits far above
    the hard limits, which fails on a machine without CAP_SYS_RESOURCE (such
    as the VM this project builds on), and crun refuses its hybrid cgroups.
    runc with the limits the caller already has works there. 32768 processes
    is the most podman itself can hand on here.
    """
    if "SHEPHERD_PODMAN_RUN_ARGS" in os.environ:
        return shlex.split(os.environ["SHEPHERD_PODMAN_RUN_ARGS"])
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nproc = 32768 if nproc == resource.RLIM_INFINITY else min(nproc, 32768)
    constrained = [
        "--runtime", "runc",
        "--ulimit", f"nofile={nofile}:{nofile}",
        "--ulimit", f"nproc={nproc}:{nproc}",
    ]  # fmt: skip
    errors = []
    for candidate in ([], constrained):
        probe = ["run", "--rm", "--network", "host", *candidate, "--entrypoint", "true", image]
        proc = podman(*probe, check=False, timeout=60)
        if proc.returncode == 0:
            return candidate
        errors.append(f"{shlex.join(candidate) or '(no flags)'}: {proc.stderr.strip()}")
    pytest.fail("podman cannot run a container here:\n" + "\n".join(errors))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))  # noqa: S104 - where the runner would listen
        except OSError:
            return False
        return True


@dataclass
class Container:
    name: str
    port: int

    def exec(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *cmd, check=False, timeout=timeout)

    def state(self) -> dict:
        proc = podman("container", "inspect", "--format", "{{json .State}}", self.name)
        return json.loads(proc.stdout)

    def logs(self) -> str:
        proc = podman("logs", self.name, check=False)
        return proc.stdout + proc.stderr


def get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_healthy(ctr: Container) -> tuple[int, bytes, float]:
    """Poll GET /healthz until it answers or START_TIMEOUT passes."""
    start = time.monotonic()
    deadline = start + START_TIMEOUT
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            status, body = get(ctr.port, "/healthz")
            return status, body, time.monotonic() - start
        except (ConnectionError, TimeoutError, http.client.HTTPException, OSError) as exc:
            last_error = exc
        if not ctr.state().get("Running"):
            pytest.fail(f"the container exited before answering /healthz:\n{ctr.logs()}")
        time.sleep(0.1)  # the poll interval of the bounded loop
    pytest.fail(f"no answer on /healthz in {START_TIMEOUT:.0f} s ({last_error}):\n{ctr.logs()}")


@contextlib.contextmanager
def runner_container(
    image: str, run_args: list[str], port: int | None = None, environ: dict | None = None
) -> Iterator:
    """The image started as it is (entrypoint `shepherd-runner serve`)."""
    name = f"shepherd-image-test-{secrets.token_hex(4)}"
    env: list[str] = []
    if port is None:
        port = DEFAULT_PORT
    if port != DEFAULT_PORT:
        env = ["--env", f"SHEPHERD_RUNNER_ADDR=127.0.0.1:{port}"]
    for key, value in (environ or {}).items():
        env += ["--env", f"{key}={value}"]
    podman("run", "--detach", "--name", name, "--network", "host", *run_args, *env, image)
    try:
        yield Container(name, port)
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


@pytest.fixture(scope="module")
def container(image: str, run_args: list[str]) -> Iterator[Container]:
    # --network host: the container's :8888 is the host's. Test the default
    # address when it is free here, another port otherwise.
    port = DEFAULT_PORT if port_is_free(DEFAULT_PORT) else free_port()
    with runner_container(image, run_args, port) as ctr:
        yield ctr


def test_serves_healthz_as_uid_1000(container: Container, image: str) -> None:
    status, body, took = wait_healthy(container)
    assert status == 200, body
    print(f"/healthz answered {status} {took:.1f} s after start")
    # PID 1 is tini, which runs the runner, all as uid/gid 1000.
    proc = container.exec("cat", "/proc/1/status", "/proc/1/cmdline")
    assert proc.returncode == 0, proc.stderr
    fields = dict(line.split(":", 1) for line in proc.stdout.splitlines() if ":" in line)
    assert fields["Uid"].split() == ["1000"] * 4
    assert fields["Gid"].split() == ["1000"] * 4
    assert "tini" in proc.stdout and "shepherd-runner" in proc.stdout
    config = json.loads(podman("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert config["User"] == "1000:1000"
    assert "8888/tcp" in config.get("ExposedPorts", {})


@pytest.mark.parametrize(
    ("cmd", "expect"),
    [
        (["claude", "--version"], "Claude Code"),
        (["git", "--version"], "git version"),
        (["gh", "--version"], "gh version"),
        (["python", "-c", "import shepherd_runner, hook; print(shepherd_runner.__file__)"],
         "/opt/shepherd/venv/"),
        (["sh", "-c", "command -v python"], "/opt/shepherd/venv/bin/python"),
        (["jq", "--version"], "jq-"),
        (["rg", "--version"], "ripgrep"),
        (["make", "--version"], "GNU Make"),
        (["ssh", "-V"], "OpenSSH"),
        (["curl", "--version"], "curl"),
    ],
    ids=lambda value: value[0] if isinstance(value, list) else None,
)  # fmt: skip
def test_tool_works_inside(container: Container, cmd: list[str], expect: str) -> None:
    proc = container.exec(*cmd)
    assert proc.returncode == 0, proc.stderr
    assert expect in proc.stdout + proc.stderr


def test_no_node_inside(container: Container) -> None:
    for tool in ("node", "nodejs", "npm", "npx"):
        proc = container.exec("sh", "-c", f"command -v {tool}")
        assert proc.returncode != 0, f"{tool} is in the image: {proc.stdout.strip()}"


def test_layout(container: Container) -> None:
    script = (
        'test -w /workspace && test -w "$HOME" && test "$HOME" = /home/shepherd'
        " && test -r /etc/shepherd/settings.json && test -r /etc/shepherd/CLAUDE.md"
        " && test ! -w /opt/shepherd/venv"
        ' && echo "$SHEPHERD_CONFIG_DIR $SHEPHERD_WORK_DIR $DISABLE_AUTOUPDATER"'
    )
    proc = container.exec("sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["/etc/shepherd", "/workspace", "1"]
    proc = container.exec("cat", "/etc/shepherd/settings.json")
    assert "shepherd_runner hook" in json.dumps(json.loads(proc.stdout))


def test_stops_promptly_on_sigterm(image: str, run_args: list[str]) -> None:
    with runner_container(image, run_args, free_port()) as ctr:
        wait_healthy(ctr)
        start = time.monotonic()
        podman("stop", "--time", "30", ctr.name, timeout=60)
        took = time.monotonic() - start
        state = ctr.state()
    assert took < STOP_BUDGET, f"podman stop took {took:.1f} s"
    assert state["ExitCode"] != 137, "the runner had to be killed"
    print(f"stopped {took:.1f} s after SIGTERM, exit code {state['ExitCode']}")


def test_image_size_is_within_budget(image: str, capsys: pytest.CaptureFixture) -> None:
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout)
    with capsys.disabled():
        print(f"\nimage {image}: {size / 1e6:.0f} MB")
    assert size < MAX_IMAGE_BYTES


# --- the agent's toolchains ---------------------------------------------------
# Each check runs in a fresh container as the pod has it: the image's user,
# an empty world-writable HOME (an emptyDir hides the image's), and no network
# (nothing may need a download). /src holds what the test wrote, read-only.

# main serves the greeting as JSON over loopback HTTP and prints what it reads
# back: building it compiles net/http, crypto/tls and encoding/json from the
# image's Go sources, which the image trims (deploy/go-slim.dpkg.cfg).
GO_MODULE = {
    "go.mod": "module example.com/greet\n\ngo 1.23\n",
    "greet.go": """package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
)

func Greeting(name string) string { return "hello, " + name }

func main() {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = json.NewEncoder(w).Encode(map[string]string{"greeting": Greeting("shepherd")})
	}))
	defer srv.Close()
	resp, err := http.Get(srv.URL)
	if err != nil {
		panic(err)
	}
	defer resp.Body.Close()
	var body map[string]string
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		panic(err)
	}
	fmt.Println(body["greeting"])
}
""",
    "greet_test.go": (
        'package main\n\nimport "testing"\n\n'
        "func TestGreeting(t *testing.T) {\n"
        '\tif got := Greeting("go"); got != "hello, go" {\n\t\tt.Fatalf("got %q", got)\n\t}\n}\n'
    ),
}
PROBE = "shepherd_probe"  # the package of the wheel the pip checks install


def probe_wheel(directory: Path) -> str:
    """A pure-Python wheel with a console script, made here (no index, no build backend)."""
    dist = f"{PROBE}-1.0.dist-info"
    files = {
        f"{PROBE}/__init__.py": "def main():\n    print('probe ran')\n",
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: shepherd-probe\nVersion: 1.0\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test_image\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
        f"{dist}/entry_points.txt": f"[console_scripts]\nshepherd-probe = {PROBE}:main\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    name = f"{PROBE}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(directory / name, "w") as whl:
        for path, text in files.items():
            whl.writestr(path, text)
    return name


@dataclass
class Workbench:
    """Runs a bash script in a fresh container like the pod's; `src` is its /src."""

    image: str
    run_args: list[str]
    home: Path
    src: Path

    def __call__(self, script: str) -> subprocess.CompletedProcess:
        volumes = ["--volume", f"{self.home}:/home/shepherd", "--volume", f"{self.src}:/src:ro"]
        return podman("run", "--rm", "--network", "none", *self.run_args, *volumes,
                      "--entrypoint", "bash", self.image, "-euc", script,
                      check=False, timeout=600)  # fmt: skip


@pytest.fixture
def workbench(image: str, run_args: list[str], tmp_path: Path) -> Workbench:
    home, src = tmp_path / "home", tmp_path / "src"
    home.mkdir()
    home.chmod(0o777)  # as an emptyDir is
    src.mkdir()
    return Workbench(image, run_args, home, src)


def show(capsys: pytest.CaptureFixture, title: str, text: str) -> None:
    with capsys.disabled():
        print(f"\n--- {title}\n{text.rstrip()}")


def test_go_builds_vets_tests_and_installs_a_module_as_uid_1000(workbench, capsys) -> None:
    module = workbench.src / "greet"
    module.mkdir()
    for name, text in GO_MODULE.items():
        (module / name).write_text(text)
    proc = workbench(
        'test "$(id -u)" = 1000 && go version'
        " && cp -r /src/greet ~/greet && cd ~/greet"
        " && go build -o greet . && ./greet"
        " && go vet ./..."
        " && go test -v ./..."
        " && go install . && command -v greet && greet"
    )
    show(capsys, "go version, build, vet, test and install in the image", proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("go version go1.2"), lines[0]
    assert lines[1] == "hello, shepherd"  # the binary go build made
    assert "--- PASS: TestGreeting" in proc.stdout
    assert "ok  \texample.com/greet" in proc.stdout
    # go install put it in $GOPATH/bin, created in the empty HOME, found by name
    assert lines[-2:] == ["/home/shepherd/go/bin/greet", "hello, shepherd"]


def test_go_fetches_the_toolchain_a_go_mod_asks_for(workbench, capsys) -> None:
    # GOTOOLCHAIN stays Go's default (auto): a go.mod asking for a newer Go makes
    # the go command download it (here it cannot: no network). With `local`,
    # `go version` would print 1.23 and succeed, and builds would refuse the module.
    proc = workbench(
        "go env GOTOOLCHAIN GOPATH CGO_ENABLED && mkdir ~/newer && cd ~/newer"
        ' && printf "module example.com/newer\n\ngo 1.25.0\n" >go.mod'
        " && ! go version"  # the script succeeds only if it fails
    )
    show(capsys, "go env GOTOOLCHAIN GOPATH CGO_ENABLED; go version in a go 1.25.0 module",
         proc.stdout + proc.stderr)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:3] == ["auto", "/home/shepherd/go", "0"]
    assert "go: downloading go1.25.0 (linux/amd64)" in proc.stderr
    assert "GOTOOLCHAIN=local" not in proc.stderr


def test_pip_install_user_works_in_an_empty_home(workbench, capsys) -> None:
    wheel = probe_wheel(workbench.src)
    proc = workbench(
        f"pip install --user --no-index /src/{wheel} && command -v shepherd-probe && shepherd-probe"
        f' && python3 -c "import {PROBE}; print({PROBE}.__file__)"'
    )
    show(capsys, "pip install --user in the image", proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Successfully installed shepherd-probe-1.0" in proc.stdout
    # the console script in ~/.local/bin (first on PATH), the module for python3
    assert proc.stdout.splitlines()[-3:] == [
        "/home/shepherd/.local/bin/shepherd-probe",
        "probe ran",
        f"/home/shepherd/.local/lib/python3.11/site-packages/{PROBE}/__init__.py",
    ]


def test_python_m_venv_makes_a_working_environment(workbench, capsys) -> None:
    wheel = probe_wheel(workbench.src)
    proc = workbench(
        f"python -m venv ~/venv && ~/venv/bin/pip install -q --no-index /src/{wheel}"
        " && . ~/venv/bin/activate && command -v shepherd-probe && shepherd-probe"
    )
    show(capsys, "python -m venv in the image", proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-2:] == ["/home/shepherd/venv/bin/shepherd-probe", "probe ran"]


# --- a real task inside the image -------------------------------------------


def _processes(cmdline: bytes) -> list[int]:
    """Host pids whose command line is `cmdline` (the container's are visible here)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
            if f.read() == cmdline:
                found.append(int(entry))
    return found


@contextlib.contextmanager
def task_container(image, run_args, api, github, token, script):
    """A container whose runner, CLI and hook are the image's, with one task assigned.

    --network host: the fakes on the host's loopback are the container's too.
    """
    repo = github.create_repo("acme", "widgets")
    api.add_task(TASK, repo_url=repo, token=token)
    with FakeModel(script) as model:
        environ = {
            "ANTHROPIC_BASE_URL": model.url,
            "ANTHROPIC_API_KEY": "sk-ant-image-test-" + secrets.token_hex(8),
            "SHEPHERD_GITHUB_API_URL": github.api_url,
            "CLAUDE_CODE_MAX_RETRIES": "0",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        }
        with runner_container(image, run_args, free_port(), environ) as ctr:
            wait_healthy(ctr)
            conn = http.client.HTTPConnection("127.0.0.1", ctr.port, timeout=10)
            conn.request("POST", "/task", json.dumps({"taskID": TASK, "apiURL": api.url}),
                         {"Content-Type": "application/json"})  # fmt: skip
            assert conn.getresponse().status == 200
            conn.close()
            yield ctr


TASK = "image-task"
COMMIT = "git add -A && git commit -qm 'Update greeting'"


def test_task_runs_end_to_end_inside_the_image(image, run_args, api, github, token):
    script = [
        {"tool": "Read", "input": {"file_path": "README.md"}},
        {"tool": "Edit", "input": {"file_path": "README.md", "old_string": "hello",
                                   "new_string": "hello world"}},
        {"tool": "Bash", "input": {"command": COMMIT, "description": "commit"}},
        {"text": "Updated the greeting.", "end": True},
    ]  # fmt: skip
    with task_container(image, run_args, api, github, token, script) as ctr:
        terminal = api.wait_terminal(TASK, timeout=120)
        podman("wait", ctr.name, timeout=60)
        state, logs = ctr.state(), ctr.logs()
    assert terminal["event"] == "completed", (terminal, logs)
    # The image's baked settings.json hook (python -m shepherd_runner hook),
    # staged as the venv's python by its path, decided it.
    assert terminal["details"]["decided_by"] == "stop-hook", logs
    venv_runner = "/opt/shepherd/venv/bin/python3 -I -m shepherd_runner"
    assert f'hook commands run this runner hooks=2 command="{venv_runner}"' in logs
    assert "executable=/opt/shepherd/venv/bin/python3" in logs
    assert github.log("acme", "widgets", f"shepherd/{TASK}")[0] == "Update greeting"
    assert len(github.pulls) == 1
    assert state["ExitCode"] == 0, logs
    assert token not in logs


def test_podman_stop_during_a_task_reports_failed_and_leaves_nothing(
    image, run_args, api, github, token
):
    marker = b"sleep\x00617\x00"
    # not a leading `sleep`: the CLI refuses those (tests/CLI_FINDINGS.md)
    script = [{"tool": "Bash", "input": {"command": "echo working && sleep 617",
                                         "description": "wait"}},
              {"text": "Slept.", "end": True}]  # fmt: skip
    with task_container(image, run_args, api, github, token, script) as ctr:
        deadline = time.monotonic() + 90
        while not _processes(marker):  # the agent is in the middle of its command
            assert time.monotonic() < deadline and ctr.state().get("Running"), ctr.logs()
            time.sleep(0.1)
        start = time.monotonic()
        podman("stop", "--time", "30", ctr.name, timeout=60)
        took = time.monotonic() - start
        state, logs = ctr.state(), ctr.logs()
    terminal = api.terminal(TASK)
    assert terminal is not None and terminal["event"] == "failed", logs
    assert terminal["message"].startswith("terminated (SIGTERM)")
    assert state["ExitCode"] == 0, logs
    assert took < STOP_BUDGET
    assert _processes(marker) == []
    print(f"podman stop during a task: {took:.2f} s to a clean exit")


# --- bring your own image: the portable runner in an image without Python ----

BYOI_IMAGE = os.environ.get("SHEPHERD_BYOI_IMAGE", "")
PORTABLE = "/opt/shepherd-runner/shepherd-runner"
PORTABLE_MAX_KB = 30 * 1000  # the directory's budget: 30 MB


@pytest.fixture(scope="module")
def byoi_image(image: str) -> str:
    """deploy/byoi.Dockerfile built on the Debian base with the runner from `image`."""
    if not BYOI_IMAGE:
        pytest.fail("SHEPHERD_BYOI_IMAGE is not set: `make image-test` builds it and sets it")
    if podman("image", "exists", BYOI_IMAGE, check=False).returncode != 0:
        pytest.fail(f"image {BYOI_IMAGE} does not exist: `make image-byoi`")
    return BYOI_IMAGE


def test_the_image_ships_the_portable_runner_for_copy_from(container: Container) -> None:
    proc = container.exec(PORTABLE, "--version")
    assert (proc.returncode, proc.stdout.strip()) == (0, "shepherd-runner 0.1.0"), proc.stderr
    proc = container.exec(
        "sh", "-c", "test ! -w /opt/shepherd-runner && du -sk /opt/shepherd-runner"
    )
    assert proc.returncode == 0, proc.stderr
    size_kb = int(proc.stdout.split()[0])
    print(f"/opt/shepherd-runner: {size_kb / 1000:.1f} MB")
    assert size_kb <= PORTABLE_MAX_KB


def test_the_byoi_image_has_no_python_only_the_portable_runner(byoi_image, run_args) -> None:
    script = (
        "id -u; id -g; echo $HOME"
        " && ! command -v python3 && ! command -v python"
        " && command -v git && command -v tini && command -v claude"
        ' && test -w "$HOME" && test -w /workspace'
        f" && {PORTABLE} --help"
    )
    proc = podman("run", "--rm", "--network", "host", *run_args, "--entrypoint", "sh",
                  byoi_image, "-c", script, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["1000", "1000", "/home/shepherd"]
    assert lines[3:6] == ["/usr/bin/git", "/usr/bin/tini", "/usr/local/bin/claude"]
    assert "usage: shepherd-runner serve" in proc.stdout


def test_the_portable_runner_serves_and_stops_promptly_in_the_byoi_image(byoi_image, run_args):
    with runner_container(byoi_image, run_args, free_port()) as ctr:
        status, _, took = wait_healthy(ctr)
        proc = ctr.exec("cat", "/proc/1/cmdline")
        start = time.monotonic()
        podman("stop", "--time", "30", ctr.name, timeout=60)
        stopped = time.monotonic() - start
        state = ctr.state()
    assert status == 200
    assert proc.stdout.split("\0")[:3] == ["/usr/bin/tini", "--", PORTABLE]
    assert stopped < STOP_BUDGET and state["ExitCode"] == 0, state
    print(f"byoi image: /healthz after {took:.1f} s, stopped {stopped:.1f} s after SIGTERM")


def test_a_whole_task_runs_in_the_byoi_image_with_the_hook_from_the_portable_runner(
    byoi_image, run_args, api, github, token
):
    # The commit message says how many of the bootloader's variables the
    # agent's commands see: none (unfreeze_environ).
    commit = (
        "n=$(env | grep -c -e '^LD_LIBRARY_PATH=' -e '^_PYI_');"
        ' git add -A && git commit -qm "Update greeting ($n loader variables)"'
    )
    script = [
        {"tool": "Read", "input": {"file_path": "README.md"}},
        {"tool": "Edit", "input": {"file_path": "README.md", "old_string": "hello",
                                   "new_string": "hello world"}},
        {"tool": "Bash", "input": {"command": commit, "description": "commit"}},
        {"text": "Updated the greeting.", "end": True},
    ]  # fmt: skip
    start = time.monotonic()
    with task_container(byoi_image, run_args, api, github, token, script) as ctr:
        terminal = api.wait_terminal(TASK, timeout=120)
        podman("wait", ctr.name, timeout=60)
        state, logs = ctr.state(), ctr.logs()
    assert terminal["event"] == "completed", (terminal, logs)
    # The Stop hook decided, run as the staged settings.json says: the portable
    # runner's executable (there is no python in this image to run another).
    assert terminal["details"]["decided_by"] == "stop-hook", logs
    assert f"hook commands run this runner hooks=2 command={PORTABLE}" in logs
    assert "INFO stop hook decided event=completed" in logs
    assert f"executable={PORTABLE}" in logs
    assert github.log("acme", "widgets", f"shepherd/{TASK}")[0] == (
        "Update greeting (0 loader variables)"
    )
    assert len(github.pulls) == 1
    assert state["ExitCode"] == 0, logs
    assert token not in logs
    print(f"a task in the byoi image: {time.monotonic() - start:.1f} s")
