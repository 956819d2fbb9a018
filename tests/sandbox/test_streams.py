"""The command reopens its standard streams (/dev/stdin, /dev/stdout,
/dev/stderr) as on a machine, whoever owns the caller's pipes and files.

Root's pipes belong to host uid 0, which is not mapped in root's sandbox; a
`runuser` pipeline hands an unprivileged caller pipes of another uid; a
command run as a non-root user inside cannot open its caller's mode-0600
pipes. Those streams reach the command through pipes of its own, relayed by
nsbuild; the streams it can reopen reach it untouched. (A terminal it cannot
reopen: test_streams_tty.py.)
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from sandbox_helpers import explain, nsbuild_argv, py, sh
from waiting import HANG_GUARD

from nsbuild.sandbox import PIPE, Sandbox, caller_idmap, host_view, spawn
from nsbuild.sandbox.enter import sandbox_pids, start

# Reads its stdin through /dev/stdin, writes through /dev/stdout and
# /dev/stderr, and exits 3: each name must open, and the status come back.
REOPEN = "cat /dev/stdin; echo out > /dev/stdout; echo err > /dev/stderr; exit 3"
SIZE = 16 * 1024 * 1024
CHUNK = 1024 * 1024


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory the sandbox's ids (and the test user) may traverse: root's
    pytest base is mode 0700."""
    d = Path(tempfile.mkdtemp(prefix="nsbuild-streams-", dir="/var/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def test_user() -> pwd.struct_passwd:
    name = os.environ.get("NSBUILD_TEST_USER", "nsbtest")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pytest.skip(f"no test user {name!r} (set NSBUILD_TEST_USER)")


def as_test_user(argv: Sequence[str]) -> list[str]:
    """argv run as the unprivileged test user, through runuser: the pipes
    this (root) process makes for it stay root's."""
    user = test_user()
    env = [f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}", "LANG=C.UTF-8",
           f"HOME={user.pw_dir}"]
    if "PYTHONPATH" in os.environ:  # the nsbuild under test, wherever it is
        env.append(f"PYTHONPATH={os.environ['PYTHONPATH']}")
    return ["runuser", "-u", user.pw_name, "--", "env", "-i", *env, *argv]


def run(argv: Sequence[str], cwd: Path, input: bytes = b"", stderr: int = subprocess.PIPE
        ) -> subprocess.CompletedProcess[bytes]:
    """argv with pipes of this process's as stdin, stdout and stderr."""
    return subprocess.run(argv, cwd=cwd, input=input, stdout=subprocess.PIPE, stderr=stderr,
                          timeout=HANG_GUARD, check=False)


def show(r: subprocess.CompletedProcess[bytes]) -> str:
    return explain(subprocess.CompletedProcess(
        r.args, r.returncode, r.stdout.decode(errors="replace"),
        (r.stderr or b"").decode(errors="replace")))


def round_trip(argv: Sequence[str], cwd: Path) -> tuple[int, str, str, bytes]:
    """Feed SIZE random bytes to argv, which copies its stdin to its stdout;
    (status, sha256 sent, sha256 received, stderr)."""
    p = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    stdin, stdout, stderr = p.stdin, p.stdout, p.stderr
    assert stdin is not None and stdout is not None and stderr is not None
    sent = hashlib.sha256()

    def feed() -> None:
        for _ in range(SIZE // CHUNK):
            block = os.urandom(CHUNK)
            sent.update(block)
            stdin.write(block)
        stdin.close()

    errors: list[bytes] = []
    threads = [threading.Thread(target=feed),
               threading.Thread(target=lambda: errors.append(stderr.read()))]
    for t in threads:
        t.start()
    got, n = hashlib.sha256(), 0
    while block := stdout.read(CHUNK):
        got.update(block)
        n += len(block)
    for t in threads:
        t.join()
    status = p.wait(timeout=HANG_GUARD)
    assert n == SIZE, f"{n} bytes of {SIZE} arrived; stderr: {errors}"
    return status, sent.hexdigest(), got.hexdigest(), errors[0]


# ------------------------------------------------------------ run by root


@pytest.mark.root
def test_root_command_writes_to_dev_stderr(base: Path) -> None:
    r = run(nsbuild_argv("--", *sh("echo x > /dev/stderr")), base)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"x\n"), show(r)


@pytest.mark.root
def test_root_command_reopens_all_three_streams(base: Path) -> None:
    r = run(nsbuild_argv("--", *sh(REOPEN)), base, input=b"in\n")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"in\nout\n", b"err\n"), show(r)


