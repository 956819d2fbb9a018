"""autopkgtest-virt-nsbuild: the virtualisation-server protocol over an nsbuild environment.

The protocol (autopkgtest's README.virtualisation-server): a line-based
conversation on stdin/stdout. The server greets with `ok`; each command line
is words, each word URL-encoded; each answer is `ok` and URL-encoded results.
Commands: capabilities, open, revert, close, print-execute-command, copydown,
copyup, shell, quit. Nothing else is ever written on stdout: commands the
server runs itself send their output to stderr.

The testbed is a throwaway copy-on-write session (owned by this process, so
`nsbuild gc` removes it should the server be killed) with one long-lived
sandbox on it that every command enters (live.py); `revert` kills that
sandbox and swaps in a fresh session and sandbox at the same scratch path.
See testbed.py for what the session holds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from typing import IO, TYPE_CHECKING, NoReturn
from urllib.parse import quote, unquote

from nsbuild.virtserver.untar import ENTRY_COST

if TYPE_CHECKING:
    from nsbuild.envs.config import EnvConfig
    from nsbuild.sandbox import Process
    from nsbuild.virtserver.live import LiveSandbox
    from nsbuild.virtserver.testbed import NetPolicy, Testbed

PROG = "autopkgtest-virt-nsbuild"
# As long as autopkgtest's own servers wait for a copy.
COPY_TIMEOUT = float(os.environ.get("AUTOPKGTEST_VIRT_COPY_TIMEOUT", "300"))
SETUP_TIMEOUT = 300.0
# What one copyup may write on the host, at most: a sparse file of the
# testbed reaches the host with all its bytes; in a tree, every folder and
# file is charged ENTRY_COST besides (inodes and blocks, not only bytes).
DEFAULT_COPY_LIMIT = "4G"
# The testbed's writes go to a tmpfs of this size (the kernel's own default
# for a tmpfs: half of the RAM); it only takes the memory that is written.
DEFAULT_TMPFS = "50%"

# Made at open: a user for tests that do not need root, as autopkgtest asks.
_MAKE_USER = """
id -u "$1" >/dev/null 2>&1 && exit 0
command -v useradd >/dev/null 2>&1 || { echo "no useradd in the environment" >&2; exit 1; }
exec useradd --create-home --shell /bin/bash "$1"
"""
_COPYDOWN_FILE = 'cat > "$1" && if [ "$2" = x ]; then chmod +x -- "$1"; fi'
_COPYDOWN_DIR = (
    'mkdir -p -- "$1" && cd -- "$1" && '
    "exec tar --warning=none --preserve-permissions --no-same-owner -x -f -"
)
_COPYUP_FILE = 'exec cat -- "$1"'
_COPYUP_DIR = 'cd -- "$1" && exec tar --warning=none -c -f - .'
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Misuse(Exception):
    """The caller broke the protocol: the server says why and quits."""


class CommandFailed(Exception):
    """One command failed; the answer is a word other than `ok`, the server goes on."""

    def __init__(self, answer: str, why: str) -> None:
        super().__init__(why)
        self.answer = answer


class Signalled(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Server:
    def __init__(self, config: EnvConfig, policy: NetPolicy,
                 tmpfs_size: str | None = DEFAULT_TMPFS, apt_cache: bool = True,
                 debug: bool = False, copy_limit: int | None = None) -> None:  # fmt: skip
        self.config = config
        self.policy = policy
        self.tmpfs_size = tmpfs_size
        self.copy_limit = copy_limit if copy_limit is not None else _bytes(DEFAULT_COPY_LIMIT)
        # A `Type: host` environment's apt folders are the host's own.
        self.apt_cache = apt_cache and config.type != "host"
        self.debug = debug
        self.testbed: Testbed | None = None
        self.live: LiveSandbox | None = None
        self.normal_user: str | None = None
        self._stack = ExitStack()
        self._relays: list[threading.Thread] = []

    # -- the conversation --

    def dispatch(self, words: list[str]) -> list[str]:
        """Run one command; return the words after `ok`, each already URL-encoded."""
        name, args = words[0], words[1:]
        arity = {"capabilities": 0, "open": 0, "revert": 0, "close": 0, "quit": 0,
                 "print-execute-command": 0, "copydown": 2, "copyup": 2,
                 "auxverb_debug_fail": 0}  # fmt: skip
        if name == "shell":
            if not args:
                raise Misuse("`shell' needs a directory")
        elif name not in arity:
            raise Misuse(f"unknown command `{name}'")
        elif len(args) != arity[name]:
            raise Misuse(f"`{name}' takes {arity[name]} arguments, got {len(args)}")
        if name == "capabilities":
            return self.capabilities()
        if name == "auxverb_debug_fail":
            # autopkgtest asks for a testbed's debugging output after a
            # failure; nsbuild has none beyond what its commands printed.
            return []
        if name == "open":
            if self.testbed is not None:
                raise Misuse("`open' when already open")
            return [quote(self.open())]
        if self.testbed is None and name != "quit":
            raise Misuse(f"`{name}' when not open")
        if name == "revert":
            self.teardown()
            return [quote(self.open())]
        if name == "close" or name == "quit":
            self.teardown()
            return []
        if name == "print-execute-command":
            return [",".join(quote(a) for a in self.execute_command())]
        if name == "copydown":
            self.copy(args[0], args[1], up=False)
        elif name == "copyup":
            self.copy(args[0], args[1], up=True)
        elif name == "shell":
            self.shell(args[0], args[1:])
        return []

    def capabilities(self) -> list[str]:
        from nsbuild.virtserver.testbed import NET_CAPABILITY

        caps = ["revert", "revert-full-system", "root-on-testbed", "isolation-container"]
        caps.append(NET_CAPABILITY)
        # No downtmp-host: a client told where the downtmp is on the host
        # reads and writes there by path (autopkgtest builds packages and
        # writes lists into it), so a symlink or a file swapped in by a
        # process in the testbed would redirect its reads and writes. Without
        # it every file crosses over copyup and copydown, as checked here.
        if self.testbed is not None and self.normal_user:
            caps.append(f"suggested-normal-user={self.normal_user}")
        return caps

    # -- the testbed --

    def open(self) -> str:
        from nsbuild.envs.session import throwaway
        from nsbuild.sandbox import caller_idmap
        from nsbuild.virtserver.live import LiveSandbox
        from nsbuild.virtserver.testbed import DOWNTMP, NORMAL_USER, Testbed

        stack = ExitStack()
        try:
            session = stack.enter_context(throwaway(self.config))
            # The owner's alone, whatever the folders above: the downtmp in it
            # is open to every user of the testbed, and holds what they made
            # (setuid programs too), so no user of the host may reach it.
            os.chmod(session.dir, 0o700)
            testbed = Testbed(str(session.dir), self.policy, session.mirrors(), self.tmpfs_size,
                              self.apt_cache, session.config.mirrors)  # fmt: skip
            testbed.downtmp_host.mkdir(mode=0o700)
            # Writable by the test user too, as autopkgtest's own downtmp is.
            testbed.downtmp_host.chmod(0o1777)
            if self.apt_cache:
                from nsbuild.virtserver.aptcache import AptCache

                cache = AptCache(self.config.name, session.dir, notice=self._notice)
                cache.snapshot(session.lowers)
                # Runs after the sandbox is gone (the stack unwinds in
                # reverse), before the session is deleted.
                stack.callback(self._harvest, cache)
            # After the downtmp: the sandbox binds it.
            live = stack.enter_context(LiveSandbox(testbed, session))
            self.testbed, self.live, self._stack = testbed, live, stack
            self.normal_user = None
            if caller_idmap().full:
                # Only with a subordinate range is there a second uid to give it.
                status = self._run_inside(["sh", "-c", _MAKE_USER, "make-user", NORMAL_USER],
                                          timeout=SETUP_TIMEOUT)  # fmt: skip
                if status != 0:
                    raise RuntimeError(
                        f"cannot create the test user {NORMAL_USER} (status {status})"
                    )
                self.normal_user = NORMAL_USER
            testbed.save()
        except BaseException:
            self.testbed = self.live = None
            self._stack = ExitStack()
            stack.close()
            raise
        return DOWNTMP

    def _harvest(self, cache: object) -> None:
        from nsbuild.virtserver.aptcache import AptCache

        assert isinstance(cache, AptCache)
        try:
            cache.harvest(self._say)
        except Exception as e:  # the testbed closes all the same
            sys.stderr.write(f"{PROG}: warning: the apt cache was not updated: {e}\n")

    def _say(self, text: str) -> None:
        if self.debug:
            sys.stderr.write(f"{PROG}: {text}\n")

    def _notice(self, text: str) -> None:
        sys.stderr.write(f"{PROG}: {text}\n")
        sys.stderr.flush()

    def teardown(self) -> None:
        """Close the testbed: its sandbox is killed with every command in it,
        the session goes. Idempotent."""
        stack = self._stack
        self.testbed = self.live = None
        self._stack = ExitStack()
        stack.close()

    def execute_command(self) -> list[str]:
        from nsbuild.virtserver.execute import boot_code

        assert self.testbed is not None and self.live is not None
        # -I: neither the caller's PYTHON* variables nor its current directory
        # decide which code runs; -S: no site (the program puts its own
        # package on sys.path), a few milliseconds off every command.
        return [sys.executable, "-I", "-S", "-c", boot_code(), str(self.testbed.record),
                *self.live.execute_args()]  # fmt: skip

    def _spawn(self, argv: list[str], stdin: int | None, stdout: int | None,
               stderr: int | None = None) -> Process:  # fmt: skip
        """A command of the server's own in the testbed. What it prints (stdout
        too: ours carries the protocol only) reaches our stderr through a
        relay, escaped: the testbed may have replaced the program."""
        assert self.live is not None
        out, relay = _relay()
        self._relays.append(relay)
        try:
            return self.live.start(argv, stdin=stdin if stdin is not None else _devnull(),
                                   stdout=stdout if stdout is not None else out,
                                   stderr=stderr if stderr is not None else out)  # fmt: skip
        finally:
            os.close(out)

    def drain_output(self) -> None:
        """Let the output of the commands just run reach our stderr before
        the answer (a process they left running may keep its relay open)."""
        deadline = time.monotonic() + RELAY_GRACE
        relays, self._relays = self._relays, []
        for relay in relays:
            relay.join(max(0.0, deadline - time.monotonic()))

    def _run_inside(self, argv: list[str], *, timeout: float, stdin: int | None = None,
                    stdout: int | None = None) -> int:  # fmt: skip
        proc = self._spawn(argv, stdin, stdout)
        return _wait(proc, time.monotonic() + timeout, argv)

    # -- copies --

    def copy(self, src: str, dst: str, *, up: bool) -> None:
        verb = "copyup" if up else "copydown"
        if not src or not dst:
            raise Misuse(f"{verb} paths must be nonempty")
        is_dir = src.endswith("/")
        if is_dir != dst.endswith("/"):
            raise Misuse(f"{verb} paths must agree about directoryness (trailing /)")
        host, inside = (dst, src) if up else (src, dst)
        if not inside.startswith("/"):
            raise CommandFailed("copy-failed", f"{verb}: {inside}: not an absolute testbed path")
        shared = self._shared(host, inside)
        if shared is not None:
            if up:
                self._check_shared(shared, is_dir, f"{verb} {src} {dst}")
            return
        from nsbuild.sandbox import SandboxError
        from nsbuild.sandbox.enter import NotRunning
        from nsbuild.virtserver.testbed import GONE

        deadline = time.monotonic() + COPY_TIMEOUT
        try:
            if up:
                self._copyup(inside, host, is_dir, deadline)
            else:
                self._copydown(host, inside, is_dir, deadline)
        except NotRunning:
            raise CommandFailed("copy-failed", f"{verb} {src} {dst}: {GONE}") from None
        except (OSError, SandboxError) as e:
            raise CommandFailed("copy-failed", f"{verb} {src} {dst}: {_why(e)}") from None

    def _shared(self, host: str, inside: str) -> str | None:
        """When `host` is `inside` seen through the shared downtmp (nothing to
        copy): the path below the downtmp, else None."""
        from nsbuild.virtserver.testbed import DOWNTMP

        assert self.testbed is not None
        inside = os.path.normpath(inside)
        if inside != DOWNTMP and not inside.startswith(DOWNTMP + "/"):
            return None
        rel = inside[len(DOWNTMP) :]
        mapped = os.path.normpath(str(self.testbed.downtmp_host) + rel)
        return rel.lstrip("/") if os.path.normpath(os.path.abspath(host)) == mapped else None

    def _check_shared(self, rel: str, is_dir: bool, what: str) -> None:
        """`ok` for a copyup through the shared downtmp tells the client to read
        the host path: only when the testbed left a regular file (a tree of
        files) there, not a symlink to a host file or a FIFO."""
        from nsbuild.virtserver.hostfs import check_shared

        assert self.testbed is not None
        try:
            check_shared(str(self.testbed.downtmp_host), rel, is_dir=is_dir)
        except OSError as e:
            raise CommandFailed("copy-failed", f"{what}: {_why(e)}") from None

    def _downtmp(self) -> str:
        assert self.testbed is not None
        return str(self.testbed.downtmp_host)

    def _copydown(self, host: str, inside: str, is_dir: bool, deadline: float) -> None:
        # Writes go through the testbed even into the shared downtmp: code in
        # it may have put symlinks there, which must resolve inside.
        from nsbuild.virtserver.hostfs import host_dir, open_host_file

        if not is_dir:
            # A host path in the downtmp is the testbed's to shape: opened
            # without following its links, as a regular file only.
            fd = open_host_file(host, self._downtmp())
            try:
                x = "x" if os.fstat(fd).st_mode & 0o111 else "-"
                argv = ["sh", "-c", _COPYDOWN_FILE, "copydown", inside.rstrip("/"), x]
                status = _wait(self._spawn(argv, fd, None), deadline, argv)
            finally:
                os.close(fd)
            if status != 0:
                raise CommandFailed("copy-failed", f"copydown to {inside}: status {status}")
            return
        top = host_dir(host, self._downtmp())
        r, w = os.pipe()
        try:
            # The host's own tar, in the folder opened above (its /proc link
            # names that very folder, whatever happens to its path since).
            tar = subprocess.Popen(["tar", "--warning=none", "-C", f"/proc/self/fd/{top}", "-c",
                                    "-f", "-", "."], stdin=subprocess.DEVNULL, stdout=w, stderr=2,
                                   pass_fds=(top,))  # fmt: skip
            os.close(w)
            w = -1
            argv = ["sh", "-c", _COPYDOWN_DIR, "copydown", inside]
            proc = self._spawn(argv, r, None)
        finally:
            os.close(r)
            os.close(top)
            if w >= 0:
                os.close(w)
        _both(proc, tar, deadline, f"copydown {host} to {inside}", argv)

    def _copyup(self, inside: str, host: str, is_dir: bool, deadline: float) -> None:
        # Reads go through the testbed: `cat` and `tar` follow its symlinks
        # inside, never on the host. What they write is the testbed's to
        # shape: the host side takes it as described in untar.py.
        from nsbuild.virtserver.hostfs import host_dir

        if not is_dir:
            parent = host_dir(os.path.dirname(os.path.abspath(host)), self._downtmp())
            try:
                self._copyup_file(inside, parent, os.fsencode(os.path.basename(host)), deadline)
            finally:
                os.close(parent)
            return
        top = host_dir(host, self._downtmp(), create=True)
        try:
            self._copyup_tree(inside, top, deadline)
        finally:
            os.close(top)

    def _copyup_file(self, inside: str, parent: int, name: bytes, deadline: float) -> None:
        # A new file (an old one is replaced, never written into), never
        # through a symlink; 0644: no mode of the testbed's file is kept.
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.unlink(name, dir_fd=parent)
        fd = os.open(name, _NEW_FILE, 0o644, dir_fd=parent)
        try:
            self._cat_into(inside, fd, deadline)
        except BaseException:
            # Nothing half-copied stays behind under the caller's name.
            _remove(name, parent)
            raise
        finally:
            os.close(fd)

    def _cat_into(self, inside: str, fd: int, deadline: float) -> None:
        """The testbed's file `inside` into the host file `fd`, through a pipe
        (not the file itself): this side counts the bytes, and no process of
        the testbed keeps a descriptor of a host file."""
        argv = ["sh", "-c", _COPYUP_FILE, "copyup", inside]
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            proc = self._spawn(argv, None, w)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        try:
            _copy_bounded(r, fd, self.copy_limit, deadline)
        except BaseException as e:
            proc.kill()
            proc.wait()
            if isinstance(e, _TooLarge):
                raise CommandFailed("copy-failed", f"copyup of {inside}: {self._over()}") from None
            if isinstance(e, _Late):
                raise CommandFailed("timeout", f"copyup of {inside}: timed out") from None
            raise
        finally:
            os.close(r)
        status = _wait(proc, deadline, argv)
        if status != 0:
            raise CommandFailed("copy-failed", f"copyup of {inside}: status {status}")

    def _over(self, tree: bool = False) -> str:
        counts = "a sparse file of the testbed counts whole"
        if tree:
            each = _size_text(ENTRY_COST)
            counts = f"each folder and file counts {each} besides its bytes; {counts}"
        limit = _size_text(self.copy_limit)
        return f"more than {limit} to copy (the server's --copy-limit; {counts})"

    def _copyup_tree(self, inside: str, top: int, deadline: float) -> None:
        from nsbuild.virtserver.untar import Timeout, TooLarge, extract

        argv = ["sh", "-c", _COPYUP_DIR, "copyup", inside]
        r, w = os.pipe()
        try:
            proc = self._spawn(argv, None, w)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        try:
            try:
                extract(r, top, deadline, self._notice, self.copy_limit)
            finally:
                # The testbed's end sees a closed pipe if it writes on.
                os.close(r)
        except BaseException as e:
            proc.kill()
            proc.wait()
            if isinstance(e, Timeout):
                raise CommandFailed("timeout", f"copyup of {inside}: timed out") from None
            if isinstance(e, TooLarge):
                raise CommandFailed("copy-failed",
                                    f"copyup of {inside}: {e}: {self._over(tree=True)}") from None
            raise
        status = _wait(proc, deadline, argv)
        if status != 0:
            raise CommandFailed("copy-failed", f"copyup of {inside}: status {status} inside")

    def shell(self, directory: str, env: list[str]) -> None:
        """An interactive shell on the caller's terminal (autopkgtest --shell)."""
        import shlex

        script = f"cd {shlex.quote(directory)}; "
        script += "".join(f"export {shlex.quote(e)}; " for e in env)
        term = os.environ.get("TERM")
        if term:
            script += f"export TERM={shlex.quote(term)}; "
        script += "exec bash -i"
        try:
            tty = os.open("/dev/tty", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise CommandFailed("shell-failed", f"shell: no terminal: {e}") from None
        try:
            proc = self._spawn(["sh", "-c", script], tty, tty, tty)
            proc.wait()
        finally:
            os.close(tty)


def _wait(proc: Process, deadline: float, argv: list[str]) -> int:
    """The command's status, or CommandFailed("timeout") once `deadline` passed."""
    pidfd = os.pidfd_open(proc.pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
    finally:
        os.close(pidfd)
    if not ready:
        proc.kill()
        proc.wait()
        raise CommandFailed("timeout", f"{' '.join(argv[:3])}...: timed out")
    return proc.wait()


class _TooLarge(Exception):
    pass


class _Late(Exception):
    pass


def _copy_bounded(r: int, out: int, limit: int, deadline: float) -> None:
    """Copy from the pipe `r` to `out` until its end: _TooLarge past `limit`
    bytes, _Late past `deadline`."""
    total = 0
    while True:
        ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise _Late()
        data = os.read(r, 1 << 20)
        if not data:
            return
        total += len(data)
        if total > limit:
            raise _TooLarge()
        while data:
            data = data[os.write(out, data) :]


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _bytes(text: str) -> int:
    """A size such as 512M or 4G (powers of 1024) in bytes; ValueError otherwise."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1:] if text[-1:] in _UNITS else ""
    number = text[: len(text) - len(unit)]
    if not number.isdigit() or int(number) == 0:
        raise ValueError(f"bad size {text!r}")
    return int(number) * _UNITS[unit]


def _size_text(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]} {unit}iB"
    return f"{n} bytes"


def _both(proc: Process, tar: subprocess.Popen[bytes], deadline: float, what: str,
          argv: list[str]) -> None:  # fmt: skip
    try:
        inside = _wait(proc, deadline, argv)
        outside = tar.wait(timeout=max(0.1, deadline - time.monotonic()))
    except (CommandFailed, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()
        tar.kill()
        tar.wait()
        raise CommandFailed("timeout", f"{what}: timed out") from None
    if inside != 0 or outside != 0:
        raise CommandFailed(
            "copy-failed", f"{what}: failed (inside status {inside}, host tar status {outside})"
        )


def _remove(name: bytes, dir_fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def _why(e: Exception) -> str:
    """An error in one line; a name in it may be the testbed's (escaped)."""
    from nsbuild.printable import printable
    from nsbuild.virtserver.hostfs import Refused

    if isinstance(e, OSError) and e.strerror and not isinstance(e, Refused):
        name = e.filename if e.filename is not None else ""
        where = os.fsdecode(name) if isinstance(name, bytes) else str(name)
        return e.strerror + (f": {printable(where, 200)}" if where else "")
    return printable(str(e))


# Lines of one command relayed, at most; the rest is read and counted.
RELAY_LINES = 50
RELAY_LINE_BYTES = 1024
# How long an answer waits for the output of the command it ran to be relayed.
RELAY_GRACE = 2.0


def _relay() -> tuple[int, threading.Thread]:
    """The write end of a pipe whose lines a thread writes to our stderr,
    each escaped and cut, the first RELAY_LINES only; and that thread."""
    r, w = os.pipe2(os.O_CLOEXEC)
    thread = threading.Thread(target=_pump, args=(r,), daemon=True)
    thread.start()
    return w, thread


def _pump(fd: int) -> None:
    from nsbuild.printable import printable

    shown = dropped = 0
    with open(fd, "rb") as output:
        # Ends when the last writer is gone (a process the command left
        # running in the testbed may hold it until the testbed goes).
        while line := output.readline(RELAY_LINE_BYTES):
            if shown == RELAY_LINES:
                dropped += 1
                continue
            text = line.decode(errors="surrogateescape").removesuffix("\n")
            shown += 1
            if not _to_stderr(printable(text, RELAY_LINE_BYTES)):
                shown = RELAY_LINES  # nobody reads our stderr: only drain the pipe
    if dropped:
        _to_stderr(f"{PROG}: ({dropped} more lines of output not shown)")


def _to_stderr(line: str) -> bool:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        return False
    return True


_DEVNULL = -1


def _devnull() -> int:
    global _DEVNULL
    if _DEVNULL < 0:
        _DEVNULL = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _DEVNULL


# -- the process --


def _send(words: list[str]) -> None:
    data = (" ".join(words) + "\n").encode()
    while data:
        data = data[os.write(1, data) :]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from nsbuild import net

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="autopkgtest virtualisation server over an nsbuild environment: each "
        "testbed is a rootless sandbox over a fresh copy-on-write session, which every "
        "command enters. "
        "Commands get no network unless --net says otherwise.",
    )
    parser.add_argument("-d", "--debug", action="store_true", help="log the protocol on stderr")
    parser.add_argument(
        "--tmpfs",
        metavar="SIZE",
        default=DEFAULT_TMPFS,
        help="keep the testbed's writes in a tmpfs of at most SIZE (e.g. 8G, or 25%% of the "
        f"RAM; default {DEFAULT_TMPFS.replace('%', '%%')}): a full tmpfs fails the writes "
        "with 'No space left on device'",
    )
    parser.add_argument(
        "--no-tmpfs",
        dest="tmpfs",
        action="store_const",
        const=None,
        help="keep the testbed's writes on disk, in its session directory",
    )
    parser.add_argument(
        "--no-apt-cache",
        dest="apt_cache",
        action="store_false",
        help="do not share the environment's apt package lists and .debs between testbeds",
    )
    parser.add_argument(
        "--copy-limit",
        metavar="SIZE",
        default=DEFAULT_COPY_LIMIT,
        help="refuse a copyup that would write more than SIZE on the host (e.g. 512M, 20G; "
        f"default {DEFAULT_COPY_LIMIT}): every folder and file counts, {_size_text(ENTRY_COST)} "
        "besides its bytes, and a sparse file of the testbed counts whole",
    )
    net.add_arguments(parser)
    parser.add_argument("env", metavar="ENV", help="nsbuild environment name or alias")
    args = parser.parse_args(argv)
    try:
        args.copy_limit = _bytes(args.copy_limit)
    except ValueError:
        parser.error(f"--copy-limit {args.copy_limit!r}: expected a size such as 512M or 20G")
    from nsbuild.sandbox.spec import is_tmpfs_size

    if args.tmpfs is not None and not is_tmpfs_size(args.tmpfs):
        parser.error(f"--tmpfs {args.tmpfs!r}: expected a size such as 512M, 8G or 50%")
    # `--net allow` alone means what tests that need the archive want: the
    # environment's own mirrors.
    if args.net == "allow" and not args.allow and not args.allow_from_env:
        args.allow_from_env = True
    return args


def _die(message: str, status: int) -> NoReturn:
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from nsbuild.envs.config import load_config
    from nsbuild.errors import NsbuildError
    from nsbuild.net import options_from_args
    from nsbuild.virtserver.testbed import NetPolicy

    try:
        opts = options_from_args(args)
        config = load_config().get(args.env)
    except NsbuildError as e:
        _die(str(e), 2)
    policy = NetPolicy(
        mode=opts.mode,
        allow=tuple(args.allow),
        allow_from_env=opts.allow_from_env,
        engine=opts.engine,
        log=os.path.abspath(opts.log_path) if opts.log_path else None,
    )
    if policy.mode == "host":
        sys.stderr.write(f"{PROG}: warning: --net host: commands share the host's network, "
                         "its loopback services and abstract sockets\n")  # fmt: skip
    server = Server(config, policy, args.tmpfs, args.apt_cache, args.debug, args.copy_limit)

    def on_signal(signum: int, _frame: object) -> None:
        raise Signalled(signum)

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, on_signal)
    try:
        return _loop(server, sys.stdin.buffer, args.debug)
    except Signalled as s:
        _cleanup(server)
        signal.signal(s.signum, signal.SIG_DFL)
        os.kill(os.getpid(), s.signum)
        return 128 + s.signum


