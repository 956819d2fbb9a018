"""External commands at sbuild's stages, and the exec escape %SBUILD_CHROOT_EXEC.

The stages run in real builds of the bookworm environment; the exec escape
also on its own, on a session of the local backend, as a host script uses it.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from waiting import wait_for

from nsbuild.backends import Backend
from nsbuild.debbuild.chrootexec import MAGIC, NOT_RUN, ExecServer
from nsbuild.debbuild.hooks import INSIDE_ENV, Facts, escapes, substitute

from .conftest import Env, kept_log, make_package

pytestmark = pytest.mark.userns


# -- the percent escapes --


def test_escapes_are_replaced_longest_first_as_they_are_and_only_when_defined() -> None:
    facts = Facts(dsc=Path("/home/u/my src/p_1.dsc"), build_dir="/build", host_arch="amd64",
                  build_arch="amd64")  # fmt: skip
    values = escapes(facts, "bash -i", None)
    text, used = substitute(
        "%% %a/%SBUILD_HOST_ARCH %SBUILD_BUILD_ARCH %b %d %SBUILD_DSC %c %SBUILD_CHANGES %e %p %x",
        values,
    )
    # %c, %e, %p are not known yet: left as they are, as sbuild leaves them.
    # As sbuild: the value as it is ("%d" for a path with a space).
    assert text == ("% amd64/amd64 amd64 /build /home/u/my src/p_1.dsc "
                    "/home/u/my src/p_1.dsc %c %SBUILD_CHANGES %e %p %x")  # fmt: skip
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
    # A pipeline of two: one at a time, the second is refused (never a hang).
    both = _sh(f"{e} cat /blub.txt | {e} sh -c 'cat > /again.txt'; echo over", tmp_path)
    assert both.stdout == "over\n"
    assert both.stderr.count("they run one at a time") == 1, both.stderr


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
        wait_for(lambda: server.busy, "the command to run inside")
        other = _sh(f"{e} true", tmp_path)  # refused meanwhile, not left waiting
        assert other.returncode == NOT_RUN
        assert "they run one at a time" in other.stderr
        server.stop()
        _, err = client.communicate(timeout=300)
    assert client.returncode == 137, err


def test_exec_escape_client_gone_ends_its_command(server: ExecServer) -> None:
    # Killed as Ctrl-C kills it: what it ran inside does not run on.
    client = subprocess.Popen(["/bin/sh", "-c", f"exec {server.command()} cat"],
                              stdin=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert client.stdin is not None
    with client.stdin:
        wait_for(lambda: server.busy, "the command to run inside")
        client.kill()
        client.wait()
        wait_for(lambda: not server.busy, "the command inside to end with its client")


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


# -- the stages, in real builds --


def _cmd(*pairs: tuple[str, str]) -> list[str]:
    return [arg for stage, text in pairs for arg in (f"--{stage}-commands", text)]


def _sections(log: str) -> list[str]:
    """The titles of the log's sections, in order."""
    lines = log.splitlines()
    return [lines[i + 1].strip("| ").strip() for i, ln in enumerate(lines[:-2])
            if ln.startswith("+---") and lines[i + 2].startswith("+---")]  # fmt: skip


