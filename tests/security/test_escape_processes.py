"""Process and privilege escapes: see, signal or trace host processes, gain
privileges through file capabilities or setuid bits, read the caller's keys,
outlive the sandbox.

Covered elsewhere, listed in docs/security.md: /proc shows only the sandbox
(tests/sandbox/test_pid.py), setuid binaries do not elevate and no_new_privs
is set (tests/sandbox/test_hardening.py), TIOCSTI injects nothing
(tests/sandbox/test_tty.py), nothing inside is host uid 0 when root runs
nsbuild (tests/sandbox/test_root.py), SIGKILL of nsbuild leaves no process
(tests/sandbox/test_pid.py)."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from sandbox_helpers import processes_with_arg
from security_helpers import NSBUILD, explain, failed, probe, probe_argv, results, run_nsbuild
from waiting import wait_for

pytestmark = pytest.mark.userns

CAP_DAC_OVERRIDE, CAP_SETUID, CAP_SYS_ADMIN = 1, 7, 21


def test_host_processes_cannot_be_seen_signalled_or_traced(tmp_path: Path) -> None:
    marker = str(10**9 + uuid.uuid4().int % 10**8)  # a unique sleep duration
    host = subprocess.Popen(["sleep", marker])
    try:
        code = """
        pid, marker = int(sys.argv[1]), sys.argv[2]
        def seen():
            found = []
            for p in os.listdir("/proc"):
                if p.isdigit():
                    try:
                        if open(f"/proc/{p}/cmdline").read() == f"sleep\\0{marker}\\0":
                            found.append(p)
                    except OSError:
                        pass
            if found:
                return found
            raise OSError(errno.ESRCH, "not visible")
        attempt("see", seen)
        attempt("kill", lambda: os.kill(pid, 9))
        attempt("pidfd_open", lambda: syscall(434, pid, 0))
        def ptrace_attach(target):
            # PTRACE_ATTACH, then PTRACE_DETACH at once: a process left stopped
            # (init!) would hang the run instead of failing this attempt.
            syscall(101, 16, target, 0, 0)
            os.waitpid(target, getattr(os, "__WALL", 0x40000000))
            syscall(101, 17, target, 0, 0)
            return "attached"
        attempt("ptrace host pid", lambda: ptrace_attach(pid))
        attempt("ptrace init", lambda: ptrace_attach(1))
        attempt("ptrace parent", lambda: ptrace_attach(os.getppid()))
        buf = ctypes.create_string_buffer(8)
        iov = (ctypes.c_void_p * 2)(ctypes.cast(buf, ctypes.c_void_p), 8)
        attempt("process_vm_readv init", lambda: syscall(310, 1, iov, 1, iov, 1, 0))
        attempt("init memory", lambda: open("/proc/1/mem", "rb").read(1))
        attempt("init environ", lambda: open("/proc/1/environ", "rb").read())
        """
        res = probe(code, cwd=tmp_path, args=(str(host.pid), marker))
        for name in ("see", "kill", "pidfd_open", "ptrace host pid"):
            failed(res, name, "ESRCH")
        for name in ("ptrace init", "ptrace parent", "process_vm_readv init", "init memory",
                     "init environ"):
            failed(res, name, "EPERM", "EACCES")
        assert host.poll() is None, "the host process was killed from inside"
    finally:
        host.kill()
        host.wait()


def _caps_xattr(*caps: int, effective: bool = True) -> bytes:
    """A VFS_CAP_REVISION_2 security.capability value: permitted `caps`."""
    lo = sum(1 << c for c in caps if c < 32)
    hi = sum(1 << (c - 32) for c in caps if c >= 32)
    return struct.pack("<IIIII", 0x02000000 | int(effective), lo, 0, hi, 0)


def _cap_lines(text: str) -> dict[str, int]:
    return {k: int(v, 16) for k, v in (line.split(":\t") for line in text.splitlines()
                                       if line.startswith(("CapPrm", "CapEff")))}


def test_file_capabilities_set_inside_grant_nothing(tmp_path: Path) -> None:
    """Root inside may write a security.capability attribute (a namespaced one):
    a user inside running that file gains nothing (no_new_privs), nor does the
    caller running it on the host (the capability belongs to the sandbox's
    namespace only). The same for a setuid bit set inside."""
    work = tmp_path / "w"
    work.mkdir()
    work.chmod(0o777)
    python = os.path.realpath("/usr/bin/python3")
    names = ("capped", "permitted", "setuid")
    for name in names:
        shutil.copy(python, work / name)
        (work / name).chmod(0o755)
    caps = (CAP_DAC_OVERRIDE, CAP_SETUID, CAP_SYS_ADMIN)
    set_caps = f"""
    import os
    os.setxattr("/w/capped", "security.capability", {_caps_xattr(*caps)!r})
    os.setxattr("/w/permitted", "security.capability", {_caps_xattr(*caps, effective=False)!r})
    """
    # The setuid bit is set on the host: inside, a bind others may reach
    # refuses setuid modes (tests/sandbox/test_setid.py).
    (work / "setuid").chmod(0o4755)
    r = run_nsbuild("run", "--bind", f"{work}:/w", "--chdir", "/", "--",
                    "/usr/bin/python3", "-c", set_caps.replace("\n    ", "\n"), cwd=tmp_path)
    assert r.returncode == 0, explain(r)
    status = "import os; print(open('/proc/self/status').read()); print('euid', os.geteuid())"
    r = run_nsbuild("run", "--bind", f"{work}:/w", "--chdir", "/", "--user", "1000:1000", "--",
                    "sh", "-c", " ; ".join(f'/w/{n} -c "{status}"' for n in names),
                    cwd=tmp_path)
    # A file whose effective capabilities cannot all be granted is refused
    # outright (EPERM); the others run with none.
    assert "/w/capped: Operation not permitted" in r.stderr, explain(r)
    assert all(v == 0 for v in _cap_lines(r.stdout).values()), r.stdout
    assert r.stdout.count("euid 1000") == 2, r.stdout
    # On the host, as the caller: the capability belongs to the sandbox's namespace.
    for name in names:
        out = subprocess.run([str(work / name), "-c", status], capture_output=True, text=True,
                             check=True).stdout
        assert all(v == 0 for v in _cap_lines(out).values()), (name, out)
        assert f"euid {os.geteuid()}" in out


SYS_ADD_KEY, SYS_REQUEST_KEY, SYS_KEYCTL = 248, 249, 250
KEY_SPEC_SESSION, KEY_SPEC_USER = -3, -4
KEYCTL_JOIN_SESSION_KEYRING = 1

KEY_PROBE = """
def find(desc, keyring):
    kid = syscall(250, 10, keyring, b"user", desc.encode(), 0)  # KEYCTL_SEARCH
    buf = ctypes.create_string_buffer(64)
    n = syscall(250, 11, kid, buf, 64)                         # KEYCTL_READ
    return buf.raw[:n]
