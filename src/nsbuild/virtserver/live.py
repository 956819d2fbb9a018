"""The long-lived sandbox of an open testbed: started at open, entered by every command.

One sandbox over the testbed's session, with the server's network policy; its
command is WAITER, which only sleeps. Every command of the testbed enters it
(nsbuild.sandbox.enter), so a command costs a fork, a setns() and an exec,
not a whole new sandbox. With `--net allow` the egress proxy (with `none` the
DNS responder that explains the refusal) is served by the server process for
the testbed's life. Stopping kills the sandbox's init: the kernel then kills
every process in its PID namespace, the entered commands too, and the mounts
go with the last of them.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nsbuild.envs.session import Session
    from nsbuild.net.plan import NetPlan
    from nsbuild.sandbox import Process
    from nsbuild.virtserver.testbed import Testbed

# Immune to the signals a test may send to every `sleep` (pkill sleep), not to
# SIGKILL; without the shell's PWD, so that commands get the sandbox's own
# environment. The testbed ends when this process does.
WAITER = ("sh", "-c", 'trap "" HUP INT QUIT TERM; exec env -u PWD sleep infinity')
STOP_TIMEOUT = 30.0


class LiveSandbox:
    """Context manager: the running sandbox of one testbed session."""

    def __init__(self, testbed: Testbed, session: Session) -> None:
        self.testbed = testbed
        self.session = session
        self.pid = 0  # the waiter's host PID: the process commands enter
        self.start_time = 0
        self.cgroup: str | None = None
        self.env: tuple[tuple[str, str], ...] = ()
        # As the sandbox's own processes: no setuid or setgid file while a
        # host folder others may reach is bound writable.
        self.deny_setid = False
        self._stack = ExitStack()

    def __enter__(self) -> LiveSandbox:
        from nsbuild import net
        from nsbuild.envs.session import host_resolver_mounts
        from nsbuild.net.launch import Launch, planned
        from nsbuild.sandbox import spawn
        from nsbuild.sandbox.enter import sandbox_pids, start_time

        stack = self._stack
        try:
            _let_sandbox_root_walk(self.testbed.session_dir)
            opts = self.testbed.net.options()
            allow = opts.mode == "allow"
            mirrors = self.testbed.mirrors if allow else ()
            trusted = self.testbed.trusted_mirrors if allow else ()
            plan = stack.enter_context(net.network(opts, mirrors=mirrors,
                                                   trusted_mirrors=trusted))
            # Once the sandbox is gone (callbacks run last to first): what its
            # commands were refused, so that a test that failed for it says why.
            stack.callback(_say_denied, plan)
            resolver = host_resolver_mounts() if plan.share_net else ()
            spec = planned(self.testbed.sandbox(self.session, WAITER, extra_mounts=resolver),
                           plan)  # fmt: skip
            # No descriptor of ours in the sandbox: a client waiting for EOF on
            # our stderr must not wait for the testbed too.
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            try:
                proc = stack.enter_context(
                    Launch(plan, lambda: spawn(spec, stdin=null, stdout=null, stderr=null)))
            finally:
                os.close(null)
            init, self.pid = sandbox_pids(proc)
            init_fd = os.pidfd_open(init)
            stack.callback(_stop, proc, init, init_fd)
            self.start_time = start_time(self.pid)
            self.cgroup = spec.cgroup
            self.env = spec.env
            self.deny_setid = bool(spec.shared_writable())
        except BaseException:
            stack.close()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stack.close()

    def start(self, argv: Sequence[str], *, stdin: int | None, stdout: int | None,
              stderr: int | None) -> Process:  # fmt: skip
        """A command entering the sandbox, with the testbed's network."""
        from nsbuild.sandbox.enter import start

        return start(self.pid, argv, env=self.env, stdin=stdin, stdout=stdout, stderr=stderr,
                     cgroup=self.cgroup, expect_start=self.start_time,
                     deny_setid=self.deny_setid)  # fmt: skip

    def execute_args(self) -> list[str]:
        """What the execute helper needs to find this sandbox (see execute.py)."""
        return [str(self.pid), str(self.start_time), self.testbed.net.mode, self.cgroup or "-",
                "deny-setid" if self.deny_setid else "-"]  # fmt: skip


def _let_sandbox_root_walk(folder: str) -> None:
    """Let the sandbox's root walk into the session folder, where the
    testbed's overlays have their upper and work dirs (the apt cache's, and
    the root's without a tmpfs): run by host root, the sandbox's root is the
    first id of root's subordinate range, for which a folder of host root's
    of mode 0700 is closed. Its group gets search permission only: it cannot
    list or change the folder, and no other user of the host gets anything."""
    from nsbuild.envs.owner import sandbox_root_ids

    ids = sandbox_root_ids()
    if ids is None:
        return  # the sandbox's root is the caller: the folder is its own
    fd = os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        here = f"/proc/self/fd/{fd}"
        os.chown(here, -1, ids[1])
        os.chmod(here, 0o710)
    finally:
        os.close(fd)


def _say_denied(plan: NetPlan) -> None:
    line = plan.denied_summary()  # escaped for a terminal
    if line:
        sys.stderr.write(f"autopkgtest-virt-nsbuild: {line}\n")
        sys.stderr.flush()


def _stop(proc: Process, init: int, init_fd: int) -> None:
    """Kill the sandbox and wait until its init is gone (every process of its
    PID namespace was killed before init exits)."""
    try:
        for pid in (init, proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        ready, _, _ = select.select([init_fd], [], [], STOP_TIMEOUT)
        if not ready:
            sys.stderr.write(f"autopkgtest-virt-nsbuild: the testbed's init {init} did not "
                             f"exit within {STOP_TIMEOUT:.0f} s of SIGKILL\n")  # fmt: skip
        proc.wait()
    finally:
        os.close(init_fd)
