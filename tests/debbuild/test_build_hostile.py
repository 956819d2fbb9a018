"""What a build leaves behind is hostile once nsbuild's own process touches it.

A package's rules, and the maintainer scripts of what it build-depends on,
shape the .changes, the output of the build, the files copied out and what
apt downloads. Each test here is an attack as a package would make it, and
what the user sees afterwards.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from nsbuild.backends import Backend, BackendOptions, CopyRefused, open_backend

from .conftest import Env, kept_log, make_package
from .test_hostile import REWRITER

pytestmark = [pytest.mark.slow, pytest.mark.userns]


def _build(env: Env, source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return env.nsbuild("build", "--env", "bookworm", "--out", str(out), *extra, str(source))


# dpkg-distaddfile adds any file of .. to the .changes: other sources' files,
# nsbuild's own log names.
DISTADD = r"""set -e
for name in victim.txt other_1.0.dsc Makefile nsb-distadd_1.0_amd64.build \
            nsb-distadd_1.0_amd64.network.jsonl; do
    echo "written by the build" > "../$name"
    dpkg-distaddfile "$name" byhand -
done
"""


def test_files_added_to_the_changes_never_reach_out(bookworm: Env, tmp_path: Path) -> None:
    tree = make_package(tmp_path, "nsb-distadd", build="sh debian/distadd.sh")
    (tree / "debian" / "distadd.sh").write_text(DISTADD)
    out = tmp_path / "out"
    out.mkdir()
    mine = ["victim.txt", "other_1.0.dsc", "Makefile", "nsb-distadd_1.0_amd64.build",
            "nsb-distadd_1.0_amd64.network.jsonl"]  # fmt: skip
    for name in mine:
        (out / name).write_text("the user's own\n")
    result = _build(bookworm, tree, out)
    assert result.returncode == 1, result.stderr
    refusal = [line for line in result.stderr.splitlines() if "not results of" in line]
    assert len(refusal) == 1, result.stderr
    for name in mine:
        assert f"'{name}'" in refusal[0]
    for name in mine:
        assert (out / name).read_text() == "the user's own\n"
    assert sorted(p.name for p in out.iterdir()) == sorted(mine)
    assert "Status: failed" in kept_log(bookworm, result.stderr, mine[3]).read_text()


# dpkg refuses such a name itself: the .changes is rewritten once complete
# (the way test_hostile.REWRITER does), to name a copy of the .deb whose
# name clears the screen.
ESCAPER = REWRITER.replace("nsb-dotdot", "nsb-escfile").replace(
    "s/ nsb-escfile_1\\.0_all\\.deb$/ ..\\/x/mg;",
    "s/ nsb-escfile_1\\.0_all\\.deb$/ esc\\e[2Jname.deb/mg;",
).replace(
    "open my $x, '>', '../x' or die;\n        close $x;",
    "system('cp', '../nsb-escfile_1.0_all.deb', \"../esc\\e[2Jname.deb\") == 0 or die;",
)


def test_a_changes_naming_a_control_character_is_refused(bookworm: Env, tmp_path: Path) -> None:
    assert "esc\\e[2Jname.deb" in ESCAPER and "../x" not in ESCAPER
    tree = make_package(
        tmp_path, "nsb-escfile", builddeb="perl debian/rewrite.pl </dev/null >/dev/null 2>&1 &"
    )
    (tree / "debian" / "rewrite.pl").write_text(ESCAPER)
    out = tmp_path / "out"
    result = _build(bookworm, tree, out)
    assert "\x1b" not in result.stdout + result.stderr
    assert result.returncode == 1, result.stderr
    assert "refused: 'esc\\x1b[2Jname.deb'" in result.stderr
    assert not out.exists()


def test_a_build_cannot_rewrite_its_own_log(bookworm: Env, tmp_path: Path) -> None:
    tree = make_package(
        tmp_path,
        "nsb-forge",
        build="""perl -e 'truncate(STDOUT, 0); seek(STDOUT, 0, 0); print "FORGED\\n"'""",
    )
    out = tmp_path / "out"
    result = _build(bookworm, tree, out)
    assert result.returncode == 0, result.stderr
    log = (out / "nsb-forge_1.0_amd64.build").read_text()
    assert log.startswith("+=====")
    assert "| Install package build dependencies" in log
    assert "FORGED" in log
    assert "Status: successful" in log


# A DNS question sent by hand: the name's first label holds an OSC sequence
# that would set the terminal's title, the second one erases the line.
DNS_QUERY = r"""
use IO::Socket::INET;
my $q = pack('n6', 0x1234, 0x0100, 1, 0, 0, 0);
$q .= chr(length $_) . $_ for ("\e]0;owned\a", "\e[2K", "example", "org");
$q .= "\0" . pack('n2', 1, 1);
my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => 53, Proto => 'udp')
    or die "socket: $!";
