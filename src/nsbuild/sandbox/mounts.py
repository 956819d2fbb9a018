"""Building the sandbox's root: each mount kind executed as a named step.

Runs in init (PID 1) inside the new namespaces. The order, and why:
  1. make every inherited mount private, so nothing we do leaks to the host
     and host changes cannot reach into the sandbox;
  2. mount a tmpfs as a scratch base and pivot_root into it, keeping the host
     tree at /oldroot: sources are then named /oldroot/SRC and can never be
     confused with paths of the new root;
  3. mount the new root at /newroot and every mount in order, resolving each
     destination *inside* /newroot (openat2 RESOLVE_IN_ROOT), so a symlink in
     an untrusted root cannot send a mount onto the host;
  4. pivot_root into /newroot and lazily detach the base, /oldroot with it:
     nothing of the host tree stays reachable.
"""

from __future__ import annotations

import errno
import os

from nsbuild.sandbox import syscalls as sc
from nsbuild.sandbox.errors import SetupError
from nsbuild.sandbox.spec import (
    Bind,
    Dev,
    Dir,
    File,
    Mount,
    Overlay,
    Proc,
    Sandbox,
    Symlink,
    Sys,
    Tmpfs,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from dataclasses import dataclass

    Say = Callable[[str], None]
else:
    from nsbuild.sandbox.record import dataclass

OLD = "/oldroot"
NEW = "/newroot"
_DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
_DEV_LINKS = (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
              ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
              ("core", "/proc/kcore"))
# Paths of a fresh /proc that must not be writable from inside.
_PROC_READONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
_NOSUID_NODEV = sc.MS_NOSUID | sc.MS_NODEV
_O_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_O_NEW_FILE = os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC


@dataclass(frozen=True)
class Planned:
    mount: Mount
    src: str | None  # host source, resolved once on the host side
    is_dir: bool
    # Run by root: the source's mount tree, cloned on the host side (see _tree).
    tree: int | None = None


@dataclass(frozen=True)
class Plan:
    root_src: str | None
    mounts: tuple[Planned, ...]
    root_tree: int | None = None


def release(plan: Plan) -> None:
    """Close the plan's cloned trees in the process that no longer needs them."""
    for fd in (plan.root_tree, *(p.tree for p in plan.mounts)):
        if fd is not None:
            os.close(fd)


def _tree(src: str) -> int | None:
    """As root, clone the source's mount tree now, with the host's credentials.
    Inside, the sandbox's root is an unprivileged subordinate id and cannot
    walk to a source below a private directory (/root/project); attaching a
    tree cloned here needs no path walk. The clone is made private at once:
    it would otherwise be a peer of a shared host mount, and every mount the
    sandbox makes on it would appear on the host. None when not root or not
    possible (no open_tree or mount_setattr, or root without CAP_SYS_ADMIN):
    the plain bind is used."""
    if os.geteuid() != 0:
        return None
    fd = -1
    try:
        fd = sc.open_tree_clone(src)
        sc.tree_private(fd, src)
        return fd
    except OSError as e:
        if fd >= 0:
            os.close(fd)
        if e.errno in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
            return None
        raise SetupError("clone bind source", e.errno or errno.EIO, src) from None


def _resolve_src(src: str, what: str) -> str:
    try:
        return os.path.realpath(src, strict=True)
    except OSError as e:
        raise SetupError(f"check {what}", e.errno or errno.ENOENT, src) from None


def prepare(spec: Sandbox) -> Plan:
    """Host-side checks before anything is forked: sources exist."""
    root = spec.root
    root_src = None
    if isinstance(root, Bind):
        root_src = _resolve_src(root.src, "root directory")
        if not os.path.isdir(root_src):
            raise SetupError("check root directory", errno.ENOTDIR, root.src)
    elif isinstance(root, Overlay):
        _check_overlay(root)
    planned: list[Planned] = []
    root_tree = None
    try:
        root_tree = _tree(root_src) if root_src is not None else None
        for mnt in spec.mounts:
            if isinstance(mnt, Bind):
                if mnt.optional and not os.path.exists(mnt.src):
                    continue
                src = _resolve_src(mnt.src, "bind source")
                planned.append(Planned(mnt, src, os.path.isdir(src), _tree(src)))
            else:
                if isinstance(mnt, Overlay):
                    _check_overlay(mnt)
                planned.append(Planned(mnt, None, not isinstance(mnt, File)))
    except BaseException:
        release(Plan(None, tuple(planned), root_tree))
        raise
    return Plan(root_src, tuple(planned), root_tree)


def _check_overlay(o: Overlay) -> None:
    for p in (*o.lowers, *(() if o.tmpfs_size else (o.upper, o.work))):
        if not os.path.isdir(p):
            raise SetupError("check overlay directory", errno.ENOENT, p)


# ------------------------------------------------------------ in the sandbox

class Step:
    """The setup step in progress, named in the error if an OSError escapes."""

    current = "setup"


def build_root(spec: Sandbox, plan: Plan, say: Say, step: type[Step],
               before_sys: Callable[[], None] | None = None) -> None:
    """Mount the new root at NEW; `before_sys` runs before a Sys mount (the
    runner joins the sandbox's network namespace then, whose devices a new
    sysfs shows)."""
    def at(name: str) -> None:
        step.current = name

    at("make mounts private")
    say("make every mount private (no propagation to or from the host)")
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)

    at("mount scratch base")
    say("mount a scratch tmpfs and pivot into it; the host tree stays at /oldroot")
    # /tmp always exists; the tmpfs on it becomes "/" and moves away with
    # pivot_root, so the host's /tmp is again visible as /oldroot/tmp.
    sc.mount("tmpfs", "/tmp", "tmpfs", _NOSUID_NODEV, "mode=0755")
    os.chdir("/tmp")
    os.mkdir("oldroot")
    os.mkdir("newroot")
    os.mkdir("files")
    at("pivot into scratch base")
    sc.pivot_root(".", "oldroot")
    os.chdir("/")

    root = spec.root
    at("mount new root")
    say(f"new root: {root.describe()}")
    if isinstance(root, Tmpfs):
        sc.mount("tmpfs", NEW, "tmpfs", _NOSUID_NODEV, _tmpfs_data(root))
    elif isinstance(root, Bind) and plan.root_tree is not None:
        _attach(plan.root_tree, os.open(NEW, _O_DIR_PATH), NEW)
    elif isinstance(root, Bind):
        assert plan.root_src is not None
        sc.mount(OLD + plan.root_src, NEW, None, sc.MS_BIND | sc.MS_REC)
    else:
        at("mount overlay root")
        _forget_volatile_mark(root)
        sc.mount("overlay", NEW, "overlay", sc.MS_NOSUID, _overlay_data(root, "root", step))
    root_fd = os.open(NEW, _O_DIR_PATH)
    try:
        for n, p in enumerate(plan.mounts):
            if before_sys is not None and isinstance(p.mount, Sys):
                before_sys()
            what = p.mount.describe()
            at(f"mount {what}")
            say(what)
            _execute(p, root_fd, n, spec)
    finally:
        os.close(root_fd)
    if isinstance(root, Bind) and root.readonly:
        at("make root read-only")
        say("make the root read-only")
        _remount_ro(NEW, recursive=False)


