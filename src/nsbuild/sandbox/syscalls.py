"""The Linux system calls Python 3.11's os module lacks, declared once.

Every wrapper raises OSError(errno, strerror, path) through `_fail`, so callers
can name the step and the path in their own error.
"""

from __future__ import annotations

# _ctypes, the C core of ctypes, and a few C types declared here: the ctypes
# package itself takes ~2.5 ms to import (it builds every C type, imports
# struct and loads a second library handle), on every `nsbuild run`.
import _ctypes
import errno
import posix

from nsbuild.sandbox import posixutil

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn


def _c_type(code: str) -> Any:
    """A C scalar type by its struct-module code, as the ctypes package makes them."""
    return type(f"c_{code}", (_ctypes._SimpleCData,), {"_type_": code})


# int, unsigned int, long, unsigned long (also size_t: Linux is LP64 or ILP32
# throughout), uint64_t, unsigned short, unsigned char, char *.
_Int, _UInt, _Long, _ULong, _U64, _UShort, _UByte, _CharP = map(_c_type, "iIlLQHBz")


class _Function(_ctypes.CFuncPtr):  # type: ignore[misc]
    # cdecl, errno saved after each call (read with _ctypes.get_errno), int result.
    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = _Int


class _Libc:
    """libc's functions by name, as a CDLL of the running program with use_errno."""

    def __init__(self) -> None:
        self._handle = _ctypes.dlopen(None, posix.RTLD_LOCAL)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        # CFuncPtr((name, library)) looks the name up in library._handle.
        function = _Function((name, self))  # type: ignore[arg-type]
        setattr(self, name, function)
        return function


_libc = _Libc()

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

MNT_DETACH = 2

# statvfs f_flag bits that a read-only remount must keep (locked in a user ns).
ST_RDONLY = 1
ST_NOSUID = 2
ST_NODEV = 4
ST_NOEXEC = 8
ST_NOATIME = 1024
ST_NODIRATIME = 2048
ST_RELATIME = 4096

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_LAST_CAP_FALLBACK = 40

AT_FDCWD = -100
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
MOUNT_ATTR_RDONLY = 0x1

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10

# Syscall numbers absent from libc wrappers. openat2 and mount_setattr share
# one number on every architecture (added after the tables were unified).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_OPENAT2 = 437
_SYS_MOUNT_SETATTR = 442
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219, "riscv64": 219, "ppc64le": 283, "s390x": 280}
KEYCTL_JOIN_SESSION_KEYRING = 1

_libc.unshare.argtypes = [_Int]
_libc.setns.argtypes = [_Int, _Int]
_libc.syncfs.argtypes = [_Int]
_libc.mount.argtypes = [_CharP, _CharP, _CharP, _ULong, _CharP]
_libc.umount2.argtypes = [_CharP, _Int]
_libc.sethostname.argtypes = [_CharP, _ULong]
_libc.prctl.argtypes = [_Int, _ULong, _ULong, _ULong, _ULong]
_libc.syscall.restype = _Long


class _OpenHow(_ctypes.Structure):  # type: ignore[misc]
    _fields_ = [("flags", _U64), ("mode", _U64), ("resolve", _U64)]


class _MountAttr(_ctypes.Structure):  # type: ignore[misc]
    _fields_ = [("attr_set", _U64), ("attr_clr", _U64), ("propagation", _U64),
                ("userns_fd", _U64)]


def _fail(path: str | None = None) -> NoReturn:
    err = _ctypes.get_errno()
    raise OSError(err, posix.strerror(err), path)


def _b(s: str | None) -> bytes | None:
    return None if s is None else posixutil.fsencode(s)


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        _fail()


def setns(fd: int, nstype: int) -> None:
    """Join the namespace(s) of `fd`: a namespace file, or a pidfd with several
    CLONE_NEW* flags at once (Linux >= 5.8)."""
    if _libc.setns(fd, nstype) != 0:
        _fail()


def syncfs(fd: int) -> None:
    """Write out everything of the filesystem `fd` is on."""
    if _libc.syncfs(fd) != 0:
        _fail()


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        _fail(target)


def umount2(target: str, flags: int = 0) -> None:
    if _libc.umount2(_b(target), flags) != 0:
        _fail(target)


def pivot_root(new_root: str, put_old: str) -> None:
    nr = _SYS_PIVOT_ROOT.get(posix.uname().machine, 155)
    if _libc.syscall(nr, _b(new_root), _b(put_old)) != 0:
        _fail(new_root)