@pytest.mark.slow
def test_every_stage_runs_in_its_place_in_order_with_its_escapes(
    bookworm: Env, tmp_path: Path
) -> None:
    tree = make_package(tmp_path, "nsb-hooks")
    out = tmp_path / "out dir"  # a path with a space: "%c", as with sbuild
    trace, inside = tmp_path / "trace", tmp_path / "inside"
    # The user's own variables reach the commands outside, never inside.
    env = Env({**bookworm.vars, "NSB_HOOK_VAR": "mine"}, bookworm.cache)
    done = env.nsbuild("build", "--env", "bookworm", "--out", str(out), *_cmd(
        ("pre-build", 'echo "pre-build $(id -u) $(pwd) %a %SBUILD_BUILD_ARCH %b %c '
                      f'$NSB_HOOK_VAR" >> {trace}'),
        ("pre-build", "true %SBUILD_CHROOT_DIR"),
        ("pre-build", '%e sh -c "echo pre-build-inside \\$(id -u) \\$(pwd) >> /build/trace"'),
        ("chroot-setup", 'echo "chroot-setup $(id -u) $(pwd) %b %e$NSB_HOOK_VAR" >> /build/trace'),
        ("starting-build", 'echo "starting-build $(id -u) %p $(test -d %p && echo tree)"'
                           " >> /build/trace"),
        ("finished-build", 'echo "finished-build $(ls %b/*.deb)" >> /build/trace'),
        ("chroot-cleanup", 'echo "chroot-cleanup %c $(test -f %c && echo found)" >> /build/trace'),
        ("post-build", f"%e cat /build/trace > {inside}"),
        ("post-build", 'echo "post-build $(id -u) $(pwd) $(basename "%c") '
                       f'$(test -f "%c" && echo found)" >> {trace}'),
        ("post-build-failed", f"touch {tmp_path / 'never'}"),
    ), str(tree))  # fmt: skip
    assert done.returncode == 0, done.stderr
    uid, home = os.getuid(), os.environ["HOME"]
    assert trace.read_text().splitlines() == [
        f"pre-build {uid} {home} amd64 amd64 /build %c mine",
        f"post-build {uid} {home} nsb-hooks_1.0_amd64.changes found",
    ]
    assert inside.read_text().splitlines() == [
        "pre-build-inside 0 /",
        "chroot-setup 0 /build /build %e",
        "starting-build 0 /build/nsb-hooks-1.0 tree",
        "finished-build /build/nsb-hooks_1.0_all.deb",
        "chroot-cleanup /build/nsb-hooks_1.0_amd64.changes found",
    ]
    assert not (tmp_path / "never").exists()
    log = (out / "nsb-hooks_1.0_amd64.build").read_text()
    titles = [t for t in _sections(log) if t.endswith("Commands")]
    assert titles == ["Pre Build Commands", "Chroot Setup Commands",
                      "Starting Timed Build Commands", "Finished Timed Build Commands",
                      "Chroot Cleanup Commands", "Post Build Commands"]  # fmt: skip
    assert log.count("Exit status: 0 (") == 9
    # Each command's line as run, escapes replaced.
    assert '\necho "chroot-setup $(id -u) $(pwd) /build %e$NSB_HOOK_VAR" >> /build/trace\n' in log
    assert "\nW: %SBUILD_CHROOT_DIR and %r are not available" in log
    assert "/chrootexec.py " in log and "\n%e cat" not in log  # %e replaced outside


@pytest.mark.slow
def test_a_failing_command_ends_its_stage_and_the_build(bookworm: Env, tmp_path: Path) -> None:
    tree = make_package(tmp_path, "nsb-hookfail")
    trace = tmp_path / "trace"
    done = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(tmp_path / "out"), "--json",
                            *_cmd(
        ("chroot-setup", "echo first ran"),
        ("chroot-setup", "exit 3"),
        ("chroot-setup", "touch /build/never"),
        ("post-build-failed", f'%e sh -c "test -e /build/never && echo ran || echo never ran"'
                              f" > {trace}; echo %c >> {trace}"),
        ("post-build", f"touch {tmp_path / 'no-post-build'}"),
    ), str(tree))  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "chroot-setup command failed (exit status 3): exit 3" in done.stderr
    summary = json.loads(done.stdout)
    assert summary["status"] == "failed"
    assert "chroot-setup" in summary["fail_stage"]
    # The rest of the stage did not run; the failed build's own commands did,
    # with the session still there and no .changes made.
    assert trace.read_text() == "never ran\n%c\n"
    assert not (tmp_path / "no-post-build").exists()
    log = kept_log(bookworm, done.stderr, "nsb-hookfail_1.0_amd64.build").read_text()
    assert "\nfirst ran\n" in log
    assert "Exit status: 3 (" in log
    assert "E: Command 'exit 3' failed to run." in log
    assert f"Fail-Stage: {summary['fail_stage']}\n" in log
    assert "Post Build Failed Commands" in _sections(log)


