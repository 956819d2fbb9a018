"""The nftables engine. Pure tests of the generated ruleset and cgroup discovery;
as root: a process in the run's cgroup reaches 127.0.0.1:A but not B, one outside
is unaffected, and nothing is left behind (also after SIGKILL of nsbuild + gc)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from net_helpers import origin
from waiting import HANG_GUARD, wait_for

from nsbuild.net import network, options_from_args
from nsbuild.net.nftables import Destination, ruleset
from nsbuild.net.nftables_engine import gc, nft_cgroup_path
from nsbuild.net.options import NetOptions
from nsbuild.sandbox.cgroupfs import cgroup2_mount


def test_ruleset_names_the_cgroup_the_allowed_destinations_and_rejects_the_rest() -> None:
    text = ruleset(
        "nsbuild_42_0",
        "unified/nsbuild-net.42.0",
        [
            Destination(ipaddress.ip_address("127.0.0.1"), 8080, "127.0.0.1:8080"),
            Destination(ipaddress.ip_address("2001:db8::1"), 443, "mirror:443"),
        ],
        3200,
    )
    assert text.startswith("table inet nsbuild_42_0 {")
    assert 'socket cgroupv2 level 1 "unified/nsbuild-net.42.0" jump sandbox' in text
    assert "ip daddr 127.0.0.1 tcp dport 8080 counter accept" in text
    assert "ip6 daddr 2001:db8::1 tcp dport 443 counter accept" in text
    assert 'limit rate 100/second burst 200 packets log prefix "nsbuild_42_0 " group 3200\n' in text
    assert 'counter reject comment "refused"' in text


def test_cgroup2_mount_comes_from_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "41 31 0:38 / /sys/fs/cgroup/un\\040ified rw,relatime - cgroup2 cgroup2 rw\n"
    )
    assert cgroup2_mount(str(info)) == "/sys/fs/cgroup/un ified"
    info.write_text("31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw\n")
    assert cgroup2_mount(str(info)) is None


def test_nft_cgroup_path_is_relative_to_what_nft_prepends() -> None:
    assert nft_cgroup_path("/sys/fs/cgroup/unified/nsbuild-net.1.0") == "unified/nsbuild-net.1.0"
    assert nft_cgroup_path("/sys/fs/cgroup/nsbuild-net.1.0") == "nsbuild-net.1.0"
    assert nft_cgroup_path("/mnt/cg2/x") == "../../../mnt/cg2/x"


# --- root -------------------------------------------------------------------


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A working directory the sandbox can bind: as root, nsbuild maps the sandbox
    onto a subordinate range, which cannot enter pytest's 0700 tmp_path."""
    path = Path(tempfile.mkdtemp(prefix="nsbuild-net-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def nsbuild_tables() -> list[str]:
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    return [line.split()[-1] for line in out.splitlines() if "nsbuild_" in line]


def nsbuild_cgroups() -> list[str]:
    mount = cgroup2_mount()
    assert mount is not None
    return [name for name in os.listdir(mount) if name.startswith("nsbuild-net.")]


CONNECT = """
import socket, sys
for port in sys.argv[2:]:
    try:
        socket.create_connection(("127.0.0.1", int(port)), timeout=30).close()
        print(port, "connected")
    except OSError as e:
        print(port, type(e).__name__)
"""


def connect_from(cgroup: str | None, *ports: int) -> list[str]:
    """Connect from a new host process, first moved into `cgroup` if given."""
    code = CONNECT
    if cgroup:
        code = (
            f"open({cgroup + '/cgroup.procs'!r}, 'w').write(str(__import__('os').getpid()))\n"
            + code
        )
    r = subprocess.run(
        [sys.executable, "-c", code, "x", *map(str, ports)],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


@pytest.mark.root
def test_cgroup_reaches_only_the_allowlist_and_others_are_unaffected(tmp_path: Path) -> None:
    log = tmp_path / "net.jsonl"
    with origin("A") as a, origin("B") as b:
        opts: NetOptions = options_from_args(
            _args(
                net="allow",
                allow=[f"127.0.0.1:{a.port}"],
                egress_engine="nftables",
                net_log=str(log),
            )
        )
        with network(opts) as plan:
            assert plan.share_net and plan.cgroup is not None
            inside = connect_from(plan.cgroup, a.port, b.port)
            outside = connect_from(None, a.port, b.port)
            summary_during = plan.denied_summary
        assert inside == [f"{a.port} connected", f"{b.port} ConnectionRefusedError"]
        assert outside == [f"{a.port} connected", f"{b.port} connected"]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    denied = [(r["host"], r["port"]) for r in records if r["decision"] == "deny"]
    assert denied == [("127.0.0.1", b.port)]
    assert any(r["decision"] == "allow" and r["port"] == a.port for r in records)
    assert summary_during() == f"network: 1 attempt denied: 127.0.0.1:{b.port}"
    assert nsbuild_tables() == [] and nsbuild_cgroups() == []


@pytest.mark.root
def test_nsbuild_run_with_nftables_engine(open_dir: Path) -> None:
    with origin("A") as a, origin("B") as b:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "nsbuild",
                "run",
                "--allow",
                f"127.0.0.1:{a.port}",
                "--egress-engine",
                "nftables",
                "--",
                "sh",
                "-c",
                f"curl -sS http://127.0.0.1:{a.port}/in; curl -sS http://127.0.0.1:{b.port}/in",
            ],
            cwd=open_dir,
            capture_output=True,
            text=True,
            timeout=HANG_GUARD,
            stdin=subprocess.DEVNULL,
        )
        assert b.requests == []
    assert "A /in" in r.stdout
    assert r.returncode == 7  # curl: could not connect
    assert f"nsbuild: network: 1 attempt denied: 127.0.0.1:{b.port}" in r.stderr
    assert nsbuild_tables() == [] and nsbuild_cgroups() == []


@pytest.mark.root
def test_sigkill_of_nsbuild_then_gc_leaves_nothing(open_dir: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nsbuild",
            "run",
            "--allow",
            "127.0.0.1:9",
            "--egress-engine",
            "nftables",
            "--",
            "sleep",
            "600",
        ],
        cwd=open_dir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    mine = f"nsbuild_{proc.pid}_"

    def table_made() -> bool:
        assert proc.poll() is None, "the run ended"
        return any(t.startswith(mine) for t in nsbuild_tables())

    wait_for(table_made, "the run's nftables table")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(t.startswith(mine) for t in nsbuild_tables())  # left behind by the crash
    # What a user runs after a crash: `nsbuild gc` (not only the net layer's gc()).
    r = subprocess.run([sys.executable, "-m", "nsbuild", "gc"], cwd=open_dir,
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"removed nftables table inet {mine}" in r.stdout
    assert nsbuild_tables() == [] and nsbuild_cgroups() == []


def _args(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**kw)


def test_gc_as_non_root_or_with_nothing_left_is_quiet() -> None:
    assert gc() == [] or os.geteuid() == 0
