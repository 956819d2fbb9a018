"""The host side of environments against hostile input: a cache other users
could reach, a tarball that expands without bound, a `Path:` that is not a
regular file, a tarball that changes while it is read.

Each test does what an attacker (or another local user) would do and checks
what the user sees: one line naming the path, a non-zero exit, nothing of
the attacker's left in the store.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pwd
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from envs_helpers import NSBUILD, chroot_d, nsbuild
from waiting import HANG_GUARD, wait_for

from nsbuild.envs.errors import UnsafeTarball
from nsbuild.envs.tarcheck import sanitize


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    """The one line of the failure (after the progress line of a first unpack)."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("nsbuild: unpacking ")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    path.chmod(0o644)
    return path


def _dir(name: str, mode: int = 0o755) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, None


def _file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info, data


def _marker_tar(path: Path, text: str) -> Path:
    return _tar(path, [_dir("./"), _dir("./etc/"), _file("./etc/marker", text.encode())])


def _env(xdg: Path, name: str, path: Path, extra: str = "") -> None:
    (chroot_d(xdg) / name).write_text(f"Name: {name}\nPath: {path}\n{extra}")


def _bases(xdg: Path) -> list[str]:
    bases = xdg / "cache" / "nsbuild" / "store" / "bases"
    return sorted(os.listdir(bases)) if bases.is_dir() else []


# -- items 4, 5, 14: the cache tree is private ------------------------------------


def test_a_cache_open_to_others_is_made_private(xdg: Path) -> None:
    top = xdg / "cache" / "nsbuild"
    r = nsbuild("session", "list")
    assert r.stderr == ""
    assert top.stat().st_mode & 0o777 == 0o700  # made private from the start
    top.chmod(0o755)
    r = nsbuild("session", "list")
    assert r.stderr == f"nsbuild: {top} was open to other users: made it private (mode 0700)\n"
    assert top.stat().st_mode & 0o777 == 0o700
    assert nsbuild("session", "list").stderr == ""  # said once


def test_a_cache_that_is_a_symlink_is_refused(xdg: Path) -> None:
    elsewhere = xdg / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (xdg / "cache" / "nsbuild").symlink_to(elsewhere)
    for args in (("session", "list"), ("env", "list"), ("gc",)):
        r = nsbuild(*args, check=False)
        assert r.returncode == 2, r.stderr
        line = _one_line(r)
        assert line.startswith(f"nsbuild: {xdg / 'cache' / 'nsbuild'}: "), line
        assert "symlink" in line, line
    assert os.listdir(elsewhere) == []


def _test_user() -> pwd.struct_passwd:
    name = os.environ.get("NSBUILD_TEST_USER", "nsbtest")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pytest.skip(f"no test user {name!r} (set NSBUILD_TEST_USER)")


def _as(uid: int, gid: int, *argv: str, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *argv],
        cwd="/", env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
        timeout=HANG_GUARD, check=False,
    )  # fmt: skip


@pytest.fixture
def user_home() -> Iterator[tuple[pwd.struct_passwd, Path, dict[str, str]]]:
    """The test user's config and cache folders under a folder every user can
    walk (as under /home), and the environment to run nsbuild as that user."""
    user = _test_user()
    top = Path(tempfile.mkdtemp(prefix="nsbuild-private-", dir="/var/tmp"))
    top.chmod(0o755)
    for sub in ("config", "cache"):
        (top / sub).mkdir()
        os.chown(top / sub, user.pw_uid, user.pw_gid)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(top), "LANG": "C.UTF-8",
           "XDG_CONFIG_HOME": str(top / "config"), "XDG_CACHE_HOME": str(top / "cache")}
    if "PYTHONPATH" in os.environ:  # the nsbuild under test, wherever it is
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    try:
        yield user, top, env
    finally:
        _as(user.pw_uid, user.pw_gid, sys.executable, "-c",
            "import sys; from pathlib import Path; from nsbuild.envs.remove import remove_tree; "
            "remove_tree(Path(sys.argv[1]))", str(top / "cache"), env=env)
        shutil.rmtree(top)


