"""The sandbox's network namespace: lo up, and the sockets made inside it.

The helper makes the namespace while init builds the root (the kernel takes
a while over a new one) and hands it to init, which joins it before sysfs is
mounted. Inside sockets (the egress proxy's, the DNS responder's) are made
in there and sent to nsbuild, which serves them from the host.
"""

from __future__ import annotations

import _socket
import fcntl
import os
import struct

from nsbuild.sandbox import mounts as m
from nsbuild.sandbox import syscalls as sc
from nsbuild.sandbox.channel import SETUP_EXIT, Channel, recv_with_fds
from nsbuild.sandbox.spec import InsideSocket, Sandbox

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

_SIOCSIFFLAGS = 0x8914
_IFF_UP_LOOPBACK_RUNNING = 0x1 | 0x8 | 0x40


def new_network(inside_sockets: tuple[InsideSocket, ...], chan: Channel,
                say: Callable[[str], None]) -> None:
    """Move into a new network namespace with lo up, and send nsbuild the
    inside sockets made there."""
    m.Step.current = "unshare network namespace"
    say("unshare the network namespace")
    sc.unshare(sc.CLONE_NEWNET)
    m.Step.current = "bring up loopback"
    say("bring up lo (127.0.0.1, ::1): the only network interface")
    loopback_up()
    if inside_sockets:
        m.Step.current = "create inside sockets"
        socks = [inside_socket(s, say) for s in inside_sockets]
        chan.send("SOCK", fds=[s.fileno() for s in socks])
        for s in socks:
            s.close()


def make_network(spec: Sandbox, chan: Channel, to_init: Channel, proc: int,
                 say: Callable[[str], None]) -> None:
    """Outside init, while it builds the root: the sandbox's network
    namespace, handed to init."""
    new_network(spec.inside_sockets, chan, say)
    ns = os.open("self/ns/net", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
    try:
        to_init.send("N", fds=[ns])
    finally:
        os.close(ns)
        to_init.sock.close()


def join_network(net: _socket.socket | None) -> None:
    """In init: join the helper's network namespace (before sysfs is mounted:
    it shows the mounter's). Once; init exits if the helper failed."""
    if net is None or net.fileno() < 0:
        return
    m.Step.current = "join the network namespace"
    data, fds = recv_with_fds(net)
    net.close()
    if data != b"N" or len(fds) != 1:
        os._exit(SETUP_EXIT)  # the helper failed, and reported why
    try:
        sc.setns(fds[0], sc.CLONE_NEWNET)
    finally:
        os.close(fds[0])


def loopback_up() -> None:
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS,
                    struct.pack("16sH22x", b"lo", _IFF_UP_LOOPBACK_RUNNING))
    finally:
        s.close()
    _large_loopback_segments()

_RTM_NEWLINK = 16
_NLM_F_REQUEST_ACK = 0x1 | 0x4
_IFLA_GSO_MAX_SIZE = 41
_IFLA_GSO_IPV4_MAX_SIZE = 63
_LO_GSO_MAX = 524280  # lo's own maximum; the default is 64 KiB
_LOOPBACK_IFINDEX = 1


def _large_loopback_segments() -> None:
    """Let TCP on this namespace's lo send segments up to lo's maximum: a
    download through the egress proxy, whose listening socket lives on this
    lo, then costs about a quarter less CPU (bench/egress --sandbox). Only
    here can it be set: the command inside has no capability over the
    network namespace. Best effort: an older kernel refuses or ignores it."""
    attrs = b"".join(struct.pack("HHI", 8, kind, _LO_GSO_MAX)
                     for kind in (_IFLA_GSO_MAX_SIZE, _IFLA_GSO_IPV4_MAX_SIZE))
    body = struct.pack("BxHiII", _socket.AF_UNSPEC, 0, _LOOPBACK_IFINDEX, 0, 0) + attrs
    message = struct.pack("IHHII", 16 + len(body), _RTM_NEWLINK, _NLM_F_REQUEST_ACK, 1, 0)
    try:
        s = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW, 0)  # NETLINK_ROUTE
        try:
            s.sendto(message + body, (0, 0))
            s.recv(4096)  # the acknowledgement, or the error it carries
        finally:
            s.close()
    except OSError:
        pass


def inside_socket(spec: InsideSocket, say: Callable[[str], None]) -> _socket.socket:
    say(spec.describe())
    family = _socket.AF_INET6 if ":" in spec.host else _socket.AF_INET
    kind = _socket.SOCK_STREAM if spec.kind == "tcp" else _socket.SOCK_DGRAM
    s = _socket.socket(family, kind)
    s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
    s.bind((spec.host, spec.port))
    if spec.kind == "tcp":
        s.listen(128)
    return s
