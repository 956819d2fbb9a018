"""Exit statuses a user sees: the command's own, 126, 127, 128+N."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from sandbox_helpers import explain, nsbuild, one_line_error, py, sh

pytestmark = pytest.mark.userns


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (["true"], 0),
        (["false"], 1),
        (sh("exit 42"), 42),
        (sh("exit 255"), 255),
    ],
    ids=["true", "false", "exit-42", "exit-255"],
)
def test_command_status_is_passed_through(tmp_path: Path, argv: list[str], status: int) -> None:
    r = nsbuild("--", *argv, cwd=tmp_path)
    assert r.returncode == status, explain(r)
    assert r.stderr == ""


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGUSR1, signal.SIGSEGV], ids=lambda s: s.name
)
def test_killed_by_signal_n_is_128_plus_n(tmp_path: Path, sig: signal.Signals) -> None:
    code = f"import os, resource; resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); " \
           f"os.kill(os.getpid(), {int(sig)})"
    r = nsbuild("--", *py(code), cwd=tmp_path)
    assert r.returncode == 128 + sig, explain(r)


def test_stdout_and_stderr_are_the_commands_own(tmp_path: Path) -> None:
    r = nsbuild("--", *sh("echo out; echo err >&2; exit 3"), cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")


def test_not_executable_is_126(tmp_path: Path) -> None:
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o644)
    r = nsbuild("--", str(script), cwd=tmp_path)
    assert r.returncode == 126, explain(r)
    assert r.stdout == ""
    assert str(script) in one_line_error(r)


def test_directory_as_command_is_126(tmp_path: Path) -> None:
    r = nsbuild("--", "/usr", cwd=tmp_path)
    assert r.returncode == 126, explain(r)
    assert "/usr" in one_line_error(r)


@pytest.mark.parametrize("cmd", ["no-such-command-nsbuild", "/usr/bin/no-such-command-nsbuild"])
def test_not_found_is_127(tmp_path: Path, cmd: str) -> None:
    r = nsbuild("--", cmd, cwd=tmp_path)
    assert r.returncode == 127, explain(r)
    assert cmd in one_line_error(r)


def test_command_found_on_path_of_the_sandbox(tmp_path: Path) -> None:
    r = nsbuild("--setenv", "PATH=/usr/sbin:/usr/bin", "--", "sh", "-c", "echo $0", cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, "sh\n"), explain(r)


def test_path_search_passes_over_what_cannot_run(tmp_path: Path) -> None:
    # As execvp: a missing directory and a file that is not executable are
    # passed over, the first place that runs wins; with only the file that
    # cannot run, its error (126).
    first, second = tmp_path / "first", tmp_path / "second"
    for d, mode in ((first, 0o644), (second, 0o755)):
        d.mkdir()
        (d / "tool").write_text(f"#!/bin/sh\necho {d.name}\n")
        (d / "tool").chmod(mode)
    path = f"/no/such/dir:{first}:{second}:/usr/bin:/bin"
    r = nsbuild("--setenv", f"PATH={path}", "--", "tool", cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, "second\n"), explain(r)
    r = nsbuild("--setenv", f"PATH=/no/such/dir:{first}", "--", "tool", cwd=tmp_path)
    assert r.returncode == 126, explain(r)
    assert "tool" in one_line_error(r)


def test_path_search_as_another_user_meets_its_permission_error(tmp_path: Path) -> None:
    # A PATH directory the --user may not search gives its EACCES (126), as
    # execvp does for that user, not "not found" as root would see it.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    r = nsbuild("--bind", f"{private}:/private", "--user", "1000", "--chdir", "/",
                "--setenv", "PATH=/private", "--", "no-such-tool", cwd=tmp_path)
    assert r.returncode == 126, explain(r)
    assert "no-such-tool" in one_line_error(r)