@pytest.mark.root
def test_other_users_cannot_reach_the_store_or_a_session(
    user_home: tuple[pwd.struct_passwd, Path, dict[str, str]],
) -> None:
    user, top, env = user_home
    suid = tarfile.TarInfo("./bin/suidroot")
    suid.mode, suid.uid, suid.gid = 0o4755, 0, 0
    tar = _tar(top / "suid.tar", [
        _dir("./"), _dir("./var/"), _dir("./var/tmp/", 0o1777), _dir("./bin/"),
        (suid, Path("/usr/bin/id").read_bytes()),
    ])  # fmt: skip
    chroot = top / "config" / "nsbuild" / "chroot.d"
    _as(user.pw_uid, user.pw_gid, "mkdir", "-p", str(chroot), env=env)
    _as(user.pw_uid, user.pw_gid, "sh", "-c", f'echo "Name: t\nPath: {tar}" > "$1"', "sh",
        str(chroot / "t"), env=env)
    nsbuild_as_user = [sys.executable, "-m", "nsbuild"]
    r = _as(user.pw_uid, user.pw_gid, *nsbuild_as_user, "session", "begin", "t", env=env)
    assert r.returncode == 0, r.stderr
    session = r.stdout.strip()
    cache = top / "cache" / "nsbuild"
    (digest,) = os.listdir(cache / "store" / "bases")
    base = cache / "store" / "bases" / digest / "root"
    # What a testbed makes in its session: a world-writable downtmp.
    upper = cache / "sessions" / session / "upper"
    r = _as(user.pw_uid, user.pw_gid, "mkdir", "-m", "1777", str(upper / "downtmp"), env=env)
    assert r.returncode == 0, r.stderr
    assert os.stat(base / "bin" / "suidroot").st_mode & 0o4000  # setuid to the user, kept

    nobody = pwd.getpwnam("nobody")
    attempts = {
        "plant in the base's var/tmp": ("sh", "-c", 'echo x > "$1"/var/tmp/planted', "sh",
                                        str(base)),
        "plant in the session's downtmp": ("sh", "-c", 'echo x > "$1"/downtmp/planted', "sh",
                                           str(upper)),
        # From a shell: setpriv itself still has root's capabilities at its exec.
        "run a setuid file of the base": ("sh", "-c", '"$1" -u', "sh",
                                          str(base / "bin" / "suidroot")),
    }  # fmt: skip
    succeeded = {}
    for what, argv in attempts.items():
        r = _as(nobody.pw_uid, nobody.pw_gid, *argv)
        if r.returncode == 0:
            succeeded[what] = r.stdout.strip()
    assert succeeded == {}, f"as nobody: {succeeded} (the user is uid {user.pw_uid})"
    assert not (base / "var" / "tmp" / "planted").exists()
    assert cache.stat().st_mode & 0o777 == 0o700

    r = _as(user.pw_uid, user.pw_gid, *nsbuild_as_user, "session", "end", session, env=env)
    assert r.returncode == 0, r.stderr


@pytest.mark.root
def test_a_cache_owned_by_another_user_is_refused(
    user_home: tuple[pwd.struct_passwd, Path, dict[str, str]],
) -> None:
    user, top, env = user_home
    cache = top / "cache" / "nsbuild"
    cache.mkdir(mode=0o700)
    nobody = pwd.getpwnam("nobody")
    os.chown(cache, nobody.pw_uid, nobody.pw_gid)
    r = _as(user.pw_uid, user.pw_gid, sys.executable, "-m", "nsbuild", "session", "list", env=env)
    assert r.returncode == 2, r.stderr
    line = _one_line(r)
    assert line.startswith(f"nsbuild: {cache}: ") and f"uid {nobody.pw_uid}" in line, line


# -- item 15: an unpack is bounded ------------------------------------------------


