"""Read the packets an nftables `log group N` rule sends over NFLOG netlink.

Just enough of nfnetlink_log to learn, for each rejected packet, its
protocol, destination address and port: bind a group, ask for the first
bytes of each packet, parse the IP and transport headers.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import threading
from collections.abc import Callable, Iterator

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_QTHRESH = 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
PROTOS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}

Seen = Callable[[str, str, int, str], None]  # (proto, addr, port, prefix)


def _attr(kind: int, payload: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def _config(group: int, attrs: bytes, seq: int) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(group)) + attrs
    kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    return struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def _attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, pos)
        if length < 4:
            return
        yield kind & 0x7FFF, data[pos + 4 : pos + length]
        pos += (length + 3) & ~3


def parse_packet(payload: bytes) -> tuple[str, str, int] | None:
    """(protocol, destination address, destination port) of an IP packet."""
    if not payload:
        return None
    version = payload[0] >> 4
    if version == 4 and len(payload) >= 20:
        ihl = (payload[0] & 0xF) * 4
        proto = payload[9]
        dst = str(ipaddress.IPv4Address(payload[16:20]))
        l4 = ihl
    elif version == 6 and len(payload) >= 40:
        proto = payload[6]
        dst = str(ipaddress.IPv6Address(payload[24:40]))
        l4 = 40
    else:
        return None
    port = 0
    if proto in (6, 17, 132) and len(payload) >= l4 + 4:
        port = struct.unpack_from("!H", payload, l4 + 2)[0]
    return PROTOS.get(proto, str(proto)), dst, port


class NflogReader:
    """Bind the first free NFLOG group from `first_group`; report packets to `seen`."""

    def __init__(self, seen: Seen, first_group: int = 3200) -> None:
        self._seen = seen
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.group = self._bind(first_group)
        self._sock.settimeout(0.2)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="nsbuild-nflog", daemon=True)

    def _bind(self, first: int) -> int:
        for group in range(first, first + 256):
            self._sock.send(_config(group, _attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])), 1))
            if self._ack() == 0:
                mode = struct.pack("!IBB", 128, NFULNL_COPY_PACKET, 0)
                # Deliver each packet at once (the default batches up to 100
                # packets or one second).
                qthresh = struct.pack("!I", 1)
                attrs = _attr(NFULA_CFG_MODE, mode) + _attr(NFULA_CFG_QTHRESH, qthresh)
                self._sock.send(_config(group, attrs, 2))
                if self._ack() != 0:
                    raise OSError("NFLOG: the kernel refused the copy mode")
                return group
        raise OSError("no free NFLOG group")

    def _ack(self) -> int:
        data = self._sock.recv(65536)
        _length, kind = struct.unpack_from("=IH", data, 0)
        if kind == NLMSG_ERROR:
            return -int(struct.unpack_from("=i", data, 16)[0])
        return 0

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except TimeoutError:
                if self._stopping:
                    return
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    continue  # the kernel dropped messages it could not queue: go on
                return
            self._handle(data)

    def _handle(self, data: bytes) -> None:
        pos = 0
        while pos + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, pos)
            if length < 16:
                return
            if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
                prefix, packet = "", None
                for akind, value in _attrs(data[pos + 20 : pos + length]):
                    if akind == NFULA_PREFIX:
                        prefix = value.rstrip(b"\0").decode("ascii", "replace")
                    elif akind == NFULA_PAYLOAD:
                        packet = parse_packet(value)
                if packet is not None:
                    self._seen(packet[0], packet[1], packet[2], prefix)
            pos += (length + 3) & ~3

    def stop(self) -> None:
        # Let the kernel deliver what was logged just before the end.
        self._stopping = True
        self._thread.join(timeout=2.0)
        self._sock.close()
