"""`nsbuild build`: the command-line face of the build driver.

Kept apart from the driver so that `nsbuild --help` costs nothing: the driver,
python-debian and the backends load only when a build runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    """Add the `build` subcommand to an argparse subparsers object."""
    p = sub.add_parser(
        "build",
        help="build a Debian source package in a sealed environment",
        description="Build PKG.dsc (or an unpacked source tree with debian/) in a fresh "
        "copy-on-write session: build dependencies are installed with network limited "
        "to the environment's mirrors, then the package builds as an unprivileged user "
        "with no network. Results, a .build log and the network log go to --out; a build "
        "that fails writes nothing there (its logs are kept in nsbuild's cache, and named).",
    )
    p.add_argument("input", metavar="PKG.dsc|DIR", type=Path)
    p.add_argument(
        "--env",
        metavar="NAME",
        help="environment (default: the one named after the changelog's distribution, "
        "created with mmdebstrap on first use)",
    )
    p.add_argument(
        "--out", metavar="DIR", type=Path, help="where results go (default: next to the input)"
    )
    sel = p.add_argument_group("what to build (default: --arch-any --arch-all)")
    sel.add_argument("--arch-any", action="store_true", help="architecture-dependent packages")
    sel.add_argument("--arch-all", action="store_true", help="architecture-independent packages")
    sel.add_argument("--source", action="store_true", help="the source package too")
    p.add_argument(
        "-j",
        "--jobs",
        type=int,
        metavar="N",
        help="parallel jobs (DEB_BUILD_OPTIONS parallel=N; default: CPUs)",
    )
    p.add_argument(
        "--extra-package",
        action="append",
        default=[],
        type=Path,
        metavar="FILE.deb",
        help="make FILE.deb available to the build-dependency resolver (repeatable)",
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="neither use nor store a dependency layer; no apt caches",
    )
    p.add_argument(
        "--shell-on-failure",
        action="store_true",
        help="open a shell in the failed build tree before cleaning up",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument(
        "--backend",
        default="local",
        help="where to build (default: local); what follows a final `--` goes to the "
        "backend, e.g. `--backend autopkgtest -- autopkgtest-virt-unshare ...`",
    )
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    # Everything after `--` (split off before parsing, see nsbuild.cli.main):
    # argparse cannot give a trailing positional list after options reliably.
    p.set_defaults(func=handler, backend_args=[])


def handler(args: argparse.Namespace) -> int:
    from nsbuild.cli.exits import USAGE, exit_status
    from nsbuild.debbuild.driver import build
    from nsbuild.debbuild.result import BuildRequest
    from nsbuild.errors import NsbuildError
    from nsbuild.printable import printable

    selected = args.arch_any or args.arch_all or args.source
    if args.backend == "local" and args.backend_args:
        print(f"nsbuild build: the local backend takes no arguments after '--' "
              f"(got {' '.join(args.backend_args)!r})", file=sys.stderr)
        return USAGE
    if args.jobs is not None and args.jobs < 1:
        print("nsbuild build: --jobs must be at least 1", file=sys.stderr)
        return USAGE
    request = BuildRequest(
        input=args.input,
        env=args.env,
        out=args.out,
        arch_any=args.arch_any or not selected,
        arch_all=args.arch_all or not selected,
        source=args.source,
        jobs=args.jobs,
        extra_packages=tuple(args.extra_package),
        use_cache=not args.no_cache,
        shell_on_failure=args.shell_on_failure,
        backend=args.backend,
        backend_args=tuple(args.backend_args),
        debug=bool(getattr(args, "debug", False)),
    )
    try:
        result = build(request)
    except NsbuildError as e:
        status = exit_status(e)
        partial = getattr(e, "result", None)
        if args.json:
            doc: dict[str, object] = (
                partial.to_json() if partial is not None else {"status": "error", "message": str(e)}
            )
            doc["exit_status"] = status
            print(json.dumps(doc, indent=1))
        # Messages quote what the build made (file names, a refusal's
        # reason): escaped, as everything from inside that is printed.
        print(f"nsbuild build: {printable(str(e), MESSAGE_LIMIT)}", file=sys.stderr)
        if partial is not None and partial.log:
            print(f"nsbuild build: log: {printable(partial.log)}", file=sys.stderr)
        return status
    if args.json:
        doc = result.to_json()
        doc["exit_status"] = 0
        print(json.dumps(doc, indent=1))  # JSON escapes control characters
    else:
        for art in result.artifacts:
            print(printable(art.path))
    # The backend's bounded counts of the whole build, else its first records.
    counts = result.network_summary
    summary = counts.denied_line() if counts is not None else _denied_line(result.network_records)
    if summary:
        print(f"nsbuild build: {summary}", file=sys.stderr)
    print(f"nsbuild build: log: {printable(str(result.log))}", file=sys.stderr)
    return 0


# Long enough for a list of unmet dependencies, short enough for a terminal.
MESSAGE_LIMIT = 4096


def _denied_line(records: list[dict[str, Any]]) -> str | None:
    """One line naming the first denied destinations; the names are the
    build's own (a DNS question may hold anything) and are escaped."""
    from nsbuild.printable import printable

    denied = [r for r in records if r.get("decision") != "allow"]
    if not denied:
        return None
    hosts = sorted({printable(f"{r.get('host')}:{r.get('port')}", 300) for r in denied})
    return f"network: {len(denied)} attempt(s) denied: {', '.join(hosts[:5])}"
