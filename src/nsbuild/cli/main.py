"""Command-line front end: parses the command line, runs the subcommand, and
turns what it raised into an exit status through nsbuild.cli.exits (the one
table, and the list of statuses). Subcommands of other layers are imported
only when used.

The run path. A plain `nsbuild run` (without --env) is a start-up time
benchmarked against bubblewrap (bench/startup), so it imports this module,
nsbuild.sandbox, nsbuild.net (options, plan, launch, netlog, dns), nsbuild.envs.masks
and the few error modules, and from the standard library only what those
need at run time. Not imported on it, because each costs more than a
millisecond of every run (bench/startup; docs/performance.md):
  - argparse: _fast_run_args parses a plain run, argparse anything else;
  - typing: annotations are strings, and type-only imports sit under
    `TYPE_CHECKING = False` (the typing module, re and collections with it);
  - dataclasses: sandbox/record.py makes the frozen records;
  - socket, signal, threading: their C cores _socket, _signal and _thread
    (the Python modules import enum, selectors and collections);
  - anything outside the standard library (python-debian, rich).
bin/nsbuild starts Python with -I -S; _complete_site() gives every other
command the site set-up. tests/sandbox/test_cli.py holds the one test of this
rule; anything else on the path may use the standard library freely.
"""

from __future__ import annotations

import os
import sys

from nsbuild.net.options import NET_OPTIONS

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from contextlib import AbstractContextManager
    from typing import Any

    from nsbuild.envs.session import Session
    from nsbuild.net import NetOptions
    from nsbuild.sandbox.limits import Limits
    from nsbuild.sandbox.spec import Mount, RootMount

# Subcommand -> (module providing `register(subparsers)`, imported only for
# its own commands or the full help; the one-line help otherwise).
_COMMANDS = {
    "env": ("nsbuild.cli.envs", "manage environments (chroots)"),
    "session": ("nsbuild.cli.envs", "long-lived copy-on-write sessions"),
    "shell": ("nsbuild.cli.envs", "interactive shell in a throw-away environment"),
    "gc": ("nsbuild.cli.envs", "remove what crashed runs left behind"),
    "build": ("nsbuild.cli.build", "build a Debian source package"),
    "config": ("nsbuild.cli.config", "show `nsbuild build`'s settings and where each comes from"),
    "farm": ("nsbuild.cli.farm", "a Buildbot build farm: master, workers, submitting"),
}


class BadOption(ValueError):
    """A value that does not parse; argparse reports it (ArgumentTypeError's role)."""


def _split_bind(spec: str) -> tuple[str, str]:
    src, sep, dst = spec.partition(":")
    if not src:
        raise BadOption(f"bad bind {spec!r}: expected SRC[:DST]")
    src = os.path.abspath(src)
    return src, (dst if sep and dst else src)


def _env_pair(spec: str) -> tuple[str, str]:
    k, sep, v = spec.partition("=")
    if not sep or not k:
        raise BadOption(f"bad --setenv {spec!r}: expected NAME=VALUE")
    return k, v