def serial(text):
    # /proc/keys names keys and keyrings the process may view, with their serials.
    for line in open("/proc/keys"):
        if text in line:
            return int(line.split()[0], 16)
    raise OSError(2, "not listed in /proc/keys")
def read(kid):
    buf = ctypes.create_string_buffer(64)
    return buf.raw[:syscall(250, 11, kid, buf, 64)]            # KEYCTL_READ
attempt("request_key", lambda: syscall(249, b"user", sys.argv[1].encode(), None, 0))
attempt("session keyring", lambda: find(sys.argv[1], -3))
attempt("user keyring", lambda: find(sys.argv[2], -4))
# Inside uid 0 is the caller's uid, which owns its user keyring: link that
# keyring by its serial into our own session keyring, then read the key.
attempt("link user keyring by serial",
        lambda: syscall(250, 8, serial(f"_uid.{sys.argv[3]}"), -3))   # KEYCTL_LINK
attempt("read key by serial", lambda: read(serial(sys.argv[2])))
attempt("add_key", lambda: syscall(248, b"user", b"x", b"y", 1, -3))
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="keyctl numbers are x86_64's")
@pytest.mark.parametrize("user", [None, "1000:1000"])
def test_callers_keyrings_are_not_reachable(tmp_path: Path, user: str | None) -> None:
    """The caller keeps a secret in its session keyring (Kerberos tickets,
    fscrypt keys live there) and one in its user keyring: the command finds
    neither."""
    session_desc = f"nsbuild-session-{uuid.uuid4().hex[:8]}"
    user_desc = f"nsbuild-user-{uuid.uuid4().hex[:8]}"
    # A child joins a fresh session keyring of its own: the test process's
    # keyrings stay as they were.
    launcher = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
