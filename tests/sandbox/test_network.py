"""Network namespace: only loopback, isolated from the host's loopback and its
abstract Unix sockets; `--net host` as an explicit, warned opt-in.

Every connection these tests make goes to 127.0.0.1, ::1 or an abstract socket.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox_helpers import explain, nonblank_lines, nsbuild, nsbuild_argv, ok, py, sh
from waiting import HANG_GUARD

pytestmark = pytest.mark.userns

IP = shutil.which("ip") or next(
    (p for p in ("/usr/sbin/ip", "/usr/bin/ip", "/sbin/ip") if os.path.exists(p)), None
)

# Inside: try to connect, print "connected" or "refused <errno name>".
CONNECT = """
import errno, socket, sys
family, addr = sys.argv[1], sys.argv[2]
if family == "unix":
    s = socket.socket(socket.AF_UNIX)
    target = "\\0" + addr
else:
    s = socket.socket(socket.AF_INET6 if family == "inet6" else socket.AF_INET)
    target = (addr, int(sys.argv[3]))
s.settimeout(60)
try:
    s.connect(target)
except OSError as e:
    print("refused", errno.errorcode.get(e.errno, e.errno))
else:
    print("connected")
"""

# Inside: listen on 127.0.0.1 and ::1 at PORT, say so, hold until stdin closes.
LISTEN = """
import socket, sys
port = int(sys.argv[1])
socks = []
for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    s = socket.socket(family)
    s.bind((addr, port))
    s.listen()
    socks.append(s)
print("listening", flush=True)
sys.stdin.read()
print("done")
"""


@pytest.fixture
def host_tcp() -> Iterator[socket.socket]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    s.setblocking(False)
    yield s
    s.close()


@pytest.fixture
def host_abstract() -> Iterator[tuple[socket.socket, str]]:
    name = f"nsbuild-test-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX)
    s.bind("\0" + name)
    s.listen()
    s.setblocking(False)
    yield s, name
    s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def accepted_nothing(s: socket.socket) -> bool:
    try:
        conn, _ = s.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


def test_only_lo_exists_and_is_up(tmp_path: Path) -> None:
    r = ok(nsbuild("--", *sh("ls /sys/class/net; cat /sys/class/net/lo/flags"), cwd=tmp_path))
    names, flags = r.stdout.split()[:-1], int(r.stdout.split()[-1], 16)
    assert names == ["lo"]
    IFF_UP, IFF_LOOPBACK = 0x1, 0x8
    assert flags & IFF_UP and flags & IFF_LOOPBACK, hex(flags)


@pytest.mark.skipif(IP is None, reason="iproute2 (ip) is not installed on the host")
def test_ip_shows_lo_up_with_127_0_0_1_and_ipv6_loopback(tmp_path: Path) -> None:
    assert IP is not None
    r = ok(nsbuild("--", *sh(f"{IP} -o link; echo --; {IP} -o addr"), cwd=tmp_path))
    links, addrs = (nonblank_lines(p) for p in r.stdout.split("--"))
    assert len(links) == 1 and ": lo:" in links[0], links
    assert "UP" in links[0].split("<")[1].split(">")[0], links[0]
    assert any("inet 127.0.0.1/8" in a for a in addrs), addrs
    assert any("inet6 ::1/128" in a for a in addrs), addrs
    assert all(" lo " in a for a in addrs), addrs


# Inside: lo's maximum TCP segment sizes, read back over rtnetlink.
GSO_SIZES = """
import socket, struct
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
ifinfo = struct.pack("BxHiII", 0, 0, 1, 0, 0)  # lo is interface 1
s.sendto(struct.pack("IHHII", 16 + len(ifinfo), 18, 1, 1, 0) + ifinfo, (0, 0))  # RTM_GETLINK
data = s.recv(65536)
attrs, pos = {}, 32
while pos + 4 <= struct.unpack_from("I", data)[0]:
    size, kind = struct.unpack_from("HH", data, pos)
    if size < 4:
        break
    if size == 8:
        attrs[kind] = struct.unpack_from("I", data, pos + 4)[0]
    pos += (size + 3) & ~3
