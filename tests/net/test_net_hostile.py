"""What a sandbox sends the network layer is hostile: a flood of DNS queries or
proxy requests must not grow nsbuild's own memory, names it prints are
escaped, and a name under a wildcard may not lead to the host's own or its
private networks.

The flood and escape tests run real `nsbuild run --net none` sandboxes; the
proxy tests run the real egress proxy against a local server, with a
resolver of the test's own standing in for DNS (it names which address a
name has)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from net_helpers import exchange, origin
from waiting import HANG_GUARD

from nsbuild.net.allowlist import Allowlist, address_refusal
from nsbuild.net.netlog import MAX_DROPPED_COUNTED, MAX_NAMES, MAX_RECORDS, NetLog
from nsbuild.net.proxy import EgressProxy

NSBUILD = (sys.executable, "-m", "nsbuild")
MEMORY_LIMIT_KIB = 100 * 1024

# Sends queries with distinct names to the inside DNS socket until exactly
# argv[1] have reached it (sent minus the socket's drops, from the sandbox's
# own /proc/net/udp), then waits until nsbuild has read every one.
FLOOD = r"""
import socket, struct, sys, time
want = int(sys.argv[1])
def stats():
    for line in open("/proc/net/udp"):
        f = line.split()
        if f[1] == "0100007F:0035":
            return int(f[-1]), int(f[4].split(":")[1], 16)
    raise SystemExit("no DNS socket inside")
def query(i):
    labels = [b"n%d" % i, b"flood", b"test"]
    name = b"".join(bytes([len(p)]) + p for p in labels) + b"\0"
    return struct.pack("!HHHHHH", i & 0xFFFF, 0x0100, 1, 0, 0, 0) + name + b"\0\1\0\1"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent = 0
while True:
    delivered = sent - stats()[0]
    if delivered >= want:
        break
    for _ in range(min(2000, want - delivered)):
        try:
            s.sendto(query(sent), ("127.0.0.1", 53))
        except OSError:
            continue
        sent += 1
while stats()[1]:
    time.sleep(0.01)
print("delivered", want, "sent", sent)
"""

# One query whose name holds terminal control sequences; waits for the answer
# so that nsbuild has seen it.
HOSTILE_NAME = r"""
import socket, struct
labels = [b"\x1b[2K\x1b]0;pwned\x07", b"example", b"org"]
name = b"".join(bytes([len(p)]) + p for p in labels) + b"\0"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(60)
s.sendto(struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + name + b"\0\1\0\1", ("127.0.0.1", 53))
print(len(s.recv(512)))
"""


# Started by a small interpreter of its own: a process's peak RSS includes
# the memory of the process it was forked from, up to its exec (the kernel
# keeps the old image's high-water mark), and pytest itself grows to hundreds
# of MiB over a whole run.
_MEASURE = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _run_measured(argv: list[str], cwd: Path) -> tuple[int, str, str, int]:
    """Run `argv` as a child; (status, stdout, stderr, peak RSS in KiB of it and
    every process it waited for: nsbuild and its sandbox)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as peak:
        proc = subprocess.Popen([sys.executable, "-c", _MEASURE, peak.name, *argv], cwd=cwd,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err)  # fmt: skip
        try:
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        out.seek(0)
        err.seek(0)
        return (proc.returncode, out.read().decode(errors="replace"),
                err.read().decode(errors="replace"), int(peak.read() or 0))


