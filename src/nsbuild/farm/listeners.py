"""Who listens on a TCP port of this machine, from /proc/net/tcp{,6}: the
owner's uid and the processes holding the socket. A master's ports are free
for any local user to bind while it is down, so the farm proves a listener
is the caller's (and the master's own) before it trusts it with a password
or counts a master as started.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

from nsbuild.farm.errors import FarmError

_LISTEN = "0A"  # the kernel's TCP_LISTEN, as /proc/net/tcp writes it
LOCAL_NAMES = ("localhost", "localhost.localdomain")


@dataclass(frozen=True)
class Listener:
    host: str
    port: int
    uid: int
    inode: int


def _address(hexaddr: str) -> str:
    """/proc/net/tcp's address: 32-bit words in the host's byte order."""
    raw = bytes.fromhex(hexaddr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def listening() -> list[Listener]:
    """Every TCP socket listening on this machine (this network namespace)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            addr, _, port = fields[1].partition(":")
            found.append(Listener(_address(addr), int(port, 16), int(fields[7]),
                                  int(fields[9])))  # fmt: skip
    return found


def _here(address: str) -> bool:
    """True if connecting to `address` reaches this machine: a loopback or
    wildcard address, or one of its own (it can be bound here)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
    except OSError:
        return False
    return True


def local_address(host: str) -> str | None:
    """The address by which `host` names this machine, or None. Any
    spelling counts (the host's name, 127.1, 2130706433, 0.0.0.0, its own
    address): a port here is free for any local user to bind while the
    master is down."""
    name = host.strip("[]")
    if name.lower() in LOCAL_NAMES:
        return "127.0.0.1"  # as the master listens by default
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    for info in infos:
        address = str(info[4][0])
        try:
            if _here(address):
                return address
        except ValueError:
            continue
    return None


def is_local(host: str) -> bool:
    """True if `host` names this machine, however spelled (local_address)."""
    return local_address(host) is not None


def check_ours(port: int, what: str, owner: int | None = None) -> list[Listener]:
    """The listeners on `port`; FarmError if one is not `owner`'s (the
    caller by default; any address: a wildcard listener answers loopback
    too)."""
    owner = os.getuid() if owner is None else owner
    found = [x for x in listening() if x.port == port]
    for x in found:
        if x.uid != owner:
            raise FarmError(f"{what}: port {port} is held by uid {x.uid}, not the master's "
                            f"user (uid {owner}): not sending it anything")  # fmt: skip
    return found


def holders(port: int) -> set[int]:
    """The caller's processes holding a socket listening on `port`."""
    inodes = {f"socket:[{x.inode}]" for x in check_ours(port, "the master")}
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") in inodes for fd in fds):
                pids.add(int(entry))
        except OSError:
            continue
    return pids
