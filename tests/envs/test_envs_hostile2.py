"""The host side of environments against trees and records shaped from inside:
a directory tree too deep for recursion, cache records that are FIFOs, links
or huge files, and apt sources written by a dependency's maintainer script.

Each test does what hostile code would do and checks what the user sees:
commands finish, say one line per bad entry, and clean up what they can.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from envs_helpers import NSBUILD, chroot_d, nsbuild, processes_with
from waiting import HANG_GUARD, wait_for

from nsbuild.envs.session import throwaway

pytestmark = [pytest.mark.userns]

DEPTH = 3000  # far past Python's recursion limit (1000) and PATH_MAX (4096 bytes)


def _no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr, r.stderr


def _cache() -> Path:
    return Path(os.environ["XDG_CACHE_HOME"]) / "nsbuild"


def _deep(user: str) -> str:
    """Shell words that make a tree DEPTH directories deep in the current folder."""
    perl = f"perl -e 'for (1..{DEPTH}) {{ mkdir q(a) or die qq(mkdir: $!); chdir q(a) or die }}'"
    return f"setpriv --reuid={user} --regid={user} --clear-groups {perl}" if user else perl


# -- A7: a tree deeper than any recursion -----------------------------------------


@pytest.mark.slow
def test_a_deep_tree_in_a_dead_session_is_listed_and_removed(bookworm: str, xdg: Path) -> None:
    # One deep tree of the session's root (the caller's own files) and one of
    # nobody (a subordinate id: only rm inside the user namespace deletes it).
    marker = f"{os.getpid()}.79"
    script = (
        f"set -e; cd /root; {_deep('')}; "
        f"mkdir /deep; chown 65534:65534 /deep; cd /deep; {_deep('65534')}; "
        # The marker appears in a command line only once sleep runs.
        f"exec sleep $(({os.getpid()}+0)).79"
    )
    proc = subprocess.Popen([*NSBUILD, "run", "--env", bookworm, "--", "sh", "-c", script])
    try:
        wait_for(lambda: processes_with(marker) or proc.poll() is not None, "the trees are made")
        assert proc.poll() is None, "the deep trees were not made"
        sessions = _cache() / "sessions"
        (session_dir,) = [p for p in sessions.iterdir() if not p.name.startswith(".")]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        wait_for(lambda: not processes_with(marker), "the sandbox is gone")
    finally:
        proc.kill()
        proc.wait()

    listed = nsbuild("env", "list", check=False, timeout=HANG_GUARD)
    _no_traceback(listed)
    assert listed.returncode == 0, listed.stderr
    assert "bookworm (aliases: stable): ready" in listed.stdout
    listed = nsbuild("session", "list", check=False, timeout=HANG_GUARD)
    _no_traceback(listed)
    assert session_dir.name in listed.stdout  # owner gone, not yet removed

    r = nsbuild("gc", check=False, timeout=HANG_GUARD)
    _no_traceback(r)
    assert r.returncode == 0, r.stderr
    assert f"removed session {session_dir.name} (owner pid {proc.pid} gone)" in r.stdout
    assert not session_dir.exists()
    assert os.listdir(sessions) == []


def _deep_tree_here(top: Path) -> None:
    """DEPTH nested folders under `top`, made through descriptors (the path is
    too long for one system call)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(DEPTH):
            os.mkdir("a", dir_fd=fd)
            child = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def test_gc_removes_a_deep_leftover_and_goes_on(xdg: Path) -> None:
    # What a killed `session begin` leaves (a `.tmp-PID-START-...` name of a
    # dead process), deep, and a second leftover after it.
    nsbuild("env", "list")  # makes the cache folder as nsbuild wants it
    sessions = _cache() / "sessions"
    deep, after = sessions / ".tmp-4194305-1-aaaaaaaa", sessions / ".tmp-4194305-1-bbbbbbbb"
    (deep / "upper").mkdir(parents=True)
    (after / "upper").mkdir(parents=True)
    _deep_tree_here(deep / "upper")
    listed = nsbuild("session", "list", check=False, timeout=HANG_GUARD)
    _no_traceback(listed)
    r = nsbuild("gc", check=False, timeout=HANG_GUARD)
    _no_traceback(r)
    assert r.returncode == 0, r.stderr
    assert f"removed unfinished session {deep}" in r.stdout
    assert f"removed unfinished session {after}" in r.stdout
    assert os.listdir(sessions) == []


# -- A13: rm's messages are drained, not cut off ---------------------------------------


def _test_user() -> pwd.struct_passwd:
    name = os.environ.get("NSBUILD_TEST_USER", "nsbtest")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pytest.skip(f"no test user {name!r} (set NSBUILD_TEST_USER)")


def _first_subuid(name: str) -> int:
    with open("/etc/subuid") as f:
        for line in f:
            fields = line.strip().split(":")
            if fields[0] == name:
                return int(fields[1])
    pytest.skip(f"no /etc/subuid range for {name!r}")


_REMOVE = """
import sys
from pathlib import Path
from nsbuild.envs.errors import EnvError
from nsbuild.envs.remove import remove_tree
try:
    remove_tree(Path(sys.argv[1]))
except EnvError as e:
    print(e)
    sys.exit(3)
"""