@pytest.mark.slow
def test_a_failed_build_runs_its_commands_inside_then_outside(
    bookworm: Env, tmp_path: Path
) -> None:
    # Build-Depends of this test alone: its build stores a new dependency layer.
    tree = make_package(tmp_path, "nsb-hookbf", build="echo broken >&2; false", build_depends="dc")
    trace = tmp_path / "trace"
    done = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(tmp_path / "out"), *_cmd(
        ("build-failed", 'echo "build-failed $(id -u) $(pwd) %p $(test -d %p && echo tree)"'
                         " > /build/bf"),
        ("post-build-failed", f"%e cat /build/bf > {trace}"),
        ("post-build", f"touch {tmp_path / 'no-post-build'}"),
    ), str(tree))  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert trace.read_text() == "build-failed 0 /build /build/nsb-hookbf-1.0 tree\n"
    assert not (tmp_path / "no-post-build").exists()


@pytest.mark.slow
def test_commands_after_the_collect_reach_a_session_whose_layer_is_stored(
    bookworm: Env, tmp_path: Path
) -> None:
    # Build-Depends of this test alone: its build stores a new dependency layer.
    tree = make_package(tmp_path, "nsb-hooklate", build_depends="ed")
    trace = tmp_path / "trace"
    done = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(tmp_path / "out"), *_cmd(
        ("chroot-cleanup", "echo cleanup ran > /build/cleanup"),
        ("post-build", f"%e cat /build/cleanup > {trace}"),
    ), str(tree))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert trace.read_text() == "cleanup ran\n"


@pytest.mark.slow
def test_sbuild_shell_is_a_root_shell_inside_on_the_terminal(
    bookworm: Env, tmp_path: Path
) -> None:
    import pty

    tree = make_package(tmp_path, "nsb-hookshell", build="false")
    argv = [sys.executable, "-m", "nsbuild", "build", "--env", "bookworm",
            "--out", str(tmp_path / "out"), "--build-failed-commands", "%SBUILD_SHELL",
            str(tree)]  # fmt: skip
    pid, terminal = pty.fork()
    if pid == 0:
        try:
            os.execve(sys.executable, argv, bookworm.vars)
        finally:
            os._exit(127)
    # Typed ahead: the shell is the only reader of the terminal.
    os.write(terminal, b"echo shell-$((6 * 7)) $(id -u) $(pwd)\nexit 0\n")
    seen = b""
    with contextlib.suppress(OSError):  # EIO: the build ended
        while chunk := os.read(terminal, 4096):
            seen += chunk
    os.close(terminal)
    _, status = os.waitpid(pid, 0)
    text = seen.decode(errors="replace")
    assert "shell-42 0 /build\r\n" in text, text
    assert os.waitstatus_to_exitcode(status) == 1, text


@pytest.mark.slow
def test_a_dependency_layer_never_keeps_what_commands_did_to_the_session(
    bookworm: Env, tmp_path: Path
) -> None:
    # Build-Depends of this test alone: no earlier build kept their layer.
    deps = "bc"
    marked = make_package(tmp_path / "a", "nsb-hooklayer", build_depends=deps)
    one = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(tmp_path / "one"), *_cmd(
        ("pre-build", "%e touch /etc/nsb-pre-marker"),
        ("chroot-setup", "touch /etc/nsb-setup-marker"),
        # What the commands did holds for the build they are part of.
        ("starting-build", "test -e /etc/nsb-pre-marker && test -e /etc/nsb-setup-marker"),
    ), str(marked))  # fmt: skip
    assert one.returncode == 0, one.stderr
    clean = make_package(tmp_path / "b", "nsb-hooklayer", build_depends=deps)
    for out in ("two", "three"):  # the second may use a layer the first kept
        again = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(tmp_path / out),
                                 *_cmd(("starting-build", "test ! -e /etc/nsb-pre-marker && "
                                                          "test ! -e /etc/nsb-setup-marker")),
                                 str(clean))  # fmt: skip
        assert again.returncode == 0, again.stderr