def _choice(option: str, *choices: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise BadOption(f"bad {option} {value!r}: expected {', '.join(choices)}")
        return value

    return check


def _limit(kind: str) -> Callable[[str], object]:
    def parse(value: str) -> object:
        from nsbuild.sandbox import limits

        try:
            return limits.parse_pids(value) if kind == "pids" else limits.parse_size(value)
        except limits.LimitError as e:
            raise BadOption(str(e)) from None

    return parse


# The sandbox options, once: they feed both argparse and the fast path of
# `nsbuild run` (see the run path above).
# name: (kind, default, convert, metavar, help); kind is flag, value or append.
OptionTable = dict[str, tuple[str, object, "Callable[[str], object] | None", str, str]]
SANDBOX_OPTIONS: OptionTable = {
    "--bind": ("append", [], _split_bind, "SRC[:DST]", "bind a host path read-write"),
    "--ro-bind": ("append", [], _split_bind, "SRC[:DST]", "bind a host path read-only"),
    "--tmpfs": ("append", [], None, "DST", "mount an empty tmpfs"),
    "--chdir": ("value", None, None, "DIR", "working directory inside"),
    "--hostname": ("value", "nsbuild", None, "NAME", "host name inside (default: nsbuild)"),
    "--setenv": ("append", [], _env_pair, "NAME=VALUE", "set a variable"),
    "--unsetenv": ("append", [], None, "NAME", "unset a variable"),
    "--clearenv": ("flag", False, None, "", "start from an empty environment"),
    "--user": ("value", None, None, "NAME|UID[:GID]",
               "run as this user of the sandbox's /etc/passwd (default: root)"),
    **{name: (kind, default, _choice(name, *choices) if choices else None, metavar, text)
       for name, (kind, default, choices, metavar, text) in NET_OPTIONS.items()},
    "--pids-max": ("value", None, _limit("pids"), "N",
                   "at most N processes and threads inside (a cgroup of the run's own)"),
    "--memory-max": ("value", None, _limit("memory"), "SIZE",
                     "at most SIZE of memory inside, no swap (e.g. 512M, 2G); past it, "
                     "the kernel kills inside the sandbox only"),
}
RUN_OPTIONS: OptionTable = {
    "--debug": ("flag", False, None, "", "print each setup step"),
    "--root": ("value", None, None, "DIR", "run on this directory tree (a chroot)"),
    "--env": ("value", None, None, "NAME", "run in a throw-away copy of environment NAME"),
}


def _dest(name: str) -> str:
    return "env_name" if name == "--env" else name[2:].replace("-", "_")


def add_options(p: argparse.ArgumentParser, table: OptionTable) -> None:
    import argparse

    def checked(convert: Callable[[str], object]) -> Callable[[str], object]:
        def inner(value: str) -> object:
            try:
                return convert(value)
            except BadOption as e:
                raise argparse.ArgumentTypeError(str(e)) from None

        return inner

    for name, (kind, default, convert, metavar, text) in table.items():
        if name == "--debug":
            # Also accepted after the subcommand; must not reset the global one.
            p.add_argument(name, action="store_true", default=argparse.SUPPRESS, help=text)
        elif kind == "flag":
            p.add_argument(name, dest=_dest(name), action="store_true", help=text)
        else:
            extra: dict[str, Any] = {"type": checked(convert)} if convert else {}
            p.add_argument(name, dest=_dest(name), metavar=metavar, help=text,
                           action="append" if kind == "append" else "store",
                           default=list(default) if isinstance(default, list) else default,
                           **extra)


def add_sandbox_options(p: argparse.ArgumentParser) -> None:
    """Options every command that runs something in a sandbox accepts."""
    add_options(p, SANDBOX_OPTIONS)


class _Args:
    """What argparse.Namespace would hold, built without argparse."""

    def __init__(self, **kw: object) -> None:
        self.__dict__.update(kw)

    def __getattr__(self, name: str) -> Any:  # typed like argparse.Namespace
        raise AttributeError(name)


def _fast_run_args(args: list[str]) -> _Args | None:
    """Parse `[--debug] run [OPTIONS] [--] CMD...` without argparse; None means
    "anything unusual": argparse then parses (and reports errors) as usual."""
    debug = False
    while args and args[0] == "--debug":
        debug, args = True, args[1:]
    if not args or args[0] != "run":
        return None
    args = [*args[:1], *(["--debug"] if debug else []), *args[1:]]
    table = {**RUN_OPTIONS, **SANDBOX_OPTIONS}
    values: dict[str, object] = {_dest(n): (list(d) if isinstance(d, list) else d)
                                 for n, (_k, d, _c, _m, _h) in table.items()}
    i = 1
    while i < len(args) and args[i].startswith("-") and args[i] != "--":
        name, eq, value = args[i].partition("=")
        opt = table.get(name)
        if opt is None:
            return None
        kind, _default, convert, _m, _h = opt
        if kind == "flag":
            if eq:
                return None
            values[_dest(name)] = True
            i += 1
            continue
        if not eq:
            if i + 1 >= len(args):
                return None
            value, i = args[i + 1], i + 1
        i += 1
        try:
            parsed = convert(value) if convert else value
        except BadOption:
            return None
        if kind == "append":
            values[_dest(name)].append(parsed)  # type: ignore[attr-defined]
        else:
            values[_dest(name)] = parsed
    return _Args(argv=args[i:], func=cmd_run, **values)


def _build_parser(command: str | None) -> argparse.ArgumentParser:
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            # One line, exit 2 (argparse would print the whole usage first);
            # the message may quote a value as given (an escape sequence, 100 kB).
            from nsbuild.printable import MESSAGE_LIMIT, printable

            sys.stderr.write(f"nsbuild: {printable(message, MESSAGE_LIMIT)} "
                             f"(see '{self.prog} --help')\n")  # fmt: skip
            raise SystemExit(2)

    parser = _Parser(prog="nsbuild", description="Rootless, hermetic builds in Linux "
                     "namespaces.")
    parser.add_argument("--debug", action="store_true", help="print each setup step")
    from nsbuild import __version__

    parser.add_argument("--version", action="version", version=f"nsbuild {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a command in a fresh sandbox",
                         description="Run CMD in fresh user, mount, PID, IPC, UTS and "
                         "network namespaces, on a read-only view of the host or on --root.")
    add_options(run, RUN_OPTIONS)
    add_sandbox_options(run)
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    run.set_defaults(func=cmd_run)

    import importlib

    for module in dict.fromkeys(m for name, (m, _) in _COMMANDS.items() if command in (None, name)):
        importlib.import_module(module).register(sub)
    for name, (_, text) in _COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=text)
    return parser


