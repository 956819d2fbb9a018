"""setuid/setgid files cannot be made in a directory of the host that other
users may reach: a writable bind that is not private (the working directory
of `nsbuild run`, --bind, a writable --root). Inside, uid 0 is the caller, so
such a file would run with the caller's ids for whoever executes it.

Where every writable bind is nsbuild's own private tree (an environment's
session, whose dpkg installs setuid programs), the bits stay allowed."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from sandbox_helpers import explain, nsbuild, ok, py, sh

from nsbuild.sandbox import Bind, Sandbox, Tmpfs, caller_idmap, host_view, run, spawn
from nsbuild.sandbox.enter import sandbox_pids, start

pytestmark = pytest.mark.userns

SETID = stat.S_ISUID | stat.S_ISGID
EPERM_TEXT = "Operation not permitted"


def setid_bits(path: Path) -> int:
    return path.lstat().st_mode & SETID


def test_chmod_4755_in_the_working_directory_fails(tmp_path: Path) -> None:
    r = nsbuild("--", *sh("cp /bin/true x; chmod 4755 x"), cwd=tmp_path)
    assert r.returncode != 0, explain(r)
    assert EPERM_TEXT in r.stderr, explain(r)
    assert (tmp_path / "x").exists()
    assert setid_bits(tmp_path / "x") == 0


def test_install_m_4755_fails(tmp_path: Path) -> None:
    r = nsbuild("--", "install", "-m", "4755", "/bin/true", "y", cwd=tmp_path)
    assert r.returncode != 0, explain(r)
    y = tmp_path / "y"
    assert not y.exists() or setid_bits(y) == 0


def test_creating_a_setuid_file_fails(tmp_path: Path) -> None:
    """open(O_CREAT) and mknod(S_IFREG) with the bits in their mode: both
    would make the file setuid at once, without any chmod."""
    r = ok(nsbuild("--", *py("""
        import errno, os, stat
        for what, make in (
            ("open", lambda: os.close(os.open("z", os.O_CREAT | os.O_WRONLY, 0o4755))),
            ("mknod", lambda: os.mknod("n", stat.S_IFREG | 0o6755)),
        ):
            try:
                make()
                print(what, "made")
            except OSError as e:
                print(what, errno.errorcode[e.errno])
    """), cwd=tmp_path))
    assert r.stdout.split("\n")[:2] == ["open EPERM", "mknod EPERM"], explain(r)
    assert not (tmp_path / "z").exists()
    assert not (tmp_path / "n").exists()


def test_chmod_setgid_fails_in_a_bind(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "g").write_bytes(b"")
    r = ok(nsbuild("--bind", f"{shared}:/mnt", "--", *py("""
        import errno, os
        try:
            os.chmod("/mnt/g", 0o2755)
            print("made")
        except OSError as e:
            print(errno.errorcode[e.errno])
    """), cwd=tmp_path))
    assert r.stdout == "EPERM\n", explain(r)
    assert setid_bits(shared / "g") == 0


def test_plain_modes_still_work(tmp_path: Path) -> None:
    ok(nsbuild("--", *sh("cp /bin/true x; chmod 1777 x; chmod 755 x; install -m 700 x y;"
                         " mkdir -m 1777 d"), cwd=tmp_path))
    assert stat.S_IMODE((tmp_path / "y").stat().st_mode) == 0o700


def test_debug_says_the_filter_is_on(tmp_path: Path) -> None:
    r = ok(nsbuild("--", "true", cwd=tmp_path, debug=True))
    assert "setuid/setgid" in r.stderr, explain(r)


# --- the sandbox API: where every writable bind is private ----------------------

CHMOD_4755 = ("/bin/sh", "-c", "cp /bin/true /w/x && chmod 4755 /w/x")


def test_private_writable_bind_keeps_setuid(tmp_path: Path) -> None:
    own = tmp_path / "own"
    own.mkdir()
    spec = Sandbox(argv=CHMOD_4755, idmap=caller_idmap(),
                   mounts=(*host_view(), Bind(str(own), "/w", private=True)))
    assert run(spec) == 0
    assert setid_bits(own / "x") == stat.S_ISUID


def test_readonly_binds_only_keep_setuid() -> None:
    """A sandbox whose only writable places are its own tmpfs: nothing of the
    host to protect, so the modes work (as dpkg needs them)."""
    script = ("cp /bin/true /tmp/x && chmod 6755 /tmp/x && test -u /tmp/x && test -g /tmp/x"
              " && install -m 4755 /bin/true /tmp/y && test -u /tmp/y")
    spec = Sandbox(argv=("/bin/sh", "-c", script), idmap=caller_idmap(), mounts=host_view())
    assert run(spec) == 0


def test_entered_commands_follow_deny_setid(tmp_path: Path) -> None:
    """A command entered into a running sandbox gets the same filter when its
    caller says the sandbox has shared writable binds (a new process is not
    the sandbox's child: it inherits no filter)."""
    own = tmp_path / "own"
    own.mkdir()
    spec = Sandbox(argv=("sleep", "infinity"), idmap=caller_idmap(),
                   mounts=(*host_view(), Bind(str(own), "/w", private=True)))
    with open("/dev/null", "rb") as null:
        proc = spawn(spec, stdin=null.fileno(), stdout=null.fileno())
    try:
        _init, command = sandbox_pids(proc)
        assert start(command, CHMOD_4755, deny_setid=True).wait_relaying() != 0
        assert setid_bits(own / "x") == 0
        assert start(command, CHMOD_4755).wait_relaying() == 0
        assert setid_bits(own / "x") == stat.S_ISUID
        mount = ("/bin/sh", "-c", "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m")
        assert start(command, mount, deny_setid=True).wait_relaying() != 0
        assert start(command, mount).wait_relaying() == 0
    finally:
        proc.kill()
        proc.wait()


def test_writable_root_bind_counts_as_shared() -> None:
    """--root DIR binds DIR writable at /: other users may reach it."""
    spec = Sandbox(argv=("true",), idmap=caller_idmap(), root=Bind("/srv/tree", "/"))
    assert spec.shared_writable() == (Bind("/srv/tree", "/"),)
    private = Sandbox(argv=("true",), idmap=caller_idmap(),
                      root=Bind("/srv/tree", "/", private=True),
                      mounts=(Bind("/x", "/x", readonly=True), Tmpfs("/tmp")))
    assert private.shared_writable() == ()


# --- the kernel making the file: overlayfs copy-up, mqueue -----------------------

# Inside, as root of the sandbox: the mount system call and the new mount API,
# each printing its errno name or "ok". The new API's numbers are the same on
# every architecture; mount goes through libc.
MOUNT_ATTEMPTS = """
    import ctypes, errno, os
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def result(ret):
        return "ok" if ret >= 0 else errno.errorcode[ctypes.get_errno()]

    for d in ("/out/up", "/out/wk", "/tmp/o"):
        os.makedirs(d, exist_ok=True)
    ret = libc.mount(b"overlay", b"/tmp/o", b"overlay", 0,
                     b"lowerdir=/lower,upperdir=/out/up,workdir=/out/wk")
    print("mount", result(ret))
    if ret == 0:
        # Opening for writing copies the file up into /out/up, with its mode.
        open("/tmp/o/su", "ab").close()
    AT_FDCWD, OPEN_TREE_CLONE = -100, 1
    for name, nr, args in (
        ("fsopen", 430, (b"tmpfs", 0)),
        ("fspick", 433, (AT_FDCWD, b"/out", 0)),
        ("open_tree", 428, (AT_FDCWD, b"/out", OPEN_TREE_CLONE)),
        ("move_mount", 429, (-1, b"", -1, b"", 0)),
        ("mount_setattr", 442, (AT_FDCWD, b"/out", 0, None, 0)),
        ("open_tree_attr", 467, (AT_FDCWD, b"/out", OPEN_TREE_CLONE, None, 0)),
    ):
        print(name, result(libc.syscall(nr, *args)))
"""


def test_overlay_copy_up_of_a_setuid_file_fails(tmp_path: Path) -> None:
    """An overlay whose upper layer is in a shared bind: writing to a setuid
    file of the lower layer copies it up, and the kernel itself gives the copy
    its mode, 4755, owned by the caller, with no chmod to refuse. The lower
    file must have a mapped owner: one the caller made, bound read-only."""
    lower = tmp_path / "lower"
    lower.mkdir()
    su = lower / "su"
    su.write_bytes(Path("/bin/true").read_bytes())
    su.chmod(0o4755)
    shared = tmp_path / "out"
    shared.mkdir()
    r = ok(nsbuild("--ro-bind", f"{lower}:/lower", "--bind", f"{shared}:/out", "--",
                   *py(MOUNT_ATTEMPTS), cwd=tmp_path))
    copy = shared / "up" / "su"
    assert not copy.exists() or setid_bits(copy) == 0, explain(r)
    assert r.stdout.splitlines() == [
        "mount EPERM", "fsopen EPERM", "fspick EPERM", "open_tree EPERM",
        "move_mount EPERM", "mount_setattr EPERM", "open_tree_attr EPERM"], explain(r)


def test_private_sandbox_can_still_mount() -> None:
    """Without a shared writable bind (an environment's session, where builds
    and their tests may unshare and mount), mount keeps working."""
    script = ("mkdir /tmp/m && mount -t tmpfs -o size=1M none /tmp/m && touch /tmp/m/x"
              " && umount /tmp/m")
    spec = Sandbox(argv=("/bin/sh", "-c", script), idmap=caller_idmap(), mounts=host_view())
    assert run(spec) == 0


def test_setuid_message_queue_fails(tmp_path: Path) -> None:
    """mq_open(O_CREAT) sets the queue's mode as given, with no chmod. The
    queue lives in the sandbox's own IPC namespace, out of the host's reach,
    but a setuid mode has no use there either; plain queues keep working."""
    r = ok(nsbuild("--", *py("""
        import ctypes, errno, os
        libc = ctypes.CDLL(None, use_errno=True)
        for name, mode in ((b"/setid", 0o4755), (b"/plain", 0o644)):
            fd = libc.mq_open(name, os.O_CREAT | os.O_RDWR, mode, None)
            print(name.decode(), "made" if fd >= 0 else errno.errorcode[ctypes.get_errno()])
    """), cwd=tmp_path))
    assert r.stdout.splitlines() == ["/setid EPERM", "/plain made"], explain(r)