def test_a_compressed_stream_that_expands_too_far_is_refused() -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("zeros")
        info.size = 64 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    small = gzip.compress(raw.getvalue())
    assert len(small) < 200_000
    with pytest.raises(UnsafeTarball, match=r"refusing member 'zeros': unpacked, it would "
                                            r"exceed the limit of 1\.0 MiB"):
        sanitize(io.BytesIO(small), io.BytesIO(), "zeros.tar.gz", limit=1 << 20)
    assert sanitize(io.BytesIO(small), io.BytesIO(), "zeros.tar.gz", limit=65 << 20).members == 1


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def test_a_member_under_a_hard_link_to_a_symlink_is_refused(tmp_path: Path) -> None:
    # tar makes `h` a second symlink to etc, then would write x through it.
    tar = _tar(tmp_path / "t.tar", [_dir("etc/"), _link("s", "etc", tarfile.SYMTYPE),
                                    _link("h", "s", tarfile.LNKTYPE), _file("h/x", b"x")])
    with tar.open("rb") as src, pytest.raises(
        UnsafeTarball, match=r"^t\.tar: refusing member 'h/x': its path goes through the "
                             r"symlink 'h'$"):
        sanitize(src, io.BytesIO(), "t.tar")


def test_an_oversized_extended_header_is_refused_before_it_is_read() -> None:
    # tarfile reads a pax header whole: 1 GiB of it would be 1 GiB of nsbuild's memory.
    head = tarfile.TarInfo("././@PaxHeader")
    head.type, head.size = tarfile.XHDTYPE, 1 << 30
    stream = io.BytesIO(head.tobuf(tarfile.USTAR_FORMAT) + bytes(2 << 20))
    with pytest.raises(UnsafeTarball, match=r"extended header of 1073741824 bytes"):
        sanitize(stream, io.BytesIO(), "pax.tar")
    assert stream.tell() < 1 << 20


def _gnu_sparse_with_map(blocks: int) -> bytes:
    """An old-GNU sparse member whose map goes on for `blocks` extension blocks."""
    info = tarfile.TarInfo("sparse")
    info.type = tarfile.GNUTYPE_SPARSE
    head = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    head[482] = 1  # isextended: a block of 21 more map entries follows
    head[148:156] = b"        "
    head[148:156] = b"%06o\0 " % sum(head)
    entry = b"%011o\0%011o\0" % (1, 1)
    out = [bytes(head)]
    for i in range(blocks):
        out.append(entry * 21 + (b"\1" if i < blocks - 1 else b"\0") + bytes(7))
    return b"".join(out) + bytes(1024)


def test_a_sparse_map_is_not_read_without_bound() -> None:
    stream = io.BytesIO(gzip.compress(_gnu_sparse_with_map(8192)))  # 4 MiB of map
    with pytest.raises(UnsafeTarball, match=r"a member's headers take more than 2097152 bytes"):
        sanitize(stream, io.BytesIO(), "sparse.tar.gz")


@pytest.mark.userns
def test_a_sparse_member_cannot_fill_the_cache(xdg: Path) -> None:
    work = xdg / "sparse"
    work.mkdir()
    with open(work / "big", "wb") as f:
        f.truncate(512 << 20)
    tar = xdg / "sparse.tar"
    subprocess.run(["tar", "--sparse", "-cf", str(tar), "-C", str(work), "big"], check=True)
    assert tar.stat().st_size < 64 << 10
    _env(xdg, "t", tar)
    r = nsbuild("session", "begin", "t", check=False)
    assert r.returncode == 2, r.stdout
    line = _one_line(r)
    assert f"{tar}: refusing member 'big': unpacked, it would exceed the limit of" in line, line
    assert "Unpack-Limit" in line
    assert _bases(xdg) == []
    used = subprocess.run(["du", "-sk", str(xdg / "cache")], capture_output=True, text=True,
                          check=True).stdout.split()[0]
    assert int(used) < 16 << 10  # KiB: nothing like the 512 MiB member was written
    # The limit is the environment's to raise.
    assert "Unpack-Limit: 1G" in _with_limit(xdg, tar)


def _with_limit(xdg: Path, tar: Path) -> str:
    _env(xdg, "t", tar, "Unpack-Limit: 1G\n")
    return nsbuild("env", "show", "t").stdout


# -- item 16: a Path that is not a regular file -----------------------------------


@pytest.fixture
def bad_paths(xdg: Path) -> dict[str, Path]:
    fifo = xdg / "fifo.tar"
    os.mkfifo(fifo)
    secret = xdg / "unreadable.tar"
    _marker_tar(secret, "secret")
    secret.chmod(0)
    link = xdg / "link.tar"
    link.symlink_to(secret)
    return {"fifo": fifo, "link": link, "dev": Path("/dev/zero")}


