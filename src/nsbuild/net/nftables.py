"""The root egress engine: an nftables table of the run's own, matching its cgroup.

The sandbox shares the host's network namespace but runs in a cgroup v2 of
its own; in the output hook, packets whose socket belongs to that cgroup
(`socket cgroupv2 level 1 "PATH"`) go to the table's `sandbox` chain, which
accepts TCP to the allowlist's resolved addresses and ports and logs (NFLOG
group) and rejects everything else. Processes outside the cgroup are not
touched. The ruleset is generated as text and applied with `nft -f`; the
table is named `nsbuild_<owner pid>_<n>` so `gc()` can tell a dead owner's.

The log takes at most LOG_RATE packets: every refused packet would otherwise
be a message to nsbuild and a line of its log, as many as the sandbox likes
to send; the reject rules' counters count them all.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nsbuild.net.allowlist import Allowlist, IPAddress, address_refusal
from nsbuild.net.errors import NetError

TABLE_PREFIX = "nsbuild_"
LOG_RATE = "limit rate 100/second burst 200 packets"
REFUSED = "refused"  # the comment of the reject rules, whose counters count every packet


@dataclass(frozen=True)
class Destination:
    addr: IPAddress
    port: int
    label: str  # the allowlist rule, shown as the rule's comment and in the log


def resolve_allowlist(allowlist: Allowlist) -> list[Destination]:
    """Every (address, port) the allowlist names, resolved now, on the host."""
    import socket

    out: list[Destination] = []
    for rule in allowlist.rules:
        if rule.wildcard:
            raise NetError(f"--allow {rule.source!r}: the nftables engine cannot enforce wildcards")
        addrs: list[IPAddress] = []
        if rule.address is not None:
            if not (rule.from_sources and address_refusal(rule.address)):
                addrs = [rule.address]
        else:
            try:
                infos = socket.getaddrinfo(rule.host, None, type=socket.SOCK_STREAM)
            except OSError as e:
                raise NetError(
                    f"--allow {rule.source!r}: cannot resolve {rule.host}: {e}"
                ) from None
            for info in infos:
                addr = ipaddress.ip_address(str(info[4][0]).split("%")[0])
                if address_refusal(addr) is None \
                        and addr not in addrs:
                    addrs.append(addr)
            # An apt source (from the environment, not the user) that leads
            # nowhere allowed opens nothing; the user's own entries must work.
            if not addrs and not rule.from_sources:
                raise NetError(
                    f"--allow {rule.source!r}: {rule.host} resolves to no usable address"
                )
        for addr in addrs:
            for port in rule.ports:
                out.append(Destination(addr, port, rule.describe()))
    return out


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "").replace('"', "") + '"'


def ruleset(
    table: str, cgroup_path: str, destinations: Sequence[Destination], log_group: int
) -> str:
    """The nft script for one run. `cgroup_path` is as nft resolves it (see cgroups)."""
    allow, replies = [], []
    for d in destinations:
        family = "ip6" if d.addr.version == 6 else "ip"
        comment = _quote(f"{d.label} {d.addr}")
        allow.append(
            f"\t\t{family} daddr {d.addr} tcp dport {d.port} counter accept comment {comment}"
        )
        replies.append(f"\t\t{family} saddr {d.addr} tcp sport {d.port} counter comment {comment}")
    prefix = _quote(f"{table} ")
    lines = [
        f"table inet {table} {{",
        "\tchain output {",
        "\t\ttype filter hook output priority filter; policy accept;",
        f"\t\tsocket cgroupv2 level 1 {_quote(cgroup_path)} jump sandbox",
        "\t}",
        # Only counts what the allowed servers send back (the socket lookup of
        # the input hook finds the sandbox's socket); decides nothing.
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy accept;",
        f"\t\tsocket cgroupv2 level 1 {_quote(cgroup_path)} jump replies",
        "\t}",
        "\tchain replies {",
        *replies,
        "\t}",
        "\tchain sandbox {",
        # Allow rules first, so their counters see every packet sent.
        *allow,
        # Replies on connections that the host opened to a sandbox server.
        "\t\tct state established,related accept",
        # No verdict: a packet over the rate goes on unlogged to be refused.
        f"\t\t{LOG_RATE} log prefix {prefix} group {log_group}",
        f"\t\tmeta l4proto tcp counter reject with tcp reset comment {_quote(REFUSED)}",
        f"\t\tcounter reject comment {_quote(REFUSED)}",
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def apply(script: str) -> None:
    proc = subprocess.run(["nft", "-f", "-"], input=script, text=True, capture_output=True)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        raise NetError(f"nft -f refused the ruleset: {err[0] if err else proc.returncode}")


def delete_table(table: str) -> None:
    subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)


def list_tables() -> list[str]:
    proc = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
    out = []
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "table" and parts[2].startswith(TABLE_PREFIX):
            out.append(parts[2] if parts[1] == "inet" else "")
    return [t for t in out if t]


def owner_pid(table: str) -> int | None:
    pid = table[len(TABLE_PREFIX) :].split("_")[0]
    return int(pid) if table.startswith(TABLE_PREFIX) and pid.isdigit() else None


def _rules(table: str) -> list[dict[str, Any]]:
    """The table's rules that carry a comment, as `nft -j` gives them."""
    import json

    proc = subprocess.run(
        ["nft", "-j", "list", "table", "inet", table], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return []
    items = json.loads(proc.stdout).get("nftables", [])
    return [item["rule"] for item in items if "comment" in item.get("rule", {})]


def refused_packets(table: str) -> int:
    """Packets the table refused (logged or not)."""
    return sum(expr["counter"]["packets"] for rule in _rules(table)
               if rule["comment"] == REFUSED for expr in rule.get("expr", []) if "counter" in expr)


def allow_counters(table: str) -> dict[str, tuple[int, int, int]]:
    """comment -> (packets sent, bytes sent, bytes received) of each allowed destination."""
    out: dict[str, tuple[int, int, int]] = {}
    for rule in _rules(table):
        if rule["comment"] == REFUSED or rule.get("chain") not in ("sandbox", "replies"):
            continue
        for expr in rule.get("expr", []):
            if "counter" in expr:
                packets, nbytes, received = out.get(rule["comment"], (0, 0, 0))
                if rule["chain"] == "sandbox":
                    packets, nbytes = expr["counter"]["packets"], expr["counter"]["bytes"]
                else:
                    received = expr["counter"]["bytes"]
                out[rule["comment"]] = (packets, nbytes, received)
    return out