@pytest.mark.slow
def test_the_shared_apt_cache_takes_nothing_after_commands_touched_the_session(
    bookworm: Env, tmp_path: Path
) -> None:
    # A repository nobody signed, planted before apt runs: its list must not
    # reach the environment's cache, where later builds would trust it.
    plant = ("mkdir -p /srv/nsbplanted && : > /srv/nsbplanted/Packages && "
             "echo 'deb [trusted=yes] file:/srv/nsbplanted ./' "
             "> /etc/apt/sources.list.d/nsbplanted.list")  # fmt: skip
    tree = make_package(tmp_path, "nsb-hookcache")
    done = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(tmp_path / "out"),
                            *_cmd(("chroot-setup", plant)), str(tree))  # fmt: skip
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "out" / "nsb-hookcache_1.0_amd64.build").read_text()
    assert "nsbplanted" in log  # apt did read the planted repository
    assert not [p for p in bookworm.cache.rglob("*nsbplanted*")]


# -- another user --


@pytest.mark.root
@pytest.mark.slow
def test_exec_escape_refuses_root_at_another_users_build() -> None:
    """Root passes the socket folder's mode; the peer check refuses it."""
    import pwd
    import shutil

    from inputs import tarball

    user = pwd.getpwnam("nsbtest")
    top = Path(tempfile.mkdtemp(prefix="nsbt-hooks-", dir="/var/tmp"))
    try:
        (top / "config" / "nsbuild" / "chroot.d").mkdir(parents=True)
        (top / "config" / "nsbuild" / "chroot.d" / "bookworm").write_text(
            f"Name: bookworm\nType: tarball\nPath: {tarball()}\nSuite: bookworm\n"
            "Architecture: amd64\nMirror: http://deb.debian.org/debian\n"
        )
        tree = make_package(top, "nsb-hookroot")
        announced, go = top / "exec.txt", top / "go"
        os.mkfifo(go)
        for path in (top, *top.rglob("*")):
            os.chown(path, user.pw_uid, user.pw_gid)
        hook = f"echo %e > {announced}; read answer < {go}"
        build = subprocess.Popen(
            ["runuser", "-u", "nsbtest", "--", "env", "-i", f"PATH={os.environ['PATH']}",
             f"HOME={user.pw_dir}", "LANG=C.UTF-8", f"XDG_CONFIG_HOME={top / 'config'}",
             f"XDG_CACHE_HOME={top / 'cache'}", sys.executable, "-m", "nsbuild", "build",
             "--env", "bookworm", "--out", str(top / "out"), "--pre-build-commands", hook,
             str(tree)],
            cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            wait_for(lambda: (announced.exists() and announced.read_text().endswith("--\n"))
                     or build.poll() is not None, "the pre-build command to say %e")  # fmt: skip
            assert build.poll() is None, build.communicate()
            e = announced.read_text().strip()
            sock = shlex.split(e)[3]
            # The client gives root's descriptors to no other user's server.
            as_root = _sh(f"{e} touch /build/by-root", top)
            # A hand-made request: the server refuses it by its credentials.
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as raw:
                raw.connect(sock)
                raw.sendmsg([MAGIC + b"touch\0/build/by-root"], [(
                    socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
                refused = raw.recv(4096)
            mine = _sh(f"runuser -u nsbtest -- {e} test ! -e /build/by-root", top)
        finally:
            with contextlib.suppress(OSError):  # the hook waits to read it
                fd = os.open(go, os.O_WRONLY | os.O_NONBLOCK)
                os.write(fd, b"go\n")
                os.close(fd)
            _, err = build.communicate()
        assert as_root.returncode == NOT_RUN
        assert as_root.stderr == (
            f"nsbuild chroot-exec: refused: {sock} is served by uid {user.pw_uid}, "
            "not by this user's build: not run\n"
        )
        assert refused == b"Erefused: uid 0 did not start this build"
        assert mine.returncode == 0, mine.stderr  # its owner's, and nothing done by root
        assert build.returncode == 0, err
    finally:
        shutil.rmtree(top)
