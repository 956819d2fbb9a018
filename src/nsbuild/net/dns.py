"""The inside DNS responder: answers every query NXDOMAIN and logs the name.

Its UDP socket lives in the sandbox's network namespace (127.0.0.1:53,
named by /etc/resolv.conf inside); one daemon thread on the host side serves
it. Nothing is ever resolved: the point is to tell the user what a build
tried to reach, and to make resolution fail fast instead of timing out.

The queries come from inside: the responder answers at most RATE a second
(a token bucket; a build that asks more is looping, and answering faster
helps nothing); a query over the rate is counted in the log's summary but
neither answered nor written to the log file one by one.
"""

from __future__ import annotations

import _socket
import _thread
import struct
import sys

from nsbuild.net.netlog import DNS_OVER_RATE, NetLog, TokenBucket

QTYPES = {
    1: "A",
    2: "NS",
    5: "CNAME",
    12: "PTR",
    15: "MX",
    16: "TXT",
    28: "AAAA",
    33: "SRV",
    65: "HTTPS",
    255: "ANY",
}
NXDOMAIN = 3
FORMERR = 1
MAX_NAME = 255  # octets of a name on the wire (RFC 1035)
RATE = 100.0  # answers a second, on average
BURST = 200  # answers at once after a quiet time


def parse_question(packet: bytes) -> tuple[int, int, str, int, int]:
    """(id, flags, name, qtype, end of question) of a query; ValueError if malformed."""
    if len(packet) < 12:
        raise ValueError("short DNS header")
    qid, flags, qdcount = struct.unpack("!HHH", packet[:6])
    if flags & 0x8000 or qdcount != 1:
        raise ValueError("not a single-question query")
    labels, pos = [], 12
    while True:
        if pos >= len(packet):
            raise ValueError("truncated name")
        length = packet[pos]
        pos += 1
        if length == 0:
            break
        if length > 63:  # compression pointers make no sense in a question
            raise ValueError("bad label")
        labels.append(packet[pos : pos + length])
        pos += length
        if pos - 12 >= MAX_NAME:  # the labels so far and the final zero octet
            raise ValueError("name too long")
    if pos + 4 > len(packet):
        raise ValueError("truncated question")
    qtype = struct.unpack("!H", packet[pos : pos + 2])[0]
    name = ".".join(_label_text(label) for label in labels) or "."
    return qid, flags, name, qtype, pos + 4


def _label_text(label: bytes) -> str:
    """A label as dig shows it: a dot or backslash inside it escaped, so that
    one label `evil.example` never reads as two (`evil\\.example`). The
    label's own backslashes are doubled first, which tells them apart from
    the `\\xff` that stands for a byte past ASCII."""
    escaped = label.replace(b"\\", b"\\\\").replace(b".", b"\\.")
    return escaped.decode("ascii", "backslashreplace")


def answer(packet: bytes, rcode: int = NXDOMAIN) -> tuple[bytes, str | None, int]:
    """The reply to `packet`: (reply, name or None, qtype)."""
    try:
        qid, flags, name, qtype, end = parse_question(packet)
    except ValueError:
        if len(packet) < 2:
            return b"", None, 0
        qid = struct.unpack("!H", packet[:2])[0]
        return struct.pack("!HHHHHH", qid, 0x8000 | FORMERR, 0, 0, 0, 0), None, 0
    # QR=1, keep opcode and RD, RA=1 so resolvers do not retry elsewhere.
    reply_flags = 0x8000 | (flags & 0x7900) | 0x0080 | rcode
    header = struct.pack("!HHHHHH", qid, reply_flags, 1, 0, 0, 0)
    return header + packet[12:end], name, qtype


class DnsResponder:
    """Serve one bound UDP socket from one daemon thread until stop()."""

    def __init__(self, sock: _socket.socket, log: NetLog, rule: str) -> None:
        self._sock = sock
        self._log = log
        self._rule = rule
        self._stopping = False
        self._bucket = TokenBucket(RATE, BURST)  # one thread at a time takes from it
        self._done = _thread.allocate_lock()  # held while the thread serves

    def start(self) -> None:
        self._done.acquire()
        try:
            _thread.start_new_thread(self._serve_then_release, ())
        except BaseException:
            self._done.release()
            raise

    def _serve_then_release(self) -> None:
        try:
            self._serve()
        except Exception as e:
            # The service alone stops: the command runs on, its names unanswered.
            sys.stderr.write(f"nsbuild: a service of the sandbox stopped: {e}\n")
        finally:
            self._done.release()

    def _serve(self) -> None:
        while not self._stopping:
            try:
                packet, peer = self._sock.recvfrom(4096)
            except OSError:
                return
            if self._stopping:
                return
            self._reply(packet, peer)

    def _reply(self, packet: bytes, peer: tuple[str, int]) -> None:
        reply, name, qtype = answer(packet)
        if not self._bucket.take():
            if name is not None:
                self._log.tally(engine="dns", kind="dns", host=name, port=53,
                                decision="nxdomain", what=DNS_OVER_RATE)
            return
        if name is not None:
            self._log.add(
                engine="dns",
                kind="dns",
                host=name,
                port=53,
                decision="nxdomain",
                rule=self._rule,
                bytes_out=len(packet),
                bytes_in=len(reply),
                qtype=QTYPES.get(qtype, str(qtype)),
            )
        if reply:
            try:
                self._sock.sendto(reply, peer)
            except OSError:
                pass

    def stop(self) -> None:
        self._stopping = True
        try:
            # Wakes the blocked recvfrom (Linux sets the shutdown flag even on
            # an unconnected datagram socket, then reports ENOTCONN).
            self._sock.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass
        if self._done.acquire(timeout=1.0):
            self._done.release()
        self._sock.close()
