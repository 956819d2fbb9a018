"""`nsbuild run --net ...` as a user runs it: what a process inside can and cannot
reach, what it is told, and what the network log says. Every server is the test's
own, on the host's 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from net_helpers import origin

pytestmark = pytest.mark.userns

NSBUILD = (sys.executable, "-m", "nsbuild")


def nsbuild_run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NSBUILD, "run", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )


def log_records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


CURL = "curl -sS -w ' %{http_code}\\n' "


def test_allow_reaches_the_allowed_server_only(tmp_path: Path) -> None:
    log = tmp_path / "net.jsonl"
    with origin("A") as a, origin("B") as b:
        r = nsbuild_run(
            "--allow",
            f"127.0.0.1:{a.port}",
            "--net-log",
            str(log),
            "--",
            "sh",
            "-c",
            f"{CURL} http://127.0.0.1:{a.port}/ok; {CURL} http://127.0.0.1:{b.port}/no",
            cwd=tmp_path,
        )
    assert r.returncode == 0, r.stderr
    assert "A /ok\n 200" in r.stdout
    assert f"127.0.0.1:{b.port} is not in the allowlist" in r.stdout and " 403" in r.stdout
    assert b.requests == []
    records = log_records(log)
    assert [(x["port"], x["decision"]) for x in records] == [(a.port, "allow"), (b.port, "deny")]
    assert f"nsbuild: network: 1 attempt denied: 127.0.0.1:{b.port}" in r.stderr


def test_connect_to_a_port_not_allowed_is_refused(tmp_path: Path) -> None:
    with origin("A") as a, origin("B") as b:
        r = nsbuild_run(
            "--allow",
            f"127.0.0.1:{a.port}",
            "--",
            "sh",
            "-c",
            f"curl -sS -p http://127.0.0.1:{a.port}/t && curl -sS -p http://127.0.0.1:{b.port}/t",
            cwd=tmp_path,
        )
    assert "A /t" in r.stdout
    assert r.returncode == 56  # curl: CONNECT answered 403
    assert "403" in r.stderr
    assert b.requests == []


PROBE = r"""
import socket, sys
tcp_port, udp_port = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket()
try:
    s.connect(("127.0.0.1", tcp_port)); print("tcp connected")
except OSError as e:
    print("tcp", type(e).__name__)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(b"hello from inside", ("127.0.0.1", udp_port))
try:
    socket.getaddrinfo("leak-probe.example", 80); print("dns resolved")
except socket.gaierror as e:
    print("dns", e.errno == socket.EAI_NONAME)
"""


@pytest.mark.parametrize("mode", [["--net", "none"], ["--allow", "127.0.0.1:{tcp}"]])
def test_raw_tcp_udp_and_dns_go_nowhere(tmp_path: Path, mode: list[str]) -> None:
    log = tmp_path / "net.jsonl"
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.5)
    with origin("A") as a:
        args = [m.format(tcp=a.port) for m in mode]
        r = nsbuild_run(
            *args,
            "--net-log",
            str(log),
            "--",
            "/usr/bin/python3",
            "-c",
            PROBE,
            str(a.port),
            str(udp.getsockname()[1]),
            cwd=tmp_path,
        )
        assert a.requests == []
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["tcp ConnectionRefusedError", "dns True"]
    with pytest.raises(TimeoutError):
        udp.recv(100)
    names = {x["host"] for x in log_records(log) if x["kind"] == "dns"}
    assert names == {"leak-probe.example"}
    assert "leak-probe.example (dns)" in r.stderr


def test_none_mode_logs_the_names_a_command_tried(tmp_path: Path) -> None:
    log = tmp_path / "net.jsonl"
    r = nsbuild_run(
        "--net-log",
        str(log),
        "--",
        "sh",
        "-c",
        "curl -sS http://deb.debian.org/debian/ ; getent hosts ftp.example.org",
        cwd=tmp_path,
    )
    assert r.returncode == 2  # getent: not found
    assert "Could not resolve host: deb.debian.org" in r.stderr
    names = [x["host"] for x in log_records(log)]
    assert "deb.debian.org" in names and "ftp.example.org" in names
    assert all(x["decision"] == "nxdomain" for x in log_records(log))
    assert r.stderr.splitlines()[-1].startswith("nsbuild: network: ")


def test_quiet_run_prints_no_summary(tmp_path: Path) -> None:
    r = nsbuild_run("--", "true", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--net", "allow"], "nothing is allowed"),
        (["--allow", "*.org"], "two labels"),
        (["--allow", "a.org", "--egress-engine", "nftables"], "needs root"),
    ],
)
def test_bad_input_is_one_line_before_anything_runs(
    tmp_path: Path, args: list[str], message: str
) -> None:
    marker = tmp_path / "ran"
    r = nsbuild_run(*args, "--", "touch", str(marker), cwd=tmp_path)
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and message in r.stderr
    assert not marker.exists()