@pytest.mark.root
def test_root_large_stream_through_dev_stdin_and_stdout_arrives_intact(base: Path) -> None:
    status, sent, got, err = round_trip(
        nsbuild_argv("--", *sh("cat /dev/stdin > /dev/stdout")), base)
    assert status == 0, err
    assert got == sent


@pytest.mark.root
def test_root_stdout_and_stderr_on_one_pipe_keep_their_order(base: Path) -> None:
    script = "echo 1; echo 2 >&2; echo 3 > /dev/stderr; echo 4 > /dev/stdout; echo 5"
    r = run(nsbuild_argv("--", *sh(script)), base, stderr=subprocess.STDOUT)
    assert (r.returncode, r.stdout) == (0, b"1\n2\n3\n4\n5\n"), show(r)


@pytest.mark.root
def test_root_stdin_eof_reaches_the_command(base: Path) -> None:
    r = run(nsbuild_argv("--", "wc", "-c", "/dev/stdin"), base, input=b"12345")
    assert (r.returncode, r.stdout.split()[0]) == (0, b"5"), show(r)


@pytest.mark.root
def test_root_file_as_stdout_is_written_through_dev_stdout(base: Path) -> None:
    out = base / "out"
    with out.open("wb") as f:  # root's, mode 0644: the sandbox may not open it
        r = subprocess.run(nsbuild_argv("--", *sh("echo reopened > /dev/stdout")), cwd=base,
                           stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.PIPE,
                           timeout=HANG_GUARD, check=False)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == b"reopened\n"


@pytest.mark.root
def test_root_command_gets_only_its_three_streams(base: Path) -> None:
    # ls's own directory descriptor is the 3.
    code = "ls /proc/self/fd; stat -L -c '%U %F' /proc/self/fd/0 /proc/self/fd/1 /proc/self/fd/2"
    r = run(nsbuild_argv("--", *sh(code)), base)
    assert r.returncode == 0, show(r)
    assert r.stdout.decode().split("\n") == [
        "0", "1", "2", "3", "root fifo", "root fifo", "root fifo", ""], show(r)


@pytest.mark.root
def test_root_reader_gone_kills_the_command_with_sigpipe(base: Path) -> None:
    p = subprocess.Popen(nsbuild_argv("--", "yes"), cwd=base, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    assert p.stdout.read(4096) == b"y\n" * 2048
    p.stdout.close()
    assert p.wait(timeout=HANG_GUARD) == 128 + signal.SIGPIPE, p.stderr.read()
    assert p.stderr.read() == b""


@pytest.mark.root
def test_root_relay_ends_with_the_command(base: Path) -> None:
    """A background process holding the relayed stdout dies with the command;
    a caller's stdin that never ends is not waited for."""
    p = subprocess.Popen(nsbuild_argv("--", *sh("sleep 1000 & echo done")), cwd=base,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdin is not None
    try:
        # The stdin pipe stays open, unwritten, until the end.
        assert p.wait(timeout=HANG_GUARD) == 0
        assert p.stdout is not None and p.stdout.read() == b"done\n"
    finally:
        p.stdin.close()
        p.wait()


@pytest.mark.root
def test_root_user_command_reopens_its_streams(base: Path) -> None:
    r = run(nsbuild_argv("--user", "1000:1000", "--", *sh(REOPEN)), base, input=b"in\n")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"in\nout\n", b"err\n"), show(r)


@pytest.mark.root
def test_runuser_pipeline_reopens_streams_of_another_uid(base: Path) -> None:
    r = run(as_test_user(nsbuild_argv("--", *sh(REOPEN))), base, input=b"in\n")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"in\nout\n", b"err\n"), show(r)


