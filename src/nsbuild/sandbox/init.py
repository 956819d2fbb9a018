"""PID 1 of the sandbox: build the root, lock the mounts, start the command, reap.

init makes the sandbox's mount namespace itself, so that no mount outlives
it; when it dies the kernel kills every process of the PID namespace.
"""

from __future__ import annotations

import _socket
import os

from nsbuild.sandbox import mounts as m
from nsbuild.sandbox import syscalls as sc
from nsbuild.sandbox.channel import FORWARDED_SIGNALS, SETUP_EXIT, Channel, report_failure
from nsbuild.sandbox.command import close_stdio, harden, resolve_user, spawn_command
from nsbuild.sandbox.netns import join_network
from nsbuild.sandbox.spec import Sandbox
from nsbuild.sandbox.streams import substitute

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable
    from typing import NoReturn
else:
    import _signal as signal


def run_init(spec: Sandbox, plan: m.Plan, chan: Channel, stdio: list[int | None],
             life_r: int, lock: tuple[int, int], maps_pending: bool,
             net: _socket.socket | None, say: Callable[[str], None]) -> NoReturn:
    # PID 1 ignores a signal it has no handler for: one sent before the
    # command runs is kept, and passed on once it does.
    early: list[int] = []
    for s in FORWARDED_SIGNALS:
        signal.signal(s, lambda sig, _f: early.append(sig))
    try:
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        m.Step.current = "name PID 1"
        # Its memory still shows nsbuild's host command line and environment.
        sc.set_process_title("nsbuild-init")
        os.set_blocking(life_r, False)
        _check_lifeline(life_r)
        m.Step.current = "wait for the id maps"
        if maps_pending and chan.sock.recv(1) != b"M":
            os._exit(SETUP_EXIT)  # nsbuild is gone, or failed to map ids
        m.Step.current = "unshare mount namespace"
        say("unshare the mount namespace")
        sc.unshare(sc.CLONE_NEWNS)
        m.Step.current = "become root in the user namespace"
        os.setresgid(0, 0, 0)
        if spec.idmap.full:
            os.setgroups([])
        os.setresuid(0, 0, 0)
        # Changing ids (nsbuild run by root: host root becomes the range's
        # first id) clears the parent-death signal: set it again, then check
        # the helper lives. (It also makes init non-dumpable, which is fine:
        # the helper that writes init's nested id map is then host root too.)
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        _check_lifeline(life_r)
        os.close(life_r)

        m.build_root(spec, plan, say, m.Step, before_sys=lambda: join_network(net))
        join_network(net)  # no /sys mounted

        m.Step.current = "set hostname"
        say(f"set hostname {spec.hostname}")
        sc.sethostname(spec.hostname)

        m.pivot(say, m.Step)

        m.Step.current = "resolve user"
        creds = resolve_user(spec.user) if spec.user else None
        _lock_mounts(*lock, say)
        sources = harden(spec, chan, stdio, creds, say)
        m.Step.current = "make the standard streams reopenable"
        sources, tty = substitute(sources, chan, creds[:2] if creds else None)
        if tty is not None:
            say(f"the caller's terminal is out of the command's reach: it gets {tty}")
        command = spawn_command(spec, chan, sources, creds, say, tty)
        chan.sock.close()
        close_stdio(sources)  # the lifted copies, if any: the originals are closed
        _reap(command, early, say)
    except BaseException as e:
        report_failure(chan, e)


def _check_lifeline(life_r: int) -> None:
    try:
        if os.read(life_r, 1) == b"":
            os._exit(SETUP_EXIT)  # the helper died before we were watching
    except BlockingIOError:
        pass


def _lock_mounts(ask_w: int, mapped_r: int, say: Callable[[str], None]) -> None:
    """Move init, and so the command it starts, into a nested user and mount
    namespace. Mounts passed to a less privileged mount namespace are locked by
    the kernel: root inside can no longer make a read-only bind writable, or
    unmount one to see what is under it. The helper, outside, gives the nested
    namespace the same ids."""
    m.Step.current = "lock mounts (nested user namespace)"
    say("lock every mount: move into a nested user and mount namespace")
    sc.unshare(sc.CLONE_NEWUSER | sc.CLONE_NEWNS)
    os.write(ask_w, b"L")
    if os.read(mapped_r, 1) != b"M":
        os._exit(SETUP_EXIT)  # the helper failed, and reported why
    os.close(ask_w)
    os.close(mapped_r)
    # Init now shares the command's user namespace: non-dumpable, so that root
    # in there cannot ptrace PID 1 or read its memory (the kernel then asks for
    # a capability in the namespace where init's memory began: the host's).
    sc.prctl(sc.PR_SET_DUMPABLE, 0)
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def _reap(child: int, early: list[int], say: Callable[[str], None]) -> NoReturn:
    """PID 1: relay signals to the command, reap orphans, and when the command
    exits kill whatever is left so nothing outlives it."""

    def relay(sig: int, _frame: object) -> None:
        try:
            os.kill(child, sig)
        except ProcessLookupError:
            pass

    for s in FORWARDED_SIGNALS:
        signal.signal(s, relay)
    for sig in early:
        relay(sig, None)
    code = 0
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code
            break
    say(f"command exited with status {code}; killing what is left in the sandbox")
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    os._exit(code)
