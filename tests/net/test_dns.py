"""The inside DNS responder: NXDOMAIN for everything, and the name goes to the log."""

from __future__ import annotations

import socket
import struct

from nsbuild.net.dns import DnsResponder, answer
from nsbuild.net.netlog import NetLog


def query(name: str, qtype: int = 1, qid: int = 0x1234) -> bytes:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1)


def test_every_query_gets_nxdomain_and_is_logged() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    log = NetLog()
    responder = DnsResponder(server, log, "--net none: no network")
    responder.start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(30)
    try:
        client.sendto(query("deb.debian.org", 28), server.getsockname())
        reply = client.recv(512)
    finally:
        responder.stop()
        client.close()
    qid, flags, qd, an = struct.unpack("!HHHH", reply[:8])
    assert qid == 0x1234 and flags & 0x8000 and flags & 0xF == 3 and (qd, an) == (1, 0)
    [record] = log.records()
    assert (record["host"], record["qtype"], record["decision"]) == (
        "deb.debian.org",
        "AAAA",
        "nxdomain",
    )
    assert log.denied_summary() == "network: 1 attempt denied: deb.debian.org (dns)"


def test_garbage_gets_formerr_and_no_log_entry() -> None:
    reply, name, _ = answer(b"\x00\x07\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff")
    assert name is None and reply[:2] == b"\x00\x07" and reply[3] & 0xF == 1
    assert answer(b"x")[0] == b""
