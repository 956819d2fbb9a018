"""The sandbox runtime: user, mount, PID, IPC, UTS and network namespaces.

Standard library only, and on the run path (nsbuild/cli/main.py says what
that allows). Knows nothing of Debian, configuration files or builds.

API:
    spec = Sandbox(argv=(...), idmap=caller_idmap(), root=..., mounts=...)
    status = run(spec)                  # blocking, returns the exit status
    proc = spawn(spec, stdout=PIPE)     # a handle: .pid .stdin .stdout .stderr
                                        # .sockets .wait() .poll() .send_signal()
    host_view(cwd=...) -> tuple[Mount, ...]   # read-only view of the host
"""

from nsbuild.sandbox.channel import FORWARDED_SIGNALS
from nsbuild.sandbox.errors import SandboxError, SetupError
from nsbuild.sandbox.hostview import host_view
from nsbuild.sandbox.idmap import caller_idmap
from nsbuild.sandbox.process import PIPE, Process
from nsbuild.sandbox.runner import run, spawn
from nsbuild.sandbox.spec import (
    Bind,
    Dev,
    Dir,
    File,
    IdMap,
    IdRange,
    InsideSocket,
    Mount,
    Overlay,
    Proc,
    Sandbox,
    SpecError,
    Symlink,
    Sys,
    Tmpfs,
)

__all__ = [
    "FORWARDED_SIGNALS",
    "PIPE",
    "Bind",
    "Dev",
    "Dir",
    "File",
    "IdMap",
    "IdRange",
    "InsideSocket",
    "Mount",
    "Overlay",
    "Proc",
    "Process",
    "Sandbox",
    "SandboxError",
    "SetupError",
    "SpecError",
    "Symlink",
    "Sys",
    "Tmpfs",
    "caller_idmap",
    "host_view",
    "run",
    "spawn",
]
