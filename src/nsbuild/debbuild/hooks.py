"""External commands at sbuild's stages (`man sbuild`, EXTERNAL COMMANDS).

Each command is a /bin/sh command line, run in the order given (the
request's `commands` hold those of the configuration first, then those of
the command line), after its percent escapes are replaced:

- inside stages: as root in the build's session, in the build directory
  (%b), with sbuild's variables and no network (none of them is part of the
  dependency phase, the only one that reaches the mirrors);
- outside stages (pre-build, post-build, post-build-failed): as the user
  who runs nsbuild, in $HOME, with the user's own environment; %e
  (%SBUILD_CHROOT_EXEC) runs a command inside the session meanwhile
  (chrootexec.py).

Each stage is a section of the .build log, each command a heading (its
command line, escaped: it may hold anything), its output and its exit
status. As in sbuild, the first command that fails ends its stage and the
build (CommandFailed, whose `fail_stage` is sbuild's name of the stage).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from nsbuild.backends import STDOUT
from nsbuild.debbuild.errors import BuildFailed, BuildInputError
from nsbuild.debbuild.result import BuildRequest
from nsbuild.debbuild.steps import Steps, open_terminal
from nsbuild.printable import printable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from nsbuild.debbuild.chrootexec import ExecServer

# In the order a build meets them.
STAGES = (
    "pre-build",  # outside, as the user, %e available
    "chroot-setup",  # inside, root
    "build-deps-failed",  # inside, root
    "starting-build",  # inside, root
    "build-failed",  # inside, root
    "finished-build",  # inside, root
    "chroot-cleanup",  # inside, root, %c available
    "post-build",  # outside, as the user, %c and %e available
    "post-build-failed",  # outside, as the user, %c and %e available
)
OUTSIDE = frozenset({"pre-build", "post-build", "post-build-failed"})
# The log's section titles, sbuild's.
TITLES = {
    "pre-build": "Pre Build Commands",
    "chroot-setup": "Chroot Setup Commands",
    "build-deps-failed": "Build-Deps Install Failed Commands",
    "starting-build": "Starting Timed Build Commands",
    "build-failed": "Generic Build Failed Commands",
    "finished-build": "Finished Timed Build Commands",
    "chroot-cleanup": "Chroot Cleanup Commands",
    "post-build": "Post Build Commands",
    "post-build-failed": "Post Build Failed Commands",
}
# The variables of commands run inside, sbuild's.
INSIDE_ENV = {"LC_ALL": "C.UTF-8", "SHELL": "/bin/sh", "HOME": "/sbuild-nonexistent"}
# sbuild's %s: the shell reads and writes the terminal, whatever the
# command's own streams are.
SHELL_ON_TTY = "bash -i </dev/tty >/dev/tty 2>/dev/tty"
# sbuild's escapes of the session's path, which nsbuild never gives (%% is
# matched too, so that %%r is not taken for one).
_CHROOT_DIR = re.compile(r"%(?:%|(SBUILD_CHROOT_DIR|r))")
# What a shell reads as code in one quoting or another. Values go in as
# they are, as sbuild puts them (users write %d bare, "%d" for a path with
# a space, or '%d'); a path holding one of these (a folder named by whoever
# made the tarball it came in) is refused rather than run as code.
_SHELL_SPECIAL = re.compile(r"""[\x00-\x1f\x7f$`\\"';&|<>()*?\[\]{}#]""")


class _Unsafe(str):
    """An escape's value no quoting makes safe in every place of a command."""


class CommandFailed(BuildFailed):
    """An external command failed: the build ends, as sbuild's does."""

    def __init__(self, stage: str, command: str, status: int) -> None:
        self.stage = stage
        self.fail_stage = f"run-{stage}-commands"  # sbuild's Fail-Stage
        self.status = status
        super().__init__(
            f"{stage} command failed (exit status {status}): {printable(command, 300)}"
        )


@dataclass
class Facts:
    """What the percent escapes stand for; None where not known yet."""

    dsc: Path | None = None  # %d: the host's .dsc
    build_dir: str | None = None  # %b: the build directory inside
    pkgbuild_dir: str | None = None  # %p: the unpacked source tree inside
    host_arch: str | None = None  # %a
    build_arch: str | None = None  # %SBUILD_BUILD_ARCH
    changes: str | None = None  # %c: the .changes, once the build made one
    extra: dict[str, str] = field(default_factory=dict)


def escapes(facts: Facts, shell: str, chroot_exec: str | None) -> dict[str, str]:
    """Each escape defined now (without its '%') and its text, as it is (one
    a shell would read as code is refused where used: substitute); %s and %e
    are command text."""
    plain = {
        "a": facts.host_arch, "SBUILD_HOST_ARCH": facts.host_arch,
        "SBUILD_BUILD_ARCH": facts.build_arch,
        "b": facts.build_dir, "SBUILD_BUILD_DIR": facts.build_dir,
        "d": None if facts.dsc is None else str(facts.dsc),
        "SBUILD_DSC": None if facts.dsc is None else str(facts.dsc),
        "p": facts.pkgbuild_dir, "SBUILD_PKGBUILD_DIR": facts.pkgbuild_dir,
        "c": facts.changes, "SBUILD_CHANGES": facts.changes,
        **facts.extra,
    }  # fmt: skip
    values: dict[str, str] = {
        key: _Unsafe(value) if _SHELL_SPECIAL.search(value) else value
        for key, value in plain.items() if value
    }  # fmt: skip
    values.update({"%": "%", "s": shell, "SBUILD_SHELL": shell})
    if chroot_exec is not None:
        values.update({"e": chroot_exec, "SBUILD_CHROOT_EXEC": chroot_exec})
    return values


def substitute(command: str, values: dict[str, str]) -> tuple[str, set[str]]:
    """`command` with each defined escape replaced (longest names first, as
    sbuild matches them; an undefined one stays as it is), and the escapes used."""
    names = sorted(values, key=lambda k: (-len(k), k))
    pattern = re.compile("%(" + "|".join(re.escape(n) for n in names) + ")")
    used: set[str] = set()

    def one(match: re.Match[str]) -> str:
        name, value = match.group(1), values[match.group(1)]
        if isinstance(value, _Unsafe):
            bad = _SHELL_SPECIAL.search(value)
            assert bad is not None
            raise BuildInputError(
                f"%{name} is {printable(value, 200)}, which holds {printable(bad.group())!r}, "
                "special to a shell in some quoting: not used (rename it)"
            )
        used.add(name)
        return value

    return pattern.sub(one, command), used


class Hooks:
    """The request's external commands, run stage by stage in `steps`' session.
    `work_dir`: the build's private host folder, where the exec escape listens."""

    def __init__(self, req: BuildRequest, steps: Steps, facts: Facts,
                 work_dir: Path | None = None) -> None:  # fmt: skip
        self.req = req
        self.steps = steps
        self.facts = facts
        self.work_dir = work_dir
        self._server: ExecServer | None = None
        self._tmp: Path | None = None  # a folder for the socket, when work_dir will not do

    def run(self, stage: str) -> None:
        """Run the commands of `stage`, in order; raises CommandFailed (a
        BuildFailed) when one fails: the rest of the stage does not run."""
        assert stage in STAGES, stage
        commands = self.req.commands_for(stage)
        if not commands:
            return
        log = self.steps.log
        log.section(TITLES[stage])
        outside = stage in OUTSIDE
        try:
            chroot_exec = self._serve() if outside else None
            # Outside, the shell is one inside, through the exec escape.
            shell = f"{chroot_exec} {SHELL_ON_TTY}" if chroot_exec else "bash -i"
            values = escapes(self.facts, shell, chroot_exec)
            for command in commands:
                self._one(stage, command, values, outside)
        finally:
            self._stop()
            log.line()
            log.line("Finished processing commands.")
            log.line("-" * 80)

    def close(self) -> None:
        """Stop whatever serves the exec escape; idempotent."""
        self._stop()
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def _one(self, stage: str, command: str, values: dict[str, str], outside: bool) -> None:
        log = self.steps.log
        text, used = substitute(command, values)
        tty = None
        if not outside and used & {"s", "SBUILD_SHELL"}:
            tty = open_terminal()
            if tty is None:
                # No terminal: sbuild's text, whose shell says so where it fails.
                text, _ = substitute(command, {**values, "s": SHELL_ON_TTY,
                                               "SBUILD_SHELL": SHELL_ON_TTY})  # fmt: skip
        if any(m.group(1) for m in _CHROOT_DIR.finditer(command)):
            log.line("W: %SBUILD_CHROOT_DIR and %r are not available (the session has no "
                     "path on the host): use %SBUILD_CHROOT_EXEC (%e)")
        shown = printable(text, 4096)
        log.line(shown)
        log.line("-" * min(len(shown), 80))
        log.line()
        start = time.monotonic()
        try:
            status = self._outside(text) if outside else self._inside(text, tty)
        finally:
            if tty is not None:
                os.close(tty)
        log.line()
        log.line(f"Exit status: {status} ({time.monotonic() - start:.1f}s)")
        if status != 0:
            log.line(f"E: Command '{shown}' failed to run.")
            raise CommandFailed(stage, text, status)
        log.line(f"I: Finished running '{shown}'.")
        log.line()

    def _inside(self, text: str, tty: int | None) -> int:
        """`text` run as root inside, in the build directory; on the user's
        terminal `tty` if given, else with its output in the log."""
        backend = self.steps.backend
        argv = ["/bin/sh", "-c", text]
        cwd = self.facts.build_dir or backend.work_dir
        if tty is not None:
            self.steps.log.line("(on the terminal: what it shows is not in this log)")
            return backend.run(argv, user="root", network="none", cwd=cwd, env=INSIDE_ENV,
                               stdin=tty, stdout=tty, stderr=tty)  # fmt: skip
        with self.steps.log.command_output() as out:
            return backend.run(argv, user="root", network="none", cwd=cwd,
                               env=INSIDE_ENV, stdout=out, stderr=STDOUT)  # fmt: skip

    def _outside(self, text: str) -> int:
        """`text` run on the host as the user, in $HOME, with the user's
        variables; its output in the log."""
        with self.steps.log.command_output() as out:
            proc = subprocess.Popen(["/bin/sh", "-c", text], cwd=_home(),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out)  # fmt: skip
            try:
                code = proc.wait()
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        return 128 - code if code < 0 else code

    def _serve(self) -> str:
        """Start serving the exec escape; its command text."""
        from nsbuild.debbuild.chrootexec import ExecServer

        folder = self.work_dir
        path_max = 100  # a socket's path is at most 107 bytes
        if folder is None or len(os.fsencode(folder / "exec.sock")) > path_max:
            folder = self._private_dir()
        server = self._server = ExecServer(self.steps.backend, folder, INSIDE_ENV)
        server.start()
        return server.command()

    def _private_dir(self) -> Path:
        """A folder of mode 0700 with a short path, for the exec socket."""
        if self._tmp is None:
            self._tmp = socket_folder()
        return self._tmp

    def _stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()


def _home() -> str:
    """sbuild's working directory for outside commands: $HOME (else /)."""
    home = os.environ.get("HOME") or os.path.expanduser("~")
    return home if os.path.isdir(home) else "/"


def socket_folder() -> Path:
    """A new folder of mode 0700 with a short path: in $XDG_RUNTIME_DIR when
    it is the user's own private folder, else in the system's temporary
    folder (sticky). Never in a folder another user may write (su keeps the
    first user's $XDG_RUNTIME_DIR): they could move ours away and listen in
    its place."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    where = None
    if runtime.startswith("/"):
        try:
            st = os.lstat(runtime)
        except OSError:
            st = None
        if (st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
                and not st.st_mode & 0o022):  # fmt: skip
            where = runtime
    return Path(tempfile.mkdtemp(prefix="nsbuild-exec-", dir=where))