$s->send($q) or die "send: $!";
my $rin = ''; vec($rin, fileno($s), 1) = 1;
select($rin, undef, undef, 10);
"""


def test_names_from_inside_are_escaped_in_the_summary(bookworm: Env, tmp_path: Path) -> None:
    tree = make_package(tmp_path, "nsb-escname", build="perl debian/query.pl")
    (tree / "debian" / "query.pl").write_text(DNS_QUERY)
    out = tmp_path / "out"
    result = _build(bookworm, tree, out)
    assert result.returncode == 0, result.stderr
    denied = [line for line in result.stderr.splitlines() if "attempt denied: " in line]
    assert len(denied) == 1, result.stderr
    assert "\\x1b]0;owned\\x07.\\x1b[2K.example.org" in denied[0]
    for char in "\x1b\x07":
        assert char not in result.stderr


POSTINST = r"""#!/bin/sh
# Plants a package of its own under the name of the archive's `less`, padded
# to the archive's size, in apt's download cache.
set -e
[ "$1" = configure ] || exit 0
show=$(apt-cache show --no-all-versions less)
size=$(printf '%s\n' "$show" | sed -n 's/^Size: //p')
version=$(printf '%s\n' "$show" | sed -n 's/^Version: //p')
file=$(printf '%s\n' "$show" | sed -n 's/^Filename: //p')
d=$(mktemp -d)
mkdir "$d/DEBIAN"
printf 'Package: less\nVersion: %s\nArchitecture: amd64\n' "$version" > "$d/DEBIAN/control"
printf 'Maintainer: x <x@x.invalid>\nDescription: not less\n' >> "$d/DEBIAN/control"
printf '#!/bin/sh\necho NSB-TROJAN-RAN-AS-$(id -u)\n' > "$d/DEBIAN/postinst"
chmod 755 "$d/DEBIAN/postinst"
dpkg-deb --build "$d" "$d.deb" >/dev/null
target="/var/cache/apt/archives/${file##*/}"
cp "$d.deb" "$target"
truncate -s "$size" "$target"
echo "planted $target"
"""


def _poison_deb(parent: Path) -> Path:
    root = parent / "nsb-poison"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: nsb-poison\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: nsbuild tests <tests@nsbuild.invalid>\nDescription: plants a package\n"
    )
    (root / "DEBIAN" / "postinst").write_text(POSTINST)
    (root / "DEBIAN" / "postinst").chmod(0o755)
    deb = parent / "nsb-poison_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)],
                   check=True, capture_output=True)  # fmt: skip
    return deb


def test_maintainer_scripts_cannot_poison_the_apt_cache(bookworm: Env, tmp_path: Path) -> None:
    poison = _poison_deb(tmp_path)
    first = make_package(tmp_path / "a", "nsb-poisoned", build_depends="nsb-poison")
    result = _build(bookworm, first, tmp_path / "out-a", "--json", "--extra-package", str(poison))
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "out-a" / "nsb-poisoned_1.0_amd64.build").read_text()
    assert "planted /var/cache/apt/archives/less_" in log
    summary = json.loads(result.stdout)

    # A later build of another package, with no extra package, that needs less.
    second = make_package(tmp_path / "b", "nsb-needs-less", build_depends="less")
    result = _build(bookworm, second, tmp_path / "out-b")
    assert result.returncode == 0, result.stderr
    log2 = (tmp_path / "out-b" / "nsb-needs-less_1.0_amd64.build").read_text()
    assert "Unpacking less " in log2
    assert "NSB-TROJAN-RAN" not in log2
    # The archive's own less was downloaded and taken into the cache.
    archives = bookworm.cache / "nsbuild" / "apt" / "bookworm" / "apt-archives"
    assert [p.name for p in archives.glob("less_*.deb")]
    # The extra package's scripts ran as root over the whole session: what
    # they left is not kept as a layer for later builds.
    assert summary["dependency_layer"] is None
    assert "Stored dependency layer" not in log


def test_only_packages_of_the_signed_indexes_reach_the_shared_cache(bookworm: Env) -> None:
    # Even from a run of apt alone, a .deb goes to the shared cache only with
    # the size and SHA256 that apt's checked package lists give it. (`ed`:
    # no other test's build depends on it, so it is not in the cache yet.)
    plant = (
        "apt-get -qq update && v=$(apt-cache show --no-all-versions less | "
        "sed -n 's/^Version: //p') && echo planted > /var/cache/apt/archives/less_${v}_amd64.deb"
        " && apt-get -qq --download-only install ed"
    )
    old = dict(os.environ)
    os.environ.update(bookworm.vars)
    try:
        caches = ("apt-lists", "apt-archives")
        with open_backend("local", BackendOptions(env="bookworm", caches=caches)) as b:
            status, text = b.check_output(["sh", "-c", plant], network="allow")
            assert status == 0, text
            said = b.take_downloads()
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert any(line.startswith("apt cache apt-archives: ") for line in said), said
    archives = bookworm.cache / "nsbuild" / "apt" / "bookworm" / "apt-archives"
    assert [p.name for p in archives.glob("ed_*.deb")]
    assert not [p.name for p in archives.glob("less_*.deb") if p.stat().st_size == 8]


def test_copy_out_has_a_size_bound(backend: Backend, tmp_path: Path) -> None:
    status, text = backend.check_output(["sh", "-c", "head -c 2097152 /dev/zero > /build/big.deb"])
    assert status == 0, text
    with pytest.raises(CopyRefused, match="larger than"):
        backend.copy_out("/build/big.deb", tmp_path / "big.deb", limit=1 << 20)
    assert list(tmp_path.iterdir()) == []
    backend.copy_out("/build/big.deb", tmp_path / "big.deb", limit=2 << 20)
    assert (tmp_path / "big.deb").stat().st_size == 2 << 20


def test_copy_out_drops_setuid_bits(tmp_path: Path) -> None:
    # The null server's testbed is the host itself, and its copyup keeps modes.
    with open_backend("autopkgtest", BackendOptions(args=("null",))) as b:
        work = b.work_dir
        script = f"cp /bin/true {work}/suid.deb && chmod 6755 {work}/suid.deb"
        status, text = b.check_output(["sh", "-c", script])
        assert status == 0, text
        assert os.stat(f"{work}/suid.deb").st_mode & 0o6000
        b.copy_out(f"{work}/suid.deb", tmp_path / "suid.deb")
        b.copy_out(f"{work}/suid.deb", tmp_path / "big.deb", limit=1 << 30)
        with pytest.raises(CopyRefused, match="larger than"):
            b.copy_out(f"{work}/suid.deb", tmp_path / "small.deb", limit=10)
    mode = (tmp_path / "suid.deb").stat().st_mode
    assert stat.S_ISREG(mode) and not mode & 0o7000
    assert not (tmp_path / "small.deb").exists()


def test_a_build_may_make_setuid_files_in_its_own_tree(bookworm: Env, tmp_path: Path) -> None:
    # The build directory is nsbuild's own, in its private cache: packages
    # that ship setuid programs make them there (dh_fixperms then decides).
    tree = make_package(
        tmp_path,
        "nsb-suid",
        install="install -D -m 4755 /bin/true debian/nsb-suid/usr/bin/suid-true\n"
        "test -u debian/nsb-suid/usr/bin/suid-true",
    )
    out = tmp_path / "out"
    result = _build(bookworm, tree, out)
    assert result.returncode == 0, result.stderr
    assert (out / "nsb-suid_1.0_all.deb").is_file()


def test_a_build_works_under_a_cache_no_one_else_can_enter(bookworm: Env, tmp_path: Path) -> None:
    # The build directory, the session and the results (setuid files among
    # them) live under the cache's top: a build closes it first, even one
    # whose input turns out to be missing.
    top = bookworm.cache / "nsbuild"
    top.mkdir(parents=True, exist_ok=True)
    top.chmod(0o755)
    result = bookworm.nsbuild("build", "--env", "bookworm", str(tmp_path / "missing_1.0.dsc"))
    assert result.returncode == 2, result.stderr
    assert stat.S_IMODE(top.stat().st_mode) == 0o700
