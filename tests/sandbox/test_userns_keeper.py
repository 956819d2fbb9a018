"""The user namespace keeper (nsbuild/sandbox/userns.py): a run that maps a
new user namespace leaves one idle process holding it, and later runs join
that namespace instead of running newuidmap/newgidmap again; each still gets
namespaces of its own, and nothing but a namespace exactly like a fresh one
is ever joined."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox_helpers import (
    PY,
    USAGE,
    SubRange,
    cmdline,
    explain,
    kill_all,
    nsbuild,
    nsbuild_argv,
    ok,
    one_line_error,
    parse_idmap,
    pids,
    processes_with_arg,
    py,
    sh,
    stat_fields,
)
from waiting import HANG_GUARD, wait_for

pytestmark = pytest.mark.userns

KEEPER = "nsbuild: user namespace keeper"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of a user whose runtime directory is this test's own, so
    keepers of other tests are neither seen nor disturbed; stops the keepers
    recorded there afterwards."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    vars_ = {k: v for k, v in os.environ.items() if k != "NSBUILD_USERNS_KEEPER"}
    vars_["XDG_RUNTIME_DIR"] = str(runtime)
    yield vars_
    kill_all([pid for pid in _recorded(vars_) if _is_keeper(pid)])


def _records(env: dict[str, str]) -> list[Path]:
    return sorted((Path(env["XDG_RUNTIME_DIR"]) / "nsbuild").glob("userns-*"))


def _recorded(env: dict[str, str]) -> list[int]:
    """The keeper pids the records name (each: pid, start time, namespace inode)."""
    out = []
    for record in _records(env):
        try:
            out.append(int(record.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            pass
    return out


def _identity(pid: int) -> str:
    """What a record says of a process: pid, start time, user namespace inode."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    started = int(stat.rsplit(b")", 1)[1].split()[19])
    return f"{pid} {started} {os.stat(f'/proc/{pid}/ns/user').st_ino}\n"


def _is_keeper(pid: int) -> bool:
    return cmdline(pid)[:1] == [KEEPER]


def _the_keeper(env: dict[str, str]) -> int:
    (pid,) = _recorded(env)
    assert _is_keeper(pid), f"record names process {pid}: {cmdline(pid)}"
    return pid


