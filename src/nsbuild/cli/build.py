"""`nsbuild build`: the command-line face of the build driver.

Kept apart from the driver so that `nsbuild --help` costs nothing: the driver,
python-debian and the backends load only when a build runs. The options are
nsbuild.cli.buildopts'; their defaults, nsbuild.cli.config's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nsbuild.cli.buildopts import (
    COMMAND_STAGES,
    NO_OPS,
    BadSetting,
    add_setting_options,
    check_conflicts,
)

if TYPE_CHECKING:  # imported when a build runs: `nsbuild build --help` stays quick
    from nsbuild.debbuild.result import BuildRequest


def _paragraphs(*texts: str) -> str:
    import textwrap

    return "\n\n".join(textwrap.fill(t, 78) for t in texts)


def register(sub: Any) -> None:
    """Add the `build` subcommand to an argparse subparsers object."""
    from nsbuild.cli.exits import BUILD_FAILED, INTERRUPTED, SETUP_FAILED, UNSATISFIABLE, USAGE

    p = sub.add_parser(
        "build",
        help="build a Debian source package in a sealed environment",
        # An abbreviation of an option could be one of sbuild's that nsbuild refuses.
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_paragraphs(
            "Build PKG.dsc (or an unpacked source tree with debian/) in a fresh copy-on-write "
            "session: build dependencies are installed with network limited to the "
            "environment's mirrors, then the package builds as an unprivileged user with no "
            "network. Results, a .build log and the network log go to --out; a build that "
            "fails writes nothing there (its logs are kept in nsbuild's cache, and named).",
            "Options marked [sbuild] have sbuild's names and meaning (`man sbuild`); the "
            "others are nsbuild's own. Defaults for any of them come from "
            "$XDG_CONFIG_HOME/nsbuild/config.toml (see `nsbuild config`): the command line "
            "overrides them, and adds to the lists of repeatable options.",
        ),
        epilog=_paragraphs(
            "DEB_BUILD_OPTIONS inside is the caller's, with parallel= from --jobs, else the "
            "caller's parallel= as given, else the number of CPUs. DEB_BUILD_PROFILES is "
            "-P's, else the caller's.",
            "Cross-building (--host-arch ARCH, sbuild's --host) runs on an environment of "
            "the machine's own architecture, as sbuild: profiles `cross nocheck` unless -P "
            "or DEB_BUILD_PROFILES gives them, DEB_BUILD_OPTIONS gains nocheck unless the "
            "caller set it, and arch-all packages are built only with -A.",
            "sbuild's options that nsbuild has no use for are refused, each in one line. "
            "Accepted and doing nothing, as nsbuild does that anyway: "
            f"{', '.join(NO_OPS)}.",
        ) + "\n\nexit status:\n"
        "  0    the package built (also when a check after it failed, as sbuild: see the\n"
        "       `check` lines on stderr and `checks` in --json)\n"
        f"  {BUILD_FAILED}    the package's own build failed, or a result it made was refused\n"
        f"  {USAGE}    bad options, configuration or input\n"
        f"  {UNSATISFIABLE}    the build dependencies cannot be installed\n"
        f"  {SETUP_FAILED}  nsbuild could not set up the sandbox or the backend\n"
        f"  {INTERRUPTED}  interrupted",
    )
    p.add_argument("input", metavar="PKG.dsc|DIR", type=Path)
    add_setting_options(p)
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    # Everything after `--` (split off before parsing, see nsbuild.cli.main):
    # argparse cannot give a trailing positional list after options reliably.
    p.set_defaults(func=handler, backend_args=[])


# -- from settings to a request --


def make_request(values: dict[str, Any], input: Path, backend_args: tuple[str, ...],
                 debug: bool) -> Any:  # fmt: skip
    """The BuildRequest of effective settings; BadSetting when they make no sense."""
    import dataclasses

    from nsbuild.debbuild.result import BuildRequest

    v = dict(values)
    # The binNMU options and --build-path are checked with the input
    # (debbuild.inputs), which knows the package.
    if v["make_binnmu"] is not None or v["append_to_version"] is not None:
        v["arch_all"] = False  # as sbuild: a binNMU rebuilds arch-dependent packages only
    if not (v["arch_any"] or v["arch_all"] or v["source"]):
        raise BadSetting("nothing to build: --no-arch-any and --no-arch-all without --source")
    if v["backend"] == "local" and backend_args:
        raise BadSetting(f"the local backend takes no arguments after '--' "
                         f"(got {' '.join(backend_args)!r})")  # fmt: skip
    commands = tuple(
        (stage, tuple(v[f"{stage.replace('-', '_')}_commands"]))
        for stage in COMMAND_STAGES
        if v[f"{stage.replace('-', '_')}_commands"]
    )
    # Settings are named as the request's fields; lists become tuples.
    fields: dict[str, Any] = {
        f.name: tuple(v[f.name]) if isinstance(v[f.name], list) else v[f.name]
        for f in dataclasses.fields(BuildRequest)
        if f.name in v
    }
    return BuildRequest(**fields, input=input, backend_args=backend_args, debug=debug,
                        commands=commands)  # fmt: skip


def check_egress_engine(request: BuildRequest) -> None:
    """--egress-engine nftables: usable here (root, nft, cgroup v2), and a
    firewall of nsbuild's own runs only: before anything else happens."""
    if request.egress_engine != "nftables":
        return
    from nsbuild.net.options import check_nftables_usable

    if request.backend != "local":
        raise BadSetting(f"--egress-engine nftables: the {request.backend} backend's runs are "
                         "not nsbuild's to firewall (the local backend only)")  # fmt: skip
    check_nftables_usable(None)