@pytest.mark.userns
def test_dns_flood_from_a_sandbox_keeps_nsbuild_small(tmp_path: Path) -> None:
    queries = 300_000
    net_log = tmp_path / "net.jsonl"
    status, out, err, peak_kib = _run_measured(
        [*NSBUILD, "run", "--net", "none", "--net-log", str(net_log), "--",
         "/usr/bin/python3", "-c", FLOOD, str(queries)], tmp_path)
    assert status == 0, err
    assert out.startswith(f"delivered {queries} "), out
    # nsbuild's own process (the sandbox's outside process, which answers DNS)
    # and everything it reaped: the flood left it small.
    assert peak_kib < MEMORY_LIMIT_KIB, f"nsbuild grew to {peak_kib} KiB\n{err}"
    # Every query is counted; the names past the cap are said to be dropped.
    assert f"network: {queries} attempts denied: " in err, err
    # (counted exactly up to MAX_DROPPED_COUNTED names, then "over" that)
    dropped = re.search(r"\((over )?(\d+) more names past the first (\d+) were not counted "
                        r"by name\)", err)
    assert dropped is not None, err
    assert int(dropped.group(3)) == MAX_NAMES
    assert int(dropped.group(2)) == min(queries - MAX_NAMES, MAX_DROPPED_COUNTED)
    assert bool(dropped.group(1)) == (queries - MAX_NAMES > MAX_DROPPED_COUNTED)
    print(f"peak RSS {peak_kib} KiB; {err.strip()}")
    assert len(err.splitlines()) == 1, err
    # The file has a line for each query answered, and one for the rest.
    records = [json.loads(line) for line in net_log.read_text().splitlines()]
    *answered, rest = records
    assert {r["decision"] for r in answered} == {"nxdomain"}
    assert rest["decision"] == "dropped" and rest["count"] == queries - len(answered)
    assert f"; {rest['count']} DNS queries over the rate limit were neither answered" in err


@pytest.mark.userns
def test_a_dns_name_with_terminal_escapes_is_printed_escaped(tmp_path: Path) -> None:
    status, out, err, _ = _run_measured(
        [*NSBUILD, "run", "--net", "none", "--", "/usr/bin/python3", "-c", HOSTILE_NAME],
        tmp_path)
    assert status == 0 and out.strip().isdigit(), err  # answered
    assert "\x1b" not in err and "\x07" not in err, repr(err)
    assert "denied: \\x1b[2K\\x1b]0;pwned\\x07.example.org (dns)" in err, repr(err)


def test_the_network_log_file_keeps_a_name_as_sent(tmp_path: Path) -> None:
    log = NetLog(str(tmp_path / "net.jsonl"))
    log.add(engine="dns", kind="dns", host="\x1b[2K.example.org", port=53,
            decision="nxdomain", rule="--net none: no network")
    log.close()
    [line] = (tmp_path / "net.jsonl").read_text().splitlines()
    assert "\x1b" not in line  # JSON escapes control characters
    assert json.loads(line)["host"] == "\x1b[2K.example.org"
    assert log.denied_summary() == "network: 1 attempt denied: \\x1b[2K.example.org (dns)"


def test_summaries_of_several_runs_add_up_within_the_cap() -> None:
    """A build runs several sandboxes: their summaries merge, still bounded."""
    first, second = NetLog(), NetLog()
    for log, prefix in ((first, "a"), (second, "b")):
        for i in range(MAX_NAMES + 10):
            log.add(engine="dns", kind="dns", host=f"{prefix}{i}.test", port=53,
                    decision="nxdomain", rule="--net none: no network")
    second.add(engine="proxy", kind="GET", host="mirror", port=80, decision="allow", rule="m")
    total = first.summary().merge(second.summary())
    assert (total.attempts, total.denied) == (2 * (MAX_NAMES + 10) + 1, 2 * (MAX_NAMES + 10))
    assert len(total.counts) == MAX_NAMES
    assert total.names_dropped == MAX_NAMES + 20
    line = total.denied_line()
    assert line is not None and f"({MAX_NAMES + 20} more names past the first" in line, line


# Sends argv[1] requests for distinct hosts, none allowed, on one kept-alive
# connection to the egress proxy inside, reading the answers as they come.
PROXY_FLOOD = r"""
import socket, sys, threading
count = int(sys.argv[1])
s = socket.create_connection(("127.0.0.1", 3128))
def send():
    for i in range(0, count, 1000):
        s.sendall(b"".join(b"GET http://h%d.example.test/ HTTP/1.1\r\n\r\n" % j
                           for j in range(i, min(i + 1000, count))))
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=send).start()
refused, tail = 0, b""
while chunk := s.recv(1 << 16):
    data = tail + chunk
    refused += data.count(b"HTTP/1.1 403 ")
    tail = data[-12:]
print("refused", refused)
"""