def pivot(say: Say, step: type[Step]) -> None:
    step.current = "pivot into new root"
    say("pivot_root into the new root and detach the old one")
    os.chdir(NEW)
    sc.pivot_root(".", ".")
    # The scratch base (and /oldroot, the host tree, under it) is now stacked
    # on "/"; a lazy unmount takes it all away.
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")


def _tmpfs_data(t: Tmpfs) -> str:
    return f"mode={t.mode:o}" + (f",size={t.size}" if t.size else "")


def _overlay_escape(path: str) -> str:
    # overlayfs splits its options on ',' and lowerdir on ':'; a backslash
    # escapes either (and itself), so any directory name can be a layer.
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def _forget_volatile_mark(o: Overlay) -> None:
    # A volatile mount leaves work/incompat/volatile behind, and the kernel
    # refuses the next mount while it is there (the upper may have lost writes
    # in a crash). Overlay.volatile means the caller vouches for the tree (a
    # throwaway session of a live owner: no restart since its last mount).
    if o.volatile and not o.tmpfs_size:
        mark = OLD + o.work + "/work/incompat/volatile"
        for remove, path in ((os.unlink, mark + "/dirty"), (os.rmdir, mark)):
            try:
                remove(path)
            except FileNotFoundError:
                pass


def _upper_tmpfs(o: Overlay, name: str, step: type[Step]) -> tuple[str, str]:
    """A fresh tmpfs for the overlay's writes, in the scratch base (never seen
    by the sandbox's commands; the overlay keeps it alive after the base is
    detached). Returns its upper and work directories."""
    step.current = f"mount tmpfs for the overlay upper on {o.dst}"
    at = f"/upper-{name}"
    os.mkdir(at)
    sc.mount("tmpfs", at, "tmpfs", _NOSUID_NODEV, f"mode=0755,size={o.tmpfs_size}")
    os.mkdir(at + "/upper")
    os.mkdir(at + "/work")
    step.current = f"mount overlay on {o.dst} (upper on tmpfs)"
    return at + "/upper", at + "/work"


