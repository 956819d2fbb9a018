"""autopkgtest-virt-nsbuild shares the environment's apt caches between testbeds.

What a client sees, with the real apt and Debian's archive: a later testbed
finds the package lists and the .debs an earlier one downloaded (apt says
"Need to get 0 B" and fetches no index again), yet every testbed starts
pristine; what code in a testbed forges in apt's folders (an index, a
signature, a .deb) never reaches the cache or a later testbed; two testbeds
open at once on the same cache both feed it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import select
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from virt_helpers import Env

from nsbuild.backends.virtproto import VirtServer
from nsbuild.envs.remove import remove_tree

pytestmark = pytest.mark.userns

# Small packages with no dependencies beyond what the buildd tarball holds.
FIRST, SECOND = "m4", "ed"
MAIN_PACKAGES = "/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages"
MAIN_RELEASE = "/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease"
APT = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-o", "APT::Install-Recommends=false"]


@pytest.fixture
def cache(server_env: Env) -> Iterator[Path]:
    """The environment's apt cache, emptied: each test starts cold."""
    path = server_env.cache / "nsbuild" / "apt" / "bookworm"
    remove_tree(path)
    yield path


def _server() -> VirtServer:
    return VirtServer(["autopkgtest-virt-nsbuild", "--net", "allow", "bookworm"])


def _exec(cmd: list[str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, *argv], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)  # fmt: skip


def _ok(cmd: list[str], *argv: str) -> str:
    done = _exec(cmd, *argv)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _downloads(apt_output: str) -> list[str]:
    """What apt fetched: its `Get:N URL ...` lines."""
    return [ln for ln in apt_output.splitlines() if re.match(r"Get:\d+ ", ln)]


def test_a_later_testbed_downloads_nothing_again_and_starts_pristine(cache: Path) -> None:
    srv = _server()
    try:
        srv.open()
        ex = srv.execute_command()
        cold = _ok(ex, *APT, "update")
        assert any("Packages" in ln for ln in _downloads(cold))
        got = _ok(ex, *APT, "install", "-y", FIRST)
        assert any(f" {FIRST} " in ln for ln in _downloads(got))

        srv.revert()
        ex = srv.execute_command()
        # Pristine: the package is not installed in the new testbed...
        assert _exec(ex, "dpkg", "-s", FIRST).returncode != 0
        # ...but apt's lists are there, and an update fetches no index again.
        assert _ok(ex, "apt-cache", "policy", FIRST).count("Candidate: (none)") == 0
        warm = _ok(ex, *APT, "update")
        assert not [ln for ln in _downloads(warm) if "Packages" in ln or "Translation" in ln]
        again = _ok(ex, *APT, "install", "-y", FIRST)
        assert _downloads(again) == [], again
        assert re.search(r"Need to get 0 B/", again), again
        assert _exec(ex, "dpkg", "-s", FIRST).returncode == 0
        srv.close()
    finally:
        srv.stop()
    assert list((cache / "apt-archives").glob(f"{FIRST}_*.deb"))


def test_what_a_testbed_forges_never_reaches_the_cache(cache: Path) -> None:
    srv = _server()
    try:
        srv.open()
        ex = srv.execute_command()
        _ok(ex, *APT, "update")
        _ok(ex, *APT, "install", "-y", "--download-only", FIRST)
        srv.revert()  # the real lists and .deb are taken into the cache
        ex = srv.execute_command()
        debs = list((cache / "apt-archives").glob(f"{FIRST}_*.deb"))
        assert len(debs) == 1
        good_deb = hashlib.sha256(debs[0].read_bytes()).hexdigest()
        packages = cache / "apt-lists" / Path(MAIN_PACKAGES).name
        good_packages = hashlib.sha256(packages.read_bytes()).hexdigest()

        # Root in the testbed forges: an index with a made-up version (same
        # size), an InRelease without a good signature, a .deb no index
        # knows, and the cached .deb overwritten in place (same size).
        forge = (
            f"sed -i 's/^Version: 1.4.19-3$/Version: 9.4.19-3/' {MAIN_PACKAGES} && "
            f"grep -q '^Version: 9.4.19-3$' {MAIN_PACKAGES} && "
            f"sed -i 's/^Date: .*/Date: Fri, 01 Jan 2100 00:00:00 UTC/' {MAIN_RELEASE} && "
            "echo not-a-deb > /var/cache/apt/archives/hello_9.9-9_amd64.deb && "
            f"f=$(ls /var/cache/apt/archives/{FIRST}_*.deb) && "
            'printf XXXXXXXX | dd of="$f" bs=1 seek=5000 conv=notrunc status=none'
        )
        _ok(ex, "sh", "-c", forge)
        srv.revert()

        ex = srv.execute_command()
        assert "9.4.19-3" not in _ok(ex, "apt-cache", "policy", FIRST)
        assert "2100" not in _ok(ex, "grep", "^Date:", MAIN_RELEASE)
        assert _exec(ex, "ls", "/var/cache/apt/archives/hello_9.9-9_amd64.deb").returncode != 0
        # The cached .deb is the archive's own: it installs.
        _ok(ex, *APT, "install", "-y", FIRST)
        srv.close()
    finally:
        srv.stop()
    assert not list((cache / "apt-archives").glob("hello_*"))
    assert hashlib.sha256(debs[0].read_bytes()).hexdigest() == good_deb
    assert hashlib.sha256(packages.read_bytes()).hexdigest() == good_packages


