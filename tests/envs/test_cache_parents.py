"""The folders above the cache, and the binds that hold it.

A cache folder checked private is private only while no other user can swap
it, or a folder above it, for one of theirs between the check and a use; and
a sandbox given a writable bind of a folder holding the cache (the home, a
working directory) must not reach the store through it: inside, uid 0 is the
user, who could hard-link the store's setuid files to where others reach
them, or rewrite the bases every later build uses."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from envs_helpers import chroot_d, nsbuild
from waiting import HANG_GUARD

from nsbuild.envs.masks import cache_masks
from nsbuild.sandbox.spec import Bind, Tmpfs


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


# -- a folder above the cache that another user can change ---------------------------


@pytest.fixture
def shared_top() -> Iterator[tuple[pwd.struct_passwd, Path, dict[str, str]]]:
    """As root: a folder every user can walk holding the test user's config
    folder and `shr`, a folder of nobody's that anyone may write in (mode 0777),
    and the environment to run nsbuild as the test user."""
    user = pwd.getpwnam(os.environ.get("NSBUILD_TEST_USER", "nsbtest"))
    top = Path(tempfile.mkdtemp(prefix="nsbuild-parents-", dir="/var/tmp"))
    top.chmod(0o755)
    (top / "config").mkdir()
    os.chown(top / "config", user.pw_uid, user.pw_gid)
    (top / "shr").mkdir()
    nobody = pwd.getpwnam("nobody")
    os.chown(top / "shr", nobody.pw_uid, nobody.pw_gid)
    (top / "shr").chmod(0o777)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(top), "LANG": "C.UTF-8",
           "XDG_CONFIG_HOME": str(top / "config")}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    try:
        yield user, top, env
    finally:
        shutil.rmtree(top)


def _give(top: Path, user: pwd.struct_passwd) -> None:
    for folder, dirs, files in os.walk(top):
        for name in (".", *dirs, *files):
            os.chown(os.path.join(folder, name), user.pw_uid, user.pw_gid)


def _as_user(user: pwd.struct_passwd, env: dict[str, str], *args: str
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--",
         sys.executable, "-m", "nsbuild", *args],
        cwd="/", env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
        timeout=HANG_GUARD, check=False,
    )  # fmt: skip


@pytest.mark.root
@pytest.mark.parametrize("cache_home", ["shr", "shr/deeper"])
@pytest.mark.parametrize("args", [("session", "list"), ("env", "list"),
                                  ("run", "--env", "h", "--", "true")])
def test_a_cache_under_a_folder_others_can_write_is_refused(
    shared_top: tuple[pwd.struct_passwd, Path, dict[str, str]], cache_home: str,
    args: tuple[str, ...],
) -> None:
    user, top, env = shared_top
    (top / "config" / "nsbuild" / "chroot.d").mkdir(parents=True)
    (top / "config" / "nsbuild" / "chroot.d" / "h").write_text("Name: h\nType: host\n")
    _give(top / "config", user)
    env["XDG_CACHE_HOME"] = str(top / cache_home)
    r = _as_user(user, env, *args)
    line = _one_line(r)
    assert line == (
        f"nsbuild: {top / cache_home / 'nsbuild'}: the folder {top / 'shr'} on its way "
        f"belongs to uid {pwd.getpwnam('nobody').pw_uid}, so another user could swap the "
        "cache; refusing to use it (choose a folder of your own)"
    ), line
    assert os.listdir(top / "shr") == []  # nothing made or written there


@pytest.mark.root
def test_an_unpack_folder_under_a_folder_others_can_write_is_refused(
    shared_top: tuple[pwd.struct_passwd, Path, dict[str, str]],
) -> None:
    user, top, env = shared_top
    env["XDG_CACHE_HOME"] = str(top / "config" / "cache")  # a private cache
    chroot = top / "config" / "nsbuild" / "chroot.d"
    chroot.mkdir(parents=True)
    tar = top / "base.tar"
    subprocess.run(["tar", "-cf", str(tar), "-C", "/usr/share/doc", "--no-recursion", "."],
                   check=True)  # fmt: skip
    (chroot / "u").write_text(f"Name: u\nPath: {tar}\nUnpack: {top / 'shr' / 'u'}\n")
    _give(top / "config", user)
    r = _as_user(user, env, "run", "--env", "u", "--", "true")
    line = _one_line(r)
    assert line.startswith(f"nsbuild: {top / 'shr' / 'u'}: the folder {top / 'shr'} "), line
    assert os.listdir(top / "shr") == []


@pytest.mark.root
def test_a_symlink_of_another_user_above_the_cache_is_refused(
    shared_top: tuple[pwd.struct_passwd, Path, dict[str, str]],
) -> None:
    # In a sticky folder (as /tmp), only its owner may change a link: nobody's link.
    user, top, env = shared_top
    top.chmod(0o1777)
    mine = top / "mine"
    mine.mkdir(mode=0o700)
    os.chown(mine, user.pw_uid, user.pw_gid)
    link = top / "link"
    link.symlink_to(mine)
    os.lchown(link, pwd.getpwnam("nobody").pw_uid, -1)
    env["XDG_CACHE_HOME"] = str(link)
    line = _one_line(_as_user(user, env, "session", "list"))
    assert line.startswith(f"nsbuild: {link / 'nsbuild'}: the symlink {link} on its way "
                           f"belongs to uid {pwd.getpwnam('nobody').pw_uid}"), line
    assert os.listdir(mine) == []


def test_a_cache_under_a_sticky_folder_of_root_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = os.stat("/tmp")
    assert tmp.st_uid == 0 and tmp.st_mode & 0o1777 == 0o1777  # /tmp, above tmp_path
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "new" / "cache"))
    assert nsbuild("session", "list").stderr == ""
    for made in (tmp_path / "new", tmp_path / "new" / "cache", tmp_path / "new" / "cache" /
                 "nsbuild"):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700, made


def test_a_cache_under_a_folder_of_mine_open_to_all_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared))
    line = _one_line(nsbuild("session", "list", check=False))
    assert line == (f"nsbuild: {shared / 'nsbuild'}: the folder {shared} on its way can be "
                    "written by other users (mode 0777, not sticky), so another user could "
                    "swap the cache; refusing to use it (choose a folder of your own)"), line
    assert os.listdir(shared) == []
    shared.chmod(0o1777)  # sticky: no one can rename or remove what is mine there
    assert nsbuild("session", "list").stderr == ""


# -- a writable bind that holds the cache ---------------------------------------------


@pytest.mark.userns
def test_a_bind_holding_the_cache_shows_an_empty_read_only_folder(xdg: Path) -> None:
    cache = xdg / "cache" / "nsbuild"
    nsbuild("session", "list")  # makes the cache
    store = cache / "store"
    store.mkdir(exist_ok=True)
    (store / "secret").write_text("the store\n")
    unpack = xdg / "unpack"
    unpack.mkdir(mode=0o700)
    (unpack / "kept").write_text("a base\n")
    (xdg / "pub").write_text("public\n")
    (chroot_d(xdg) / "h").write_text(
        f"Name: h\nType: host\nBind-Mounts: {xdg}:/w\n\n"
        f"Name: other\nPath: {xdg / 'none.tar'}\nUnpack: {unpack}\n"
    )
    nsbuild("session", "list")  # opens every Unpack folder: a store from now on
    script = (
        'for d in /w/cache/nsbuild /w/unpack; do'
        '  echo "$d: $(ls -A "$d" | wc -l) entries";'
        '  touch "$d/x" 2>&1; ln /w/pub "$d/l" 2>/dev/null && echo "$d: linked in";'
        ' done;'
        ' ln /w/cache/nsbuild/store/secret /w/out 2>/dev/null && echo "linked out"; echo end'
    )
    r = nsbuild("run", "--env", "h", "--", "sh", "-c", script)
    assert r.stdout == (
        "/w/cache/nsbuild: 0 entries\n"
        "touch: cannot touch '/w/cache/nsbuild/x': Read-only file system\n"
        "/w/unpack: 0 entries\n"
        "touch: cannot touch '/w/unpack/x': Read-only file system\n"
        "end\n"
    ), r.stdout + r.stderr
    assert not (xdg / "out").exists()
    assert sorted(os.listdir(unpack)) == ["empty", "kept"]
    assert os.listdir(cache / "empty") == []


@pytest.mark.userns
def test_a_working_directory_holding_the_cache_shows_an_empty_read_only_folder(
        xdg: Path) -> None:
    """Plain `nsbuild run` binds the working directory writable: run from the
    home (here: the folder holding XDG_CACHE_HOME), the store is out of reach."""
    cache = xdg / "cache" / "nsbuild"
    nsbuild("session", "list")  # makes the cache
    (cache / "store").mkdir(exist_ok=True)
    (cache / "store" / "secret").write_text("the store\n")
    script = ('echo "$(ls -A cache/nsbuild | wc -l) entries";'
              ' touch cache/nsbuild/x 2>&1;'
              ' ln cache/nsbuild/store/secret out 2>/dev/null && echo "linked out"; echo end')
    r = nsbuild("run", "--", "sh", "-c", script, cwd=xdg)
    assert r.stdout == (
        "0 entries\n"
        "touch: cannot touch 'cache/nsbuild/x': Read-only file system\n"
        "end\n"
    ), r.stdout + r.stderr
    assert not (xdg / "out").exists()


def test_cache_masks_cover_the_cache_folders_a_writable_bind_holds(tmp_path: Path) -> None:
    cache = tmp_path / "home" / ".cache" / "nsbuild"
    unpack = tmp_path / "home" / "unpack"
    inner = cache / "inner-unpack"
    for d in (cache, unpack, inner, tmp_path / "elsewhere"):
        d.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "home")
    protected = [str(d) for d in (cache, unpack, inner, tmp_path / "missing")]

    def masks(*mounts: object) -> list[Bind]:
        return cache_masks(mounts, protected)

    home = tmp_path / "home"
    # Nested: a mask at the matching place inside, under the bind's destination.
    # An Unpack inside the cache is hidden with it; a missing folder needs none.
    found = masks(Bind(str(home), "/w"))
    assert found == [Bind(str(cache / "empty"), "/w/.cache/nsbuild", readonly=True),
                     Bind(str(unpack / "empty"), "/w/unpack", readonly=True)]
    assert os.listdir(cache / "empty") == os.listdir(unpack / "empty") == []
    # Compared as real paths: a bind through a symlink is the same bind.
    assert masks(Bind(str(tmp_path / "link"), "/w")) == found
    # Equal: the whole bind.
    assert masks(Bind(str(unpack), "/u")) == [Bind(str(unpack / "empty"), "/u", readonly=True)]
    # Unrelated, read-only, private, or not a bind at all: nothing to mask.
    assert masks(Bind(str(tmp_path / "elsewhere"), "/e")) == []
    assert masks(Bind(str(home), "/w", readonly=True)) == []
    assert masks(Bind(str(home), "/w", private=True)) == []
    assert masks(Tmpfs("/w")) == []
    # Masks already there are not made twice.
    assert masks(Bind(str(home), "/w"), *found) == []
