"""The execute command of autopkgtest-virt-nsbuild: run one command in the testbed.

    python3 -I -S -c BOOT RECORD PID START MODE CGROUP SETID [--nsbuild-net MODE] CMD [ARG...]

`print-execute-command` hands out this program (BOOT puts the package on
sys.path and calls entry(): no site, no stdlib beyond what entering needs, as
it starts once for every command the client runs) with the address of the
testbed's sandbox: the PID and start time of its waiter, the server's network
mode, the sandbox's cgroup (`-`: none) and `deny-setid` when the command may
make no setuid/setgid file, as the sandbox's own processes (`-`: it may); the
client appends the command. The
command enters that sandbox as root, with the caller's stdin, stdout and
stderr, and its exit status is ours (128+N when killed by signal N). When this
program itself fails (the testbed is gone, entering failed) it exits 255, as
the protocol asks, with one line on stderr.

A command that asks for another network mode than the testbed's must not get
the testbed's network: it enters every namespace but the network one and gets
a fresh network namespace instead, with only lo (`none`), or with the egress
proxy's sockets, served by this program from the host (`allow`). A fresh
sandbox over the session is no option: the session's overlay is already
mounted by the testbed's sandbox, and one upper directory in two overlay
mounts at once gives undefined results.
"""

from __future__ import annotations

import os
import sys

PROG = "autopkgtest-virt-nsbuild"
FAILED = 255
# Kept in step with testbed.py (not imported: this runs before anything else).
NET_ARG = "--nsbuild-net"
GONE = "the testbed was closed or reverted, or its sandbox ended"


def boot_code() -> str:
    """The -c program: this package on sys.path, then entry()."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return (f"import sys;sys.path[:0]=[{root!r}];"
            "from nsbuild.virtserver.execute import entry;entry()")  # fmt: skip


def main(argv: list[str]) -> int:
    if len(argv) < 7:
        return _fail("usage: execute RECORD PID START MODE CGROUP SETID [--nsbuild-net MODE] "
                     "CMD...")  # fmt: skip
    record, pid_text, start_text, mode, cgroup, setid, *command = argv
    requested = mode
    if command[0] == NET_ARG:
        if len(command) < 3:
            return _fail(f"{NET_ARG} needs a mode and a command")
        requested, command = command[1], command[2:]
    if not (pid_text.isdigit() and start_text.isdigit()):
        return _fail(f"bad testbed address {pid_text} {start_text}")
    from nsbuild.errors import NsbuildError
    from nsbuild.sandbox.enter import start, start_time
    from nsbuild.sandbox.errors import NotRunning

    pid, started = int(pid_text), int(start_text)
    group = None if cgroup == "-" else cgroup
    deny = setid != "-"
    try:
        if requested == mode:
            status = start(pid, command, expect_start=started, cgroup=group,
                           deny_setid=deny).wait_relaying()  # fmt: skip
        elif requested == "none":
            status = start(pid, command, new_net=True, expect_start=started, cgroup=group,
                           deny_setid=deny).wait_relaying()  # fmt: skip
        elif requested == "allow":
            status = _with_proxy(record, pid, started, group, deny, command)
        elif requested == "host":
            return _fail(f"{NET_ARG} host: the server was not started with --net host")
        else:
            return _fail(f"{NET_ARG} {requested!r}: expected none, allow or host")
    except NotRunning:
        return _fail(GONE)
    except (NsbuildError, OSError, ValueError) as e:
        return _fail(str(e))
    if status != 0:
        _say_if_full(record, pid)
    if status >= 128:
        # Killed: by a signal of its own, or with the whole testbed?
        try:
            if start_time(pid) == started:
                return status
        except NotRunning:
            pass
        return _fail(GONE)
    return status


def _with_proxy(record: str, pid: int, started: int, cgroup: str | None, deny_setid: bool,
                command: list[str]) -> int:  # fmt: skip
    """`allow` in a testbed without it: a fresh network namespace with the
    proxy's sockets, served from here (the proxy engine: an nftables table
    would need the sandbox's network shared with the host's)."""
    from nsbuild import net
    from nsbuild.net.launch import Launch
    from nsbuild.sandbox.enter import environ, start
    from nsbuild.virtserver.testbed import Testbed

    testbed = Testbed.load(record)
    opts = testbed.net.options("allow", engine="proxy")
    with net.network(opts, mirrors=testbed.mirrors,
                     trusted_mirrors=testbed.trusted_mirrors) as plan:
        # The testbed's own variables, the proxy's on top.
        env = dict(environ(pid))
        env.update(plan.env)
        with Launch(plan, lambda: start(pid, command, env=tuple(env.items()), new_net=True,
                                        inside_sockets=plan.inside_sockets, cgroup=cgroup,
                                        expect_start=started, deny_setid=deny_setid),
                    relay_signals=True) as proc:  # fmt: skip
            return proc.wait()


def _say_if_full(record: str, pid: int) -> None:
    """After a failed command: if the testbed has no space left, say so in
    one line (the command itself only said 'No space left on device')."""
    try:
        # The testbed's root as its processes see it; the overlay reports
        # the space of its upper, the tmpfs or the session's disk.
        st = os.statvfs(f"/proc/{pid}/root")
    except OSError:
        return
    if st.f_bavail > 0:
        return
    import json

    try:
        with open(record) as f:
            size = json.load(f).get("tmpfs_size")
    except (OSError, ValueError, AttributeError):
        size = None
    total = st.f_blocks * st.f_frsize >> 20
    if size:
        sys.stderr.write(f"{PROG}: the testbed's tmpfs is full ({total} MiB, --tmpfs {size}): "
                         "give the server a larger --tmpfs SIZE, or --no-tmpfs\n")  # fmt: skip
    else:
        sys.stderr.write(f"{PROG}: the testbed's disk is full ({total} MiB)\n")


def _fail(message: str) -> int:
    sys.stderr.write(f"{PROG}: {message}\n")
    return FAILED


def entry() -> None:
    status = main(sys.argv[1:])
    sys.stderr.flush()
    # No interpreter teardown: nothing is left to do, and it costs time on
    # every command of a test run.
    os._exit(status)