def _userns(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/user")


def test_a_first_run_leaves_a_keeper_that_holds_nothing_of_the_caller(
    tmp_path: Path, env: dict[str, str], subids: tuple[SubRange, SubRange]
) -> None:
    r = ok(nsbuild("--", "true", cwd=tmp_path, env=env))
    assert r.stderr == ""
    pid = _the_keeper(env)
    assert cmdline(pid) == [KEEPER, "60", ""]
    fields = stat_fields(pid)
    assert fields is not None and fields[0] != os.getpid(), "left the caller's process tree"
    assert os.getsid(pid) == pid, "a session of its own: no terminal, no job control"
    assert os.readlink(f"/proc/{pid}/cwd") == "/", "holds no directory of the caller"
    assert Path(f"/proc/{pid}/environ").read_bytes() == b""
    fds = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert fds == {"0": "/dev/null", "1": "/dev/null", "2": "/dev/null"}
    # It is in a user namespace of its own, mapped onto the caller's range.
    assert _userns(pid) != _userns("self")
    uid, gid = subids
    assert parse_idmap(Path(f"/proc/{pid}/uid_map").read_text()) == [
        (0, os.getuid(), 1), (1, uid.start, 65535)]
    assert parse_idmap(Path(f"/proc/{pid}/gid_map").read_text()) == [
        (0, os.getgid(), 1), (1, gid.start, 65535)]


def test_later_runs_join_the_kept_namespace_and_nest_their_own(
    tmp_path: Path, env: dict[str, str], scratch: Path, subids: tuple[SubRange, SubRange]
) -> None:
    ok(nsbuild("--", "true", cwd=tmp_path, env=env))
    keeper = _the_keeper(env)
    marker = f"nsbuild-test-keeper-{uuid.uuid4().hex}"
    p = subprocess.Popen(
        nsbuild_argv("--bind", f"{scratch}:/scratch", "--",
                     *py("import time; print('ready', flush=True); time.sleep(3600)", marker)),
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        assert p.stdout.readline() == "ready\n"
        # nsbuild's helper joined the kept namespace; its one child is the
        # sandbox's init.
        (helper,) = [pid for pid in pids() if (stat_fields(pid) or (0, 0))[0] == p.pid]
        (init,) = [pid for pid in pids() if (stat_fields(pid) or (0, 0))[0] == helper]
        (command,) = [pid for pid in processes_with_arg(marker) if cmdline(pid)[0] == PY]
        assert _userns(helper) == _userns(keeper), "the helper joined the kept namespace"
        assert _userns(p.pid) == _userns("self"), "nsbuild itself stays on the host"
        assert (stat_fields(command) or (0, 0))[0] == init, "init is the helper's child"
        assert _userns(command) not in (_userns(keeper), _userns("self")), \
            "the command runs in a nested namespace of its own"
    finally:
        p.kill()
        p.wait()
        kill_all(processes_with_arg(marker))
    # Ids inside are as with a namespace of the run's own.
    r = ok(nsbuild("--bind", f"{scratch}:/scratch", "--",
                   *sh("setpriv --reuid 100 --regid 100 --clear-groups touch /scratch/f; id -u"),
                   cwd=tmp_path, env=env, debug=True))
    assert r.stdout == "0\n"
    assert "joined the one kept by process" in r.stderr, r.stderr
    st = (scratch / "f").stat()
    assert (st.st_uid, st.st_gid) == (subids[0].start + 99, subids[1].start + 99)
    assert _recorded(env) == [keeper], "no second keeper while the first lives"


NESTED_NAMESPACE = """
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
r, w = os.pipe()
child = os.fork()
if child == 0:
    assert libc.unshare(0x10000000) == 0  # CLONE_NEWUSER
    # Named like a keeper, so that only its parentage gives it away.
    os.execv("/bin/sleep", ["nsbuild: user namespace keeper", "3600"])
os.close(w)
assert os.read(r, 1) == b""  # the pipe closes on exec: the child is the sleep now
# One line per range of the sandbox's own map: from the host it then reads
# exactly like the caller's outer namespace.
for name in ("uid_map", "gid_map"):
    with open(f"/proc/{child}/{name}", "w") as f:
        f.write("0 0 1\\n1 1 65535\\n")
print("ready", flush=True)
time.sleep(3600)
"""


def test_a_namespace_made_inside_a_sandbox_is_never_joined(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """The record is only a hint: a command that could write it (a user who binds
    their runtime directory into a sandbox) must not make later sandboxes
    join a namespace in which the command holds every capability."""
    ok(nsbuild("--", "true", cwd=tmp_path, env=env))
    (record,) = _records(env)
    expected = {name: Path(f"/proc/{_the_keeper(env)}/{name}").read_text()
                for name in ("uid_map", "gid_map", "setgroups")}
    marker = f"nsbuild-test-nested-{uuid.uuid4().hex}"
    p = subprocess.Popen(nsbuild_argv("--", PY, "-c", NESTED_NAMESPACE, marker),
                         cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        assert p.stdout.readline() == "ready\n", p.stderr.read() if p.stderr else ""
        (maker,) = [pid for pid in processes_with_arg(marker) if cmdline(pid)[0] == PY]
        (nested,) = [pid for pid in pids() if (stat_fields(pid) or (0, 0))[0] == maker]
        assert cmdline(nested)[0] == KEEPER
        # Control: seen from the host, it passes every check but its parentage.
        assert {name: Path(f"/proc/{nested}/{name}").read_text() for name in expected} \
            == expected
        record.write_text(_identity(nested))
        r = ok(nsbuild("--", "true", cwd=tmp_path, env=env, debug=True))
        assert "joined" not in r.stderr, r.stderr
        assert "newuidmap" in r.stderr, r.stderr
        assert _recorded(env) != [nested] and _is_keeper(_the_keeper(env))
    finally:
        p.kill()
        p.wait()
        kill_all(processes_with_arg(marker))


@pytest.mark.parametrize("content", ["999999999 1 1\n", "not a pid\n", "self"])
def test_a_stale_or_wrong_record_means_a_fresh_namespace(
    tmp_path: Path, env: dict[str, str], content: str
) -> None:
    ok(nsbuild("--", "true", cwd=tmp_path, env=env))
    (record,) = _records(env)
    old = _the_keeper(env)
    # "self": a process of the caller in the host's own user namespace.
    record.write_text(_identity(os.getpid()) if content == "self" else content)
    r = ok(nsbuild("--", *sh("id -u"), cwd=tmp_path, env=env, debug=True))
    assert r.stdout == "0\n"
    assert "joined" not in r.stderr, r.stderr
    assert _the_keeper(env) != old


def test_the_keeper_goes_away_after_its_time(tmp_path: Path, env: dict[str, str]) -> None:
    env["NSBUILD_USERNS_KEEPER"] = "1"
    ok(nsbuild("--", "true", cwd=tmp_path, env=env))
    keeper = _the_keeper(env)
    assert cmdline(keeper)[:2] == [KEEPER, "1"]
    wait_for(lambda: not _is_keeper(keeper), f"keeper {keeper} to end")
    # Its record is stale now: the next run makes and maps a namespace again.
    r = ok(nsbuild("--", "true", cwd=tmp_path, env=env, debug=True))
    assert "joined" not in r.stderr and "newuidmap" in r.stderr, r.stderr


def test_keepers_can_be_turned_off(tmp_path: Path, env: dict[str, str]) -> None:
    env["NSBUILD_USERNS_KEEPER"] = "0"
    for _ in range(2):
        r = ok(nsbuild("--", "true", cwd=tmp_path, env=env, debug=True))
        assert "newuidmap" in r.stderr and "keeping" not in r.stderr, r.stderr
    assert _records(env) == []


def test_a_bad_keeper_setting_is_a_one_line_error(tmp_path: Path, env: dict[str, str]) -> None:
    env["NSBUILD_USERNS_KEEPER"] = "soon"
    r = nsbuild("--", "true", cwd=tmp_path, env=env)
    assert r.returncode == USAGE, explain(r)
    assert "NSBUILD_USERNS_KEEPER" in one_line_error(r)


def test_a_runtime_directory_open_to_others_is_not_used(
    tmp_path: Path, env: dict[str, str]
) -> None:
    shared = Path(env["XDG_RUNTIME_DIR"]) / "nsbuild"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    for _ in range(2):
        r = ok(nsbuild("--", "true", cwd=tmp_path, env=env, debug=True))
        # Nothing read from there, and no keeper left that nobody could find.
        assert "joined" not in r.stderr and "keeping" not in r.stderr, r.stderr
    assert _records(env) == []


def test_the_keeper_outlives_a_killed_run_and_is_joined_after_it(
    tmp_path: Path, env: dict[str, str]
) -> None:
    marker = f"nsbuild-test-early-kill-{uuid.uuid4().hex}"
    p = subprocess.Popen(nsbuild_argv("--", *py("import time; time.sleep(3600)", marker)),
                         cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: p.poll() is not None or any(
            cmdline(pid)[0] == PY for pid in processes_with_arg(marker)), "the command started")
        assert p.poll() is None, f"nsbuild ended with {p.returncode}"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    keeper = _the_keeper(env)
    r = ok(nsbuild("--", "true", cwd=tmp_path, env=env, debug=True))
    assert f"kept by process {keeper}" in r.stderr, r.stderr


@pytest.mark.parametrize("kind", ["fifo", "stdin"])
def test_a_record_that_is_no_file_neither_blocks_nor_reads_anything(
    tmp_path: Path, env: dict[str, str], kind: str
) -> None:
    """A command that can write the record directory (bound in, or the working
    directory) puts a FIFO or a symlink to /dev/stdin in a record's place: the
    next run must neither hang on it nor read its own stdin through it."""
    ok(nsbuild("--", "true", cwd=tmp_path, env=env))
    (record,) = _records(env)
    record.unlink()
    if kind == "fifo":
        os.mkfifo(record)
    else:
        record.symlink_to("/dev/stdin")
    r = subprocess.run(nsbuild_argv("--", "wc", "-l"), cwd=tmp_path, env=env,
                       input="".join(f"{i}\n" for i in range(3000)), capture_output=True,
                       text=True, timeout=HANG_GUARD, check=False)
    assert (r.returncode, r.stdout.strip()) == (0, "3000"), explain(r)


def test_a_run_with_other_process_limits_does_not_join(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """A user namespace holds its maker's limit on processes (and a few others):
    a run made under a low limit must not impose it on a later run without."""
    import resource

    # Counted for the whole uid: what runs already, and room for one run.
    tasks = sum(len(os.listdir(f"/proc/{pid}/task")) for pid in pids()
                if os.path.isdir(f"/proc/{pid}/task") and _uid_of(pid) == os.getuid())
    limit = tasks + 32

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NPROC, (limit, resource.getrlimit(
            resource.RLIMIT_NPROC)[1]))

    first = subprocess.run(nsbuild_argv("--", "true"), cwd=tmp_path, env=env,
                           preexec_fn=low_limit, capture_output=True, text=True,
                           timeout=HANG_GUARD, check=False)
    assert first.returncode == 0, explain(first)
    assert len(_records(env)) == 1, "the first run left a keeper"
    probe = """
    import os, sys
    pids = []
    try:
        for _ in range(100):
            pid = os.fork()
            if pid == 0:
                os.read(0, 1)  # stdin is /dev/null: returns at once
                os._exit(0)
            pids.append(pid)
    finally:
        for pid in pids:
            os.waitpid(pid, 0)
    print(len(pids))
    """
    r = ok(nsbuild("--", *py(probe.replace("100", str(limit + 20))), cwd=tmp_path, env=env,
                   debug=True))
    assert r.stdout == f"{limit + 20}\n", explain(r)
    assert "joined" not in r.stderr, r.stderr
    # Runs under the same limits as each other still share one.
    again = ok(nsbuild("--", "true", cwd=tmp_path, env=env, debug=True))
    assert "joined" in again.stderr, again.stderr


def _uid_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def test_a_record_must_name_the_keeper_itself(tmp_path: Path, env: dict[str, str]) -> None:
    """The record names its keeper by pid, start time and namespace: a record
    whose start time is off (the pid reused by another process) is not joined."""
    ok(nsbuild("--", "true", cwd=tmp_path, env=env))
    (record,) = _records(env)
    pid, started, inode = record.read_text().split()
    record.write_text(f"{pid} {int(started) + 1} {inode}\n")
    r = ok(nsbuild("--", "true", cwd=tmp_path, env=env, debug=True))
    assert "joined" not in r.stderr, r.stderr


def test_a_keeper_with_other_maps_is_not_joined(
    tmp_path: Path, env: dict[str, str], subids: tuple[SubRange, SubRange]
) -> None:
    """A live keeper whose namespace maps fewer ids (made from another subuid
    file) is not joined under the full range's record."""
    uid, gid = subids
    small = tmp_path / "small"
    small.mkdir()
    (small / "subuid").write_text(f"{os.getuid()}:{uid.start}:1000\n")
    (small / "subgid").write_text(f"{os.getuid()}:{gid.start}:1000\n")
    ok(nsbuild("--", "true", cwd=tmp_path, env={
        **env, "NSBUILD_SUBUID_FILE": str(small / "subuid"),
        "NSBUILD_SUBGID_FILE": str(small / "subgid")}))
    (small_record,) = _records(env)
    ok(nsbuild("--", "true", cwd=tmp_path, env=env))
    (full_record,) = [r for r in _records(env) if r != small_record]
    assert ".1000_" in small_record.name and ".65535_" in full_record.name
    full_record.write_text(small_record.read_text())  # names the small keeper, alive
    r = ok(nsbuild("--", *sh("setpriv --reuid 5000 id -u"), cwd=tmp_path, env=env,
                   debug=True))
    assert r.stdout == "5000\n" and "joined" not in r.stderr, explain(r)


COUNT_INTERRUPTS = """
import signal, sys, time
got = []
signal.signal(signal.SIGINT, lambda *_: got.append(1))
print("ready", flush=True)
time.sleep(1.5)
print(len(got), flush=True)
"""


def test_a_joined_run_relays_the_terminals_interrupt_once_and_answers_dns(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """nsbuild stays in the caller's process group (Ctrl-C reaches it) while
    the sandbox does not: the command sees one SIGINT, not one relayed and
    one of its own. Its DNS responder answers."""
    ok(nsbuild("--", "true", cwd=tmp_path, env=env))
    _the_keeper(env)
    # A terminal sends SIGINT to its foreground process group: this one.
    p = subprocess.Popen(nsbuild_argv("--", *py(COUNT_INTERRUPTS)), cwd=tmp_path, env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stdout is not None
        assert p.stdout.readline() == "ready\n"
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=HANG_GUARD)
    finally:
        p.kill()
        p.wait()
    assert (p.returncode, out) == (0, "1\n"), err
    r = nsbuild("--", *sh("getent hosts example.org; echo $?"), cwd=tmp_path, env=env,
                debug=True)
    assert r.returncode == 0 and r.stdout == "2\n", explain(r)
    assert "joined the one kept by process" in r.stderr, r.stderr
    assert "denied: example.org (dns)" in r.stderr, r.stderr


# nsbuild's own steps after its helper joined the kept namespace, made to
# fail as a kernel refusing them would (loopback: a network namespace the
# helper makes).
FAILING_STEP = """
import errno, sys
from nsbuild.sandbox import netns
def refuse():
    raise PermissionError(errno.EPERM, "Operation not permitted")
netns.loopback_up = refuse
sys.argv = ["nsbuild", "run", "--", "true"]
from nsbuild.cli.main import entry
entry()
"""


def _joined_script(tmp_path: Path, env: dict[str, str],
                   code: str) -> subprocess.CompletedProcess[str]:
    """Python `code` (the command line, with a fault put in) run once a keeper
    is alive, so that its `nsbuild run` joins the kept namespace."""
    ok(nsbuild("--", "true", cwd=tmp_path, env=env))
    _the_keeper(env)
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=HANG_GUARD)


def test_a_failure_of_nsbuilds_own_step_in_a_joined_run_is_one_line_and_125(
    tmp_path: Path, env: dict[str, str]
) -> None:
    r = _joined_script(tmp_path, env, FAILING_STEP)
    assert r.returncode == 125, explain(r)
    assert one_line_error(r) == "nsbuild: bring up loopback: EPERM (Operation not permitted)"


@pytest.mark.parametrize("runs", [1, 2], ids=["first run", "joined run"])
def test_a_network_log_that_cannot_be_written_ends_in_one_line_not_the_command(
    tmp_path: Path, env: dict[str, str], runs: int
) -> None:
    """A full disk under --net-log: the command runs on and its DNS questions are
    still answered; nsbuild says once what was lost and exits 125."""
    for _ in range(runs - 1):
        ok(nsbuild("--", "true", cwd=tmp_path, env=env))
    r = nsbuild("--net-log", "/dev/full", "--",
                *sh("getent hosts a.example; echo got $?; echo still-here"),
                cwd=tmp_path, env=env)
    assert r.returncode == 125, explain(r)
    assert r.stdout == "got 2\nstill-here\n", explain(r)
    assert "Traceback" not in r.stderr, explain(r)
    assert "nsbuild: --net-log /dev/full: No space left on device (" in r.stderr


FAILING_SERVICE = """
import sys
from nsbuild.net import dns
def broken(packet, rcode=3):
    raise RuntimeError("no answer")
dns.answer = broken
sys.argv = ["nsbuild", "run", "--", "/bin/sh", "-c",
            "getent hosts a.example; echo got $?; echo still-here"]
from nsbuild.cli.main import entry
entry()
"""

HANDLERS_AFTER = """
import signal, sys
from nsbuild.cli.main import main
signal.signal(signal.SIGHUP, signal.SIG_IGN)
before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
status = main(["run", "--", "true"])
after = {s: signal.getsignal(s) for s in before}
print(status, after == before, flush=True)
"""


def test_a_service_that_fails_in_a_joined_run_stops_alone(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """The DNS responder raising: the command runs on (its question
    unanswered), nsbuild says so in one line."""
    r = _joined_script(tmp_path, env, FAILING_SERVICE)
    assert (r.returncode, r.stdout) == (0, "got 2\nstill-here\n"), explain(r)
    assert one_line_error(r) == "nsbuild: a service of the sandbox stopped: no answer"


def test_a_joined_run_gives_the_caller_its_signal_handlers_back(
    tmp_path: Path, env: dict[str, str]
) -> None:
    r = _joined_script(tmp_path, env, HANDLERS_AFTER)
    assert r.stdout == "0 True\n", explain(r)
