"""The execute command of autopkgtest-virt-nsbuild: run one command in the testbed.

    python3 -I -m nsbuild.virtserver.execute RECORD [--nsbuild-net MODE] CMD [ARG...]

`print-execute-command` hands out this program and RECORD (the testbed's
record in its session directory); the client appends the command. The command
gets the caller's stdin, stdout and stderr, runs as root in a fresh sandbox
over the testbed's session with the server's network policy, and its exit
status is ours. When this program itself fails (the testbed is gone, the
sandbox could not be set up) it exits 255, as the protocol asks, with one line
on stderr.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nsbuild.virtserver.testbed import Testbed

PROG = "autopkgtest-virt-nsbuild"
FAILED = 255


def main(argv: list[str]) -> int:
    from nsbuild.errors import NsbuildError
    from nsbuild.virtserver.testbed import NET_ARG, Testbed, TestbedGone

    if len(argv) < 2:
        return _fail("usage: execute RECORD [--nsbuild-net MODE] CMD [ARG...]")
    record, command = argv[0], argv[1:]
    requested = None
    if command[0] == NET_ARG:
        if len(command) < 3:
            return _fail(f"{NET_ARG} needs a mode and a command")
        requested, command = command[1], command[2:]
    try:
        testbed = Testbed.load(record)
        mark = testbed.register()
        try:
            return _run(testbed, command, requested)
        finally:
            mark.unlink(missing_ok=True)
    except TestbedGone as e:
        return _fail(str(e))
    except (NsbuildError, OSError, ValueError) as e:
        return _fail(str(e))


def _run(testbed: Testbed, command: list[str], requested: str | None) -> int:
    from nsbuild import net
    from nsbuild.envs.session import host_resolver_mounts
    from nsbuild.sandbox import run

    opts = testbed.net.options(requested)
    session = testbed.session()
    mirrors = testbed.mirrors if opts.mode == "allow" else ()
    with net.network(opts, mirrors=mirrors) as plan:
        extra = (*plan.mounts, *(host_resolver_mounts() if plan.share_net else ()))
        spec = testbed.sandbox(
            session,
            command,
            share_net=plan.share_net,
            extra_mounts=extra,
            extra_env=plan.env,
            inside_sockets=plan.inside_sockets,
            cgroup=plan.cgroup,
        )
        with session.in_use():
            return run(spec, on_start=lambda proc: plan.serve(proc.sockets))


def _fail(message: str) -> int:
    sys.stderr.write(f"{PROG}: {message}\n")
    return FAILED


if __name__ == "__main__":
    sys.stdout.flush()
    status = main(sys.argv[1:])
    sys.stderr.flush()
    # No interpreter teardown: nothing is left to do, and it costs time on
    # every command of a test run.
    import os

    os._exit(status)
