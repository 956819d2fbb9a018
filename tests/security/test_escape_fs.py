"""Filesystem escapes: read host files outside the bound paths, write kernel
interfaces, reach host block devices, undo read-only mounts, make device nodes,
fill a filesystem.

Covered elsewhere, listed in docs/security.md: /proc/sys and /sys read-only
and /sys/kernel masked (tests/sandbox/test_fs.py), a read-only bind cannot be
remounted read-write (same file), only fds 0-2 are inherited
(tests/sandbox/test_hardening.py, tests/sandbox/test_api.py)."""

from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path

import pytest
from security_helpers import explain, failed, probe, probe_argv, results, run_nsbuild

from nsbuild.sandbox import Sandbox, Tmpfs, caller_idmap, host_view, spawn

pytestmark = pytest.mark.userns

SECRET = "nsbuild-host-secret"


@pytest.fixture
def host_secret(tmp_path: Path) -> tuple[Path, Path]:
    """(a host file next to the working directory but not bound in, the working dir)."""
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    work = tmp_path / "work"
    work.mkdir()
    return secret, work


def test_host_files_outside_the_bound_paths_are_unreachable(
    host_secret: tuple[Path, Path],
) -> None:
    """By name, by `..` from the working directory, through /proc/1/root,
    /proc/self/root, /proc/self/cwd and every other process's root and cwd."""
    secret, work = host_secret
    code = """
    path = sys.argv[1]
    def read(p):
        with open(p) as f:
            return f.read()
    attempt("by name", lambda: read(path))
    attempt("dotdot", lambda: read("../" + os.path.basename(path)))
    attempt("dotdot from /proc/self/cwd", lambda: read("/proc/self/cwd/../"
                                                        + os.path.basename(path)))
    attempt("/proc/self/root", lambda: read("/proc/self/root" + path))
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        attempt(f"/proc/{pid}/root", lambda pid=pid: read(f"/proc/{pid}/root" + path))
        attempt(f"/proc/{pid}/cwd", lambda pid=pid: read(f"/proc/{pid}/cwd/../"
                                                          + os.path.basename(path)))
    """
    res = probe(code, cwd=work, args=(str(secret),))
    assert "/proc/1/root" in res
    for name, got in res.items():
        assert got["ok"] is False, f"{name}: read the host file: {got}"


def test_a_leaked_directory_descriptor_gives_nothing(host_secret: tuple[Path, Path]) -> None:
    """The caller holds an inheritable descriptor of a host directory (O_PATH and
    a plain one): inside, only 0, 1 and 2 exist, so nothing opens through it."""
    secret, work = host_secret
    fds = (os.open(secret.parent, os.O_PATH), os.open(secret.parent, os.O_RDONLY))
    try:
        for fd in fds:
            os.set_inheritable(fd, True)
        code = """
        attempt("fds", lambda: sorted(int(f) for f in os.listdir("/proc/self/fd")))
        for fd in sys.argv[1:]:
            attempt("openat " + fd, lambda fd=fd: os.open("secret.txt", os.O_RDONLY,
                                                         dir_fd=int(fd)))
            attempt("magic link " + fd, lambda fd=fd: open(f"/proc/self/fd/{fd}/secret.txt").read())
        """
        res = probe(code, cwd=work, args=tuple(map(str, fds)), pass_fds=fds)
    finally:
        for fd in fds:
            os.close(fd)
    # listdir itself holds one descriptor (3) while it reads.
    assert res["fds"] == {"ok": True, "value": "[0, 1, 2, 3]"}, res["fds"]
    for fd in fds:
        failed(res, f"openat {fd}", "EBADF", "ENOTDIR")
        failed(res, f"magic link {fd}", "ENOENT", "ENOTDIR")


def test_dotdot_in_mount_destinations_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    for opt in ("--bind", "--ro-bind"):
        r = run_nsbuild("run", opt, f"{tmp_path}:/a/../../etc", "--", "touch", str(marker),
                        cwd=tmp_path)
        assert r.returncode == 2, explain(r)
        assert "'..'" in r.stderr and len(r.stderr.splitlines()) == 1, explain(r)
    r = run_nsbuild("run", "--tmpfs", "/x/../../tmp", "--", "touch", str(marker), cwd=tmp_path)
    assert r.returncode == 2, explain(r)
    assert not marker.exists()


def _hostile_root(root: Path) -> None:
    root.mkdir()
    (root / "usr").mkdir()
    for d in ("bin", "lib", "lib64"):
        (root / d).symlink_to(f"usr/{d}")


