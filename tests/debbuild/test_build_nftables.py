"""`nsbuild build --egress-engine nftables`: the dependency phase's network
through the kernel firewall of the run's own cgroup (root), the mirror
reachable and nothing else; no table or cgroup left after the build, even
a failed one. As an unprivileged user the option is one line, exit 2."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from inputs import bookworm_config

from .conftest import Env, make_package

# What the probe package's postinst says of each attempt (it runs as root in
# the dependency phase, with that phase's network).
POSTINST = """#!/bin/bash
try() {{ if exec 3<>"/dev/tcp/$2/$3"; then echo "$1-REACHED"; else echo "$1-REFUSED"; fi; }}
try NSB-PROBE {addr} {port}
try NSB-MIRROR deb.debian.org 80
exit {status}
"""


@pytest.fixture
def root_home() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("the nftables engine is root's (marker root)")
    # Not pytest's tmp_path: for root that is below a 0700 folder, which the
    # subordinate ids cannot walk.
    top = Path(tempfile.mkdtemp(prefix="nsbuild-nft-build-", dir="/var/tmp"))
    top.chmod(0o755)
    bookworm_config(top / "config")
    yield top
    subprocess.run([sys.executable, "-m", "nsbuild", "gc"], env=_env(top), capture_output=True)
    from nsbuild.envs.remove import remove_tree

    remove_tree(top)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A server outside the allowlist: another loopback address, a port the
    kernel chose."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.2", 0))
        sock.listen(8)
        sock.setblocking(False)
        yield sock


def _env(top: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["XDG_CONFIG_HOME"] = str(top / "config")
    env["XDG_CACHE_HOME"] = str(top / "cache")
    return env


def _probe_deb(parent: Path, addr: str, port: int, status: int = 0) -> Path:
    root = parent / "nsb-nft-probe"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: nsb-nft-probe\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: nsbuild tests <tests@nsbuild.invalid>\nDescription: tries the network\n"
    )
    (root / "DEBIAN" / "postinst").write_text(POSTINST.format(addr=addr, port=port,
                                                              status=status))  # fmt: skip
    (root / "DEBIAN" / "postinst").chmod(0o755)
    deb = parent / "nsb-nft-probe_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)],
                   check=True, capture_output=True)  # fmt: skip
    deb.chmod(0o644)
    return deb


def _sources(top: Path, name: str, **kw: str) -> Path:
    tree = make_package(top / "src", name, **kw)
    for path in (top / "src", *(top / "src").rglob("*")):
        path.chmod(0o755 if path.is_dir() or path.name == "rules" else 0o644)
    return tree


def _build(top: Path, tree: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """`nsbuild build --egress-engine nftables` as root; its outcome and its pid
    (the owner the names of its tables and cgroups carry)."""
    argv = [sys.executable, "-m", "nsbuild", "build", "--env", "bookworm", "--debug",
            "--egress-engine", "nftables", "--out", str(top / f"out-{tree.name}"), *extra,
            str(tree)]  # fmt: skip
    proc = subprocess.Popen(argv, env=_env(top), cwd="/", stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    out, err = proc.communicate()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err), proc.pid


def _tables_applied(stderr: str) -> set[str]:
    """The tables the build's --debug output says it loaded."""
    return set(re.findall(r"^table inet (nsbuild_\d+_\d+) \{$", stderr, re.M))


def _left_behind(pid: int) -> list[str]:
    """nftables tables and cgroups of the build's process still there."""
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    left = [t for t in re.findall(r"^table inet (nsbuild_\d+_\d+)$", tables, re.M)
            if t.split("_")[1] == str(pid)]  # fmt: skip
    from nsbuild.sandbox.cgroupfs import cgroup2_mount

    mount = cgroup2_mount()
    if mount is not None:
        left += [e.name for e in os.scandir(mount) if e.name.startswith(f"nsbuild-net.{pid}.")]
    return left


def _refused(listener: socket.socket) -> None:
    """The listener's backlog is empty: no connection ever reached it."""
    with pytest.raises(BlockingIOError):
        listener.accept()[0].close()


@pytest.mark.root
@pytest.mark.slow
def test_the_dependency_phase_reaches_the_mirror_and_nothing_else(
    root_home: Path, listener: socket.socket
) -> None:
    addr, port = listener.getsockname()
    probe = _probe_deb(root_home, addr, port)
    # bc is downloaded from the mirror in the dependency phase, through the table.
    tree = _sources(root_home, "nsb-nft", build_depends="bc, nsb-nft-probe")
    done, pid = _build(root_home, tree, "--json", "--extra-package", str(probe))
    assert done.returncode == 0, done.stderr[-3000:]
    log = (root_home / f"out-{tree.name}" / "nsb-nft_1.0_amd64.build").read_text()
    assert "egress engine nftables" in log
    assert "Unpacking bc " in log
    assert "NSB-MIRROR-REACHED" in log and "NSB-PROBE-REFUSED" in log, log[-3000:]
    _refused(listener)
    # The refusal is named in the summary and in the network log, by the engine.
    summary = json.loads(done.stdout)
    denied = {(r["host"], r["port"]) for r in summary["network"]["denied"]}
    assert (addr, port) in denied, summary["network"]
    assert f"{addr}:{port}" in done.stderr
    records = [json.loads(line) for line in
               Path(summary["network_log"]).read_text().splitlines()]  # fmt: skip
    assert {r["engine"] for r in records} == {"nftables"}
    allowed = [r for r in records if r["decision"] == "allow"]
    assert allowed and all(r["rule"].startswith("deb.debian.org") for r in allowed), allowed
    assert sum(r["bytes_in"] for r in allowed) > 0
    # A table of its own for each run with network, each gone with its cgroup.
    assert _tables_applied(done.stderr)
    assert _left_behind(pid) == []


@pytest.mark.root
@pytest.mark.slow
def test_a_failed_dependency_phase_leaves_no_table(
    root_home: Path, listener: socket.socket
) -> None:
    addr, port = listener.getsockname()
    # The postinst fails while its run's table is loaded.
    probe = _probe_deb(root_home, addr, port, status=1)
    tree = _sources(root_home, "nsb-nft-fails", build_depends="nsb-nft-probe")
    done, pid = _build(root_home, tree, "--extra-package", str(probe))
    assert done.returncode not in (0, 2), done.stderr[-3000:]
    (kept,) = re.findall(r"^nsbuild build: log: (.*)$", done.stderr, re.M)
    assert "NSB-PROBE-REFUSED" in Path(kept).read_text()
    _refused(listener)
    assert _tables_applied(done.stderr)
    assert _left_behind(pid) == []


@pytest.mark.root
@pytest.mark.slow
def test_a_failed_build_leaves_no_table(root_home: Path) -> None:
    tree = _sources(root_home, "nsb-nft-false", build="false", build_depends="bc")
    done, pid = _build(root_home, tree)
    assert done.returncode == 1, done.stderr[-3000:]
    assert _tables_applied(done.stderr)
    assert _left_behind(pid) == []


def test_an_unprivileged_user_is_told_to_use_the_proxy(bookworm: Env, tmp_path: Path) -> None:
    tree = make_package(tmp_path, "nsb-nft-user")
    done = bookworm.nsbuild("build", "--env", "bookworm", "--egress-engine", "nftables",
                            "--out", str(tmp_path / "out"), str(tree))  # fmt: skip
    assert done.returncode == 2, done.stderr
    # Said before anything of the build is: the whole of stderr.
    assert done.stderr == (
        "nsbuild build: --egress-engine nftables needs root; use --egress-engine proxy\n")
    assert not (tmp_path / "out").exists()
