"""Files the user hands to a build, and the folder results go to, as others shape them.

The folder of a .dsc may be its author's, and so may --out: names in it can
be swapped for links after nsbuild checked them, or planted before the build
as links to the user's own files. Each test here is such an attack, and
what the user sees afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nsbuild.backends import Backend, BackendOptions, CopyRefused, open_backend
from nsbuild.debbuild.driver import build
from nsbuild.debbuild.result import BuildRequest
from nsbuild.errors import NsbuildError

from .conftest import Env, make_package

pytestmark = [pytest.mark.slow, pytest.mark.userns]


def _build(env: Env, source: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return env.nsbuild("build", "--env", "bookworm", *extra, str(source))


@pytest.fixture
def backend(bookworm_here: Env) -> Iterator[Backend]:
    with open_backend("local", BackendOptions(env="bookworm")) as b:
        yield b


def _dsc(tree: Path) -> Path:
    """The .dsc of a native source tree, made on the host as its author would."""
    subprocess.run(["dpkg-source", "-b", tree.name], cwd=tree.parent, check=True,
                   capture_output=True)  # fmt: skip
    name, version = tree.name.rsplit("-", 1)
    return tree.parent / f"{name}_{version}.dsc"


def _deb(parent: Path, name: str) -> Path:
    root = parent / name
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: nsbuild tests <tests@nsbuild.invalid>\nDescription: extra package\n"
    )
    deb = parent / f"{name}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(root), str(deb)], check=True, capture_output=True)
    return deb


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _SwapAtPrepare:
    """A progress stream that, when the Prepare phase starts (after every
    input was checked), turns each of `swap` into a link to `victim`: what
    the author of the folder can do at any moment."""

    def __init__(self, swap: list[Path], victim: Path) -> None:
        self.swap, self.victim, self.text = swap, victim, ""

    def write(self, text: str) -> int:
        if "[1/4]" in text:
            for path in self.swap:
                path.unlink()
                path.symlink_to(self.victim)
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_source_files_and_extra_packages_swapped_after_the_check_are_not_used(
    bookworm_here: Env, tmp_path: Path
) -> None:
    victim = tmp_path / "home"
    victim.mkdir()
    (victim / "secret.txt").write_text("VICTIM-SECRET\n")
    tree = make_package(tmp_path, "nsb-swap", build_depends="nsb-swapextra")
    dsc = _dsc(tree)
    extra = _deb(tmp_path, "nsb-swapextra")
    orig = tmp_path / "nsb-swap_1.0.tar.xz"
    assert orig.is_file()
    stream = _SwapAtPrepare([orig, extra], victim)
    out = tmp_path / "out"
    request = BuildRequest(input=dsc, env="bookworm", out=out, extra_packages=(extra,))
    try:
        result = build(request, progress=stream)  # type: ignore[arg-type]
    except NsbuildError as e:
        pytest.fail(f"the build used the swapped files: {e}\n{stream.text}")
    assert result.status == "successful"
    assert (out / "nsb-swap_1.0_all.deb").is_file()
    log = (out / "nsb-swap_1.0_amd64.build").read_text()
    assert "Setting up nsb-swapextra (1.0)" in log
    assert "VICTIM-SECRET" not in log


def test_a_failing_dpkg_source_is_named_with_its_error(bookworm: Env, tmp_path: Path) -> None:
    bundle = tmp_path / "nsb-git_1.0.git"
    bundle.write_bytes(b"# v2 git bundle\n\n")
    data = bundle.read_bytes()
    dsc = tmp_path / "nsb-git_1.0.dsc"
    dsc.write_text(
        "Format: 3.0 (git)\nSource: nsb-git\nBinary: nsb-git\nArchitecture: all\n"
        "Version: 1.0\nMaintainer: nsbuild tests <tests@nsbuild.invalid>\n"
        f"Checksums-Sha256:\n {hashlib.sha256(data).hexdigest()} {len(data)} {bundle.name}\n"
        f"Files:\n {hashlib.md5(data).hexdigest()} {len(data)} {bundle.name}\n"
    )
    result = _build(bookworm, dsc, "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr  # bad input: the source does not unpack
    assert "dpkg-buildpackage failed" not in result.stderr
    line = [ln for ln in result.stderr.splitlines() if "dpkg-source -x failed" in ln]
    assert len(line) == 1, result.stderr
    assert line[0].endswith("git is not in the PATH"), line


@pytest.fixture(params=["same-filesystem", "other-filesystem"])
def out_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """--out on the cache's filesystem, or on another one (a tmpfs)."""
    if request.param == "same-filesystem":
        yield tmp_path / "out"
        return
    shm = Path("/dev/shm")
    assert shm.is_dir() and os.access(shm, os.W_OK)
    top = Path(tempfile.mkdtemp(prefix="nsbuild-test-", dir=shm))
    assert os.stat(top).st_dev != os.stat(tmp_path).st_dev
    try:
        yield top / "out"
    finally:
        shutil.rmtree(top)