@pytest.mark.userns
def test_a_request_flood_through_the_proxy_keeps_nsbuild_small(tmp_path: Path) -> None:
    requests = 200_000
    status, out, err, peak_kib = _run_measured(
        [*NSBUILD, "run", "--net", "allow", "--allow", "allowed.example.test", "--",
         "/usr/bin/python3", "-c", PROXY_FLOOD, str(requests)], tmp_path)
    assert status == 0 and out == f"refused {requests}\n", err
    assert peak_kib < MEMORY_LIMIT_KIB, f"nsbuild grew to {peak_kib} KiB\n{err}"
    assert f"network: {requests} attempts denied: " in err, err
    assert f"more names past the first {MAX_NAMES} were not counted by name" in err, err
    print(f"peak RSS {peak_kib} KiB; {err.strip()}")


# -- the egress proxy ------------------------------------------------------------


def _resolver(names: dict[str, str]) -> Any:
    """getaddrinfo for the names of `names` (name -> address), none other."""

    def resolve(name: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        if name not in names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        addr = names[name]
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (addr, port))]

    return resolve


@contextmanager
def _proxy(entries: list[str], names: dict[str, str]) -> Iterator[tuple[int, NetLog]]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    log = NetLog()
    proxy = EgressProxy(listener, Allowlist.parse(entries), log, resolver=_resolver(names))
    proxy.start()
    try:
        yield listener.getsockname()[1], log
    finally:
        proxy.stop()


def _get(proxy_port: int, url: str) -> tuple[str, str]:
    """(status code, body) of GET url through the proxy."""
    out = exchange(proxy_port, f"GET {url} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
    head, _, body = out.partition(b"\r\n\r\n")
    return head.split(b" ")[1].decode(), body.decode(errors="replace")


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.7.7", "private"),
        ("172.16.0.9", "private"),
        ("100.64.1.1", "not a global"),
        ("169.254.169.254", "link-local"),
        ("fd00::1", "private"),
        ("::ffff:10.0.0.1", "private"),
        ("240.0.0.1", "reserved"),
        ("0.0.0.0", "unspecified"),
    ],
)
def test_a_name_under_a_wildcard_may_not_resolve_to_an_internal_address(
        address: str, why: str) -> None:
    with origin("A") as a, _proxy([f"*.example.test:{a.port}"],
                                  {"evil.example.test": address}) as (pp, log):
        status, body = _get(pp, f"http://evil.example.test:{a.port}/")
        assert a.requests == []
    assert status == "403", body
    assert why in body, body
    assert log.records()[0]["rule"] == "names may not resolve to internal addresses"


def test_only_a_literal_entry_reaches_an_internal_address_and_only_by_that_address() -> None:
    """A literal entry for the address does not let a name under a wildcard
    borrow it: the address is reached when asked for as such."""
    with origin("A") as a, _proxy([f"*.example.test:{a.port}", f"127.0.0.1:{a.port}"],
                                  {"mirror.example.test": "127.0.0.1"}) as (pp, _):
        by_name = _get(pp, f"http://mirror.example.test:{a.port}/name")
        by_address = _get(pp, f"http://127.0.0.1:{a.port}/address")
        assert [path for _, path, _ in a.requests] == ["/address"]
    assert by_name[0] == "403" and "loopback" in by_name[1], by_name
    assert by_address == ("200", "A /address\n")


def test_a_plain_name_may_resolve_to_a_private_address_but_not_to_loopback() -> None:
    """A name the user wrote out (a mirror on the local network) may be
    private; loopback and the like stay refused for every name."""
    ip = __import__("ipaddress").ip_address
    assert address_refusal(ip("192.168.1.10")) is None
    assert address_refusal(ip("10.0.0.2")) is None
    for addr in ("127.0.0.1", "::1", "169.254.1.1", "0.0.0.0", "224.0.0.1", "240.0.0.1",
                 "::ffff:127.0.0.1", "0.1.2.3"):
        assert address_refusal(ip(addr)) is not None, addr
    for addr in ("192.168.1.10", "10.0.0.2", "100.64.1.1", "fd00::1", "::ffff:10.0.0.1"):
        assert address_refusal(ip(addr), wildcard=True) is not None, addr
    assert address_refusal(ip("151.101.2.132"), wildcard=True) is None