@pytest.mark.parametrize("link", ["absolute", "relative", "tmp"])
def test_symlinks_in_a_hostile_root_cannot_send_mounts_onto_the_host(
    tmp_path: Path, link: str
) -> None:
    """--root R where a path the mounts go through is a symlink pointing outside R
    (absolute, relative, or R's own /tmp): the mount is refused (one line, exit
    125) or lands inside R; the host directory pointed to stays empty."""
    root, outside, src = tmp_path / "root", tmp_path / "outside", tmp_path / "src"
    _hostile_root(root)
    outside.mkdir()
    src.mkdir()
    (src / "payload").write_text("x")
    target = str(outside) if link != "relative" else "../" * 12 + str(outside).lstrip("/")
    name = "tmp" if link == "tmp" else "evil"
    (root / name).symlink_to(target)
    extra = [] if link == "tmp" else ["--ro-bind", f"{src}:/evil/by-bind",
                                      "--tmpfs", "/evil/by-tmpfs"]
    r = run_nsbuild("run", "--root", str(root), "--bind", "/usr:/usr", *extra, "--",
                    "/usr/bin/sh", "-c", "echo escaped > /tmp/written", cwd=tmp_path)
    if r.returncode != 0:
        assert r.returncode == 125, explain(r)
        assert len(r.stderr.splitlines()) == 1, explain(r)
        assert f"/{name}" in r.stderr, explain(r)
    assert sorted(os.listdir(outside)) == [], "something landed outside the root"


@pytest.mark.parametrize("at", ["dev", "proc"])
def test_a_hostile_root_cannot_send_dev_or_proc_entries_onto_the_host(
    tmp_path: Path, at: str
) -> None:
    """--root R where /dev (or /proc) is a symlink to R itself and R holds
    symlinks named like their entries (null, sys...) that point at the host
    through the setup's own view of it (/oldroot): nothing is created or
    mounted on the host, whatever becomes of the run."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    _hostile_root(root)
    outside.mkdir()
    (root / at).symlink_to("/")
    for name in ("null", "zero", "pts", "shm", "sys", "fs"):
        (root / name).symlink_to(f"/oldroot{outside}/{name}")
    r = run_nsbuild("run", "--root", str(root), "--bind", "/usr:/usr", "--",
                    "/usr/bin/true", cwd=tmp_path)
    assert r.returncode in (0, 125, 126, 127), explain(r)
    assert sorted(os.listdir(outside)) == [], "something landed outside the root"


def test_kernel_interfaces_are_not_writable(tmp_path: Path) -> None:
    """/proc/sysrq-trigger, /proc/sys, /sys, a fresh proc or sysfs of one's own."""
    code = """
    def write(p, data="1"):
        with open(p, "w") as f:
            f.write(data)
    def mount(fstype, target):
        os.makedirs(target, exist_ok=True)
        r = libc.mount(fstype.encode(), target.encode(), fstype.encode(), 0, None)
        if r != 0:
            e = ctypes.get_errno(); raise OSError(e, os.strerror(e))
    attempt("sysrq-trigger", lambda: write("/proc/sysrq-trigger", "h"))
    attempt("core_pattern", lambda: write("/proc/sys/kernel/core_pattern", "|/tmp/x"))
    attempt("sys uevent_helper", lambda: write("/sys/kernel/uevent_helper", "/tmp/x"))
    attempt("sys lo mtu", lambda: write("/sys/class/net/lo/mtu", "1280"))
    attempt("mount proc", lambda: mount("proc", "/tmp/p"))
    attempt("mount sysfs", lambda: mount("sysfs", "/tmp/s"))
    attempt("mount cgroup2", lambda: mount("cgroup2", "/tmp/c"))
    attempt("kmsg", lambda: os.open("/dev/kmsg", os.O_WRONLY))
    attempt("kcore", lambda: os.open("/proc/kcore", os.O_RDONLY))
    """
    res = probe(code, cwd=tmp_path)
    for name in res:
        failed(res, name)


def test_host_block_devices_and_device_nodes_are_out_of_reach(tmp_path: Path) -> None:
    """No block device in /dev, none can be made, none mounted; nor any character
    device beyond the harmless ones."""
    host_disks = sorted(d for d in os.listdir("/dev")
                        if d.startswith(("vd", "sd", "nvme", "xvd", "loop", "dm-")))
    code = """
    def mount(src, target, fstype):
        os.makedirs(target, exist_ok=True)
        r = libc.mount(src.encode(), target.encode(), fstype.encode(), 1, None)
        if r != 0:
            e = ctypes.get_errno(); raise OSError(e, os.strerror(e))
    attempt("dev listing", lambda: sorted(os.listdir("/dev")))
    attempt("mknod block", lambda: os.mknod("/tmp/disk", 0o60600, os.makedev(8, 0)))
    attempt("mknod char mem", lambda: os.mknod("/tmp/mem", 0o20600, os.makedev(1, 1)))
    attempt("mknod in cwd", lambda: os.mknod("disk", 0o60600, os.makedev(253, 0)))
    for d in sys.argv[1:]:
        attempt("open " + d, lambda d=d: os.open("/dev/" + d, os.O_RDONLY))
        attempt("mount " + d, lambda d=d: mount("/dev/" + d, "/tmp/m", "ext4"))
    """
    res = probe(code, cwd=tmp_path, args=tuple(host_disks))
    listing = ast.literal_eval(str(res["dev listing"]["value"]))
    assert set(listing) <= {"null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx",
                            "fd", "stdin", "stdout", "stderr", "core", "shm"}, listing
    failed(res, "mknod block", "EPERM")
    failed(res, "mknod char mem", "EPERM")
    failed(res, "mknod in cwd", "EPERM")
    for d in host_disks:
        failed(res, f"open {d}", "ENOENT")
        failed(res, f"mount {d}", "ENOENT", "EPERM")