def test_another_suites_release_or_text_around_one_never_replaces_an_archives_own(
    cache: Path,
) -> None:
    # Genuine files, signed by the environment's own key: only their names
    # or their framing are forged.
    updates_release = MAIN_RELEASE.replace("_bookworm_", "_bookworm-updates_")
    updates_packages = MAIN_PACKAGES.replace("_bookworm_", "_bookworm-updates_")
    srv = _server()
    try:
        srv.open()
        _ok(srv.execute_command(), *APT, "update")
        srv.revert()  # the real lists are taken into the cache

        # bookworm-updates' newer release and index under bookworm's names:
        # bookworm's own packages would vanish from every later testbed.
        _ok(srv.execute_command(), "sh", "-c",
            f"cp {updates_release} {MAIN_RELEASE} && cp {updates_packages} {MAIN_PACKAGES}")
        srv.revert()
        ex = srv.execute_command()
        assert "Codename: bookworm\n" in _ok(ex, "cat", MAIN_RELEASE)
        assert "Candidate: (none)" not in _ok(ex, "apt-cache", "policy", FIRST)

        # bookworm's own release with text after its signature: gpgv ignores
        # it, apt refuses every list after it.
        _ok(ex, "sh", "-c", f"echo trailing >> {MAIN_RELEASE}")
        srv.revert()
        _ok(srv.execute_command(), *APT, "update")
        srv.close()
    finally:
        srv.stop()
    kept = (cache / "apt-lists" / Path(MAIN_RELEASE).name).read_text()
    assert kept.endswith("-----END PGP SIGNATURE-----\n") and "\nCodename: bookworm\n" in kept