def test_many_distinct_hosts_through_the_proxy_keep_the_log_bounded() -> None:
    hosts = MAX_RECORDS + MAX_NAMES + 500
    request = b"".join(f"GET http://h{i}.example.test/ HTTP/1.1\r\n\r\n".encode()
                       for i in range(hosts))
    with _proxy(["allowed.example.test"], {}) as (pp, log):
        out = exchange(pp, request)
    assert out.count(b"HTTP/1.1 403 ") == hosts
    assert len(log.records()) == MAX_RECORDS
    summary = log.summary()
    assert summary.attempts == summary.denied == hosts
    line = log.denied_summary()
    assert line is not None and line.startswith(f"network: {hosts} attempts denied: ")
    assert f"{hosts - MAX_NAMES} more names past the first {MAX_NAMES}" in line, line


# Opens argv[2] connections to the proxy at argv[1] without a word on them,
# waits until they are accepted (or the guard ends), then holds them until
# its stdin closes.
HOLD = r"""
import resource, select, socket, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (2048, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
port, count = int(sys.argv[1]), int(sys.argv[2])
socks = []
for _ in range(count):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", port))
    socks.append(s)
poller = select.poll()
for s in socks:
    poller.register(s, select.POLLOUT)
pending, guard = len(socks), time.monotonic() + 5
while pending and time.monotonic() < guard:
    pending -= len(poller.poll(100))
print("open", flush=True)
sys.stdin.read()
"""


def test_a_flood_of_connections_leaves_the_proxy_serving() -> None:
    """Each connection the sandbox opens costs nsbuild a thread and a
    descriptor: a flood of them (more than nsbuild may open) must neither
    take nsbuild's descriptors nor stop the proxy for the rest of the run."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        with origin("A") as a, _proxy([f"127.0.0.1:{a.port}"], {}) as (pp, _):
            holder = subprocess.Popen([sys.executable, "-c", HOLD, str(pp), "600"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                assert holder.stdout is not None and holder.stdin is not None
                assert holder.stdout.readline() == "open\n"
                fds = len(os.listdir("/proc/self/fd"))
                holder.stdin.close()
                assert holder.wait(timeout=HANG_GUARD) == 0
            finally:
                holder.kill()
                holder.wait()
            with socket.create_connection(("127.0.0.1", pp), timeout=HANG_GUARD) as s:
                s.sendall(f"GET http://127.0.0.1:{a.port}/after HTTP/1.1\r\n"
                          "Connection: close\r\n\r\n".encode())
                answer = s.makefile("rb").read()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert fds < 200, fds  # nsbuild kept descriptors of its own
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"A /after\n"), answer


# --- root: the nftables engine -------------------------------------------------

UDP_FLOOD = """
import os, socket, sys
open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    try:
        s.sendto(b"x", ("127.0.0.1", int(sys.argv[2])))
    except PermissionError:  # refused on the way out
        pass
"""


@pytest.mark.root
def test_a_packet_flood_under_the_nftables_engine_is_counted_not_logged_one_by_one(
        tmp_path: Path) -> None:
    """Every refused packet was an NFLOG message, a record and a line of the
    log file; now the log takes a bounded rate of them and the rest are
    counted from the table's counters."""
    import argparse

    from nsbuild.net import network, options_from_args

    packets = 50_000
    log = tmp_path / "net.jsonl"
    opts = options_from_args(argparse.Namespace(
        net="allow", allow=["127.0.0.1:9"], egress_engine="nftables", net_log=str(log)))
    with network(opts) as plan:
        assert plan.cgroup is not None
        subprocess.run([sys.executable, "-c", UDP_FLOOD, plan.cgroup, "7", str(packets)],
                       check=True, timeout=HANG_GUARD)
    summary = plan.denied_summary()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    *logged, rest = records
    assert {(r["kind"], r["host"], r["port"]) for r in logged} == {("udp", "127.0.0.1", 7)}
    assert rest["decision"] == "dropped" and rest["count"] == packets - len(logged)
    assert summary is not None and summary.startswith(
        f"network: {packets} attempts denied: 127.0.0.1:7 x{len(logged)}; "
        f"{rest['count']} packets over the log rate were refused"), summary


