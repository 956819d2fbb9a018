"""External commands at sbuild's stages, and the exec escape %SBUILD_CHROOT_EXEC.

The stages run in real builds of the bookworm environment; the exec escape
also on its own, on a session of the local backend, as a host script uses it.
"""

from __future__ import annotations

import array
import os
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nsbuild.backends import Backend
from nsbuild.debbuild.chrootexec import MAGIC, NOT_RUN, ExecServer
from nsbuild.debbuild.hooks import INSIDE_ENV, Facts, escapes, substitute

pytestmark = pytest.mark.userns


# -- the percent escapes --


def test_escapes_are_replaced_longest_first_quoted_and_only_when_defined() -> None:
    facts = Facts(dsc=Path("/home/u/my src/p_1.dsc"), build_dir="/build", host_arch="amd64",
                  build_arch="amd64")  # fmt: skip
    values = escapes(facts, "bash -i", None)
    text, used = substitute(
        "%% %a/%SBUILD_HOST_ARCH %SBUILD_BUILD_ARCH %b %d %SBUILD_DSC %c %SBUILD_CHANGES %e %p %x",
        values,
    )
    # %c, %e, %p are not known yet: left as they are, as sbuild leaves them.
    assert text == ("% amd64/amd64 amd64 /build '/home/u/my src/p_1.dsc' "
                    "'/home/u/my src/p_1.dsc' %c %SBUILD_CHANGES %e %p %x")  # fmt: skip
    assert used == {"%", "a", "SBUILD_HOST_ARCH", "SBUILD_BUILD_ARCH", "b", "d", "SBUILD_DSC"}
    # %%c is a percent and a c, never the .changes.
    facts.changes = "/out/p_1_amd64.changes"
    assert substitute("%%c %c", escapes(facts, "bash -i", "x --"))[0] == (
        "%c /out/p_1_amd64.changes"
    )
    assert substitute("%s; %SBUILD_SHELL", values)[0] == "bash -i; bash -i"


# -- the exec escape on its own --


@pytest.fixture
def server(backend: Backend) -> Iterator[ExecServer]:
    # A short folder of mode 0700: a socket's path has at most 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="nsbt-exec-"))
    srv = ExecServer(backend, folder, INSIDE_ENV)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        for name in os.listdir(folder):
            os.unlink(folder / name)
        folder.rmdir()


def _sh(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A host script, as an outside command runs it."""
    return subprocess.run(["/bin/sh", "-c", script], cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def test_exec_escape_copies_a_file_in_and_out_as_root_in_slash(
    server: ExecServer, tmp_path: Path
) -> None:
    e = server.command()
    # More than a pipe holds, with every byte value.
    data = bytes(range(256)) * 4096
    (tmp_path / "blub.txt").write_bytes(data)
    copied_in = _sh(f'cat blub.txt | {e} sh -c "cat > blub.txt"', tmp_path)
    assert copied_in.returncode == 0, copied_in.stderr
    out = _sh(f"{e} cat /blub.txt > back.txt && {e} sh -c 'id -u; pwd'", tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "back.txt").read_bytes() == data
    assert out.stdout == "0\n/\n"
    # Two at once, one feeding the other: each sees the end of its input.
    both = _sh(f"{e} cat /blub.txt | {e} sh -c 'cat > /again.txt' && "
               f"{e} cmp /blub.txt /again.txt && echo same", tmp_path)  # fmt: skip
    assert (both.returncode, both.stdout) == (0, "same\n"), both.stderr


def test_exec_escape_gives_the_inside_status_and_stderr(server: ExecServer, tmp_path: Path) -> None:
    e = server.command()
    done = _sh(f"{e} sh -c 'echo oops >&2; exit 7'", tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (7, "", "oops\n")
    missing = _sh(f"{e} no-such-command", tmp_path)
    assert missing.returncode == 127
    assert "no-such-command" in missing.stderr
    # No network inside.
    net = _sh(f"{e} sh -c 'getent hosts deb.debian.org || echo no network'", tmp_path)
    assert net.stdout == "no network\n"


def test_exec_escape_refuses_once_the_stage_ended(server: ExecServer, tmp_path: Path) -> None:
    e = server.command()
    assert _sh(f"{e} true", tmp_path).returncode == 0
    server.stop()
    late = _sh(f"{e} touch /late", tmp_path)
    assert late.returncode == NOT_RUN
    assert late.stderr.startswith("nsbuild chroot-exec: the build's session is not available")
    assert len(late.stderr.splitlines()) == 1


def test_exec_escape_ends_a_command_left_behind_when_the_stage_ends(
    server: ExecServer, tmp_path: Path
) -> None:
    e = server.command()
    # A command the script left in the background, reading a pipe no one
    # writes: the stage's end ends it, and the client hears its status.
    client = subprocess.Popen(["/bin/sh", "-c", f"exec {e} cat"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert client.stdin is not None
    with client.stdin:
        first = _sh(f"{e} true", tmp_path)  # the server answers others meanwhile
        assert first.returncode == 0
        server.stop()
        _, err = client.communicate(timeout=300)
    assert client.returncode == 137, err


def test_exec_escape_bounds_what_a_client_sends(server: ExecServer, tmp_path: Path) -> None:
    e = server.command()
    # 200 words of 1000 bytes (one argument has at most 128 KiB).
    long = _sh(f"{e} echo $(for i in $(seq 200); do printf '%01000d ' 0; done)", tmp_path)
    assert long.returncode == NOT_RUN
    assert "longer than" in long.stderr
    # A hand-made request: no descriptors, then one too many.
    for fds in ([], [0, 1, 2, 2]):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(str(server.path))
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            sock.sendmsg([MAGIC + b"touch\0/hacked"], rights)
            assert sock.recv(4096).startswith(b"E" + b"refused: the request must carry")
    # Not a request at all.
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(str(server.path))
        sock.sendmsg([b"rm -rf /"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      array.array("i", [0, 1, 2]))])  # fmt: skip
        assert sock.recv(4096).startswith(b"Erefused: a malformed request")
    assert _sh(f"{e} test ! -e /hacked", tmp_path).returncode == 0
