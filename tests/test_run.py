"""The one function that runs subprocesses, and the error that carries their failure."""

from __future__ import annotations

import sys

import shepherd_runner as sr


def test_a_missing_program_is_a_result_not_a_crash():
    code, out, err = sr.run(["no-such-program-shepherd"])
    assert (code, out) == (127, "")
    assert err == "no-such-program-shepherd: command not found"


def test_a_missing_working_directory_is_named(tmp_path):
    code, _, err = sr.run(["true"], cwd=tmp_path / "gone")
    assert code == 127 and err == f"{tmp_path / 'gone'}: no such directory"


def test_a_command_over_its_time_is_stopped_with_124():
    code, _, err = sr.run([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert code == 124 and "timed out after 0.5s" in err


def test_output_and_exit_code_come_back():
    code, out, err = sr.run([sys.executable, "-c", "import sys; print('o'); sys.exit('e')"])
    assert (code, out, err) == (1, "o\n", "e\n")


def test_command_error_blanks_the_token_in_argv_output_and_message(token):
    redact = sr.Redactor([token])
    exc = sr.CommandError(
        ["git", "push", f"https://x:{token}@h/o/r"], 128, token, f"no {token}", redact
    )
    for text in (str(exc), exc.out, exc.err, " ".join(exc.cmd)):
        assert token not in text
    assert exc.code == 128 and "exited with 128" in str(exc)


def test_git_failure_raises_command_error_with_gits_words(tmp_path):
    git = sr.Git(str(tmp_path), {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, sr.Redactor())
    try:
        git("rev-parse", "HEAD")
    except sr.CommandError as exc:
        assert exc.code == 128 and "not a git repository" in exc.err
    else:
        raise AssertionError("git rev-parse outside a repository succeeded")
