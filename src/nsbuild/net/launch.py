"""Run a sandbox under a network plan: the one sequence every caller shares.

    with network(opts, ...) as plan:
        status = run_under(plan, spec, stdout=fd)     # a new sandbox, waited for
        # or any start (spawn, enter.start) of a process with the plan's sockets:
        with Launch(plan, lambda: spawn(planned(spec, plan))) as proc:
            ...                                       # the plan serves proc meanwhile

At the end Launch kills what still runs, stops the plan's services, and only
then closes the sockets they served: a descriptor closed under a service's
thread could be reused by the next one opened. Setup failures (SetupError)
pass through unchanged.
"""

from __future__ import annotations

from nsbuild.sandbox import spawn
from nsbuild.sandbox.record import replace

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from nsbuild.net.plan import NetPlan
    from nsbuild.sandbox import Process, Sandbox
    from nsbuild.sandbox.limits import Limits


def planned(spec: Sandbox, plan: NetPlan) -> Sandbox:
    """`spec` with the plan's network namespace, inside sockets, mounts,
    variables (winning over the spec's: the plan's proxy is the only way out)
    and cgroup (unless the spec has its own: limits made inside the plan's)."""
    return replace(spec, share_net=plan.share_net, inside_sockets=plan.inside_sockets,
                   mounts=(*spec.mounts, *plan.mounts),
                   env=tuple({**dict(spec.env), **dict(plan.env)}.items()),
                   cgroup=spec.cgroup or plan.cgroup)  # fmt: skip


class Launch:
    """Context manager: `start()` a process made with the plan's inside
    sockets, say on `stderr` (default 2) why its command could not be
    executed, serve the plan to it; yields the Process. relay_signals: pass
    SIGINT, SIGTERM, SIGHUP and SIGQUIT on to it (main thread only)."""

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
        try:
            proc.tell_exec_error(self._stderr)
            if self._relay:
                self._restore = proc.relay_signals()
            self._plan.serve(proc.sockets)
        except BaseException:
            self._end()
            raise
        return proc

    def __exit__(self, *exc: object) -> None:
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
    """Run `spec` in a new sandbox under `plan`, with these descriptors
    (default: the caller's); the command's exit status (128+N: signal N).
    limits: the run's own cgroup, the sandbox's; or cgroup v1 ones, which
    it inherits: this process is in them while it forks the sandbox (and
    leaves no user namespace keeper there: they must end empty)."""
    if limits is not None and limits.path:
        spec = replace(spec, cgroup=limits.path)
    spec = planned(spec, plan)

    def start() -> Process:
        if limits is None:
            return spawn(spec, stdin=stdin, stdout=stdout, stderr=stderr)
        limits.join()
        try:
            # Out again as soon as the sandbox is forked: the threads that
            # relay its streams must not count against its process limit.
            return spawn(spec, stdin=stdin, stdout=stdout, stderr=stderr, leave_keeper=False,
                         forked=limits.leave)  # fmt: skip
        finally:
            limits.leave()

    with Launch(plan, start, stderr=stderr, relay_signals=relay_signals) as proc:
        return proc.wait()

