"""A package's build is untrusted: what it leaves behind is never followed out.

Results leave the environment through `Backend.copy_out`, which refuses
anything but a regular file with a single name under the work directory, and
through the file names of the .changes, which must be plain names. Nothing of
a refused build reaches --out (its logs are kept in nsbuild's cache), and
nothing at all lands outside.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nsbuild.backends import Backend, CopyRefused

from .conftest import Env, kept_log, make_package

pytestmark = [pytest.mark.slow, pytest.mark.userns]


def test_copy_out_refuses_all_but_plain_files(backend: Backend, tmp_path: Path) -> None:
    script = (
        "cd /build && echo real > real.deb && echo secret > /root/secret && "
        "ln -s /root/secret symlink.deb && ln real.deb hardlink.deb && "
        "mkfifo fifo.deb && mkdir dir && ln -s /root linkdir && "
        "echo inside > dir/ok.deb"
    )
    status, text = backend.check_output(["sh", "-c", script])
    assert status == 0, text
    # hardlink.deb and real.deb are two names of one file: both refused.
    for name, why in [
        ("symlink.deb", "symlink"),
        ("hardlink.deb", "hard link"),
        ("real.deb", "hard link"),
        ("fifo.deb", "not a regular file"),
        ("dir", "not a regular file"),
        ("linkdir/secret", "symlink"),
        ("missing.deb", "not a regular file"),
    ]:
        with pytest.raises(CopyRefused, match=why):
            backend.copy_out(f"/build/{name}", tmp_path / "got")
        assert not (tmp_path / "got").exists()
    for path in ("/build/../root/secret", "/root/secret", "relative.deb"):
        with pytest.raises(CopyRefused):
            backend.copy_out(path, tmp_path / "got")
    backend.copy_out("/build/dir/ok.deb", tmp_path / "ok.deb")
    assert (tmp_path / "ok.deb").read_text() == "inside\n"


def test_a_symlink_in_place_of_a_deb_is_refused(bookworm: Env, tmp_path: Path) -> None:
    # dpkg-genchanges follows the link and lists /etc/passwd's checksum: the
    # .changes is consistent, only the file's kind gives it away.
    tree = make_package(
        tmp_path,
        "nsb-symlink",
        builddeb="rm ../nsb-symlink_1.0_all.deb\nln -s /etc/passwd ../nsb-symlink_1.0_all.deb",
    )
    _refused(bookworm, tree, "nsb-symlink_1.0_all.deb is a symlink")


# Run in the background by the package's own rules: debian/source/format
# becomes a FIFO. Its one reader is `dpkg-source --after-build`, which
# dpkg-buildpackage runs after dpkg-genchanges has written the .changes; so
# when the FIFO opens, the .changes is complete, and it is rewritten to name
# ../x before the format is served and dpkg-buildpackage goes on to its end.
REWRITER = r"""
use POSIX qw(mkfifo);
$SIG{PIPE} = 'IGNORE';
alarm 600;
my $format = 'debian/source/format';
unlink $format;
mkfifo($format, 0644) or die "mkfifo: $!";
while (1) {
    open my $w, '>', $format or die "open: $!";
    my ($c) = glob '../nsb-dotdot_1.0_*.changes';
    if (defined $c) {
        my $text = do { local $/; open my $f, '<', $c or die; <$f> };
        $text =~ s/ nsb-dotdot_1\.0_all\.deb$/ ..\/x/mg;
        open my $out, '>', $c or die;
        print $out $text;
        close $out;
        open my $x, '>', '../x' or die;
        close $x;
    }
    print $w "3.0 (native)\n";
    close $w;
    exit 0 if defined $c;
}
"""


def test_a_changes_naming_a_path_is_refused(bookworm: Env, tmp_path: Path) -> None:
    tree = make_package(
        tmp_path, "nsb-dotdot", builddeb="perl debian/rewrite.pl </dev/null >/dev/null 2>&1 &"
    )
    (tree / "debian" / "rewrite.pl").write_text(REWRITER)
    _refused(bookworm, tree, "lists a file with a path: '../x'")


def _refused(bookworm: Env, tree: Path, message: str) -> None:
    """Build `tree` (named NAME-1.0, alone in its folder): the build fails
    saying `message`, nothing reaches --out, its log says so, and nothing
    lands beside the tree."""
    name = tree.name.removesuffix("-1.0")
    out = tree.parent / "out"
    result = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(out), str(tree))
    assert result.returncode == 1, result.stderr
    assert message in result.stderr
    assert not out.exists()
    log = kept_log(bookworm, result.stderr, f"{name}_1.0_amd64.build")
    assert "Status: failed" in log.read_text()
    assert sorted(p.name for p in tree.parent.iterdir()) == [tree.name]