@pytest.mark.root
def test_runuser_pipeline_large_stream_arrives_intact(base: Path) -> None:
    status, sent, got, err = round_trip(
        as_test_user(nsbuild_argv("--", *sh("cat /dev/stdin > /dev/stdout"))), base)
    assert status == 0, err
    assert got == sent


@pytest.mark.root
def test_root_entered_command_reopens_its_streams(base: Path) -> None:
    """A command entered into a running sandbox (the virt server's execute)."""
    null = os.open(os.devnull, os.O_RDWR)
    spec = Sandbox(argv=("sleep", "infinity"), idmap=caller_idmap(),
                   mounts=host_view(str(base)), cwd=str(base),
                   env=(("PATH", "/usr/bin:/bin"),))  # fmt: skip
    sandbox = spawn(spec, stdin=null, stdout=null, stderr=null)
    try:
        _, pid = sandbox_pids(sandbox)
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        os.write(in_w, b"in\n")
        os.close(in_w)
        proc = start(pid, ("sh", "-c", REOPEN), stdin=in_r, stdout=out_w, stderr=out_w)
        os.close(in_r)
        os.close(out_w)
        with os.fdopen(out_r, "rb") as f:
            out = f.read()
        assert (proc.wait(), out) == (3, b"in\nout\nerr\n")
    finally:
        sandbox.kill()
        sandbox.wait()
        os.close(null)


@pytest.mark.root
def test_root_pipes_of_nsbuilds_own_reach_the_command_untouched(base: Path) -> None:
    """spawn(stdout=PIPE) by root: the pipe is given to the sandbox's root."""
    spec = Sandbox(argv=("/usr/bin/python3", "-c", "import os; print(os.fstat(1).st_ino, "
                         "os.stat('/dev/stdout').st_ino)"),
                   idmap=caller_idmap(), mounts=host_view(str(base)), cwd=str(base))
    null = os.open(os.devnull, os.O_RDWR)
    try:
        proc = spawn(spec, stdin=null, stdout=PIPE, stderr=null)
    finally:
        os.close(null)
    assert proc.stdout is not None
    inode = os.fstat(proc.stdout.fileno()).st_ino
    out = proc.stdout.read().split()
    assert proc.wait() == 0
    assert out == [str(inode).encode()] * 2


# ------------------------------------------- run by an unprivileged user


@pytest.mark.userns
def test_reopenable_streams_reach_the_command_untouched(tmp_path: Path) -> None:
    """The caller's own pipe: the command holds it itself, no relay between."""
    r, w = os.pipe()
    inode = os.fstat(r).st_ino
    code = "import os; print(os.fstat(1).st_ino, os.stat('/dev/stdout').st_ino)"
    p = subprocess.run(nsbuild_argv("--", *py(code)), cwd=tmp_path, stdin=subprocess.DEVNULL,
                       stdout=w, stderr=subprocess.PIPE, timeout=HANG_GUARD, check=False)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().split()
    assert p.returncode == 0, p.stderr
    assert out == [str(inode).encode()] * 2


@pytest.mark.userns
def test_user_command_reopens_the_callers_private_pipes(tmp_path: Path) -> None:
    """Pipes are mode 0600: a non-root user inside may not open the caller's."""
    tmp_path.chmod(0o755)
    r = run(nsbuild_argv("--user", "1000:1000", "--", *sh(REOPEN)), tmp_path, input=b"in\n")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"in\nout\n", b"err\n"), show(r)

