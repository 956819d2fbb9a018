"""Subcommands of the environments layer: env, session, shell, gc.

`register()` only declares arguments (argparse alone is imported); the work is
imported inside each handler, so `nsbuild run` without --env never loads it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nsbuild.envs.config import EnvConfig
    from nsbuild.envs.session import Session

def _sandbox_options(p: argparse.ArgumentParser) -> None:
    from nsbuild.cli.main import add_sandbox_options

    add_sandbox_options(p)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    env = sub.add_parser("env", help="manage environments (chroots)")
    env_sub = env.add_subparsers(dest="env_command", metavar="ACTION", required=True)

    p = env_sub.add_parser("list", help="environments, their disk use and sessions")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_env_list)

    p = env_sub.add_parser("show", help="one environment's configuration (by name or alias)")
    p.add_argument("name", help="environment name or alias")
    p.set_defaults(func=cmd_env_show)

    p = env_sub.add_parser("create", help="bootstrap a Debian environment with mmdebstrap")
    p.add_argument("name", help="the new environment's name (letters, digits, . _ + ~ -)")
    p.add_argument("--suite", required=True, help="e.g. bookworm, trixie, unstable")
    p.add_argument("--arch", help="architecture (default: the host's)")
    p.add_argument("--mirror", help="apt mirror URL (default: deb.debian.org)")
    p.add_argument("--variant", default="buildd", help="mmdebstrap variant (default: buildd)")
    p.add_argument(
        "--include", action="append", default=[], metavar="PKG,...",
        help="extra packages to install (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--alias", action="append", default=[],
        help="another name for it, e.g. UNRELEASED for builds of work in progress (repeatable)",
    )  # fmt: skip
    p.set_defaults(func=cmd_env_create)

    p = env_sub.add_parser(
        "update",
        help="upgrade an environment's packages (apt)",
        description="Upgrade the packages of a tarball environment with apt, its mirrors "
        "reachable. When nothing was upgraded, the tarball and its unpacked base stay as they "
        "are (dependency layers stay valid); otherwise a new tarball replaces the old one.",
    )
    p.add_argument("name", help="environment name or alias")
    p.set_defaults(func=cmd_env_update)

    p = env_sub.add_parser(
        "remove",
        help="forget an environment and free its disk",
        description="Remove the environment's chroot.d file, the tarball `nsbuild env create` "
        "made for it, and its unpacked base. Refused while sessions use it, unless --force.",
    )
    p.add_argument("name", help="environment name (not an alias)")
    p.add_argument(
        "--keep-tarball",
        action="store_true",
        help="keep the tarball (its chroot.d file and unpacked base still go)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="also end the environment's sessions that no command is running in, deleting "
        "their files, and remove it; a session still running a command (or owned by a running "
        "build) is kept with the unpacked base it uses, which `nsbuild gc` frees once it ends",
    )
    p.set_defaults(func=cmd_env_remove)

    session = sub.add_parser("session", help="long-lived copy-on-write sessions")
    s_sub = session.add_subparsers(dest="session_command", metavar="ACTION", required=True)

    p = s_sub.add_parser("begin", help="start a session; prints its id")
    p.add_argument("name", help="environment name or alias")
    p.set_defaults(func=cmd_session_begin)

    p = s_sub.add_parser("run", help="run a command in a session")
    p.add_argument("id", help="session id (nsbuild session list)")
    _sandbox_options(p)
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]",
                   help="the command to run, after --")  # fmt: skip
    p.set_defaults(func=cmd_session_run)

    p = s_sub.add_parser("shell", help="interactive shell in a session")
    p.add_argument("id", help="session id (nsbuild session list)")
    _sandbox_options(p)
    p.set_defaults(func=cmd_session_shell)

    p = s_sub.add_parser("end", help="end sessions and delete their files")
    p.add_argument("ids", nargs="+", metavar="id", help="session ids (nsbuild session list)")
    p.set_defaults(func=cmd_session_end)

    p = s_sub.add_parser("list", help="open sessions")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_session_list)

    p = sub.add_parser("shell", help="interactive shell in a throw-away environment")
    p.add_argument("name", help="environment name or alias")
    _sandbox_options(p)
    p.set_defaults(func=cmd_shell)

    p = sub.add_parser(
        "gc",
        help="remove what crashed runs left behind",
        description="Remove sessions and half-made files of runs that are gone, unpacked "
        "bases no environment uses, stale dependency layers and apt caches, old logs of "
        "failed builds, and (root) nftables tables and cgroups of dead runs.",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="only say what would be removed (nftables tables and cgroups are not looked at)",
    )
    p.set_defaults(func=cmd_gc)


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def cmd_env_list(args: argparse.Namespace) -> int:
    from nsbuild.envs.usage import env_usage

    rows = env_usage()
    if args.json:
        found = [_architecture(r.env, r.base if r.base_bytes else None) for r in rows]
        out = [{**r.to_json(), "architecture": arch, "runs": runs, "cannot_run": why}
               for r, (arch, runs, why) in zip(rows, found, strict=True)]  # fmt: skip
        json.dump(out, sys.stdout, indent=1)
        print()
        return 0
    if not rows:
        from nsbuild.envs.suites import DEFAULT_DISTRIBUTION, create_command

        print(f"no environments; create one with: {create_command(DEFAULT_DISTRIBUTION)}")
        return 0
    for r in rows:
        aliases = f" (aliases: {', '.join(r.env.aliases)})" if r.env.aliases else ""
        sizes = (
            f"tarball {_human(r.tarball_bytes)}, unpacked {_human(r.base_bytes)}"
            if r.env.type == "tarball"
            else r.env.type
        )
        arch, runs, why = _architecture(r.env, r.base if r.base_bytes else None)
        runs += f", cannot run here (nsbuild env show {r.env.name})" if why else ""
        print(f"{r.env.name}{aliases}: {r.status}; {sizes}; "
              f"{arch or 'architecture unknown'} ({runs})")  # fmt: skip
        for s in r.sessions:
            print(f"  session {s.id} ({s.kind}): {_human(s.bytes)}")
    return 0


def _architecture(env: EnvConfig, base: str | None) -> tuple[str, str, str | None]:
    """An environment's architecture, how it runs here (native, linux32,
    qemu-user), and what is missing to run it (None: nothing). Without an
    Architecture field: its dpkg's, where its tree is there to read (a
    directory, or the unpacked `base`); "" if not known yet."""
    from nsbuild.envs import arches
    from nsbuild.envs.store import layout_for

    arch = env.architecture
    if env.type == "host":
        arch = arch or arches.machine_arch()
    elif not arch:
        root = (env.path if env.type == "directory"
                else layout_for(env).base_dir(base) / "root" if base else None)  # fmt: skip
        arch = (arches.elf_arch(root) if root else None) or ""
    if not arch or not arches.ARCH_RE.match(arch):
        return arch, "unknown", None
    runs = arches.run_mode(arch)
    return arch, runs, arches.emulation_missing(arch) if runs == arches.QEMU_USER else None


def cmd_env_show(args: argparse.Namespace) -> int:
    from nsbuild.envs.config import load_config

    env = load_config().get(args.name)
    print(f"# {env.source}")
    arch, runs, why = _architecture(env, None)
    if arch:
        how = {"native": "runs natively", "linux32": "runs natively, under the 32-bit "
               "personality (linux32)", "qemu-user": "runs under qemu-user emulation"}
        print(f"# {arch}: " + (f"cannot run here: {why}" if why else how.get(runs, runs)))
    sys.stdout.write(env.to_deb822())
    return 0


def cmd_env_create(args: argparse.Namespace) -> int:
    from nsbuild.envs.create import create_env

    include = [p for item in args.include for p in item.split(",") if p]
    env = create_env(
        args.name,
        args.suite,
        architecture=args.arch,
        variant=args.variant,
        mirror=args.mirror,
        include=include,
        aliases=args.alias,
    )
    print(f"created environment {env.name!r}: {env.path} ({env.source})")
    return 0


def cmd_env_update(args: argparse.Namespace) -> int:
    from nsbuild.envs.update import update_env

    done = update_env(args.name)
    if done.changed:
        print(f"updated environment {done.env.name!r}: {done.env.path} (base {done.base[:12]})")
    else:
        print(
            f"environment {done.env.name!r} is up to date: nothing upgraded, "
            f"tarball and base {done.base[:12]} unchanged"
        )
    return 0


def cmd_env_remove(args: argparse.Namespace) -> int:
    from nsbuild.envs.create import remove_env

    for line in remove_env(args.name, keep_tarball=args.keep_tarball, force=args.force):
        print(line)
    return 0


def cmd_session_begin(args: argparse.Namespace) -> int:
    from nsbuild.envs.session import begin_session

    print(begin_session(args.name).id)
    return 0


def _run_in(session: Session, args: argparse.Namespace, argv: list[str]) -> int:
    """Run like `nsbuild run --env`: the same options, network policy and log."""
    from nsbuild.cli import main as cli
    from nsbuild.net import options_from_args

    opts = options_from_args(args)  # bad network options fail before anything runs
    session.require_runnable()
    cli.warn_host_net(opts)
    with session.in_use():
        return cli.run_sandboxed(args, argv, opts, session)


def _shell_argv() -> list[str]:
    return ["/bin/bash", "-l"] if sys.stdin.isatty() else ["/bin/sh"]


def _with_term(args: argparse.Namespace) -> None:
    # An interactive shell needs to know the terminal; nothing else leaks in.
    term = os.environ.get("TERM")
    if term and not any(k == "TERM" for k, _ in args.setenv):
        args.setenv.append(("TERM", term))


def _command(args: argparse.Namespace) -> list[str]:
    """The command after `--`; sandbox options given between ID and `--` apply too
    (argparse's REMAINDER would otherwise take them for the command)."""
    from nsbuild.envs.errors import EnvError

    rest: list[str] = args.argv
    if "--" in rest:
        cut = rest.index("--")
        late, rest = rest[:cut], rest[cut + 1 :]
        if late:
            parser = argparse.ArgumentParser(prog="nsbuild session run", add_help=False)
            _sandbox_options(parser)
            defaults = argparse.Namespace()
            parser.parse_args([], namespace=defaults)
            parsed = parser.parse_args(late)
            for key, value in vars(parsed).items():
                if value != getattr(defaults, key):
                    current = getattr(args, key, None)
                    merged = current + value if isinstance(value, list) and current else value
                    setattr(args, key, merged)
    if not rest:
        raise EnvError("no command given (nsbuild session run ID [OPTIONS] -- CMD [ARG...])")
    return rest


def cmd_session_run(args: argparse.Namespace) -> int:
    from nsbuild.envs.session import get_session

    return _run_in(get_session(args.id), args, _command(args))


def cmd_session_shell(args: argparse.Namespace) -> int:
    from nsbuild.envs.session import get_session

    _with_term(args)
    return _run_in(get_session(args.id), args, _shell_argv())


def cmd_session_end(args: argparse.Namespace) -> int:
    from nsbuild.envs.session import end_session

    for session_id in args.ids:
        end_session(session_id)
    return 0


def cmd_session_list(args: argparse.Namespace) -> int:
    from nsbuild.envs.usage import session_usage

    rows = session_usage()
    if args.json:
        json.dump([r.to_json() for r in rows], sys.stdout, indent=1)
        print()
        return 0
    for r in rows:
        state = "" if r.alive else ", owner gone (nsbuild gc removes it)"
        print(f"{r.id}\t{r.env}\t{r.kind}{state}\t{_human(r.bytes)}")
    return 0


def cmd_shell(args: argparse.Namespace) -> int:
    from nsbuild.envs.session import throwaway

    _with_term(args)
    with throwaway(args.name) as session:
        return _run_in(session, args, _shell_argv())


def cmd_gc(args: argparse.Namespace) -> int:
    from nsbuild.envs.cleanup import gc

    report = gc(dry_run=args.dry_run)
    removed, errors = list(report.removed), list(report.errors)
    # Dependency layers, apt caches and kept logs of the build layer.
    from nsbuild.debbuild.gc import gc as build_gc

    removed += build_gc(dry_run=args.dry_run, errors=errors)
    if not args.dry_run:
        # What other layers leave behind when a run dies: nftables tables and
        # cgroups of the root egress engine (only root can have made them).
        from nsbuild.net.nftables_engine import gc as net_gc
        from nsbuild.sandbox.limits import gc as limits_gc

        for what, collect in (("network", net_gc), ("resource limit", limits_gc)):
            try:
                removed += collect()
            except OSError as e:
                errors.append(f"{what} leftovers: {e}")
    done = "would remove" if args.dry_run else "removed"
    for line in removed:
        print(f"{done} {line}")
    for line in errors:
        print(f"nsbuild: gc: {line}", file=sys.stderr)
    if not removed:
        print("nothing to remove")
    return 1 if errors else 0