def _overlay_data(o: Overlay, name: str, step: type[Step]) -> str:
    lowers = ":".join(_overlay_escape(OLD + p) for p in o.lowers)
    if o.tmpfs_size:
        upper, work = (_overlay_escape(p) for p in _upper_tmpfs(o, name, step))
    else:
        upper, work = _overlay_escape(OLD + o.upper), _overlay_escape(OLD + o.work)
    # userxattr: the only way overlayfs works inside a user namespace (>= 5.11).
    data = f"lowerdir={lowers},upperdir={upper},workdir={work},userxattr"
    return data + ",volatile" if o.volatile else data


def _target(fd: int) -> str:
    # The host's /proc is still mounted under /oldroot; mounting onto the
    # descriptor's magic link mounts onto exactly the object we resolved.
    return f"{OLD}/proc/self/fd/{fd}"


def _open_in_root(root_fd: int, dst: str, create: str | None) -> int:
    """An O_PATH fd for `dst` resolved inside the root, creating a missing
    directory or empty file (and missing parents) when asked."""
    rel = dst.lstrip("/") or "."
    how = sc.RESOLVE_IN_ROOT | sc.RESOLVE_NO_MAGICLINKS
    try:
        return sc.openat2(root_fd, rel, os.O_PATH, how)
    except FileNotFoundError:
        if create is None:
            raise
    parent, name = os.path.split(rel)
    pfd = _open_in_root(root_fd, "/" + parent, "dir") if parent else os.dup(root_fd)
    try:
        if create == "dir":
            os.mkdir(name, 0o755, dir_fd=pfd)
        else:
            os.close(os.open(name, _O_NEW_FILE | os.O_NOFOLLOW, 0o644, dir_fd=pfd))
    except FileExistsError:
        pass
    finally:
        os.close(pfd)
    return sc.openat2(root_fd, rel, os.O_PATH, how)


def _remount_ro(path: str, recursive: bool) -> None:
    if recursive:
        try:
            sc.mount_setattr_readonly(path)
            return
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
    # Flags locked by the user namespace (nosuid, nodev, ...) must be repeated.
    st = os.statvfs(path)
    keep = 0
    for st_flag, ms_flag in ((sc.ST_NOSUID, sc.MS_NOSUID), (sc.ST_NODEV, sc.MS_NODEV),
                             (sc.ST_NOEXEC, sc.MS_NOEXEC), (sc.ST_NOATIME, sc.MS_NOATIME),
                             (sc.ST_NODIRATIME, sc.MS_NODIRATIME),
                             (sc.ST_RELATIME, sc.MS_RELATIME)):
        if st.f_flag & st_flag:
            keep |= ms_flag
    sc.mount(None, path, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | keep)


def _mount_at(root_fd: int, dst: str, create: str, source: str | None, fstype: str | None,
              flags: int, data: str | None = None) -> None:
    fd = _open_in_root(root_fd, dst, create)
    try:
        sc.mount(source, _target(fd), fstype, flags, data)
    finally:
        os.close(fd)


def _ro_at(root_fd: int, dst: str, recursive: bool = True) -> None:
    fd = _open_in_root(root_fd, dst, None)  # resolves through the new mount
    try:
        _remount_ro(_target(fd), recursive)
    finally:
        os.close(fd)


def _execute(p: Planned, root_fd: int, n: int, spec: Sandbox) -> None:
    mnt = p.mount
    if isinstance(mnt, Bind) and p.tree is not None:
        create = "dir" if p.is_dir else "file"
        _attach(p.tree, _open_in_root(root_fd, mnt.dst, create), mnt.dst)
        if mnt.readonly:
            _ro_at(root_fd, mnt.dst)
    elif isinstance(mnt, Bind):
        assert p.src is not None
        _mount_at(root_fd, mnt.dst, "dir" if p.is_dir else "file", OLD + p.src, None,
                  sc.MS_BIND | sc.MS_REC)
        if mnt.readonly:
            _ro_at(root_fd, mnt.dst)
    elif isinstance(mnt, Tmpfs):
        _mount_at(root_fd, mnt.dst, "dir", "tmpfs", "tmpfs", _NOSUID_NODEV, _tmpfs_data(mnt))
    elif isinstance(mnt, Overlay):
        _forget_volatile_mark(mnt)
        _mount_at(root_fd, mnt.dst, "dir", "overlay", "overlay", sc.MS_NOSUID,
                  _overlay_data(mnt, str(n), Step))
    elif isinstance(mnt, Dir):
        os.close(_open_in_root(root_fd, mnt.dst, "dir"))
    elif isinstance(mnt, Symlink):
        _symlink(root_fd, mnt.target, mnt.dst)
    elif isinstance(mnt, File):
        src = f"/files/{n}"
        fd = os.open(src, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, mnt.mode)
        try:
            os.write(fd, mnt.data)
        finally:
            os.close(fd)
        _mount_at(root_fd, mnt.dst, "file", src, None, sc.MS_BIND)
        _ro_at(root_fd, mnt.dst, recursive=False)
    elif isinstance(mnt, Proc):
        _mount_proc(root_fd, mnt.dst, n)
    elif isinstance(mnt, Dev):
        _mount_dev(root_fd, mnt.dst, n, spec)
    elif isinstance(mnt, Sys):
        _mount_sys(root_fd, mnt.dst)