assert libc.syscall({SYS_KEYCTL}, {KEYCTL_JOIN_SESSION_KEYRING}, None) >= 0
for desc, ring in (({session_desc!r}, {KEY_SPEC_SESSION}), ({user_desc!r}, {KEY_SPEC_USER})):
    kid = libc.syscall({SYS_ADD_KEY}, b"user", desc.encode(), b"TOPSECRET", 9,
                       ctypes.c_long(ring))
    assert kid > 0, ctypes.get_errno()
    # The user keyring outlives the test: the key expires by itself.
    libc.syscall({SYS_KEYCTL}, 15, ctypes.c_long(kid), 120)  # KEYCTL_SET_TIMEOUT
os.execv(sys.argv[1], sys.argv[1:])
"""
    argv = [*NSBUILD, "run", "--chdir", "/", *(["--user", user] if user else []), "--",
            *probe_argv(KEY_PROBE, session_desc, user_desc, str(os.getuid()))]
    r = subprocess.run([sys.executable, "-c", launcher, *argv], cwd=tmp_path,
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 0, explain(r)
    res = results(r)
    # The keyring system calls do not exist inside (ENOSYS); where /proc/keys
    # does not even list the key, reading it fails before that (ENOENT).
    for name in ("request_key", "session keyring", "user keyring", "add_key"):
        failed(res, name, "ENOSYS")
    failed(res, "link user keyring by serial", "ENOSYS", "ENOENT")
    failed(res, "read key by serial", "ENOSYS", "ENOENT")


def test_a_double_forked_daemon_ignoring_sigterm_dies_with_the_command(tmp_path: Path) -> None:
    """A daemon (double fork, new session, SIGTERM/SIGHUP/SIGINT ignored) started
    by a command that then exits: gone when nsbuild returns."""
    marker = str(10**9 + uuid.uuid4().int % 10**8)
    script = f"trap '' TERM HUP INT; (setsid sleep {marker} > /dev/null 2>&1 &) ; echo started"
    try:
        r = run_nsbuild("run", "--", "sh", "-c", script, cwd=tmp_path)
        assert r.returncode == 0 and "started" in r.stdout, explain(r)
        wait_for(lambda: processes_with_arg(marker) == [], "the daemon is gone")
    finally:
        for pid in processes_with_arg(marker):
            os.kill(pid, signal.SIGKILL)


def test_sigterm_ignoring_command_does_not_survive_a_killed_nsbuild(tmp_path: Path) -> None:
    """nsbuild relays SIGTERM; a command that ignores it (and its daemon) keeps
    running only as long as nsbuild does: SIGKILL of nsbuild ends them all."""
    marker = str(10**9 + uuid.uuid4().int % 10**8)
    script = (f"trap '' TERM HUP INT; (setsid sleep {marker} > /dev/null 2>&1 &); "
              f"echo started; exec sleep {marker}")
    p = subprocess.Popen([*NSBUILD, "run", "--", "sh", "-c", script], cwd=tmp_path,
                         stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "started"
        wait_for(lambda: len(processes_with_arg(marker)) >= 2, "command and daemon run")
        p.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(timeout=1)  # the command ignores SIGTERM: nsbuild keeps waiting
        p.kill()
        p.wait()
        wait_for(lambda: processes_with_arg(marker) == [], "everything inside is gone")
    finally:
        p.kill()
        for pid in processes_with_arg(marker):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.root
def test_as_root_host_processes_and_files_stay_out_of_reach(tmp_path: Path) -> None:
    """nsbuild run by root: the sandbox runs on root's subordinate range, so a
    host root process cannot be signalled and a root-only file not read, even
    through /proc."""
    # A folder the subordinate range may traverse (pytest's tmp_path is 0700).
    shared = Path(tempfile.mkdtemp(prefix="nsbuild-sec-"))
    shared.chmod(0o755)
    secret = shared / "root-only"
    secret.write_text("secret")
    secret.chmod(0o600)
    host = subprocess.Popen(["sleep", "1000"])
    try:
        code = """
        attempt("kill", lambda: os.kill(int(sys.argv[1]), 9))
        attempt("read", lambda: open(sys.argv[2]).read())
        """
        res = probe(code, "--ro-bind", str(shared), cwd="/", args=(str(host.pid),
                                                                   str(secret)))
        failed(res, "kill", "ESRCH")
        failed(res, "read", "EACCES")
        assert host.poll() is None
    finally:
        host.kill()
        host.wait()
        shutil.rmtree(shared)