def handler(args: argparse.Namespace) -> int:
    from nsbuild.cli.config import DEFAULT, ConfigError, effective
    from nsbuild.cli.exits import USAGE, exit_status
    from nsbuild.debbuild.driver import build
    from nsbuild.debbuild.extrarepo import check_request
    from nsbuild.errors import NsbuildError
    from nsbuild.printable import MESSAGE_LIMIT, printable

    given: dict[str, object] = getattr(args, "given", {})
    try:
        check_conflicts(given, getattr(args, "flags", []))
        settings = effective(given, os.environ)
        values = {name: value for name, (value, _) in settings.items()}
        # A cross build leaves arch-all out unless it was chosen (sbuild's default).
        values["arch_all_given"] = settings["arch_all"][1] != DEFAULT
        request = make_request(values, args.input, tuple(args.backend_args),
                               bool(getattr(args, "debug", False)))  # fmt: skip
        check_request(request)
        check_egress_engine(request)
    except (BadSetting, ConfigError, NsbuildError) as e:
        print(f"nsbuild build: {printable(str(e), MESSAGE_LIMIT)}", file=sys.stderr)
        return USAGE
    as_json = bool(values["json"])
    try:
        result = build(request)
    except NsbuildError as e:
        status = exit_status(e)
        partial = getattr(e, "result", None)
        if as_json:
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
        if partial is not None:
            _say_session(partial.session)
        return status
    if as_json:
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
    from nsbuild.debbuild.checks import summary_lines

    for line in summary_lines(result.checks):
        print(f"nsbuild build: {line}", file=sys.stderr)
    _say_session(result.session)
    print(f"nsbuild build: log: {printable(str(result.log))}", file=sys.stderr)
    return 0


def _say_session(enter: str | None) -> None:
    """How to enter the session --purge-build kept, and how to end it."""
    from nsbuild.printable import printable

    if enter:
        ident = enter.split()[-1]
        print(f"nsbuild build: session kept: {printable(enter)} "
              f"(end it with: nsbuild session end {printable(ident)})", file=sys.stderr)



def _denied_line(records: list[dict[str, Any]]) -> str | None:
    """One line naming the first denied destinations; the names are the
    build's own (a DNS question may hold anything) and are escaped."""
    from nsbuild.printable import printable

    denied = [r for r in records if r.get("decision") != "allow"]
    if not denied:
        return None
    hosts = sorted({printable(f"{r.get('host')}:{r.get('port')}", 300) for r in denied})
    return f"network: {len(denied)} attempt(s) denied: {', '.join(hosts[:5])}"
