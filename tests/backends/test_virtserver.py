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
from urllib.parse import unquote

import pytest
from virt_helpers import Env, run, sessions
from waiting import wait_for

from nsbuild.backends.virtproto import VirtServer, VirtServerError
from nsbuild.virtserver.testbed import GONE, NET_ARG

pytestmark = pytest.mark.userns


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
    # The scratch folder is the testbed's: a client copies to and from it.
    assert not any(c.startswith("downtmp-host=") for c in caps)
    ex = server.execute_command()

    # Root inside, and the suggested user exists.
    assert _exec(ex, "id", "-u").stdout.strip() == "0"
    as_user = _exec(ex, "runuser", "-u", "nsbuild", "--", "id", "-un")
    assert as_user.stdout.strip() == "nsbuild", as_user.stderr
    # The testbed keeps its files from one command to the next, /tmp and the
    # scratch folder included.
    assert _exec(ex, "sh", "-c", f"echo kept > /etc/marker && echo tmp > /tmp/t && "
                                 f"echo scratch > {scratch}/s").returncode == 0  # fmt: skip
    assert _exec(ex, "cat", "/etc/marker", "/tmp/t", f"{scratch}/s").stdout == (
        "kept\ntmp\nscratch\n"
    )
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


# The status of a GET through the proxy apt uses (http_proxy), and its body.
_GET = 'my $r = HTTP::Tiny->new->get($ARGV[0]); print "$r->{status} ", substr($r->{content}, 0, 99)'


def test_commands_reach_only_the_mirrors_by_default(server: VirtServer) -> None:
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
    # No name resolves inside; the environment's mirror answers through the
    # proxy, any other host is refused by it.
    assert _exec(ex, "getent", "hosts", "deb.debian.org").returncode != 0
    release = "http://deb.debian.org/debian/dists/bookworm/Release"
    assert _exec(ex, "perl", "-MHTTP::Tiny", "-e", _GET, release).stdout.startswith("200 ")
    other = _exec(ex, "perl", "-MHTTP::Tiny", "-e", _GET, "http://example.org/").stdout
    assert other.startswith("403 nsbuild egress proxy:"), other


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


# -- the testbed is one long-lived sandbox that every command enters --