def test_mounts_are_locked(tmp_path: Path) -> None:
    """Unmounting a read-only bind (to see what is under it), remounting it
    read-write, moving it away: refused, the nested user namespace locks them."""
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "f").write_text("keep")
    code = """
    MS_REMOUNT, MS_BIND, MS_MOVE = 32, 4096, 8192
    def call(fn):
        if fn() != 0:
            e = ctypes.get_errno(); raise OSError(e, os.strerror(e))
    attempt("umount ro", lambda: call(lambda: libc.umount2(b"/ro", 0)))
    attempt("lazy umount /usr", lambda: call(lambda: libc.umount2(b"/usr", 2)))
    attempt("remount ro rw", lambda: call(lambda: libc.mount(None, b"/ro", None,
                                                            MS_REMOUNT | MS_BIND, None)))
    attempt("move ro", lambda: (os.makedirs("/tmp/moved", exist_ok=True),
                                call(lambda: libc.mount(b"/ro", b"/tmp/moved", None, MS_MOVE,
                                                        None))))
    attempt("write ro", lambda: open("/ro/f", "w").write("changed"))
    """
    # From "/": no working directory is bound writable, so no seccomp filter
    # refuses the mounts first (tests/sandbox/test_setid.py); the lock must.
    res = probe(code, "--ro-bind", f"{ro}:/ro", cwd="/")
    for name in res:
        failed(res, name)
    assert (ro / "f").read_text() == "keep"


def test_chroot_and_file_handles_do_not_lead_out(tmp_path: Path) -> None:
    """The classic chroot escape (chroot deeper, chdir .. past the root) ends in
    the sandbox's own root; open_by_handle_at needs a capability of the host."""
    code = """
    def chroot_escape():
        os.makedirs("/tmp/jail", exist_ok=True)
        fd = os.open("/", os.O_RDONLY)
        os.chroot("/tmp/jail")
        os.fchdir(fd)
        for _ in range(64):
            os.chdir("..")
        os.chroot(".")
        return sorted(os.listdir("/"))
    attempt("root listing", lambda: sorted(os.listdir("/")))
    attempt("chroot escape", chroot_escape)
    handle = ctypes.create_string_buffer(b"\\x08\\0\\0\\0\\x01\\0\\0\\0" + b"\\x02" + b"\\0" * 7)
    attempt("open_by_handle_at", lambda: syscall(304, -100, handle, 0))
    """
    res = probe(code, cwd=tmp_path)
    assert res["chroot escape"] == res["root listing"], res
    assert "'home'" not in str(res["root listing"]["value"])
    failed(res, "open_by_handle_at", "EPERM")


def test_filling_a_sized_tmpfs_is_a_clear_error_and_harms_nothing(tmp_path: Path) -> None:
    """A tmpfs of 8M filled to the brim: the writer gets ENOSPC ('No space left on
    device'), the sandbox ends normally, the host is untouched. (An unsized
    tmpfs, as --tmpfs makes, is bounded only by --memory-max: see docs.)"""
    spec = Sandbox(
        argv=tuple(probe_argv("""
        def fill():
            with open("/fill/big", "wb") as f:
                while True:
                    f.write(b"x" * (1 << 20))
                    f.flush()
        attempt("fill", fill)
        attempt("size", lambda: os.statvfs("/fill").f_blocks * os.statvfs("/fill").f_frsize)
        """)),
        idmap=caller_idmap(),
        mounts=(*host_view(str(tmp_path)), Tmpfs("/fill", 0o1777, size="8M")),
        cwd=str(tmp_path),
    )
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        status = spawn(spec, stdout=f.fileno()).wait()
    r = subprocess.CompletedProcess([], status, out.read_text(), "")
    assert status == 0, explain(r)
    res = results(r)
    failed(res, "fill", "ENOSPC")
    assert res["size"]["value"] == str(8 << 20)

