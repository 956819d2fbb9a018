"""Mount namespace: the default read-only view of the host, what stays hidden,
--bind/--ro-bind/--tmpfs/--chdir/--hostname and --root."""

from __future__ import annotations

import os
import socket
import stat
import uuid
from pathlib import Path

import pytest
from sandbox_helpers import (
    SETUP_FAILED,
    USAGE,
    explain,
    nsbuild,
    ok,
    one_line_error,
    py,
    sh,
)

pytestmark = pytest.mark.userns

# Inside: try to create PATH; print "ok" or the errno name.
CREATE = """
import errno, sys
try:
    open(sys.argv[1], "w").close()
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))
else:
    print("ok")
"""

# Inside: write DATA to an existing file; print "ok" or the errno name.
WRITE = """
import errno, sys
try:
    with open(sys.argv[1], "w") as f:
        f.write(sys.argv[2])
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))
else:
    print("ok")
"""


def test_proc_sys_is_read_only(tmp_path: Path) -> None:
    # Root inside owns its UTS namespace, so only the read-only mount stops this.
    r = ok(nsbuild("--", *py(WRITE, "/proc/sys/kernel/hostname", "evil"), cwd=tmp_path))
    assert r.stdout.strip() in ("EROFS", "EACCES", "EPERM"), r.stdout
    r = ok(nsbuild("--", "cat", "/proc/sys/kernel/hostname", cwd=tmp_path))
    assert r.stdout.strip() == "nsbuild"


def test_proc_sys_mount_is_read_only(tmp_path: Path) -> None:
    r = ok(nsbuild("--", "cat", "/proc/self/mountinfo", cwd=tmp_path))
    sysmounts = [line.split() for line in r.stdout.splitlines() if line.split()[4] == "/proc/sys"]
    assert sysmounts, r.stdout
    assert "ro" in sysmounts[-1][5].split(","), sysmounts[-1]


def test_sys_is_read_only(tmp_path: Path) -> None:
    create = ok(nsbuild("--", *py(CREATE, "/sys/nsbuild-test"), cwd=tmp_path)).stdout.strip()
    assert create in ("EROFS", "EACCES", "EPERM"), create
    write = ok(nsbuild("--", *py(WRITE, "/sys/class/net/lo/mtu", "1280"), cwd=tmp_path))
    assert write.stdout.strip() in ("EROFS", "EACCES", "EPERM"), write.stdout
    r = ok(nsbuild("--", "cat", "/proc/self/mountinfo", cwd=tmp_path))
    sys_mount = [line.split() for line in r.stdout.splitlines() if line.split()[4] == "/sys"]
    assert sys_mount and "ro" in sys_mount[-1][5].split(","), r.stdout


def test_sys_kernel_is_masked(tmp_path: Path) -> None:
    assert os.listdir("/sys/kernel"), "control: the host's /sys/kernel has entries"
    r = nsbuild("--", *py("""
        import os
        try:
            print(len(os.listdir("/sys/kernel")))
        except OSError as e:
            print("error", e.errno)
    """), cwd=tmp_path)
    assert r.returncode == 0, explain(r)
    assert r.stdout.strip() == "0" or r.stdout.startswith("error"), r.stdout


def test_home_root_and_other_host_trees_are_not_visible(tmp_path: Path) -> None:
    home = Path.home()
    marker = home / f".nsbuild-test-{uuid.uuid4().hex}"
    try:
        marker.write_text("secret")
    except OSError:
        marker = None  # type: ignore[assignment]
    try:
        code = """
        import os, sys
        for path in sys.argv[1:]:
            try:
                entries = os.listdir(path)
            except FileNotFoundError:
                print(path, "absent")
            except OSError as e:
                print(path, "error", e.errno)
            else:
                print(path, "entries", len(entries), *sorted(entries)[:5])
        """
        paths = ["/home", "/root", "/srv", "/opt", "/mnt", "/media", "/var/lib", "/var/log",
                 "/var/cache", str(home)]
        r = ok(nsbuild("--", *py(code, *paths), cwd=tmp_path))
        seen = dict(line.split(" ", 1) for line in r.stdout.splitlines())
        for path in paths:
            assert seen[path] == "absent" or seen[path].startswith("entries 0"), (path, seen[path])
        if marker is not None:
            r = nsbuild("--", "cat", str(marker), cwd=tmp_path)
            assert r.returncode != 0 and "secret" not in r.stdout
    finally:
        if marker is not None:
            marker.unlink()


def test_usr_and_etc_are_read_only(tmp_path: Path) -> None:
    for path in ("/usr/nsbuild-test", "/etc/nsbuild-test", "/usr/bin/nsbuild-test"):
        r = ok(nsbuild("--", *py(CREATE, path), cwd=tmp_path))
        assert r.stdout.strip() == "EROFS", (path, r.stdout)


def test_merged_usr_links_and_tools_work(tmp_path: Path) -> None:
    links = [name for name in ("bin", "sbin", "lib", "lib64") if os.path.islink(f"/{name}")]
    r = ok(nsbuild("--", *sh(
        "".join(f"readlink /{name}; " for name in links) + "/bin/sh -c 'echo works'"
    ), cwd=tmp_path))
    assert r.stdout.split() == [*(os.readlink(f"/{name}") for name in links), "works"]