def _environment(args: argparse.Namespace, base: dict[str, str]) -> tuple[tuple[str, str], ...]:
    env = {} if args.clearenv else dict(base)
    for k in args.unsetenv:
        env.pop(k, None)
    env.update(args.setenv)
    return tuple(env.items())


def extra_mounts(args: argparse.Namespace) -> list[Mount]:
    from nsbuild.sandbox.spec import Bind, Tmpfs

    mounts: list[Mount] = [Bind(s, d) for s, d in args.bind]
    mounts += [Bind(s, d, readonly=True) for s, d in args.ro_bind]
    mounts += [Tmpfs(d, 0o1777) for d in args.tmpfs]
    return mounts


def warn_host_net(opts: object) -> None:
    if getattr(opts, "mode", None) == "host":
        sys.stderr.write("nsbuild: warning: --net host: the sandbox shares the host's "
                         "network, its loopback services and abstract sockets\n")


def cmd_run(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise _usage("run: no command given (nsbuild run [OPTIONS] -- CMD [ARG...])")
    if args.env_name and args.root:
        raise _usage("run: --env and --root exclude each other")
    from nsbuild.net import options_from_args

    opts = options_from_args(args)  # bad network options fail before anything runs
    warn_host_net(opts)
    if args.env_name:
        from nsbuild.envs.session import throwaway

        with throwaway(args.env_name) as session:
            return run_sandboxed(args, argv, opts, session)
    return run_sandboxed(args, argv, opts, None)


def run_sandboxed(args: argparse.Namespace, argv: list[str], opts: NetOptions,
                  session: Session | None) -> int:
    """Run `argv` as the parsed sandbox options say: on the host view, on
    --root, or in `session` (an environment); with the network plan of `opts`
    and the resource limits asked for. Shared by run, session run and shell."""
    from nsbuild.envs.masks import cache_masks
    from nsbuild.net import network
    from nsbuild.net.launch import run_under
    from nsbuild.sandbox import Bind, Dev, Proc, Sandbox, Sys, Tmpfs, caller_idmap, host_view
    from nsbuild.sandbox.errors import SandboxError

    cwd = os.getcwd()
    root: RootMount
    mounts: list[Mount]
    mirrors: tuple[str, ...] = ()
    trusted: tuple[str, ...] = ()
    if session is not None:
        # An environment: its own clean, reproducible variables, not the host's.
        root, mounts, base_env = session.root, list(session.mounts), dict(session.env)
        # Only --allow-from-env needs them (reading the layers' apt sources).
        # The environment's Mirror: is the user's own config; apt sources read
        # from its root may reach global addresses only.
        mirrors = session.mirrors() if opts.allow_from_env else ()
        trusted = session.config.mirrors
        workdir = args.chdir or "/"
    elif args.root:
        root = Bind(os.path.abspath(args.root), "/")
        mounts = [Proc(), Dev(), Sys(), Tmpfs("/tmp", 0o1777), Tmpfs("/run")]
        base_env, workdir = dict(os.environ), args.chdir or "/"
    else:
        root, mounts = Tmpfs("/"), list(host_view(cwd))
        base_env, workdir = dict(os.environ), args.chdir or cwd
    mounts += extra_mounts(args)
    # A writable bind (the working directory, --bind, --root) may hold the
    # cache or an Unpack folder: the sandbox must not reach the store.
    mounts += cache_masks([root, *mounts])
    spec = Sandbox(argv=tuple(argv), idmap=caller_idmap(), root=root, mounts=tuple(mounts),
                   cwd=workdir, env=_environment(args, base_env), user=args.user,
                   hostname=args.hostname, debug=args.debug,
                   personality=session.personality if session is not None else None)  # fmt: skip
    with network(opts, mirrors=mirrors, trusted_mirrors=trusted, debug=args.debug) as plan, \
            _limits(args, plan.cgroup) as lim:
        status = run_under(plan, spec, limits=lim, relay_signals=True)
    summary = plan.denied_summary()
    if summary:
        sys.stderr.write(f"nsbuild: {summary}\n")
    lost = plan.log_error()
    if lost:
        # Asked for and not written: nsbuild's own failure, if the command's is not.
        if not status:
            raise SandboxError(lost)
        sys.stderr.write(f"nsbuild: {lost}\n")
    return status


RUNTIME_PROCESSES = 2  # the helper (outside the PID namespace) and init (PID 1)


class _NoLimits:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _limits(args: argparse.Namespace, parent: str | None) -> AbstractContextManager[Limits | None]:
    """The run's cgroup limits as a context manager (nothing when none asked)."""
    pids, memory = getattr(args, "pids_max", None), getattr(args, "memory_max", None)
    if pids is None and memory is None:
        return _NoLimits()
    from nsbuild.sandbox.limits import prepare

    # The cgroup also holds the sandbox's own helper and init: N is for the
    # command and what it starts.
    lim = prepare(pids, memory, parent=parent, runtime=RUNTIME_PROCESSES)
    if args.debug:
        sys.stderr.write(f"nsbuild: limits: {lim.describe()}\n")
    return lim


def _usage(msg: str) -> Exception:
    from nsbuild.errors import NsbuildError

    return NsbuildError(msg)


def main(argv: Sequence[str] | None = None) -> int:
    if os.geteuid() == 0:
        # Root's sandboxes run as a subordinate uid that must walk into the
        # folders nsbuild makes (a umask of 077 shuts it out, and every
        # session copies its base); the cache's top stays 0700 regardless.
        os.umask(0o022)
    args_list = list(sys.argv[1:] if argv is None else argv)
    args: argparse.Namespace | _Args | None = _fast_run_args(args_list)
    plain_run = args is not None and not getattr(args, "env_name", None)
    if args is None:
        command = next((a for a in args_list if not a.startswith("-")), None)
        parser = _build_parser(command)
        trailing = None
        if command == "build" and "--" in args_list:
            # `nsbuild build [OPTIONS] PKG.dsc [OPTIONS] -- BACKEND ARGS...`
            cut = args_list.index("--")
            args_list, trailing = args_list[:cut], args_list[cut + 1 :]
        args = parser.parse_args(args_list)
        if trailing is not None:
            args.backend_args = trailing
        if not getattr(args, "func", None):
            from nsbuild.cli.exits import USAGE

            parser.print_help(sys.stderr)
            return USAGE
    if not plain_run:
        _complete_site()
    from nsbuild.errors import NsbuildError
    from nsbuild.printable import MESSAGE_LIMIT, printable

    # Messages may quote names a sandbox made (files, hosts, paths): one
    # line, escaped, whatever they hold.
    try:
        status: int = args.func(args)
        return status
    except (NsbuildError, ValueError, KeyboardInterrupt) as e:  # ValueError: SpecError and friends
        from nsbuild.cli.exits import exit_status

        if not isinstance(e, KeyboardInterrupt):
            sys.stderr.write(f"nsbuild: {printable(str(e), MESSAGE_LIMIT)}\n")
        return exit_status(e)


def _complete_site() -> None:
    """The command wrapper starts Python without `site` (bin/nsbuild); all
    but a plain `nsbuild run` may import third-party modules (python-debian),
    which may live wherever site would have looked (e.g. system packages)."""
    if sys.flags.no_site:
        import site

        site.main()


def entry() -> None:
    """Console-script entry: exit without the interpreter's teardown, which
    costs milliseconds on every `nsbuild run` and has nothing left to do."""
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