@pytest.mark.userns
def test_a_path_that_is_not_a_readable_regular_file_gives_one_line(
    xdg: Path, bad_paths: dict[str, Path]
) -> None:
    if os.access(bad_paths["link"], os.R_OK):
        pytest.skip("run as a user who cannot read a mode 0 file (not root)")
    whys = {"fifo": "not a regular file (a FIFO)", "link": "Permission denied",
            "dev": "not a regular file (a character device)"}
    for name, path in bad_paths.items():
        _env(xdg, name, path)
        for args in (("run", "--env", name, "--", "true"), ("session", "begin", name)):
            r = nsbuild(*args, check=False, timeout=HANG_GUARD)
            assert r.returncode == 2, r.stdout
            line = _one_line(r)
            assert line.startswith(f"nsbuild: {path}: ") and whys[name] in line, line


@pytest.mark.userns
def test_gc_goes_on_past_a_bad_path(xdg: Path, bad_paths: dict[str, Path]) -> None:
    if os.access(bad_paths["link"], os.R_OK):
        pytest.skip("run as a user who cannot read a mode 0 file (not root)")
    _env(xdg, "old", _marker_tar(xdg / "old.tar", "old"))
    nsbuild("session", "end", nsbuild("session", "begin", "old").stdout.strip())
    (digest,) = _bases(xdg)
    (chroot_d(xdg) / "old").unlink()
    for name, path in bad_paths.items():
        _env(xdg, name, path)
    r = nsbuild("gc", check=False, timeout=HANG_GUARD)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 1, r.stderr
    assert f"removed unused base {digest[:12]}" in r.stdout.splitlines()
    errors = r.stderr.splitlines()
    for name, path in bad_paths.items():
        assert any(f"environment {name!r}" in ln and str(path) in ln for ln in errors), errors
    assert _bases(xdg) == []


# -- item 17: what is unpacked is what was hashed ---------------------------------


def _lock_waiter(lock: Path) -> bool:
    """Whether a process waits for a flock on `lock` (a "->" line of /proc/locks)."""
    st = os.stat(lock)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as f:
        return any("->" in line and ident in line for line in f)


@pytest.mark.userns
@pytest.mark.parametrize("swap", ["rename", "rewrite"])
def test_a_tarball_swapped_after_hashing_is_not_stored_under_the_old_hash(
    xdg: Path, swap: str
) -> None:
    import fcntl

    tar = _marker_tar(xdg / "t.tar", "A")
    other = _marker_tar(xdg / "other.tar", "B" * 64)
    digest_a = hashlib.sha256(tar.read_bytes()).hexdigest()
    _env(xdg, "t", tar)
    lock = xdg / "cache" / "nsbuild" / "store" / "locks" / f"{digest_a}.lock"
    lock.parent.mkdir(parents=True)
    # Held shared: nsbuild hashes, then waits here before it unpacks.
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    proc = subprocess.Popen([*NSBUILD, "session", "begin", "t"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        def nsbuild_waits() -> bool:
            assert proc.poll() is None, proc.communicate()
            return _lock_waiter(lock)

        wait_for(nsbuild_waits, "nsbuild waits for the lock")
        if swap == "rename":
            os.replace(other, tar)
        else:
            with open(tar, "r+b") as f:
                f.write(other.read_bytes())
    finally:
        os.close(fd)
    out, err = proc.communicate(timeout=HANG_GUARD)
    if digest_a in _bases(xdg):
        root = xdg / "cache" / "nsbuild" / "store" / "bases" / digest_a / "root"
        content = (root / "etc" / "marker").read_bytes()
        assert content == b"A", f"the store entry named after A's sha256 holds {content!r}"
    if swap == "rename":
        # The descriptor hashed is the one unpacked: the session is on A.
        assert proc.returncode == 0, err
        assert _bases(xdg) == [digest_a]
        nsbuild("session", "end", out.strip())
    else:
        assert proc.returncode == 2, out
        line = err.strip().splitlines()[-1]
        assert line == f"nsbuild: {tar}: changed while it was being unpacked; try again", line
        assert _bases(xdg) == []
