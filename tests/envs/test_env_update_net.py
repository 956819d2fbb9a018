"""`nsbuild env update`: the upgrade's maintainer scripts get a build's
dependency-phase network (the environment's mirrors, through the egress
proxy), never the host's: no host loopback, no abstract sockets, no host
interfaces, and every attempt in a network log.

The environment is the CI tarball with one file added: an `apt-get` earlier
on PATH that probes the network the way a hostile postinst would, then
stands in for the upgrade (so the test needs no mirror).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from envs_helpers import chroot_d, nsbuild
from inputs import tarball

pytestmark = [pytest.mark.slow, pytest.mark.userns]


PROBE = r"""#!/usr/bin/perl
# Stands in for apt-get in the upgrade: reaches for what a postinst could.
use Socket;
exit 0 unless ($ARGV[0] // '') eq 'update';
$| = 1;
socket(my $t, PF_INET, SOCK_STREAM, 0) or die "socket: $!";
print "probe tcp: ", (connect($t, pack_sockaddr_in(@PORT@, inet_aton('127.0.0.1')))
                      ? 'reached' : "refused ($!)"), "\n";
socket(my $u, PF_UNIX, SOCK_STREAM, 0) or die "socket: $!";
print "probe abstract: ", (connect($u, pack_sockaddr_un("\0@ABSTRACT@"))
                           ? 'reached' : "refused ($!)"), "\n";
opendir(my $d, '/sys/class/net') or die "sys: $!";
print "probe interfaces: ", join(',', sort grep { !/^\./ } readdir($d)), "\n";
# Through the proxy apt is given: a host that is not a mirror.
my ($host, $port) = ($ENV{http_proxy} // '') =~ m{//([^:/]+):(\d+)}
    or do { print "probe proxy: none\n"; exit 0 };
socket(my $p, PF_INET, SOCK_STREAM, 0) or die "socket: $!";
connect($p, pack_sockaddr_in($port, inet_aton($host))) or die "proxy: $!";
syswrite($p, "GET http://example.org/ HTTP/1.1\r\nHost: example.org\r\nConnection: close\r\n\r\n");
my $status = <$p>;
print "probe proxy: $status";
"""


class Listener:
    """A host service the sandbox must not reach: counts who connected."""

    def __init__(self, family: int, address: object) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind(address)
        self.sock.listen(8)
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def home(tmp_path: Path) -> Iterator[dict[str, str]]:
    if os.geteuid() == 0:
        pytest.skip("environment tests run as the unprivileged test user")
    env = dict(os.environ)
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    yield env
    nsbuild("gc", check=False, env=env)
    from nsbuild.envs.remove import remove_tree

    remove_tree(tmp_path / "cache")


def _tarball_with_probe(tmp_path: Path, probe: str) -> Path:
    """A copy of the CI tarball (update replaces its tarball) with the probe as
    /usr/local/sbin/apt-get, ahead of /usr/bin on the environment's PATH."""
    copy = tmp_path / "bookworm-probe.tar"
    shutil.copyfile(tarball(), copy)
    script = tmp_path / "apt-get"
    script.write_text(probe)
    with tarfile.open(copy, "a") as tar:
        info = tar.gettarinfo(script, arcname="./usr/local/sbin/apt-get")
        info.mode, info.uid, info.gid, info.uname, info.gname = 0o755, 0, 0, "root", "root"
        with script.open("rb") as f:
            tar.addfile(info, f)
    return copy


def test_update_reaches_no_host_service(home: dict[str, str], tmp_path: Path) -> None:
    tcp = Listener(socket.AF_INET, ("127.0.0.1", 0))
    abstract_name = f"nsbuild-update-test-{os.getpid()}"
    abstract = Listener(socket.AF_UNIX, "\0" + abstract_name)
    try:
        probe = PROBE.replace("@PORT@", str(tcp.sock.getsockname()[1]))
        image = _tarball_with_probe(tmp_path, probe.replace("@ABSTRACT@", abstract_name))
        (chroot_d(tmp_path) / "probe").write_text(
            f"Name: probe\nType: tarball\nPath: {image}\nSuite: bookworm\n"
            "Architecture: amd64\nMirror: http://deb.debian.org/debian\n"
        )
        result = nsbuild("env", "update", "probe", check=False, env=home, timeout=900)
    finally:
        tcp.close()
        abstract.close()

    out = result.stdout + result.stderr
    assert tcp.accepted == 0 and abstract.accepted == 0, out
    assert "probe tcp: refused" in out
    assert "probe abstract: refused" in out
    assert "probe interfaces: lo\n" in out
    assert "probe proxy: HTTP/1.1 403" in out
    assert result.returncode == 0, out
    # The attempt is in the network log the update names, and said in one line.
    log = tmp_path / "cache" / "nsbuild" / "logs" / "probe.update.network.jsonl"
    assert f"network log: {log}" in result.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(r["host"] == "example.org" and r["decision"] == "deny" for r in records), records
    assert "example.org:80" in result.stderr