print(attrs.get(41), attrs.get(63))  # IFLA_GSO_MAX_SIZE, IFLA_GSO_IPV4_MAX_SIZE
"""


def test_lo_takes_large_tcp_segments(tmp_path: Path) -> None:
    # What makes a download through the egress proxy (on this lo) cheaper.
    r = ok(nsbuild("--", *py(GSO_SIZES), cwd=tmp_path))
    assert r.stdout.split() == ["524280", "524280"], explain(r)


def test_loopback_addresses_work_inside(tmp_path: Path) -> None:
    code = """
    import socket
    for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        srv = socket.socket(family)
        srv.bind((addr, 0))
        srv.listen()
        c = socket.create_connection((addr, srv.getsockname()[1]), timeout=60)
        conn, _ = srv.accept()
        c.sendall(b"ping")
        print(addr, conn.recv(4).decode())
    """
    r = ok(nsbuild("--", *py(code), cwd=tmp_path))
    assert r.stdout.splitlines() == ["127.0.0.1 ping", "::1 ping"]


def test_host_tcp_server_on_loopback_is_unreachable(
    tmp_path: Path, host_tcp: socket.socket
) -> None:
    port = str(host_tcp.getsockname()[1])
    r = ok(nsbuild("--", *py(CONNECT, "inet", "127.0.0.1", port), cwd=tmp_path))
    assert r.stdout.strip() == "refused ECONNREFUSED"
    assert accepted_nothing(host_tcp)


def test_server_inside_is_unreachable_from_the_host(tmp_path: Path) -> None:
    port = free_port()
    p = subprocess.Popen(
        nsbuild_argv("--", *py(LISTEN, str(port))),
        cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline() == "listening\n"
        for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family) as s, pytest.raises(ConnectionRefusedError):
                s.settimeout(60)
                s.connect((addr, port))
        p.stdin.close()
        assert p.wait(timeout=HANG_GUARD) == 0
    finally:
        p.kill()
        p.wait()


def test_two_sandboxes_listen_on_the_same_port_at_once(
    tmp_path: Path, host_tcp: socket.socket
) -> None:
    # The host itself listens on that port too.
    port = str(host_tcp.getsockname()[1])
    procs = [
        subprocess.Popen(
            nsbuild_argv("--", *py(LISTEN, port)),
            cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line == "listening\n", (line, p.stderr.read() if p.stderr else "")
        # Both hold the port now; only then are they let go.
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
        for p in procs:
            assert p.wait(timeout=HANG_GUARD) == 0
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_host_abstract_unix_socket_is_unreachable(
    tmp_path: Path, host_abstract: tuple[socket.socket, str]
) -> None:
    srv, name = host_abstract
    r = ok(nsbuild("--", *py(CONNECT, "unix", name), cwd=tmp_path))
    assert r.stdout.strip() == "refused ECONNREFUSED"
    assert accepted_nothing(srv)


def test_default_network_namespace_is_not_the_hosts(tmp_path: Path) -> None:
    r = ok(nsbuild("--", "readlink", "/proc/self/ns/net", cwd=tmp_path))
    assert r.stdout.strip() != os.readlink("/proc/self/ns/net")


def test_net_host_shares_the_host_network_and_warns(
    tmp_path: Path, host_tcp: socket.socket, host_abstract: tuple[socket.socket, str]
) -> None:
    # The positive control of the isolation tests above: the same probes connect.
    port = str(host_tcp.getsockname()[1])
    _, name = host_abstract
    r = nsbuild("--net", "host", "--", *sh(
        f"readlink /proc/self/ns/net; {py_cmd(CONNECT, 'inet', '127.0.0.1', port)}; "
        f"{py_cmd(CONNECT, 'unix', name)}"
    ), cwd=tmp_path)
    assert r.returncode == 0, explain(r)
    assert r.stdout.split("\n")[:3] == [os.readlink("/proc/self/ns/net"), "connected", "connected"]
    lines = nonblank_lines(r.stderr)
    assert len(lines) == 1 and "warning" in lines[0] and "host" in lines[0], explain(r)


def py_cmd(code: str, *args: str) -> str:
    import shlex

    return shlex.join(py(code, *args))


def test_connect_error_is_not_a_timeout(tmp_path: Path) -> None:
    # Nothing listens inside: a refusal, at once, not a silently dropped packet.
    r = ok(nsbuild("--", *py(CONNECT, "inet", "127.0.0.1", str(free_port())), cwd=tmp_path))
    assert r.stdout.strip() == f"refused {errno.errorcode[errno.ECONNREFUSED]}"
