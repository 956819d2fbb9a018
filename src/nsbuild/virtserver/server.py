"""autopkgtest-virt-nsbuild: the virtualisation-server protocol over an nsbuild environment.

What each command of the protocol (protocol.py) does. Commands:
capabilities, open, revert, close, print-execute-command, copydown, copyup
(copies.py), shell, quit.

The testbed is a throwaway copy-on-write session (owned by this process, so
`nsbuild gc` removes it should the server be killed) with one long-lived
sandbox on it that every command enters (live.py); `revert` kills that
sandbox and swaps in a fresh session and sandbox at the same scratch path.
See testbed.py for what the session holds.

With no network option the testbed reaches the environment's mirrors and
nothing else, and fetches the package lists at open when the shared apt
cache has none: `autopkgtest PKG.dsc -- nsbuild ENV` installs the tests'
dependencies as autopkgtest-virt-unshare's testbeds do.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from contextlib import ExitStack
from typing import TYPE_CHECKING
from urllib.parse import quote

from nsbuild.virtserver.copies import DEFAULT_COPY_LIMIT, Copies, parse_size, size_text
from nsbuild.virtserver.inside import Inside
from nsbuild.virtserver.protocol import PROG, CommandFailed, Misuse, cleanup, die, say, serve
from nsbuild.virtserver.untar import ENTRY_COST

if TYPE_CHECKING:
    from nsbuild.envs.config import EnvConfig
    from nsbuild.virtserver.aptcache import AptCache
    from nsbuild.virtserver.testbed import NetPolicy, Testbed

SETUP_TIMEOUT = 300.0
# The testbed's writes go to a tmpfs of this size (the kernel's own default
# for a tmpfs: half of the RAM); it only takes the memory that is written.
DEFAULT_TMPFS = "50%"

# Made at open: a user for tests that do not need root, as autopkgtest asks.
_MAKE_USER = """
id -u "$1" >/dev/null 2>&1 && exit 0
command -v useradd >/dev/null 2>&1 || { echo "no useradd in the environment" >&2; exit 1; }
exec useradd --create-home --shell /bin/bash "$1"
"""
# Status 0 when apt has the package lists of some archive (a Release file).
_HAS_LISTS = """
for f in /var/lib/apt/lists/*Release; do [ -f "$f" ] && exit 0; done
exit 1
"""
# Arguments each command takes (`shell`: a directory and any environment).
_ARITY = {"capabilities": 0, "open": 0, "revert": 0, "close": 0, "quit": 0,
          "print-execute-command": 0, "copydown": 2, "copyup": 2,
          "auxverb_debug_fail": 0}  # fmt: skip


class Signalled(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Server:
    def __init__(self, config: EnvConfig, policy: NetPolicy,
                 tmpfs_size: str | None = DEFAULT_TMPFS, apt_cache: bool = True,
                 debug: bool = False, copy_limit: int | None = None,
                 by_default: bool = False) -> None:  # fmt: skip
        self.config = config
        self.policy = policy
        # No network option given: the mirrors (`policy`, as --net allow),
        # and the package lists fetched at open when none are cached, so that
        # a test's dependencies install as on a machine.
        self.by_default = by_default
        self.tmpfs_size = tmpfs_size
        self.copy_limit = copy_limit if copy_limit is not None else parse_size(DEFAULT_COPY_LIMIT)
        # A `Type: host` environment's apt folders are the host's own.
        self.apt_cache = apt_cache and config.type != "host"
        self.debug = debug
        self.testbed: Testbed | None = None
        self.inside = Inside()
        self.normal_user: str | None = None
        self._stack = ExitStack()
        # Tests already told that they need --net host (once per server).
        self._told: set[str] = set()

    def dispatch(self, words: list[str]) -> list[str]:
        """Run one command; return the words after `ok`, each already URL-encoded."""
        name, args = words[0], words[1:]
        if name == "shell":
            if not args:
                raise Misuse("`shell' needs a directory")
        elif name not in _ARITY:
            raise Misuse(f"unknown command `{name}'")
        elif len(args) != _ARITY[name]:
            raise Misuse(f"`{name}' takes {_ARITY[name]} arguments, got {len(args)}")
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
        if name in ("copydown", "copyup"):
            assert self.testbed is not None
            downtmp = str(self.testbed.downtmp_host)
            copies = Copies(self.inside, downtmp, self.copy_limit, say)
            copies.copy(args[0], args[1], up=name == "copyup")
            if args[0].endswith("/"):
                self._tell_needs_internet(args[1] if name == "copyup" else args[0], downtmp)
        elif name == "shell":
            self.shell(args[0], args[1:])
        return []

    def drain_output(self) -> None:
        self.inside.drain()

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

    def open(self) -> str:
        from nsbuild.envs.session import throwaway
        from nsbuild.sandbox import caller_idmap
        from nsbuild.virtserver.live import LiveSandbox
        from nsbuild.virtserver.testbed import DOWNTMP, NORMAL_USER, NetPolicy, Testbed

        stack = ExitStack()
        try:
            session = stack.enter_context(throwaway(self.config))
            # The owner's alone, whatever the folders above: the downtmp in it
            # is open to every user of the testbed, and holds what they made
            # (setuid programs too), so no user of the host may reach it.
            os.chmod(session.dir, 0o700)
            mirrors = session.mirrors()
            policy = self.policy
            if self.by_default and not mirrors:
                # Nothing to allow: the default is then no network at all.
                say(f"{self.config.name} names no mirror or apt source: commands get no network")
                policy = NetPolicy(log=policy.log)
            testbed = Testbed(str(session.dir), policy, mirrors, self.tmpfs_size,
                              self.apt_cache, session.config.mirrors)  # fmt: skip
            testbed.downtmp_host.mkdir(mode=0o700)
            # Writable by the test user too, as autopkgtest's own downtmp is.
            testbed.downtmp_host.chmod(0o1777)
            # A session that copied its environment mounts no apt cache
            # (testbed.py): its snapshot would only cost links on every open.
            if self.apt_cache and not session.copied:
                from nsbuild.virtserver.aptcache import AptCache

                cache = AptCache(self.config.name, session.dir, notice=say)
                cache.snapshot(session.lowers)
                # Runs after the sandbox is gone (the stack unwinds in
                # reverse), before the session is deleted.
                stack.callback(self._harvest, cache)
            # After the downtmp: the sandbox binds it.
            live = stack.enter_context(LiveSandbox(testbed, session))
            self.testbed, self.inside.live, self._stack = testbed, live, stack
            self.normal_user = None
            if caller_idmap().full:
                # Only with a subordinate range is there a second uid to give it.
                status = self.inside.run(["sh", "-c", _MAKE_USER, "make-user", NORMAL_USER],
                                         timeout=SETUP_TIMEOUT)  # fmt: skip
                if status != 0:
                    raise RuntimeError(
                        f"cannot create the test user {NORMAL_USER} (status {status})"
                    )
                self.normal_user = NORMAL_USER
            if self.by_default and self.apt_cache and policy.mode == "allow":
                self._fetch_lists()
            testbed.save()
        except BaseException:
            self.testbed = self.inside.live = None
            self._stack = ExitStack()
            stack.close()
            raise
        return DOWNTMP

    def _fetch_lists(self) -> None:
        """apt-get update when the testbed has no package lists. Only with the
        shared apt cache: the lists are then fetched once, for every later
        testbed; a failure is said and leaves the testbed as it is."""
        try:
            if self.inside.run(["sh", "-c", _HAS_LISTS], timeout=SETUP_TIMEOUT) == 0:
                return
            say(f"no package lists of {self.config.name} cached yet: apt-get update "
                "from its mirrors")  # fmt: skip
            status = self.inside.run(["apt-get", "-q", "-q", "update"], timeout=SETUP_TIMEOUT)
        except CommandFailed as e:
            status, why = 1, str(e)
        else:
            why = f"status {status}"
        if status != 0:
            say(f"warning: apt-get update failed ({why}): the tests' dependencies may not "
                "install")  # fmt: skip

    def _tell_needs_internet(self, host: str, downtmp: str) -> None:
        """Say once which tests of a tree just copied need the internet the
        testbed does not give them, and what to pass."""
        from nsbuild.printable import printable
        from nsbuild.virtserver import internet

        assert self.testbed is not None
        policy = self.testbed.net
        if policy.mode == "host":
            return
        try:
            found = internet.declaring(host, downtmp)
        except Exception as e:  # a hint: it never fails the copy
            say(f"warning: debian/tests/control not read: {printable(str(e), 200)}")
            return
        names = [n for n in found if n not in self._told]
        if names:
            self._told.update(names)
            say(internet.advice(names, policy, self.config.name))

    def _harvest(self, cache: AptCache) -> None:
        try:
            cache.harvest(say if self.debug else lambda _text: None)
        except Exception as e:  # the testbed closes all the same
            say(f"warning: the apt cache was not updated: {e}")

    def teardown(self) -> None:
        """Close the testbed: its sandbox is killed with every command in it,
        the session goes. Idempotent."""
        stack = self._stack
        self.testbed = self.inside.live = None
        self._stack = ExitStack()
        stack.close()

    def execute_command(self) -> list[str]:
        from nsbuild.virtserver.execute import boot_code

        live = self.inside.live
        assert self.testbed is not None and live is not None
        # -I: neither the caller's PYTHON* variables nor its current directory
        # decide which code runs; -S: no site (the program puts its own
        # package on sys.path), less to start for every command.
        return [sys.executable, "-I", "-S", "-c", boot_code(), str(self.testbed.record),
                *live.execute_args()]  # fmt: skip

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
            proc = self.inside.start(["sh", "-c", script], tty, tty, tty)
            proc.wait()
        finally:
            os.close(tty)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="autopkgtest virtualisation server over an nsbuild environment: each "
        "testbed is a rootless sandbox over a fresh copy-on-write session, which every "
        "command enters.",
        epilog="Network: with no network option, commands reach the environment's mirrors "
        "and nothing else (as --net allow does), and a testbed that finds no package lists "
        "in the shared apt cache runs apt-get update at open, so that the tests' "
        "dependencies install. A test that declares Restrictions: needs-internet needs "
        "--net host (the server says so when it sees one); --net none takes every network "
        "away.",
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
        f"default {DEFAULT_COPY_LIMIT}): every folder and file counts, {size_text(ENTRY_COST)} "
        "besides its bytes, and a sparse file of the testbed counts whole",
    )
    _network_arguments(parser)
    parser.add_argument("env", metavar="ENV", help="nsbuild environment name or alias")
    args = parser.parse_args(argv)
    try:
        args.copy_limit = parse_size(args.copy_limit)
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


def _network_arguments(parser: argparse.ArgumentParser) -> None:
    """The network options of nsbuild.net, with this server's own default."""
    from nsbuild.net.options import add_arguments

    add_arguments(parser, {"--net": (
        "network: none (loopback only), allow (only the --allow list, through an "
        "egress engine), host (the host's network: explicit opt-in); default: "
        "the environment's mirrors, as --net allow --allow-from-env")})


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    by_default = args.net is None and not args.allow and not args.allow_from_env
    if by_default:
        args.net, args.allow_from_env = "allow", True
    from nsbuild.envs.config import load_config
    from nsbuild.errors import NsbuildError
    from nsbuild.net import options_from_args
    from nsbuild.virtserver.testbed import NetPolicy

    try:
        opts = options_from_args(args)
        config = load_config().get(args.env)
    except NsbuildError as e:
        die(str(e), 2)
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
    server = Server(config, policy, args.tmpfs, args.apt_cache, args.debug, args.copy_limit,
                    by_default)  # fmt: skip

    def on_signal(signum: int, _frame: object) -> None:
        raise Signalled(signum)

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, on_signal)
    try:
        return serve(server, sys.stdin.buffer, args.debug)
    except Signalled as s:
        cleanup(server)
        signal.signal(s.signum, signal.SIG_DFL)
        os.kill(os.getpid(), s.signum)
        return 128 + s.signum
