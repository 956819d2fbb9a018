"""Attacks on what sbuild's options hand to nsbuild's own process: the paths
the percent escapes carry into a shell, the exec escape's socket as another
user sees it, and what a build leaves beside its results."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from nsbuild.debbuild import chrootexec
from nsbuild.debbuild.errors import BuildInputError
from nsbuild.debbuild.hooks import Facts, escapes, socket_folder, substitute

from .conftest import Env, make_package

# -- the percent escapes: a path is a value, never shell code --


_HOSTILE_NAMES = ["$(touch pwned)", "`touch pwned`", 'a"; touch pwned; "b', "a b;touch pwned;'",
                  "a\ntouch pwned"]  # fmt: skip


@pytest.mark.parametrize("name", _HOSTILE_NAMES)
def test_a_path_an_escape_carries_never_runs_in_any_quoting(tmp_path: Path, name: str) -> None:
    # sbuild's users write %d, "%d" or '%d'; the folder of a .dsc (or
    # --out) may be named by whoever made the tarball it came in.
    facts = Facts(dsc=tmp_path / name / "p_1.dsc", changes=f"{tmp_path / name}/p_1_amd64.changes")
    values = escapes(facts, "bash -i", None)
    for command in ('echo "%d"', "echo '%d'", "echo %SBUILD_CHANGES"):
        with pytest.raises(BuildInputError) as refused:
            substitute(command, values)
        said = str(refused.value)
        assert "\n" not in said and said.startswith("%"), said
        assert "special to a shell" in said
    assert not (tmp_path / "pwned").exists()


def test_a_plain_path_with_spaces_is_one_word_quoted_as_with_sbuild(tmp_path: Path) -> None:
    where = tmp_path / "my src, é"
    where.mkdir()
    (where / "p_1.dsc").write_text("x")
    values = escapes(Facts(dsc=where / "p_1.dsc"), "bash -i", None)
    for command in ('cat "%d"', "cat '%d'"):
        text, _ = substitute(command, values)
        done = subprocess.run(["/bin/sh", "-c", text], capture_output=True, text=True,
                              check=False)  # fmt: skip
        assert (done.returncode, done.stdout) == (0, "x"), command


# -- the exec escape's socket, as another user may place it --


def test_the_socket_folder_is_never_in_a_runtime_dir_others_can_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # as a runtime dir another user gave (su keeps it)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(shared))
    folder = socket_folder()
    try:
        assert shared not in folder.parents
        st = folder.lstat()
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == os.getuid()
    finally:
        folder.rmdir()
    # A link to a private folder is not taken either: its target may change.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(private)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "link"))
    folder = socket_folder()
    try:
        assert tmp_path not in folder.parents
    finally:
        folder.rmdir()
    # The user's own private runtime dir is taken.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(private))
    folder = socket_folder()
    assert folder.parent == private
    folder.rmdir()


@pytest.mark.root
def test_the_client_gives_its_descriptors_to_no_other_users_server() -> None:
    """A socket path another user could swap (a folder in their runtime dir):
    root's %e must not hand its terminal to whoever listens there."""
    user = pwd.getpwnam("nsbtest")
    top = Path(tempfile.mkdtemp(prefix="nsbt-fake-", dir="/tmp"))
    try:
        os.chown(top, user.pw_uid, user.pw_gid)
        path, said = top / "exec.sock", top / "said"
        # nsbtest's listener: answers "it ran" and says how many fds it got.
        fake = (
            "import array, socket, sys\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
            f"s.bind({str(path)!r}); s.listen(1); print('ready', flush=True)\n"
            "c, _ = s.accept()\n"
            "data, anc, _, _ = c.recvmsg(1 << 17, socket.CMSG_SPACE(64))\n"
            "fds = array.array('i')\n"
            "for _l, _k, p in anc: fds.frombytes(p[: len(p) - len(p) % 4])\n"
            f"open({str(said)!r}, 'w').write(str(len(fds)))\n"
            "c.send(b'S0')\n"
        )
        server = subprocess.Popen(["runuser", "-u", "nsbtest", "--", sys.executable, "-c", fake],
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert server.stdout is not None
        assert server.stdout.readline() == "ready\n"
        client = subprocess.run(
            [sys.executable, "-I", chrootexec.__file__, str(path), "--", "true"],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
        server.kill()
        server.wait()
        assert client.returncode == chrootexec.NOT_RUN
        assert client.stderr == (
            f"nsbuild chroot-exec: refused: {path} is served by uid {user.pw_uid}, "
            "not by this user's build: not run\n"
        )
        assert not said.exists() or said.read_text() == "0"
    finally:
        for p in top.iterdir():
            p.unlink()
        top.rmdir()


def test_the_client_sends_nothing_over_a_path_that_is_no_socket(tmp_path: Path) -> None:
    # Not a server of ours at all (a file, a folder): said in one line.
    (tmp_path / "file").write_text("")
    for target in (tmp_path / "file", tmp_path):
        done = subprocess.run(
            [sys.executable, "-I", chrootexec.__file__, str(target), "--", "true"],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
        assert done.returncode == chrootexec.NOT_RUN
        assert len(done.stderr.splitlines()) == 1, done.stderr
        assert done.stderr.startswith("nsbuild chroot-exec: "), done.stderr


# -- what a build leaves beside its results --


@pytest.mark.slow
@pytest.mark.userns
def test_a_source_only_changes_must_list_the_source_as_it_is(bookworm: Env, tmp_path: Path) -> None:
    # The build owns the build directory: after dpkg-buildpackage it puts a
    # .dsc of its own beside the tree, which dpkg-genchanges -S then lists.
    forge = "cp ../nsb-forged_1.0.dsc f && echo >> f && mv -f f ../nsb-forged_1.0.dsc"
    tree = make_package(tmp_path / "src", "nsb-forged", builddeb=forge)
    subprocess.run(["dpkg-source", "-b", tree.name], cwd=tree.parent, check=True,
                   capture_output=True)  # fmt: skip
    dsc = tree.parent / "nsb-forged_1.0.dsc"
    mine = dsc.read_bytes()
    out = tmp_path / "out"
    done = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(out),
                            "--source-only-changes", str(dsc))  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert ("nsb-forged_1.0_source.changes lists nsb-forged_1.0.dsc, which is not the "
            "source's (size or checksum differ)") in done.stderr  # fmt: skip
    assert not (out / "nsb-forged_1.0_source.changes").exists()
    assert dsc.read_bytes() == mine


# -- a tree's neighbours --


@pytest.mark.root
def test_an_upstream_tarball_another_user_put_beside_the_tree_is_not_taken() -> None:
    """dpkg-source takes PKG_VERSION.orig.tar.* from the tree's folder: in a
    shared one (/tmp), anyone may have put it there, with files of theirs."""
    # Where root's sandbox (a subordinate uid) may read the tree.
    tmp_path = Path(tempfile.mkdtemp(prefix="nsbt-planted-", dir="/tmp"))
    tmp_path.chmod(0o755)
    try:
        _planted_orig(tmp_path)
    finally:
        shutil.rmtree(tmp_path)


def _planted_orig(tmp_path: Path) -> None:
    from nsbuild.debbuild.srctree import source_from_tree

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    tree = make_package(shared, "nsb-planted")
    (tree / "debian" / "source" / "format").write_text("3.0 (quilt)\n")
    changelog = tree / "debian" / "changelog"
    changelog.write_text(changelog.read_text().replace("(1.0)", "(1.0-1)", 1))
    other = pwd.getpwnam("nsbtest")
    planted = shared / "nsb-planted_1.0.orig.tar.gz"
    subprocess.run(["tar", "-czf", str(planted), "-C", str(shared), tree.name], check=True)
    os.chown(planted, other.pw_uid, other.pw_gid)
    made = tmp_path / "made"
    made.mkdir()
    with pytest.raises(BuildInputError) as refused:
        source_from_tree(tree, made)
    assert str(refused.value) == (
        f"{planted}: owned by uid {other.pw_uid}, not by you or the owner of {tree}: "
        "not taken as the upstream tarball (move it away, or build a .dsc)"
    )
    # A link of theirs to a tarball of ours is theirs too.
    planted.unlink()
    ours = tmp_path / "nsb-planted_1.0.orig.tar.gz"
    subprocess.run(["tar", "-czf", str(ours), "-C", str(shared), tree.name], check=True)
    planted.symlink_to(ours)
    os.chown(planted, other.pw_uid, other.pw_gid, follow_symlinks=False)
    with pytest.raises(BuildInputError, match="owned by uid"):
        source_from_tree(tree, made)
    # Our own is taken.
    planted.unlink()
    ours.rename(planted)
    assert source_from_tree(tree, made).version == "1.0-1"


@pytest.mark.slow
@pytest.mark.userns
def test_a_tree_as_it_is_keeps_its_links_and_pipes_as_they_are(
    bookworm: Env, tmp_path: Path
) -> None:
    # --no-clean-source copies the user's tree in: its links stay links
    # (never the user's file they point at), a pipe stays a pipe (never
    # opened: that would wait for a writer for ever).
    secret = tmp_path / "secret.txt"
    secret.write_text("the user's own\n")
    checks = "test -p pipe\ntest -L secret\ntest ! -e secret\ntest -L up\ntest ! -e secret.txt"
    tree = make_package(tmp_path / "src", "nsb-astree", build=checks)
    os.mkfifo(tree / "pipe")
    (tree / "secret").symlink_to(secret)
    (tree / "up").symlink_to("..")
    # The tree named through a link, as a user's shortcut may name it.
    (tmp_path / "shortcut").symlink_to(tree)
    out = tmp_path / "out"
    done = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(out), "--no-clean-source",
                            str(tmp_path / "shortcut"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (out / "nsb-astree_1.0_all.deb").is_file()


@pytest.mark.slow
@pytest.mark.userns
def test_a_build_whose_escape_would_run_its_path_stops_in_one_line(
    bookworm: Env, tmp_path: Path
) -> None:
    folder = tmp_path / "pkg;touch ran;"
    tree = make_package(folder, "nsb-quoted")
    subprocess.run(["dpkg-source", "-b", tree.name], cwd=folder, check=True, capture_output=True)
    done = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(tmp_path / "out"),
                            "--pre-build-commands", "ls '%d'",
                            str(folder / "nsb-quoted_1.0.dsc"))  # fmt: skip
    assert done.returncode == 2, done.stderr
    said = [line for line in done.stderr.splitlines() if "special to a shell" in line]
    assert said == [f"nsbuild build: %d is {folder}/nsb-quoted_1.0.dsc, which holds ';', "
                    "special to a shell in some quoting: not used (rename it)"], done.stderr
    assert not (tmp_path / "ran").exists() and not (Path.home() / "ran").exists()