def test_kept_alive_server_connections_are_bounded_in_all() -> None:
    """Each (address, port) a request went to may keep a few connections for
    later requests; a sandbox that asks for many (a wildcard's names may have
    as many addresses as their DNS likes) must not make nsbuild keep them all."""
    import ipaddress

    from nsbuild.net.upstream import MAX_IDLE, UpstreamPool

    listeners = []
    for _ in range(MAX_IDLE + 40):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)  # the connection completes in the backlog: nobody need accept
        listeners.append(sock)
    pool = UpstreamPool()
    before = len(os.listdir("/proc/self/fd"))
    try:
        for sock in listeners:
            up = pool.connect([ipaddress.ip_address("127.0.0.1")], sock.getsockname()[1])
            pool.put(up)
        kept = len(os.listdir("/proc/self/fd")) - before
    finally:
        pool.close()
        for sock in listeners:
            sock.close()
    assert kept == MAX_IDLE


def test_a_flood_of_refused_requests_is_counted_not_written_one_by_one(tmp_path: Path) -> None:
    """Refused requests cost the sandbox next to nothing; each was a line of
    the network log file. Past a rate, they are counted instead."""
    requests = 20_000
    path = tmp_path / "net.jsonl"
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    log = NetLog(str(path))
    proxy = EgressProxy(listener, Allowlist.parse(["allowed.example.test"]), log,
                        resolver=_resolver({}))
    proxy.start()
    try:
        out = exchange(listener.getsockname()[1],
                       b"GET http://other.example.test/ HTTP/1.1\r\n\r\n" * requests)
    finally:
        proxy.stop()
        log.close()
    assert out.count(b"HTTP/1.1 403 ") == requests
    *written, rest = [json.loads(line) for line in path.read_text().splitlines()]
    assert {(r["host"], r["decision"]) for r in written} == {("other.example.test", "deny")}
    assert rest["decision"] == "dropped" and rest["count"] == requests - len(written) > 0
    assert log.denied_summary() == (
        f"network: {requests} attempts denied: other.example.test:80 x{requests}; "
        f"{rest['count']} refused attempts over the log rate were not logged one by one")


# -- the network log file: a path in a folder the sandbox could write ----------

# One DNS query for the name made of the labels argv[1:] (as bytes, hex),
# waiting for the answer so that nsbuild has seen it.
QUERY = r"""
import socket, struct, sys
labels = [bytes.fromhex(a) for a in sys.argv[1:]]
name = b"".join(bytes([len(p)]) + p for p in labels) + b"\0"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(60)
s.sendto(struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + name + b"\0\1\0\1", ("127.0.0.1", 53))
print(len(s.recv(512)))
"""


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NSBUILD, *argv], cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=HANG_GUARD)


def _query_argv(*labels: bytes) -> list[str]:
    return ["/usr/bin/python3", "-c", QUERY, *(label.hex() for label in labels)]


VICTIM_TEXT = "# the user's shell start-up file\n"