def _loop(server: Server, stdin: IO[bytes], debug: bool) -> int:
    from nsbuild.errors import NsbuildError

    def say(text: str) -> None:
        if debug:
            sys.stderr.write(f"{PROG}: {text}\n")
            sys.stderr.flush()

    try:
        _send(["ok"])
        while True:
            line = stdin.readline()
            if not line:
                _cleanup(server)
                _die("end of input: the caller went away; testbed closed", 1)
            text = line.decode(errors="replace").strip()
            if not text:
                continue
            say(f"<- {text}")
            words = [unquote(w) for w in text.split()]
            try:
                try:
                    results = server.dispatch(words)
                finally:
                    server.drain_output()
            except CommandFailed as e:
                sys.stderr.write(f"{PROG}: {e}\n")
                reply = [e.answer]
            else:
                reply = ["ok", *results]
            say(f"-> {' '.join(reply)}")
            try:
                _send(reply)
            except BrokenPipeError:
                # A caller may stop reading once it sent `quit`.
                if words[0] != "quit":
                    _cleanup(server)
                    _die("the caller stopped reading; testbed closed", 1)
            if words[0] == "quit":
                return 0
    except Misuse as e:
        _cleanup(server)
        _die(f"failure: {e}", 1)
    except (NsbuildError, OSError, RuntimeError) as e:
        _cleanup(server)
        _die(f"failure: {e}", 1)


def _cleanup(server: Server) -> None:
    try:
        server.teardown()
    except Exception as e:
        sys.stderr.write(f"{PROG}: while closing the testbed: {e}\n")


def entry() -> None:
    status = main()
    sys.stderr.flush()
    os._exit(status)


__all__ = ["Server", "entry", "main"]
