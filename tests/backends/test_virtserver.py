"""autopkgtest-virt-nsbuild spoken to directly: the protocol, as any client sees it.

The client end is nsbuild's own (VirtServer), the server the real console
script in a real bookworm environment.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from virt_helpers import Env, run, sessions

from nsbuild.backends.virtproto import VirtServer

pytestmark = pytest.mark.userns


@pytest.fixture
def server_env(tools: Env, monkeypatch: pytest.MonkeyPatch) -> Env:
    """The server inherits our environment: the test session's XDG folders and PATH."""
    for key in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "PATH"):
        monkeypatch.setenv(key, tools.vars[key])
    return tools


@pytest.fixture
def server(server_env: Env) -> Iterator[VirtServer]:
    srv = VirtServer(["autopkgtest-virt-nsbuild", "bookworm"])
    try:
        yield srv
    finally:
        srv.stop()


def _exec(cmd: list[str], *argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [*cmd, *argv], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120, **kw
    )


def test_open_run_copy_revert_close(server: VirtServer, server_env: Env, tmp_path: Path) -> None:
    before = server.capabilities()
    for cap in ("revert", "revert-full-system", "root-on-testbed", "isolation-container"):
        assert cap in before
    assert not any(c.startswith("downtmp-host=") for c in before)

    scratch = server.open()
    caps = server.capabilities()
    assert "suggested-normal-user=nsbuild" in caps
    (shared,) = [Path(c.split("=", 1)[1]) for c in caps if c.startswith("downtmp-host=")]
    ex = server.execute_command()

    # Root inside, and the suggested user exists.
    assert _exec(ex, "id", "-u").stdout.strip() == "0"
    as_user = _exec(ex, "runuser", "-u", "nsbuild", "--", "id", "-un")
    assert as_user.stdout.strip() == "nsbuild", as_user.stderr
    # The testbed keeps its files from one command to the next, /tmp included;
    # the scratch folder is the host's downtmp-host.
    assert _exec(ex, "sh", "-c", f"echo kept > /etc/marker && echo tmp > /tmp/t && "
                                 f"echo shared > {scratch}/s").returncode == 0  # fmt: skip
    assert _exec(ex, "cat", "/etc/marker", "/tmp/t").stdout == "kept\ntmp\n"
    assert (shared / "s").read_text() == "shared\n"
    # The exit status is the command's.
    assert _exec(ex, "sh", "-c", "exit 7").returncode == 7

    # copydown and copyup, files and trees, the exec bit kept.
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "tool").write_text("#!/bin/sh\necho from the tree\n")
    (src / "sub" / "tool").chmod(0o755)
    server.copydown(str(src) + "/", "/srv/tree/")
    assert _exec(ex, "/srv/tree/sub/tool").stdout == "from the tree\n"
    server.copydown(str(src / "sub" / "tool"), "/usr/local/bin/tool")
    assert _exec(ex, "tool").stdout == "from the tree\n"
    server.copyup("/srv/tree/", str(tmp_path / "back") + "/")
    assert (tmp_path / "back" / "sub" / "tool").read_text() == (src / "sub" / "tool").read_text()
    assert os.access(tmp_path / "back" / "sub" / "tool", os.X_OK)
    server.copyup("/etc/marker", str(tmp_path / "marker"))
    assert (tmp_path / "marker").read_text() == "kept\n"

    # revert: a fresh session at the same scratch path; old commands are refused.
    assert server.revert() == scratch
    stale = _exec(ex, "true")
    assert stale.returncode == 255
    assert "the testbed was closed or reverted" in stale.stderr
    ex = server.execute_command()
    assert _exec(ex, "test", "-e", "/etc/marker").returncode == 1
    assert _exec(ex, "id", "-un", "nsbuild").returncode == 0

    # close: a command still running is stopped, the session is gone.
    running = subprocess.Popen([*ex, "sleep", "1000"])
    assert len(sessions(server_env)) == 1
    server.close()
    assert running.wait(timeout=60) != 0
    assert sessions(server_env) == []


def test_copies_never_follow_the_testbeds_symlinks_on_the_host(server: VirtServer) -> None:
    # A host file in a folder that exists inside too (/tmp), named by a
    # symlink the testbed made in the shared scratch folder.
    secret = Path(f"/tmp/nsbuild-test-secret-{os.getpid()}")
    secret.write_text("HOST ONLY\n")
    payload = secret.with_name(secret.name + ".payload")
    payload.write_text("written by copydown\n")
    try:
        server.open()
        ex = server.execute_command()
        assert _exec(ex, "ln", "-s", str(secret), "/tmp/autopkgtest/evil").returncode == 0
        # copydown writes inside the testbed: the host file stays as it was.
        server.copydown(str(payload), "/tmp/autopkgtest/evil")
        assert secret.read_text() == "HOST ONLY\n"
        assert _exec(ex, "cat", str(secret)).stdout == "written by copydown\n"
        # copyup reads inside the testbed too: the testbed's file, not the host's.
        back = secret.with_name(secret.name + ".back")
        server.copyup("/tmp/autopkgtest/evil", str(back))
        assert back.read_text() == "written by copydown\n"
        back.unlink()
    finally:
        secret.unlink()
        payload.unlink()


def test_commands_get_no_network_by_default(server: VirtServer) -> None:
    # A service on the host's loopback: a testbed command must not reach it.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        server.open()
        ex = server.execute_command()
        probe = _exec(ex, "bash", "-c", f"echo hi > /dev/tcp/127.0.0.1/{port}")
        assert probe.returncode != 0
        listener.settimeout(0)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert _exec(ex, "getent", "hosts", "deb.debian.org").returncode != 0


def test_the_callers_end_closes_the_testbed(server_env: Env) -> None:
    proc = subprocess.Popen(["autopkgtest-virt-nsbuild", "bookworm"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == "ok\n"
    proc.stdin.write("open\n")
    proc.stdin.flush()
    assert proc.stdout.readline().startswith("ok ")
    assert len(sessions(server_env)) == 1
    proc.stdin.close()  # the caller went away
    assert proc.wait(timeout=60) == 1
    assert proc.stderr is not None
    assert "end of input" in proc.stderr.read()
    assert sessions(server_env) == []


def test_a_killed_server_leaves_only_what_gc_removes(server_env: Env) -> None:
    proc = subprocess.Popen(["autopkgtest-virt-nsbuild", "bookworm"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    proc.stdout.readline()
    proc.stdin.write("open\n")
    proc.stdin.flush()
    proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert len(sessions(server_env)) == 1
    # (gc's status also covers the test session's deliberately broken
    # environment, so only what it says about the session counts.)
    gc = run(server_env, ["nsbuild", "gc"])
    assert "removed session bookworm-" in gc.stdout
    assert sessions(server_env) == []


def test_bad_input_gets_one_line(server_env: Env) -> None:
    unknown = run(server_env, ["autopkgtest-virt-nsbuild", "no-such-env"], timeout=60)
    assert unknown.returncode == 2
    assert unknown.stdout == ""
    assert unknown.stderr.startswith("autopkgtest-virt-nsbuild: ")
    assert "no-such-env" in unknown.stderr and len(unknown.stderr.splitlines()) == 1

    misuse = subprocess.run(["autopkgtest-virt-nsbuild", "bookworm"], input="copyup /a /b\n",
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert misuse.returncode == 1
    assert misuse.stdout == "ok\n"
    assert "`copyup' when not open" in misuse.stderr