def test_a_testbed_that_waits_for_the_cache_lock_says_so(cache: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    lock = os.open(cache / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a build's apt run holds it
    server = subprocess.Popen(["autopkgtest-virt-nsbuild", "--net", "allow", "bookworm"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert server.stdin and server.stdout and server.stderr
    try:
        assert server.stdout.readline() == "ok\n"
        server.stdin.write("open\n")
        server.stdin.flush()
        said = ""
        while "waiting for its lock" not in said:
            ready, _, _ = select.select([server.stderr], [], [], 120)
            assert ready, f"no word of the wait; the server said: {said!r}"
            line = server.stderr.readline()
            assert line, f"the server ended; it said: {said!r}"
            said += line
        fcntl.flock(lock, fcntl.LOCK_UN)
        assert server.stdout.readline().startswith("ok ")  # the testbed opened
        server.stdin.write("close\nquit\n")
        server.stdin.flush()
        assert server.wait(timeout=120) == 0
    finally:
        os.close(lock)
        server.kill()
        server.wait()


def test_testbeds_open_at_once_both_feed_the_cache(cache: Path) -> None:
    servers = [_server(), _server()]
    errors: list[BaseException] = []

    def use(srv: VirtServer, package: str) -> None:
        try:
            srv.open()
            ex = srv.execute_command()
            _ok(ex, *APT, "update")
            _ok(ex, *APT, "install", "-y", "--download-only", package)
            srv.close()
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    try:
        threads = [threading.Thread(target=use, args=(srv, pkg))
                   for srv, pkg in zip(servers, (FIRST, SECOND), strict=True)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
    finally:
        for srv in servers:
            srv.stop()
    for package in (FIRST, SECOND):
        assert list((cache / "apt-archives").glob(f"{package}_*.deb")), package

    third = _server()
    try:
        third.open()
        ex = third.execute_command()
        got = _ok(ex, *APT, "install", "-y", "--download-only", FIRST, SECOND)
        assert _downloads(got) == [], got
        third.close()
    finally:
        third.stop()


def test_the_environments_own_lists_stay_below_the_cached_ones(tmp_path: Path) -> None:
    """An environment that ships package lists keeps them: the cache's
    overlay on apt's folders has the layers' own folders below the snapshot."""
    from nsbuild.sandbox import Overlay
    from nsbuild.virtserver.aptcache import AptCache

    with_lists, without = tmp_path / "top", tmp_path / "base"
    (with_lists / "var/lib/apt/lists").mkdir(parents=True)
    without.mkdir()
    mounts = AptCache("bookworm", tmp_path / "session").mounts([str(with_lists), str(without)])
    lists = [m for m in mounts if isinstance(m, Overlay) and m.dst == "/var/lib/apt/lists"]
    assert len(lists) == 1
    assert lists[0].lowers == (
        str(tmp_path / "session/apt/apt-lists/lower"),
        str(with_lists / "var/lib/apt/lists"),
    )


# -- how the cache reads apt's files (aptformats.py), on text made here --

_SUM_A, _SUM_B = "a" * 64, "b" * 64
_RELEASE = f"""Origin: Debian
Label: Debian
Suite: stable
Codename: bookworm
Date: Sat, 10 Jun 2023 08:56:43 UTC
SHA256:
 {_SUM_A} 12 main/binary-amd64/Packages
 {_SUM_A} 13 main/twice
 {_SUM_B} 13 main/twice
 {_SUM_B} 14 main/same-twice
 {_SUM_B} 14 main/same-twice
 {_SUM_B} x main/bad-size
 nothex 15 main/bad-sum
 {_SUM_B} 17 main/a trailing-word
\t{_SUM_B} 16 main/tab
"""


def test_a_release_lists_a_file_twice_with_other_sums_vouches_for_neither() -> None:
    from nsbuild.virtserver.aptformats import parse_release, sha256_entries

    assert sha256_entries(parse_release(_RELEASE)) == {
        "main/binary-amd64/Packages": (12, _SUM_A),
        "main/same-twice": (14, _SUM_B),
        "main/tab": (16, _SUM_B),
    }
    # Only the first paragraph counts, as for apt; a one-line SHA256 is none.
    later = parse_release(f"Codename: x\n\nSHA256:\n {_SUM_A} 1 f\n")
    assert sha256_entries(later) == {}
    assert sha256_entries(parse_release(f"SHA256: {_SUM_A} 1 f\n")) == {}


def test_a_release_field_folded_over_lines_counts_as_missing() -> None:
    from nsbuild.virtserver.aptformats import date, identity, names_its_suite, parse_release

    name = "deb.debian.org_debian_dists_bookworm_InRelease"
    assert names_its_suite(name, parse_release(_RELEASE))
    assert identity(parse_release(_RELEASE)) == ("Debian", "Debian", "bookworm")
    assert date(parse_release(_RELEASE)) == 1686387403
    folded = _RELEASE.replace("Suite: stable\nCodename: bookworm", "Codename:\n bookworm")
    assert not names_its_suite(name, parse_release(folded))
    assert identity(parse_release(folded)) == ("Debian", "Debian", "")
    split = _RELEASE.replace("Codename: bookworm", "Codename: book\n worm")
    assert not names_its_suite(name, parse_release(split))
    assert date(parse_release(_RELEASE.replace("Date: Sat,", "Date:\n Sat,"))) == 0
    assert not names_its_suite("deb.debian.org_debian_._InRelease", parse_release(_RELEASE))


def test_debs_are_known_by_the_stanzas_of_the_packages_wanted(tmp_path: Path) -> None:
    from nsbuild.virtserver.aptcache import _deb_hashes

    index = tmp_path / "x_dists_bookworm_main_binary-amd64_Packages"
    index.write_text(
        f"Package: m4\nVersion: 1.4.19-3\nArchitecture: amd64\nSize: 10\nSHA256: {_SUM_A}\n\n"
        # Package not first; an epoch, which apt writes as %3a.
        f"SHA256: {_SUM_B.upper()}\nSize: 20\nPackage: ed\nVersion: 1:1.19-1\n"
        "Architecture: amd64\n\n"
        f"Package: hello\nVersion: 2.10-3\nArchitecture: amd64\nSize:\n 30\nSHA256: {_SUM_A}\n"
    )
    wanted = {"m4_1.4.19-3_amd64.deb", "ed_1%3a1.19-1_amd64.deb", "hello_2.10-3_amd64.deb",
              "m4_9_amd64.deb"}  # fmt: skip
    assert _deb_hashes([index, tmp_path / "other_InRelease"], wanted) == {
        "m4_1.4.19-3_amd64.deb": (10, _SUM_A),
        "ed_1%3a1.19-1_amd64.deb": (20, _SUM_B),
    }


def test_an_armoured_key_is_read_as_its_key_blocks() -> None:
    import base64

    from nsbuild.virtserver.aptformats import dearmor

    key = os.urandom(300)
    body = base64.encodebytes(key).decode()
    block = (f"-----BEGIN PGP PUBLIC KEY BLOCK-----\nComment: made here\n\n{body}=AbCd\n"
             "-----END PGP PUBLIC KEY BLOCK-----\n")  # fmt: skip
    assert dearmor(block.encode()) == key
    assert dearmor(block.replace("\n", "\r\n").encode()) == key
    assert dearmor((block + block.replace("Comment: made here\n", "")).encode()) == key + key
    # Another kind of block, or base64 that does not decode: no key.
    assert dearmor(block.replace("PUBLIC KEY BLOCK", "SIGNATURE").encode()) == b""
    assert dearmor(block.replace(body[:4], "!!!!").encode()) == b""