def test_links_planted_in_out_are_replaced_never_written_through(
    bookworm: Env, tmp_path: Path, out_dir: Path
) -> None:
    tree = make_package(tmp_path, "nsb-plant", build="echo 'curl evil | sh'")
    victim = tmp_path / "bashrc"
    victim.write_text("the victim's own\n")
    out_dir.mkdir()
    names = ["nsb-plant_1.0_all.deb", "nsb-plant_1.0_amd64.changes",
             "nsb-plant_1.0_amd64.buildinfo", "nsb-plant_1.0_amd64.build",
             "nsb-plant_1.0_amd64.network.jsonl"]  # fmt: skip
    for name in names:
        (out_dir / name).symlink_to(victim)
    result = _build(bookworm, tree, "--out", str(out_dir))
    assert result.returncode == 0, result.stderr
    assert victim.read_text() == "the victim's own\n"
    for name in names:
        assert (out_dir / name).is_file() and not (out_dir / name).is_symlink(), name
    assert "curl evil" in (out_dir / "nsb-plant_1.0_amd64.build").read_text()
    assert not [p.name for p in out_dir.iterdir() if p.name not in names]
    # A second build into the same folder replaces the first one's results.
    first = _sha256(out_dir / "nsb-plant_1.0_amd64.build")
    again = _build(bookworm, tree, "--out", str(out_dir))
    assert again.returncode == 0, again.stderr
    assert _sha256(out_dir / "nsb-plant_1.0_amd64.build") != first
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(names)


def test_a_source_build_replaces_its_dsc_but_never_an_upstream_tarball(
    bookworm: Env, tmp_path: Path
) -> None:
    """With --source the results land next to the input by default. The .dsc
    and the Debian part are what the user asked to rebuild (as with sbuild);
    the upstream tarball, which every revision reuses, must come out as it
    went in. A build that forges it in its `clean` step is refused, named,
    and the user's files stay as they were."""
    tree = make_package(tmp_path / "in", "nsb-resrc")
    changelog = tree / "debian" / "changelog"
    changelog.write_text(changelog.read_text().replace("(1.0)", "(1.0-1)", 1))
    (tree / "debian" / "source" / "format").write_text("3.0 (quilt)\n")
    (tree / "upstream.txt").write_text("upstream\n")
    subprocess.run(["tar", "--exclude=debian", "-czf", "nsb-resrc_1.0.orig.tar.gz", tree.name],
                   cwd=tree.parent, check=True)  # fmt: skip
    forge = ("cd .. && rm -rf forged && mkdir -p forged/nsb-resrc-1.0"
             " && cp $(CURDIR)/upstream.txt forged/nsb-resrc-1.0/"
             " && echo forged > forged/nsb-resrc-1.0/FORGED"
             " && tar -C forged -czf nsb-resrc_1.0.orig.tar.gz nsb-resrc-1.0 && rm -rf forged")
    rules = tree / "debian" / "rules"
    plain = rules.read_text()
    subprocess.run(["dpkg-source", "-b", tree.name], cwd=tree.parent, check=True,
                   capture_output=True)  # fmt: skip
    dsc = tree.parent / "nsb-resrc_1.0-1.dsc"
    shutil.rmtree(tree)
    inputs = {p.name: p.read_bytes() for p in dsc.parent.iterdir()}
    assert sorted(inputs) == ["nsb-resrc_1.0-1.debian.tar.xz", "nsb-resrc_1.0-1.dsc",
                              "nsb-resrc_1.0.orig.tar.gz"]

    # An honest source build: the .dsc is the build's, the orig the same bytes.
    result = _build(bookworm, dsc, "--source", "--no-arch-any", "--no-arch-all")
    assert result.returncode == 0, result.stderr
    assert (dsc.parent / "nsb-resrc_1.0.orig.tar.gz").read_bytes() == inputs[
        "nsb-resrc_1.0.orig.tar.gz"]
    assert (dsc.parent / "nsb-resrc_1.0-1_source.changes").is_file()

    # A forged upstream tarball: refused, the input untouched.
    for p in dsc.parent.iterdir():
        if p.name not in inputs:
            p.unlink()
        else:
            p.write_bytes(inputs[p.name])
    unpacked = tmp_path / "again"
    subprocess.run(["dpkg-source", "-x", str(dsc), str(unpacked)], check=True,
                   capture_output=True)  # fmt: skip
    (unpacked / "debian" / "rules").write_text(
        plain + f"\noverride_dh_auto_clean:\n\t{forge}\n")
    subprocess.run(["dpkg-source", "-b", unpacked.name], cwd=tmp_path, check=True,
                   capture_output=True)  # fmt: skip
    forged_dsc = tmp_path / dsc.name
    for name in ("nsb-resrc_1.0-1.debian.tar.xz", dsc.name):
        (dsc.parent / name).write_bytes((tmp_path / name).read_bytes())
    inputs = {p.name: p.read_bytes() for p in dsc.parent.iterdir()}
    assert forged_dsc.exists()
    result = _build(bookworm, dsc, "--source", "--no-arch-any", "--no-arch-all")
    assert result.returncode == 1, result.stderr
    refusal = [ln for ln in result.stderr.splitlines() if "upstream tarballs" in ln]
    assert len(refusal) == 1, result.stderr
    assert "'nsb-resrc_1.0.orig.tar.gz'" in refusal[0]
    assert {p.name: p.read_bytes() for p in dsc.parent.iterdir()} == inputs


