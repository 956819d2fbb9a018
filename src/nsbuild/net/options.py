"""Command-line options of the network policy, validated into a frozen NetOptions.

Every check that can fail does so here, before anything runs: an entry that
does not parse, the nftables engine without root, without `nft`, or without a
cgroup v2 mount.
"""

from __future__ import annotations

import os

from nsbuild.net.errors import NetError

# On the run path (cli/main.py); the allowlist module (ipaddress) loads only
# when needed.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from dataclasses import dataclass

    from nsbuild.net.allowlist import Allowlist
else:
    from nsbuild.sandbox.record import dataclass

MODES = ("none", "allow", "host")
ENGINES = ("proxy", "nftables")


@dataclass(frozen=True)
class NetOptions:
    mode: str = "none"
    allowlist: Allowlist | None = None  # None: empty (with --allow-from-env: mirrors only)
    allow_from_env: bool = False
    engine: str = "proxy"
    log_path: str | None = None


# The network options, once: cli/main.py puts them in its own tables (for
# argparse and the fast path of `nsbuild run`), add_arguments() in any other
# parser. name: (kind, default, choices, metavar, help); kind is flag, value
# or append.
NET_OPTIONS: dict[str, tuple[str, object, tuple[str, ...] | None, str, str]] = {
    "--net": ("value", None, MODES, "none|allow|host",
              "network: none (loopback only, default), allow (only the --allow list, "
              "through an egress engine), host (the host's network: explicit opt-in)"),
    "--allow": ("append", [], None, "HOST[:PORT]",
                "let --net allow reach HOST (wildcards *.example.org) on PORT (default 80 "
                "and 443); repeatable; implies --net allow"),
    "--allow-from-env": ("flag", False, None, "",
                         "allow the environment's mirrors and apt sources; implies --net allow"),
    "--egress-engine": ("value", "proxy", ENGINES, "proxy|nftables",
                        "proxy: rootless HTTP/CONNECT proxy (default); "
                        "nftables: kernel-enforced for every protocol (root only)"),
    "--net-log": ("value", None, None, "FILE",
                  "write one JSON line per network attempt (allowed or denied) to FILE"),
}


def add_arguments(parser: argparse.ArgumentParser, helps: dict[str, str] | None = None) -> None:
    """The network options in `parser`; `helps` replaces an option's help
    text (a tool whose default differs says so)."""
    group = parser.add_argument_group("network")
    for name, (kind, default, choices, metavar, text) in NET_OPTIONS.items():
        text = (helps or {}).get(name, text)
        if kind == "flag":
            group.add_argument(name, action="store_true", help=text)
        else:
            group.add_argument(name, action="append" if kind == "append" else "store",
                               default=list(default) if isinstance(default, list) else default,
                               choices=choices, metavar=metavar, help=text)  # fmt: skip


def options_from_args(args: argparse.Namespace) -> NetOptions:
    allow: list[str] = list(getattr(args, "allow", None) or [])
    from_env = bool(getattr(args, "allow_from_env", False))
    mode = getattr(args, "net", None)
    engine = getattr(args, "egress_engine", None) or "proxy"
    log_path = getattr(args, "net_log", None)
    if mode is None:
        mode = "allow" if allow or from_env else "none"
    if mode not in MODES:
        raise NetError(f"--net {mode!r}: expected one of {', '.join(MODES)}")
    if mode != "allow" and (allow or from_env):
        flag = "--allow" if allow else "--allow-from-env"
        raise NetError(f"{flag} needs --net allow (got --net {mode})")
    if mode == "allow" and not allow and not from_env:
        raise NetError(
            "--net allow: nothing is allowed; give --allow HOST[:PORT] or --allow-from-env"
        )
    if engine not in ENGINES:
        raise NetError(f"--egress-engine {engine!r}: expected one of {', '.join(ENGINES)}")
    allowlist = None
    if allow:
        from nsbuild.net.allowlist import Allowlist

        allowlist = Allowlist.parse(allow)
    if mode == "allow" and engine == "nftables":
        check_nftables_usable(allowlist)
    if log_path is not None:
        parent = os.path.split(os.path.abspath(log_path))[0]
        if not os.path.isdir(parent):
            raise NetError(f"--net-log {log_path}: directory {parent} does not exist")
    return NetOptions(mode, allowlist, from_env, engine, log_path)


def check_nftables_usable(allowlist: Allowlist | None) -> None:
    import shutil

    from nsbuild.sandbox.cgroupfs import cgroup2_mount

    if os.geteuid() != 0:
        raise NetError("--egress-engine nftables needs root; use --egress-engine proxy")
    if shutil.which("nft") is None:
        raise NetError(
            "--egress-engine nftables: the nft command is missing (apt install nftables)"
        )
    if cgroup2_mount() is None:
        raise NetError("--egress-engine nftables: no cgroup v2 mount in /proc/self/mountinfo")
    for rule in allowlist.rules if allowlist else ():
        if rule.wildcard:
            raise NetError(
                f"--allow {rule.source!r}: the nftables engine matches addresses, so it "
                "cannot enforce a wildcard; name the hosts or use --egress-engine proxy"
            )