def test_tmp_run_and_var_tmp_are_fresh_and_private(tmp_path: Path) -> None:
    host_marker = Path("/tmp") / f"nsbuild-test-{uuid.uuid4().hex}"
    host_marker.write_text("host")
    inside_name = f"nsbuild-test-{uuid.uuid4().hex}"
    try:
        r = ok(nsbuild("--", *sh(
            f"test -e {host_marker} && echo host-visible; "
            f"for d in /tmp /run /var/tmp; do touch $d/{inside_name} && echo $d-writable; done"
        ), cwd=tmp_path))
        assert r.stdout.split() == ["/tmp-writable", "/run-writable", "/var/tmp-writable"]
        for d in ("/tmp", "/run", "/var/tmp"):
            assert not (Path(d) / inside_name).exists()
    finally:
        host_marker.unlink()


def test_current_directory_is_bound_read_write_at_its_own_path(tmp_path: Path) -> None:
    work = tmp_path / "work dir"
    work.mkdir()
    (work / "input").write_text("from host")
    r = ok(nsbuild("--", *sh("pwd; cat input; echo from sandbox > output"), cwd=work))
    assert r.stdout.splitlines() == [str(work), "from host"]
    assert (work / "output").read_text() == "from sandbox\n"


def test_dev_is_minimal_and_works(tmp_path: Path) -> None:
    code = """
    import os, stat
    for name in sorted(os.listdir("/dev")):
        st = os.lstat("/dev/" + name)
        kind = ("chr" if stat.S_ISCHR(st.st_mode) else "blk" if stat.S_ISBLK(st.st_mode)
                else "dir" if stat.S_ISDIR(st.st_mode) else "lnk" if stat.S_ISLNK(st.st_mode)
                else "other")
        print(name, kind)
    """
    r = ok(nsbuild("--", *py(code), cwd=tmp_path))
    entries = dict(line.split() for line in r.stdout.splitlines())
    for name in ("null", "zero", "full", "random", "urandom", "tty"):
        assert entries.get(name) == "chr", (name, entries)
    for name in ("pts", "shm"):
        assert entries.get(name) == "dir", (name, entries)
    for name in ("ptmx", "fd", "stdin", "stdout", "stderr"):
        assert name in entries, (name, entries)
    devices = {n for n, kind in entries.items() if kind in ("chr", "blk")}
    assert devices <= {"null", "zero", "full", "random", "urandom", "tty", "ptmx", "console"}, \
        devices
    r = ok(nsbuild("--", *sh(
        "head -c 16 /dev/urandom | wc -c; head -c 8 /dev/zero | wc -c; echo x > /dev/null && "
        "echo null-ok; (echo x > /dev/full) 2>/dev/null || echo full-fails; "
        "touch /dev/shm/x && echo shm-ok"
    ), cwd=tmp_path))
    assert r.stdout.split() == ["16", "8", "null-ok", "full-fails", "shm-ok"]


def test_new_pty_can_be_opened(tmp_path: Path) -> None:
    r = ok(nsbuild("--", *py("""
        import os, pty
        m, s = pty.openpty()
        print(os.ttyname(s).startswith("/dev/pts/"))
    """), cwd=tmp_path))
    assert r.stdout.strip() == "True"


def test_bind_is_read_write_and_visible_on_the_host(tmp_path: Path) -> None:
    d = tmp_path / "rw"
    d.mkdir()
    (d / "in").write_text("hello")
    r = ok(nsbuild("--bind", f"{d}:/data", "--", *sh("cat /data/in; echo bye > /data/out"),
                   cwd=tmp_path))
    assert r.stdout == "hello"
    assert (d / "out").read_text() == "bye\n"


def test_bind_without_destination_uses_the_same_path(tmp_path: Path) -> None:
    d = tmp_path / "same"
    d.mkdir()
    r = ok(nsbuild("--chdir", "/", "--bind", str(d), "--", "touch", f"{d}/made", cwd=tmp_path))
    assert r.returncode == 0
    assert (d / "made").exists()


def test_ro_bind_is_read_only(tmp_path: Path) -> None:
    d = tmp_path / "ro"
    d.mkdir()
    (d / "in").write_text("hello")
    r = ok(nsbuild("--ro-bind", f"{d}:/data", "--", "cat", "/data/in", cwd=tmp_path))
    assert r.stdout == "hello"
    for path in ("/data/new", "/data/in"):
        r = ok(nsbuild("--ro-bind", f"{d}:/data", "--", *py(CREATE, path), cwd=tmp_path))
        assert r.stdout.strip() == "EROFS", (path, r.stdout)
    assert sorted(os.listdir(d)) == ["in"] and (d / "in").read_text() == "hello"