def _attach(tree: int, target_fd: int, what: str) -> None:
    try:
        sc.move_mount_fd(tree, target_fd, what)
    finally:
        os.close(target_fd)
        os.close(tree)


def _symlink(root_fd: int, target: str, dst: str) -> None:
    parent, name = os.path.split(dst.lstrip("/"))
    pfd = _open_in_root(root_fd, "/" + parent, "dir")
    try:
        os.symlink(target, name, dir_fd=pfd)
    except FileExistsError:
        if os.readlink(name, dir_fd=pfd) != target:
            raise
    finally:
        os.close(pfd)


def _stage(n: int, what: str) -> str:
    """A directory of the scratch base (ours alone, nothing of the root in
    it) where a filesystem for the root is made ready, then moved into place
    (_move_into): its entries are made by plain paths, without resolving
    each inside the root, and no symlink of the root can take them elsewhere."""
    path = f"/{what}-{n}"
    os.mkdir(path, 0o755)
    return path


def _move_into(root_fd: int, dst: str, stage: str) -> None:
    _mount_at(root_fd, dst, "dir", stage, None, sc.MS_MOVE)


def _mount_proc(root_fd: int, dst: str, n: int) -> None:
    stage = _stage(n, "proc")
    # Only a process inside the new PID namespace can mount a proc that shows it.
    sc.mount("proc", stage, "proc", _NOSUID_NODEV | sc.MS_NOEXEC)
    for sub in _PROC_READONLY:
        path = f"{stage}/{sub}"
        try:
            sc.mount(path, path, None, sc.MS_BIND | sc.MS_REC)
        except FileNotFoundError:
            continue
        _remount_ro(path, recursive=True)
    _move_into(root_fd, dst, stage)


def _mount_dev(root_fd: int, dst: str, n: int, spec: Sandbox) -> None:
    stage = _stage(n, "dev")
    sc.mount("tmpfs", stage, "tmpfs", sc.MS_NOSUID | sc.MS_NOEXEC, "mode=0755")
    for node in _DEV_NODES:
        # Device nodes cannot be created in a user namespace: bind the host's.
        if os.path.exists(f"{OLD}/dev/{node}"):
            os.close(os.open(f"{stage}/{node}", _O_NEW_FILE | os.O_EXCL, 0o644))
            sc.mount(f"{OLD}/dev/{node}", f"{stage}/{node}", None, sc.MS_BIND)
    for name, target in _DEV_LINKS:
        os.symlink(target, f"{stage}/{name}")
    os.mkdir(f"{stage}/pts", 0o755)
    # tty group 5 exists inside only when the full range is mapped.
    gid = ",gid=5" if spec.idmap.full else ""
    sc.mount("devpts", f"{stage}/pts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC,
             f"newinstance,ptmxmode=0666,mode=620{gid}")
    os.mkdir(f"{stage}/shm", 0o755)
    sc.mount("tmpfs", f"{stage}/shm", "tmpfs", _NOSUID_NODEV, "mode=1777")
    _move_into(root_fd, dst, stage)


def _mount_sys(root_fd: int, dst: str) -> None:
    flags = sc.MS_RDONLY | _NOSUID_NODEV | sc.MS_NOEXEC
    try:
        # A fresh sysfs shows the sandbox's own network namespace (only lo).
        _mount_at(root_fd, dst, "dir", "sysfs", "sysfs", flags)
    except PermissionError:
        # Sharing the host network namespace: sysfs may not be mounted anew.
        _mount_at(root_fd, dst, "dir", f"{OLD}/sys", None, sc.MS_BIND | sc.MS_REC)
        _ro_at(root_fd, dst)
    try:
        _mount_at(root_fd, f"{dst}/kernel", "dir", "tmpfs", "tmpfs", flags, "size=0")
    except FileNotFoundError:
        pass