def _marked(marker: str) -> list[int]:
    """Host PIDs of processes with `marker` as an argument."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                args = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker.encode() in args:
                found.append(int(name))
    return found


def test_commands_share_processes_until_revert_and_close(
    server: VirtServer, server_env: Env
) -> None:
    server.open()
    ex = server.execute_command()
    # A background process left by one command is there for the next.
    left = _exec(ex, "sh", "-c", "sleep 86431 >/dev/null 2>&1 & echo $! > /tmp/bg")
    assert left.returncode == 0, left.stderr
    seen = _exec(ex, "sh", "-c", 'kill -0 "$(cat /tmp/bg)" && cat /proc/$(cat /tmp/bg)/cmdline')
    assert seen.returncode == 0 and seen.stdout == "sleep\x0086431\x00"
    assert len(_marked("86431")) == 1
    # A test that signals every `sleep` does not end the testbed.
    assert _exec(ex, "sh", "-c", "kill -TERM -1; true").returncode == 0
    wait_for(lambda: not _marked("86431"), "the test's own sleep got SIGTERM")
    assert _exec(ex, "true").returncode == 0

    # revert: what ran is killed, the tree is clean.
    _exec(ex, "sh", "-c", "setsid sleep 86432 >/dev/null 2>&1 & touch /etc/reverted-away")
    assert len(_marked("86432")) == 1
    server.revert()
    wait_for(lambda: not _marked("86432"), "revert killed what ran")
    ex = server.execute_command()
    assert _exec(ex, "test", "-e", "/etc/reverted-away").returncode == 1

    # close: no process, no mount, no session directory is left.
    _exec(ex, "sh", "-c", "setsid sleep 86433 >/dev/null 2>&1 &")
    (session,) = sessions(server_env)
    assert len(_marked("86433")) == 1
    server.close()
    assert _marked("86433") == []
    assert sessions(server_env) == []
    mounts = [line for pid in ["self", *os.listdir("/proc")] if str(pid).isdigit() or pid == "self"
              for line in _mountinfo(pid) if session in line]  # fmt: skip
    assert mounts == []


def _mountinfo(pid: str) -> list[str]:
    try:
        return Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    except OSError:
        return []


def test_exit_statuses_through_the_execute_command(server: VirtServer) -> None:
    server.open()
    ex = server.execute_command()
    assert _exec(ex, "true").returncode == 0
    assert _exec(ex, "sh", "-c", "exit 9").returncode == 9
    missing = _exec(ex, "no-such-command-in-the-testbed")
    assert missing.returncode == 127
    assert "no-such-command-in-the-testbed: command not found" in missing.stderr
    assert _exec(ex, "sh", "-c", "kill -KILL $$").returncode == 128 + signal.SIGKILL
    assert _exec(ex, "sh", "-c", "kill -TERM $$").returncode == 128 + signal.SIGTERM
    # stdin and stdout are the caller's.
    piped = subprocess.run([*ex, "tr", "a-z", "A-Z"], input="through\n", capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert piped.stdout == "THROUGH\n"


def test_killing_the_execute_command_kills_its_command(server: VirtServer) -> None:
    server.open()
    ex = server.execute_command()
    proc = subprocess.Popen([*ex, "sleep", "86434"], stdin=subprocess.DEVNULL)
    wait_for(lambda: bool(_marked("86434")), "the command runs")
    proc.kill()
    proc.wait()
    wait_for(lambda: not _marked("86434"), "the command died with the execute command")
    assert _exec(ex, "true").returncode == 0


def test_a_dead_testbed_fails_commands_in_one_line(server: VirtServer) -> None:
    server.open()
    ex = server.execute_command()
    running = subprocess.Popen([*ex, "sleep", "86435"], stdin=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for(lambda: bool(_marked("86435")), "the command runs")
    waiter = int(ex[-5])  # the address of the testbed's sandbox: PID START MODE CGROUP SETID
    os.kill(waiter, signal.SIGKILL)
    assert running.wait(timeout=120) == 255
    assert running.stderr is not None
    assert running.stderr.read().strip() == f"autopkgtest-virt-nsbuild: {GONE}"
    later = _exec(ex, "true")
    assert later.returncode == 255
    assert later.stderr.strip() == f"autopkgtest-virt-nsbuild: {GONE}"
    with pytest.raises(VirtServerError, match=f"answered .* with 'copy-failed'.*{GONE}"):
        server.copydown("/etc/hostname", "/tmp/hostname")


def test_revert_heals_a_dead_testbed(server_env: Env) -> None:
    proc = subprocess.Popen(["autopkgtest-virt-nsbuild", "bookworm"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None

    def say(line: str) -> str:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    try:
        assert proc.stdout.readline() == "ok\n"
        assert say("open") == "ok /tmp/autopkgtest"
        ex = [unquote(w) for w in say("print-execute-command").split()[1].split(",")]
        os.kill(int(ex[-5]), signal.SIGKILL)
        assert say("copydown /etc/hostname /tmp/hostname") == "copy-failed"
        # What autopkgtest asks after a testbed failure: answered, not fatal.
        assert say("auxverb_debug_fail") == "ok"
        assert say("revert") == "ok /tmp/autopkgtest"
        ex = [unquote(w) for w in say("print-execute-command").split()[1].split(",")]
        assert _exec(ex, "true").returncode == 0
        assert say("quit") == "ok"
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
    assert sessions(server_env) == []


def test_a_killed_server_fails_commands_in_one_line(server_env: Env) -> None:
    srv = VirtServer(["autopkgtest-virt-nsbuild", "bookworm"])
    try:
        srv.open()
        ex = srv.execute_command()
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait()
        wait_for(lambda: _exec(ex, "true").returncode == 255, "the testbed died with its server")
        gone = _exec(ex, "true")
        assert gone.stderr.strip() == f"autopkgtest-virt-nsbuild: {GONE}"
    finally:
        srv.stop()
    run(server_env, ["nsbuild", "gc"])


def test_per_command_network_modes(server_env: Env) -> None:
    # The proxy of --net allow listens on the testbed's own loopback: a command
    # that asks for `none` must not reach it, one that asks for `allow` in a
    # testbed without network must.
    proxy = "exec 3<>/dev/tcp/127.0.0.1/3128"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        host = f"exec 3<>/dev/tcp/127.0.0.1/{listener.getsockname()[1]}"
        srv = VirtServer(["autopkgtest-virt-nsbuild", "--net", "allow", "bookworm"])
        try:
            srv.open()
            ex = srv.execute_command()
            assert _exec(ex, "bash", "-c", proxy).returncode == 0
            assert _exec(ex, NET_ARG, "allow", "bash", "-c", proxy).returncode == 0
            assert _exec(ex, NET_ARG, "none", "bash", "-c", proxy).returncode != 0
            assert _exec(ex, NET_ARG, "none", "bash", "-c", host).returncode != 0
            assert _exec(ex, "bash", "-c", host).returncode != 0
            refused = _exec(ex, NET_ARG, "host", "true")
            assert refused.returncode == 255
            assert "the server was not started with --net host" in refused.stderr
            # Files are shared whatever the network.
            assert _exec(ex, NET_ARG, "none", "touch", "/etc/from-none").returncode == 0
            assert _exec(ex, "test", "-e", "/etc/from-none").returncode == 0
        finally:
            srv.stop()
        srv = VirtServer(["autopkgtest-virt-nsbuild", "--net", "none", "bookworm"])
        try:
            srv.open()
            ex = srv.execute_command()
            assert _exec(ex, "bash", "-c", proxy).returncode != 0
            allowed = _exec(ex, NET_ARG, "allow", "bash", "-c", f"echo $http_proxy; {proxy}")
            assert allowed.returncode == 0, allowed.stderr
            assert allowed.stdout == "http://127.0.0.1:3128\n"
            assert _exec(ex, NET_ARG, "allow", "bash", "-c", host).returncode != 0
        finally:
            srv.stop()
        listener.settimeout(0)
        with pytest.raises(BlockingIOError):
            listener.accept()