def join_new_session_keyring() -> None:
    """Replace the session keyring with a new, empty, anonymous one: keys the
    caller keeps there (Kerberos tickets, fscrypt keys) are no longer possessed."""
    nr = _SYS_KEYCTL.get(posix.uname().machine, 250)
    if _libc.syscall(nr, KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
        err = _ctypes.get_errno()
        if err != errno.ENOSYS:  # a kernel without keyrings has nothing to leak
            raise OSError(err, posix.strerror(err), "keyctl(JOIN_SESSION_KEYRING)")


OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = posix.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40


def open_tree_clone(path: str) -> int:
    """A detached copy of the mount tree at `path` (recursive), as an fd that
    move_mount() can attach elsewhere, even in another mount namespace."""
    fd = int(_libc.syscall(_SYS_OPEN_TREE, _Int(AT_FDCWD), _b(path),
                           _UInt(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE)))
    if fd < 0:
        _fail(path)
    return fd


def move_mount_fd(tree_fd: int, target_fd: int, what: str) -> None:
    """Attach the detached tree `tree_fd` on the object `target_fd` (O_PATH)."""
    ret = _libc.syscall(_SYS_MOVE_MOUNT, _Int(tree_fd), b"", _Int(target_fd), b"",
                        _UInt(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH))
    if ret != 0:
        _fail(what)


PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
_X32 = 0x40000000
# (audit arch, add_key, request_key, keyctl) for each ABI a process may use.
_KEYRING_SYSCALLS = {
    "x86_64": ((0xC000003E, 248, 249, 250),  # x86_64
               (0xC000003E, _X32 | 248, _X32 | 249, _X32 | 250),  # x32
               (0x40000003, 286, 287, 288)),  # i386
    "aarch64": ((0xC00000B7, 217, 218, 219),  # arm64
                (0x40000028, 309, 310, 311)),  # arm (compat)
}


class _SockFilter(_ctypes.Structure):  # type: ignore[misc]
    _fields_ = [("code", _UShort), ("jt", _UByte), ("jf", _UByte), ("k", _UInt)]


class _SockFprog(_ctypes.Structure):  # type: ignore[misc]
    _fields_ = [("len", _UShort), ("filter", _ctypes.POINTER(_SockFilter))]


Insn = tuple[int, int, int, int]  # (code, jt, jf, k) of a struct sock_filter


def _keyring_filter(table: tuple[Insn, ...]) -> list[Insn]:
    """A classic BPF seccomp program: the keyring syscalls of each listed ABI
    fail with ENOSYS (as on a kernel without keyrings); everything else runs."""
    ld_arch, ld_nr = (0x20, 0, 0, 4), (0x20, 0, 0, 0)  # BPF_LD|BPF_W|BPF_ABS
    allow = (0x06, 0, 0, _SECCOMP_RET_ALLOW)  # BPF_RET|BPF_K
    deny = (0x06, 0, 0, _SECCOMP_RET_ERRNO | errno.ENOSYS)
    prog: list[Insn] = []
    for arch, *nrs in table:
        # Each block: ld arch; jeq arch (else skip the rest of the block);
        # ld nr; jeq nr -> deny, for each; allow; deny.
        rest = 1 + len(nrs) + 2
        prog += [ld_arch, (0x15, 0, rest, arch), ld_nr]
        for i, nr in enumerate(nrs):
            prog.append((0x15, len(nrs) - i, 0, nr))  # BPF_JMP|BPF_JEQ|BPF_K
        prog += [allow, deny]
    prog.append(allow)
    return prog


def deny_keyring_syscalls() -> bool:
    """Make add_key, request_key and keyctl fail with ENOSYS for this process
    and its descendants. Inside, uid 0 is the caller's own uid, and the kernel
    grants a key's owner access by uid: without this, the command could link
    the caller's user keyring by its serial and read its keys. Needs
    no_new_privs. False where this architecture has no table here."""
    table = _KEYRING_SYSCALLS.get(posix.uname().machine)
    if table is None:
        return False
    insns = _keyring_filter(table)
    array = (_SockFilter * len(insns))(*(_SockFilter(*i) for i in insns))
    prog = _SockFprog(len(insns), array)
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, _ctypes.addressof(prog), 0, 0) != 0:
        _fail()
    return True


def sethostname(name: str) -> None:
    raw = name.encode()
    if _libc.sethostname(raw, len(raw)) != 0:
        _fail()


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    ret: int = _libc.prctl(option, arg2, arg3, arg4, arg5)
    if ret < 0:
        _fail()
    return ret


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    how = _OpenHow(flags | posix.O_CLOEXEC, mode, resolve)
    fd = int(_libc.syscall(_SYS_OPENAT2, _Int(dirfd), _b(path), _ctypes.byref(how),
                           _ULong(_ctypes.sizeof(how))))
    if fd < 0:
        _fail(path)
    return fd


def _mount_setattr(dirfd: int, path: str, flags: int, attr: _MountAttr, what: str) -> None:
    ret = _libc.syscall(_SYS_MOUNT_SETATTR, _Int(dirfd), _b(path), _UInt(flags),
                        _ctypes.byref(attr), _ULong(_ctypes.sizeof(attr)))
    if ret != 0:
        _fail(what)


def mount_setattr_readonly(path: str) -> None:
    """Make the mount at `path` and every mount below it read-only, keeping all
    other (possibly locked) flags: the kernel changes only what is asked."""
    _mount_setattr(AT_FDCWD, path, AT_RECURSIVE, _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0), path)


def tree_private(tree_fd: int, what: str) -> None:
    """Take every mount of the detached tree `tree_fd` (open_tree_clone) out
    of its peer group: a clone of a shared mount is a peer of it, and mounts
    made on it later would appear on the host."""
    _mount_setattr(tree_fd, "", AT_EMPTY_PATH | AT_RECURSIVE,
                   _MountAttr(0, 0, MS_PRIVATE, 0), what)


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return CAP_LAST_CAP_FALLBACK


class _RLimit64(_ctypes.Structure):  # type: ignore[misc]
    _fields_ = [("soft", _U64), ("hard", _U64)]


def soft_limit(resource: int) -> int:
    """The soft value of a resource limit, through glibc's prlimit64 (64-bit
    fields on every ABI; the resource module costs ~0.2 ms to import)."""
    limit = _RLimit64()
    if _libc.prlimit64(0, resource, None, _ctypes.byref(limit)) != 0:
        _fail()
    return int(limit.soft)
