"""Run a sandbox under a network plan: the one sequence every caller shares.

    with network(opts, ...) as plan:
        status = run_under(plan, spec, stdout=fd)    # a new sandbox, waited for

    with network(opts, ...) as plan:                 # any start: spawn, or enter.start
        with Launch(plan, lambda: spawn(planned(spec, plan))) as proc:
            ...                                      # the plan serves proc's sockets

planned() gives a Sandbox the plan's network: its namespace (private or the
host's), the sockets made inside for the plan's services, its mounts
(resolv.conf), its variables (the proxy's) and its cgroup. Launch starts the
process, says why its command could not be executed, serves the plan's
services; at the end it kills whatever of the sandbox still runs, stops the
services, and only then closes the sockets they served (a descriptor closed
under a service's thread could be reused by the next one opened). A setup
failure is raised by the start (SetupError) and passes through unchanged.

On the path of every `nsbuild run`: posix and _signal only (see sandbox/runner.py).
"""

from __future__ import annotations

import posix

from nsbuild.sandbox import spawn
from nsbuild.sandbox.channel import FORWARDED_SIGNALS
from nsbuild.sandbox.record import replace

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable
    from types import TracebackType

    from nsbuild.net.plan import NetPlan
    from nsbuild.sandbox import Process, Sandbox
    from nsbuild.sandbox.limits import Limits
else:
    import _signal as signal


def planned(spec: Sandbox, plan: NetPlan) -> Sandbox:
    """`spec` with the plan's network. The plan's variables win over the
    spec's (the proxy the plan serves is the only way out); the spec's own
    cgroup, if any, wins over the plan's (resource limits made inside it)."""
    return replace(
        spec,
        share_net=plan.share_net,
        inside_sockets=plan.inside_sockets,
        mounts=(*spec.mounts, *plan.mounts),
        env=tuple({**dict(spec.env), **dict(plan.env)}.items()),
        cgroup=spec.cgroup or plan.cgroup,
    )


class Launch:
    """Context manager: `start()` a sandbox process made with the plan's
    inside sockets, serve the plan's services to it; yields the Process.

    stderr: where to say that the command could not be executed (default 2).
    relay_signals: pass SIGINT, SIGTERM, SIGHUP and SIGQUIT on to the command
    while the block runs (main thread only: a command-line front end)."""

    def __init__(self, plan: NetPlan, start: Callable[[], Process], *,
                 stderr: int | None = None, relay_signals: bool = False) -> None:  # fmt: skip
        self._plan = plan
        self._start = start
        self._stderr = 2 if stderr is None else stderr
        self._relay = relay_signals
        self._proc: Process | None = None
        self._restore: Callable[[], None] | None = None

    def __enter__(self) -> Process:
        proc = self._proc = self._start()
        if proc.exec_error:
            _say(self._stderr, proc.exec_error)
        try:
            if self._relay:
                self._restore = _relayed(proc)
            self._plan.serve(proc.sockets)
        except BaseException:
            self._end()
            raise
        return proc

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self._end()

    def _end(self) -> None:
        proc = self._proc
        assert proc is not None
        try:
            if proc.returncode is None:
                # Failed, or left early: nothing of the sandbox outlives the block.
                proc.kill()
                proc.wait()
        finally:
            if self._restore is not None:
                self._restore()
                self._restore = None
            self._plan.stop()
            for sock in proc.sockets:
                sock.close()


def run_under(plan: NetPlan, spec: Sandbox, *, stdin: int | None = None,
              stdout: int | None = None, stderr: int | None = None,
              limits: Limits | None = None, relay_signals: bool = False) -> int:  # fmt: skip
    """Run `spec` in a new sandbox under `plan`; its command's exit status
    (128+N when killed by signal N). stdin, stdout, stderr: descriptors for
    the command (default: the caller's). limits: the run's own cgroup (its
    path becomes the sandbox's); cgroup v1 ones the sandbox inherits: this
    process is in them while it forks the sandbox, which then leaves no user
    namespace keeper behind (they must be empty at the end)."""
    if limits is not None and limits.path:
        spec = replace(spec, cgroup=limits.path)
    spec = planned(spec, plan)

    def start() -> Process:
        if limits is None:
            return spawn(spec, stdin=stdin, stdout=stdout, stderr=stderr)
        limits.join()
        try:
            return spawn(spec, stdin=stdin, stdout=stdout, stderr=stderr, leave_keeper=False)
        finally:
            limits.leave()

    with Launch(plan, start, stderr=stderr, relay_signals=relay_signals) as proc:
        return proc.wait()


def _relayed(proc: Process) -> Callable[[], None]:
    """Pass the usual termination signals on to `proc`; returns what restores
    the handlers there were."""
    previous = {sig: signal.signal(sig, lambda n, _f: proc.send_signal(n))
                for sig in FORWARDED_SIGNALS}  # fmt: skip

    def restore() -> None:
        for sig, handler in previous.items():
            # None: a handler not set from Python; the default is the nearest.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    return restore


def _say(fd: int, message: str) -> None:
    try:
        posix.write(fd, f"nsbuild: {message}\n".encode(errors="replace"))
    except OSError:
        pass  # the caller's stderr is gone: nothing else to tell it with


__all__ = ["Launch", "planned", "run_under"]
