"""Network escapes under `--net none` (the default): a process inside tries to
reach the host, its services and the world, and must reach nothing.

Covered elsewhere, listed in docs/security.md: host TCP on 127.0.0.1
(tests/sandbox/test_network.py), host abstract Unix sockets (same file), UDP and
DNS leaks in none and allow modes (tests/net/test_sandbox_net.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from security_helpers import failed, probe

pytestmark = pytest.mark.userns


def _global_addresses() -> list[str]:
    """The host's own non-loopback addresses (what a build would try first)."""
    ip = shutil.which("ip") or "/usr/sbin/ip"
    if not os.path.exists(ip):
        return []
    out = subprocess.run([ip, "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True, check=False).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines() if len(line.split()) > 3]


@contextlib.contextmanager
def _listeners(kind: int, hosts: list[str]) -> Iterator[list[tuple[str, int, socket.socket]]]:
    socks = []
    try:
        for host in hosts:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = socket.socket(family, kind)
            s.bind((host, 0))
            if kind == socket.SOCK_STREAM:
                s.listen(8)
            s.settimeout(0.5)
            socks.append((host, s.getsockname()[1], s))
        yield socks
    finally:
        for _, _, s in socks:
            s.close()


def test_no_route_to_any_address_outside(tmp_path: Path) -> None:
    """No route at all: the host's own public addresses and any other address are
    unreachable, in IPv4 and IPv6, before a single packet is sent."""
    hosts = [h for h in _global_addresses() if not h.startswith("fe80")]
    with _listeners(socket.SOCK_STREAM, ["0.0.0.0", "::"]) as (v4, v6):
        code = """
        def tcp(host, port):
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = socket.socket(fam); s.settimeout(5); s.connect((host, port))
        attempt("route table", lambda: [l for l in open("/proc/net/route").read().splitlines()[1:]])
        attempt("v6 routes", lambda: [l for l in open("/proc/net/ipv6_route").read().splitlines()
                                      if not l.endswith("lo")])
        attempt("documentation v4", lambda: tcp("192.0.2.1", 80))
        attempt("documentation v6", lambda: tcp("2001:db8::1", 80))
        for h in sys.argv[3:]:
            port = int(sys.argv[2] if ":" in h else sys.argv[1])
            attempt("host " + h, lambda: tcp(h, port))
        """
        res = probe(code, cwd=tmp_path, args=(str(v4[1]), str(v6[1]), *hosts))
    assert res["route table"] == {"ok": True, "value": "[]"}
    assert res["v6 routes"] == {"ok": True, "value": "[]"}
    failed(res, "documentation v4", "ENETUNREACH")
    failed(res, "documentation v6", "ENETUNREACH")
    for h in hosts:
        failed(res, f"host {h}", "ENETUNREACH")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_host_loopback_tcp_and_udp_services_are_unreachable(tmp_path: Path, host: str) -> None:
    """The host's loopback services, IPv4 and IPv6, TCP and UDP: the sandbox's
    127.0.0.1 and ::1 are its own."""
    with _listeners(socket.SOCK_STREAM, [host]) as [(_, tport, tsock)], \
            _listeners(socket.SOCK_DGRAM, [host]) as [(_, uport, usock)]:
        code = """
        host, tport, uport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        def tcp():
            s = socket.socket(fam); s.settimeout(5); s.connect((host, tport))
        def udp():
            u = socket.socket(fam, socket.SOCK_DGRAM)
            for _ in range(5):
                u.sendto(b"nsbuild-escape", (host, uport))
        attempt("tcp", tcp)
        attempt("udp", udp)
        """
        res = probe(code, cwd=tmp_path, args=(host, str(tport), str(uport)))
        failed(res, "tcp", "ECONNREFUSED")
        # Sending succeeds (to the sandbox's own loopback); nothing may arrive here.
        with pytest.raises(TimeoutError):
            usock.recv(100)
        with pytest.raises(TimeoutError):
            tsock.accept()


def test_host_path_socket_not_bound_in_is_unreachable(tmp_path: Path) -> None:
    """Path sockets are not per network namespace: only the mount namespace keeps
    them out. Sockets next to the working directory and in the host's /tmp."""
    work = tmp_path / "work"
    work.mkdir()
    paths = [tmp_path / "outside.sock", Path(f"/tmp/nsbuild-sec-{uuid.uuid4().hex[:8]}.sock")]
    servers = []
    try:
        for p in paths:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(str(p))
            s.listen(4)
            s.settimeout(0.5)
            servers.append(s)
        code = """
        for p in sys.argv[1:]:
            def connect(p=p):
                s = socket.socket(socket.AF_UNIX); s.connect(p)
            attempt(p, connect)
        attempt("dbus", lambda: socket.socket(socket.AF_UNIX).connect(
            "/run/dbus/system_bus_socket"))
        """
        res = probe(code, cwd=work, args=tuple(str(p) for p in paths))
        for p in paths:
            failed(res, str(p), "ENOENT")
            assert os.path.exists(p)
        failed(res, "dbus", "ENOENT")
        for s in servers:
            with pytest.raises(TimeoutError):
                s.accept()
    finally:
        for s in servers:
            s.close()
        paths[1].unlink(missing_ok=True)


@pytest.mark.parametrize("user", [None, "1000:1000"])
def test_raw_and_packet_sockets_are_refused(tmp_path: Path, user: str | None) -> None:
    """Raw and packet sockets could forge or sniff traffic: root inside has no
    CAP_NET_RAW over the network namespace (the command runs in a nested user
    namespace that does not own it), a user even less."""
    code = """
    attempt("raw udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP))
    attempt("raw icmp6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_RAW,
                                               socket.IPPROTO_ICMPV6))
    attempt("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)))
    attempt("packet dgram", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM,
                                                  socket.htons(3)))
    """
    # --chdir /: pytest's tmp_path sits in a 0700 folder a subordinate uid cannot enter.
    res = probe(code, "--chdir", "/", *(["--user", user] if user else []), cwd=tmp_path)
    for name in ("raw udp", "raw icmp6", "packet", "packet dgram"):
        failed(res, name, "EPERM", "EACCES")


def test_the_hosts_resolver_is_unreachable(tmp_path: Path) -> None:
    """DNS goes to nsbuild's logging responder (NXDOMAIN); the host's own resolvers
    cannot be asked directly, and no name resolves."""
    nameservers = []
    with contextlib.suppress(OSError), open("/etc/resolv.conf") as f:
        nameservers = [ln.split()[1] for ln in f if ln.startswith("nameserver ")]
    query = bytes.fromhex("123401000001000000000000036465620664656269616e036f72670000010001")
    code = """
    query = bytes.fromhex(sys.argv[1])
    attempt("resolve", lambda: socket.getaddrinfo("deb.debian.org", 80))
    for ns in sys.argv[2:]:
        def ask(ns=ns):
            fam = socket.AF_INET6 if ":" in ns else socket.AF_INET
            u = socket.socket(fam, socket.SOCK_DGRAM); u.settimeout(2)
            u.sendto(query, (ns, 53))
            return u.recv(512)
        attempt("ask " + ns, ask)
    """
    res = probe(code, cwd=tmp_path, args=(query.hex(), *nameservers))
    failed(res, "resolve")
    for ns in nameservers:
        if ns.startswith("127.") or ns == "::1":
            # The sandbox's own loopback: only nsbuild's responder could answer,
            # and it listens on 127.0.0.1 only when asked on that address.
            continue
        failed(res, f"ask {ns}", "ENETUNREACH")
