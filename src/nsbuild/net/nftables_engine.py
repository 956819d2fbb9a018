"""The nftables engine's life cycle: cgroup + NFLOG reader + table, then cleanup.

Order matters: the cgroup exists before the ruleset names it (nft resolves
the path when it loads the rules); the NFLOG group is bound before the rules
log to it; on exit the table goes first (so nothing is matched against a
cgroup being removed), then the cgroup (killing stragglers), then the reader.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Generator
from typing import TYPE_CHECKING

from nsbuild.net import nftables
from nsbuild.net.errors import NetError
from nsbuild.net.netlog import PACKETS_OVER_RATE, NetLog
from nsbuild.sandbox.cgroupfs import (
    cgroup2_mount,
    make_run_cgroup,
    pid_alive,
    remove_cgroup,
    run_cgroup_owner,
)
from nsbuild.sandbox.spec import File

if TYPE_CHECKING:
    from nsbuild.net.allowlist import Allowlist

# A run's cgroup is `<cgroup2 mount>/nsbuild-net.<owner pid>.<n>`, at the top
# of the hierarchy (level 1) so nftables can match it with `socket cgroupv2
# level 1`, and so gc() finds leftovers of dead owners in one place.
PREFIX = "nsbuild-net."


def nft_cgroup_path(cgroup_dir: str) -> str:
    """The path string nft wants for `socket cgroupv2 ... "PATH"`.

    nft (1.0.x) resolves it as `/sys/fs/cgroup/PATH`, a hard-coded prefix, so
    give it our directory relative to that prefix; it stays right when the
    cgroup2 mount is elsewhere (here: /sys/fs/cgroup/unified)."""
    return os.path.relpath(cgroup_dir, "/sys/fs/cgroup")


def hosts_file(destinations: list[nftables.Destination], allowlist: Allowlist) -> bytes:
    """/etc/hosts naming the allowed hosts: the sandbox cannot reach a resolver."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    seen = set()
    for rule in allowlist.rules:
        if rule.address is not None:
            continue
        for d in destinations:
            if d.label == rule.describe() and (d.addr, rule.host) not in seen:
                seen.add((d.addr, rule.host))
                lines.append(f"{d.addr}\t{rule.host}")
    return ("\n".join(lines) + "\n").encode()


def nftables_engine(allowlist: Allowlist, log: NetLog,
                    debug: bool) -> Generator[tuple[str, File], None, None]:
    """A generator: the first next() sets up and yields the run's cgroup and
    the sandbox's /etc/hosts, the second tears down."""
    from nsbuild.net.nflog import NflogReader
    from nsbuild.net.options import check_nftables_usable

    check_nftables_usable(allowlist)
    destinations = nftables.resolve_allowlist(allowlist)
    mount = cgroup2_mount()
    if mount is None:
        raise NetError("--egress-engine nftables: no cgroup v2 mount")
    gc()  # leftovers of crashed runs
    cgroup = make_run_cgroup(mount, PREFIX)
    table = nftables.TABLE_PREFIX + cgroup.rsplit("/", 1)[1][len(PREFIX) :].replace(".", "_")
    reader = None
    applied = False
    logged = [0]  # packets the reader saw; the table counts every one it refused
    refused: int | None = None
    try:

        def seen(proto: str, addr: str, port: int, prefix: str) -> None:
            if prefix.strip() == table:
                logged[0] += 1
                log.add(
                    engine="nftables",
                    kind=proto,
                    host=addr,
                    port=port,
                    decision="deny",
                    rule="default deny",
                )

        reader = NflogReader(seen)
        reader.start()
        script = nftables.ruleset(
            table, nft_cgroup_path(cgroup), destinations, reader.group
        )
        if debug:
            print(f"nsbuild: nftables ruleset (nft -f):\n{script}", file=sys.stderr, end="")
        nftables.apply(script)
        applied = True
        yield cgroup, File("/etc/hosts", hosts_file(destinations, allowlist))
        refused = nftables.refused_packets(table)
        for label, (packets, nbytes, received) in nftables.allow_counters(table).items():
            if packets:
                dest = next(d for d in destinations if f"{d.label} {d.addr}" == label)
                log.add(
                    engine="nftables",
                    kind="tcp",
                    host=str(dest.addr),
                    port=dest.port,
                    decision="allow",
                    rule=dest.label,
                    bytes_out=nbytes,
                    bytes_in=received,
                    packets_out=packets,
                )
    finally:
        if applied:
            nftables.delete_table(table)
        remove_cgroup(cgroup)
        if reader is not None:
            reader.stop()
        if refused is not None and refused > logged[0]:
            log.refused_unlogged(refused - logged[0], engine="nftables", kind="packets",
                                 what=PACKETS_OVER_RATE)


def gc() -> list[str]:
    """Remove nsbuild tables and cgroups whose owner process is dead. Returns what went."""
    import shutil

    removed: list[str] = []
    if os.geteuid() != 0:
        return removed
    if shutil.which("nft") is not None:
        for table in nftables.list_tables():
            pid = nftables.owner_pid(table)
            if pid is not None and not pid_alive(pid):
                nftables.delete_table(table)
                removed.append(f"nftables table inet {table}")
    mount = cgroup2_mount()
    try:
        entries = list(os.scandir(mount)) if mount is not None else []
    except OSError:
        entries = []
    for entry in entries:
        pid = run_cgroup_owner(entry.name, PREFIX)
        if pid is not None and not pid_alive(pid):
            try:
                remove_cgroup(entry.path)
                removed.append(f"cgroup {entry.path}")
            except OSError:
                pass
    return removed