def test_ro_bind_cannot_be_remounted_read_write(tmp_path: Path) -> None:
    d = tmp_path / "ro"
    d.mkdir()
    r = nsbuild("--ro-bind", f"{d}:/data", "--", *sh(
        "mount -o remount,bind,rw /data 2>/dev/null; touch /data/x 2>/dev/null && echo written"
    ), cwd="/")  # no writable bind: the mount lock refuses, not the setuid filter
    assert "written" not in r.stdout, explain(r)
    assert not (d / "x").exists()


def test_missing_bind_source_is_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    r = nsbuild("--bind", f"{missing}:/data", "--", "true", cwd=tmp_path)
    assert r.returncode in (USAGE, SETUP_FAILED), explain(r)
    assert str(missing) in one_line_error(r)


def test_tmpfs_is_empty_private_and_writable(tmp_path: Path) -> None:
    assert os.listdir("/usr/share"), "control: the host's /usr/share has entries"
    r = ok(nsbuild("--tmpfs", "/usr/share", "--", *sh(
        "ls -A /usr/share | wc -l; echo x > /usr/share/new && cat /usr/share/new"
    ), cwd=tmp_path))
    assert r.stdout.split() == ["0", "x"]
    assert not Path("/usr/share/new").exists()


def test_tmpfs_on_a_new_path(tmp_path: Path) -> None:
    r = ok(nsbuild("--tmpfs", "/scratch", "--", *sh("touch /scratch/f && ls /scratch"),
                   cwd=tmp_path))
    assert r.stdout.strip() == "f"


def test_chdir(tmp_path: Path) -> None:
    r = ok(nsbuild("--chdir", "/usr/share", "--", "pwd", cwd=tmp_path))
    assert r.stdout.strip() == "/usr/share"


def test_chdir_to_a_missing_directory_is_one_clear_line(tmp_path: Path) -> None:
    r = nsbuild("--chdir", "/no-such-dir", "--", "true", cwd=tmp_path)
    assert r.returncode in (USAGE, SETUP_FAILED), explain(r)
    assert "/no-such-dir" in one_line_error(r)


def test_hostname_default_and_option(tmp_path: Path) -> None:
    host = socket.gethostname()
    assert ok(nsbuild("--", "hostname", cwd=tmp_path)).stdout.strip() == "nsbuild"
    r = ok(nsbuild("--hostname", "builder-1", "--", *sh("hostname; uname -n"), cwd=tmp_path))
    assert r.stdout.split() == ["builder-1", "builder-1"]
    assert socket.gethostname() == host


# --- --root --------------------------------------------------------------------


def make_root(base: Path) -> Path:
    """A tiny root: the host's /usr bound in, merged-usr links, its own /etc."""
    root = base / "root"
    for d in ("usr", "etc", "proc", "dev", "sys", "tmp", "run", "home/builder"):
        (root / d).mkdir(parents=True)
    for name in ("bin", "sbin", "lib", "lib64"):
        if os.path.exists(f"/usr/{name}"):
            (root / name).symlink_to(f"usr/{name}")
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nbuilder:x:1234:1235::/home/builder:/bin/sh\n"
    )
    (root / "etc/group").write_text("root:x:0:\nbuilder:x:1235:\nextra:x:1300:builder\n")
    (root / "marker").write_text("this is the custom root\n")
    return root


def test_root_runs_on_the_given_tree(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    r = ok(nsbuild("--root", str(root), "--ro-bind", "/usr:/usr", "--", *sh(
        "cat /marker; cut -d: -f1 /etc/passwd | tr '\\n' ' '; echo; test -e /proc/self/status "
        "&& echo proc-ok; ls /sys/class/net"
    ), cwd=tmp_path))
    assert r.stdout.splitlines() == ["this is the custom root", "root builder ",
                                     "proc-ok", "lo"]


def test_root_user_is_resolved_against_the_roots_passwd(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    r = ok(nsbuild("--root", str(root), "--ro-bind", "/usr:/usr", "--user", "builder", "--",
                   *sh("id -u; id -g; id -G"), cwd=tmp_path))
    uid, gid, groups = r.stdout.splitlines()
    assert (uid, gid) == ("1234", "1235")
    assert set(groups.split()) == {"1235", "1300"}


def test_root_host_only_user_is_unknown(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    host_user = "nobody"  # in the host's /etc/passwd, not in the root's
    r = nsbuild("--root", str(root), "--ro-bind", "/usr:/usr", "--user", host_user, "--", "true",
                cwd=tmp_path)
    assert r.returncode in (USAGE, SETUP_FAILED), explain(r)
    assert host_user in one_line_error(r)


def test_missing_root_exits_125_with_one_line_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-root"
    r = nsbuild("--root", str(missing), "--", "true", cwd=tmp_path)
    assert r.returncode == SETUP_FAILED, explain(r)
    assert str(missing) in one_line_error(r)


def test_root_files_written_by_root_inside_belong_to_the_caller(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    ok(nsbuild("--root", str(root), "--ro-bind", "/usr:/usr", "--bind", f"{tmp_path}:/out",
               "--", "touch", "/out/made", cwd=tmp_path))
    st = (tmp_path / "made").stat()
    assert (st.st_uid, stat.S_ISREG(st.st_mode)) == (os.getuid(), True)