@pytest.mark.userns
@pytest.mark.parametrize(
    ("planted", "kind"),
    [
        ("ln -s victimrc net.jsonl", "symbolic link"),
        ("ln victimrc net.jsonl", "hard link"),
        ("mkfifo net.jsonl", "FIFO"),
    ],
    ids=["symlink", "hardlink", "fifo"],
)
def test_a_network_log_the_sandbox_replaced_is_not_written_through(
        tmp_path: Path, planted: str, kind: str) -> None:
    """The working folder is bound writable: a first run replaces its own
    --net-log file with a link to a file of the user's (or a FIFO); the next
    run with the same command line must not append the names the sandbox
    asks (JSON leaves `$(...)` alone) to that file, nor hang on the FIFO."""
    victim = tmp_path / "victimrc"
    victim.write_text(VICTIM_TEXT)
    log = tmp_path / "net.jsonl"
    first = _run(["run", "--net", "none", "--net-log", str(log), "--",
                  "/bin/sh", "-c", f"rm net.jsonl && {planted}"], tmp_path)
    assert first.returncode == 0, first.stderr
    assert log.is_symlink() or log.stat().st_nlink == 2 or log.is_fifo()

    second = _run(["run", "--net", "none", "--net-log", str(log), "--",
                   *_query_argv(b"$(touch PWNED)", b"example", b"org")], tmp_path)
    assert second.returncode != 0, second.stderr
    assert second.stdout == ""  # refused before anything ran
    [line] = second.stderr.splitlines()
    assert line.startswith(f"nsbuild: --net-log {log}: ") and kind in line, line
    assert victim.read_text() == VICTIM_TEXT
    assert not (tmp_path / "PWNED").exists()


# -- DNS names: a dot inside a label -----------------------------------------------


@pytest.mark.userns
def test_a_dot_inside_a_dns_label_does_not_print_as_another_name(tmp_path: Path) -> None:
    """`evil.example` as one label is not the name evil.example.org: the
    denied line shows the dot escaped, as dig does (and a backslash too)."""
    r = _run(["run", "--net", "none", "--", *_query_argv(b"evil.example", b"org")], tmp_path)
    assert r.returncode == 0 and r.stdout.strip().isdigit(), r.stderr
    assert "denied: evil\\\\.example.org (dns)" in r.stderr, r.stderr
    r = _run(["run", "--net", "none", "--", *_query_argv(b"a\\.b", b"org")], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "denied: a\\\\\\\\\\\\.b.org (dns)" in r.stderr, r.stderr


# -- apt sources of an environment: global addresses only -----------------------


@contextmanager
def _served_plan(mirrors: list[str], trusted: list[str]) -> Iterator[int]:
    """The real `--net allow --allow-from-env` plan of the network layer for
    these mirrors, its proxy serving a socket of ours; yields the port."""
    import argparse

    from nsbuild.net import network, options_from_args

    opts = options_from_args(argparse.Namespace(net="allow", allow=[], allow_from_env=True))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    with network(opts, mirrors=mirrors, trusted_mirrors=trusted) as plan:
        plan.serve([tcp, udp])
        yield tcp.getsockname()[1]


def test_an_apt_source_of_the_environment_does_not_reach_host_loopback() -> None:
    """A base's sources.list may hold what code in a sandbox wrote (`env
    update` packs it): `deb http://127.0.0.1:PORT/` there must not let the
    sandbox reach a service of the host. The same URL as the environment's
    Mirror: (the user's own config) does."""
    with origin("A") as a:
        url = f"http://127.0.0.1:{a.port}/debian"
        with _served_plan([url], []) as pp:
            status, body = _get(pp, f"http://127.0.0.1:{a.port}/dists/bookworm/InRelease")
        assert a.requests == []
        assert status == "403", body
        assert "loopback" in body and "apt sources" in body, body
        with _served_plan([url], [url]) as pp:
            assert _get(pp, f"http://127.0.0.1:{a.port}/ok") == ("200", "A /ok\n")


@pytest.mark.parametrize(
    ("address", "why"),
    [("127.0.0.1", "loopback"), ("169.254.169.254", "link-local"),
     ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast")],
)
def test_a_name_in_the_apt_sources_may_not_resolve_to_a_host_local_address(
        address: str, why: str) -> None:
    """Never the host itself or its link (a mirror on the local network, at
    a private address, stays usable: tests/net/test_allowlist.py)."""
    from nsbuild.net.allowlist import rule_from_url

    with origin("A") as a:
        url = f"http://mirror.example.test:{a.port}/debian"
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        proxy = EgressProxy(listener, Allowlist((rule_from_url(url, trusted=False),)),
                            NetLog(), resolver=_resolver({"mirror.example.test": address}))
        proxy.start()
        try:
            status, body = _get(listener.getsockname()[1], url + "/x")
        finally:
            proxy.stop()
        assert a.requests == []
    assert status == "403" and why in body, body