@pytest.mark.root
def test_rm_that_says_a_lot_still_removes_all_it_can() -> None:
    # Folders of host root, which no id in the user's namespace may write in:
    # rm says one line per file it cannot remove (over a megabyte here), and
    # folders of a subordinate id that only rm in the namespace can delete.
    user = _test_user()
    other = _first_subuid(user.pw_name) + 1000
    top = Path(tempfile.mkdtemp(prefix="nsbuild-rm-", dir="/var/tmp"))
    try:
        top.chmod(0o755)
        tree = top / "tree"
        tree.mkdir()
        os.chown(tree, user.pw_uid, user.pw_gid)
        for i in range(30):
            (tree / f"locked{i}").mkdir()
            for j in range(200):
                (tree / f"locked{i}" / f"{'x' * 200}{j}").touch()
        for i in range(100):
            (tree / f"sub{i}").mkdir()
            (tree / f"sub{i}" / "f").touch()
            os.chown(tree / f"sub{i}" / "f", other, other)
            os.chown(tree / f"sub{i}", other, other)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/", "LANG": "C.UTF-8"}
        if "PYTHONPATH" in os.environ:  # the nsbuild under test, wherever it is
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        r = subprocess.run(
            ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
             "--", sys.executable, "-c", _REMOVE, str(tree)],
            cwd="/", env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
            timeout=HANG_GUARD, check=False,
        )  # fmt: skip
        assert r.returncode == 3, r.stderr
        (line,) = r.stdout.splitlines()
        assert "cannot remove inside the user namespace" in line and "Permission denied" in line
        # Every folder rm could remove is gone: it ran to its end.
        assert sorted(os.listdir(tree)) == sorted(f"locked{i}" for i in range(30))
    finally:
        shutil.rmtree(top)


# -- records in the cache: regular, bounded, not followed ---------------------------


def _session_record(xdg: Path, kind: str) -> Path:
    """A session folder whose session.json is `kind`: a FIFO, a link, a huge file."""
    nsbuild("env", "list")  # makes the cache folder as nsbuild wants it
    folder = _cache() / "sessions" / "bookworm-0badc0de"
    folder.mkdir(parents=True)
    record = folder / "session.json"
    if kind == "fifo":
        os.mkfifo(record)
    elif kind == "link":
        record.symlink_to("/dev/zero")
    else:
        with open(record, "wb") as f:
            f.truncate(100 << 20)
    return record


@pytest.mark.parametrize("kind", ["fifo", "link", "huge"])
def test_a_hostile_session_record_is_one_line_and_never_read(xdg: Path, kind: str) -> None:
    record = _session_record(xdg, kind)
    for args in (("session", "list"), ("env", "list")):
        r = nsbuild(*args, check=False, timeout=HANG_GUARD)
        _no_traceback(r)
        assert r.returncode == 0, r.stderr
        assert "bookworm-0badc0de" not in r.stdout
    r = nsbuild("gc", check=False, timeout=HANG_GUARD)
    _no_traceback(r)
    assert r.returncode == 1
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"nsbuild: gc: {record}: unreadable session record: ")
    # gc cannot know whose it is: it is left for the user to look at.
    assert os.path.lexists(record)
    r = nsbuild("session", "run", "bookworm-0badc0de", "--", "true", check=False,
                timeout=HANG_GUARD)  # fmt: skip
    _no_traceback(r)
    assert r.returncode != 0 and len(r.stderr.splitlines()) == 1, r.stderr


def _directory_env(xdg: Path, sources: str) -> Path:
    base = xdg / "base"
    (base / "etc" / "apt").mkdir(parents=True)
    (base / "etc" / "apt" / "sources.list").write_text(sources)
    (chroot_d(xdg) / "plain").write_text(f"Name: plain\nType: directory\nPath: {base}\n")
    return base


def test_hostile_cache_records_are_ignored_and_made_again(xdg: Path) -> None:
    _directory_env(xdg, "deb http://deb.debian.org/debian bookworm main\n")
    nsbuild("env", "list")
    cache = _cache()
    for name in ("config-cache.json", "overlay-probe.json"):
        (cache / name).unlink(missing_ok=True)
        os.mkfifo(cache / name)
    r = nsbuild("session", "begin", "plain", check=False, timeout=HANG_GUARD)
    _no_traceback(r)
    assert r.returncode == 0, r.stderr
    session_id = r.stdout.strip()
    r = nsbuild("env", "list", check=False, timeout=HANG_GUARD)
    assert r.returncode == 0 and "plain" in r.stdout, r.stderr
    nsbuild("session", "end", session_id, timeout=HANG_GUARD)
    # Made again, as regular files only their owner can read.
    for name in ("config-cache.json", "overlay-probe.json"):
        st = os.lstat(cache / name)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, name


def test_records_are_written_private(xdg: Path) -> None:
    _directory_env(xdg, "")
    session_id = nsbuild("session", "begin", "plain", timeout=HANG_GUARD).stdout.strip()
    try:
        cache = _cache()
        records = [cache / "config-cache.json", cache / "overlay-probe.json",
                   cache / "sessions" / session_id / "session.json"]  # fmt: skip
        for record in records:
            assert stat.S_IMODE(os.lstat(record).st_mode) == 0o600, record
    finally:
        nsbuild("session", "end", session_id, timeout=HANG_GUARD)


# -- the allowlist of a dependency phase comes from the base and config only ---------


def test_sources_in_a_dependency_layer_do_not_widen_the_allowlist(
    xdg: Path, tmp_path: Path
) -> None:
    _directory_env(xdg, "deb http://deb.debian.org/debian bookworm main\n")
    # A layer kept after a build dependency's maintainer scripts ran: they
    # added an apt source of their own.
    layer = tmp_path / "layer"
    (layer / "etc" / "apt" / "sources.list.d").mkdir(parents=True)
    (layer / "etc" / "apt" / "sources.list.d" / "evil.list").write_text(
        "deb http://evil.example/debian bookworm main\n"
    )
    (layer / "etc" / "apt" / "sources.list").write_text("deb http://evil.example/x y z\n")
    with throwaway("plain", extra_lowers=(layer,)) as s:
        assert s.mirrors() == ("http://deb.debian.org/debian",)