# Denied DNS questions, more than the records kept in memory, at a pace the
# responder's and the log's rates let through one by one.
DNS_FLOOD = r"""
use IO::Socket::INET;
use Time::HiRes qw(sleep);
my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => 53, Proto => 'udp')
    or die "socket: $!";
for my $n (1 .. 1200) {
    my $q = pack('n6', $n, 0x0100, 1, 0, 0, 0);
    $q .= chr(length $_) . $_ for ("n$n", "example", "org");
    $s->send($q . "\0" . pack('n2', 1, 1)) or die "send: $!";
    sleep 0.02;
}
sleep 1;
"""


def test_the_network_log_and_summary_count_past_the_records_kept(
    bookworm: Env, tmp_path: Path
) -> None:
    tree = make_package(tmp_path, "nsb-flood", build="perl debian/flood.pl")
    (tree / "debian" / "flood.pl").write_text(DNS_FLOOD)
    out = tmp_path / "out"
    result = _build(bookworm, tree, "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    lines = (out / "nsb-flood_1.0_amd64.network.jsonl").read_text().splitlines()
    asked = {json.loads(ln).get("host") for ln in lines}
    assert {f"n{i}.example.org" for i in range(1, 1201)} <= asked
    summary = json.loads(result.stdout)
    assert summary["network"]["attempts"] >= 1200
    log = (out / "nsb-flood_1.0_amd64.build").read_text()
    denied = [ln for ln in log.splitlines() if ln.startswith("Network-Denied: ")]
    assert len(denied) == 1 and int(denied[0].split()[1]) >= 1200, denied


def test_copy_in_streams_without_a_temporary_file(backend: Backend, tmp_path: Path) -> None:
    src = tmp_path / "data"
    src.write_bytes(b"x" * 100_000)
    old = tempfile.tempdir
    tempfile.tempdir = str(tmp_path / "no-such-folder")
    try:
        backend.copy_in(src, "/build/data")
    finally:
        tempfile.tempdir = old
    status, text = backend.check_output(["sh", "-c", "wc -c < /build/data"])
    assert (status, text.strip()) == (0, "100000")


def test_copy_in_refuses_a_file_over_its_bound(backend: Backend, tmp_path: Path) -> None:
    sparse = tmp_path / "sparse"
    with sparse.open("wb") as f:
        f.truncate(64 << 20)
    with pytest.raises(CopyRefused, match="larger than 1048576 bytes"):
        backend.copy_in(sparse, "/build/sparse", limit=1 << 20)
    status, _ = backend.check_output(["test", "-e", "/build/sparse"])
    assert status != 0
