"""The Linux system calls Python 3.11's os module lacks, declared once.

Every wrapper raises OSError(errno, strerror, path) through `_fail`, so callers
can name the step and the path in their own error.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from ctypes import c_char_p, c_int, c_long, c_ubyte, c_uint, c_uint64, c_ulong, c_ushort

# typing (with re and collections) is not imported at run time: every
# `nsbuild run` imports this module, and the annotations are strings.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

# libc of the running program; errno is saved after each call (ctypes.get_errno).
_libc = ctypes.CDLL(None, use_errno=True)

# personality(2): the persona that makes uname() report a 32-bit machine
# (i686 on x86_64, armv8l on arm64), as linux32(1) and schroot set it.
PER_LINUX = 0x0000
PER_LINUX32 = 0x0008
PER_MASK = 0x00FF  # the persona; the bits above are flags (ADDR_NO_RANDOMIZE...)
# What uname() says under PER_LINUX32, for a 64-bit process.
_UNDER_LINUX32 = {"i686": "x86_64", "armv8l": "aarch64", "armv8b": "aarch64_be"}


def _machine() -> str:
    """The machine whose system call numbers this process uses: uname's,
    unless a 32-bit personality inherited from the caller (linux32 nsbuild,
    an i386 environment) makes a 64-bit process see a 32-bit name."""
    name = os.uname().machine
    if sys.maxsize > 2**32:
        return _UNDER_LINUX32.get(name, name)
    return name


MACHINE = _machine()

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

_libc.unshare.argtypes = [c_int]
_libc.setns.argtypes = [c_int, c_int]
_libc.syncfs.argtypes = [c_int]
_libc.mount.argtypes = [c_char_p, c_char_p, c_char_p, c_ulong, c_char_p]
_libc.umount2.argtypes = [c_char_p, c_int]
_libc.sethostname.argtypes = [c_char_p, c_ulong]
_libc.prctl.argtypes = [c_int, c_ulong, c_ulong, c_ulong, c_ulong]
_libc.personality.argtypes = [c_ulong]
_libc.personality.restype = c_int
_libc.syscall.restype = c_long
_libc.memset.argtypes = [c_ulong, c_int, c_ulong]
_libc.memset.restype = c_ulong
_libc.memmove.argtypes = [c_ulong, c_char_p, c_ulong]
_libc.memmove.restype = c_ulong


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", c_uint64), ("mode", c_uint64), ("resolve", c_uint64)]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", c_uint64), ("attr_clr", c_uint64), ("propagation", c_uint64),
                ("userns_fd", c_uint64)]


def _fail(path: str | None = None) -> NoReturn:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), path)


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


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
    nr = _SYS_PIVOT_ROOT.get(MACHINE, 155)
    if _libc.syscall(nr, _b(new_root), _b(put_old)) != 0:
        _fail(new_root)


def personality(persona: int) -> int:
    """Set this process's persona (kept across fork and exec); the old one is returned."""
    old = _libc.personality(persona)
    if old == -1:
        _fail()
    return int(old)


def join_new_session_keyring() -> None:
    """Replace the session keyring with a new, empty, anonymous one: keys the
    caller keeps there (Kerberos tickets, fscrypt keys) are no longer possessed."""
    nr = _SYS_KEYCTL.get(MACHINE, 250)
    if _libc.syscall(nr, KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
        err = ctypes.get_errno()
        if err != errno.ENOSYS:  # a kernel without keyrings has nothing to leak
            raise OSError(err, os.strerror(err), "keyctl(JOIN_SESSION_KEYRING)")


OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40


def open_tree_clone(path: str) -> int:
    """A detached copy of the mount tree at `path` (recursive), as an fd that
    move_mount() can attach elsewhere, even in another mount namespace."""
    fd = int(_libc.syscall(_SYS_OPEN_TREE, c_int(AT_FDCWD), _b(path),
                           c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE)))
    if fd < 0:
        _fail(path)
    return fd


def move_mount_fd(tree_fd: int, target_fd: int, what: str) -> None:
    """Attach the detached tree `tree_fd` on the object `target_fd` (O_PATH)."""
    ret = _libc.syscall(_SYS_MOVE_MOUNT, c_int(tree_fd), b"", c_int(target_fd), b"",
                        c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH))
    if ret != 0:
        _fail(what)


PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
_X32 = 0x40000000
_KEYRING = {"add_key", "request_key", "keyctl"}
# The calls that make a mount, old and new API. A new mount lets the kernel
# itself write a file's mode in a shared bind, where no chmod is seen: an
# overlay whose upper layer is there copies a setuid file of its lower layer
# up with mode 4755 on the first write (the copy is the caller's, and other
# users could run it). Sandboxes with no shared bind keep mount: builds and
# their tests use it in nested namespaces.
_MOUNT = {"mount", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
          "mount_setattr", "open_tree_attr"}
_GENERIC = {"io_uring_setup": 425, "openat2": 437, "fchmodat2": 452,  # one number everywhere
            "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
            "fsmount": 432, "fspick": 433, "mount_setattr": 442, "open_tree_attr": 467}
_X86_64 = {"add_key": 248, "request_key": 249, "keyctl": 250, "open": 2, "creat": 85,
           "chmod": 90, "fchmod": 91, "mknod": 133, "openat": 257, "mknodat": 259,
           "fchmodat": 268, "mount": 165, "mq_open": 240, **_GENERIC}
_I386_ARM = {"open": 5, "creat": 8, "mknod": 14, "chmod": 15, "mount": 21, "fchmod": 94,
             **_GENERIC}
# (audit arch, syscall numbers by name) for each ABI a process may use; arm64
# has no open, creat, mknod or chmod.
_ABIS: dict[str, tuple[tuple[int, dict[str, int]], ...]] = {
    "x86_64": ((0xC000003E, _X86_64),
               (0xC000003E, {name: _X32 | nr for name, nr in _X86_64.items()}),  # x32
               (0x40000003, {"add_key": 286, "request_key": 287, "keyctl": 288, "openat": 295,
                             "mknodat": 297, "fchmodat": 306, "mq_open": 277,
                             **_I386_ARM})),  # i386
    "aarch64": ((0xC00000B7, {"add_key": 217, "request_key": 218, "keyctl": 219,
                              "mknodat": 33, "mount": 40, "fchmod": 52, "fchmodat": 53,
                              "openat": 56, "mq_open": 180, **_GENERIC}),
                (0x40000028, {"add_key": 309, "request_key": 310, "keyctl": 311, "mq_open": 274,
                              "openat": 322, "mknodat": 324, "fchmodat": 333,
                              **_I386_ARM})),  # arm (compat)
}
_SETID = 0o6000  # S_ISUID | S_ISGID
_CREATES = 0o100 | 0o20000000  # O_CREAT | __O_TMPFILE, the same on every ABI listed
# Calls that set a file's mode: (index of the mode argument, index of the
# flags argument that says whether the call creates, or None: it always
# sets the mode). mkdir needs no rule: the kernel drops S_ISUID and S_ISGID
# from its mode (a directory gets S_ISGID only from its parent), and a
# directory runs nothing. mknod does: it makes regular files too. mq_open
# makes a file of the IPC namespace's mqueue filesystem with the mode given:
# a setuid queue has no use, and the refusal keeps plain queues working
# (test suites use them).
_MODE_ARGUMENT: dict[str, tuple[int, int | None]] = {
    "chmod": (1, None), "fchmod": (1, None), "fchmodat": (2, None), "fchmodat2": (2, None),
    "creat": (1, None), "mknod": (1, None), "mknodat": (2, None),
    "open": (2, 1), "openat": (3, 2), "mq_open": (2, 1),
}
# Calls whose mode the filter cannot see: openat2's is in a struct in memory
# (seccomp reads registers only), and io_uring's opens bypass seccomp
# altogether. ENOSYS, as on an older kernel: libc and programs fall back to
# openat and plain system calls.
_MODE_UNSEEN = ("openat2", "io_uring_setup")


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", c_ushort), ("jt", c_ubyte), ("jf", c_ubyte), ("k", c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


Insn = tuple[int, int, int, int]  # (code, jt, jf, k) of a struct sock_filter
# An instruction whose jump targets may be labels; a bare str is a label.
_Line = tuple[int, "int | str", "int | str", int] | str
_LD, _JEQ, _JSET, _RET = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, ..|JSET|K, BPF_RET|K


def _load(offset: int) -> _Line:
    return (_LD, 0, 0, offset)


def _load_arg(index: int) -> _Line:
    """The low 32 bits of a system call argument (struct seccomp_data.args)."""
    return _load(16 + 8 * index + (4 if sys.byteorder == "big" else 0))


def _assemble(lines: list[_Line]) -> list[Insn]:
    """Resolve labels to the relative, forward-only offsets classic BPF jumps take."""
    at: dict[str, int] = {}
    pc = 0
    for line in lines:
        if isinstance(line, str):
            at[line] = pc
        else:
            pc += 1
    prog: list[Insn] = []
    for line in lines:
        if isinstance(line, str):
            continue
        code, jt, jf, k = line
        here = len(prog)
        offsets = [at[j] - here - 1 if isinstance(j, str) else j for j in (jt, jf)]
        if not all(0 <= o <= 255 for o in offsets):
            raise ValueError(f"seccomp program: jump out of range at {here}")
        prog.append((code, offsets[0], offsets[1], k))
    return prog


def _mode_check(mode: int, flags: int | None) -> str:
    """The label of the check of a mode argument (shared by every ABI)."""
    return f"mode {mode} flags {flags}"


def _targets(nrs: dict[str, int], deny_setid: bool) -> list[tuple[int, str]]:
    """(syscall number, label of its verdict) for each call of one ABI the filter acts on."""
    targets = [(nr, "enosys") for name, nr in nrs.items() if name in _KEYRING]
    if deny_setid:
        targets += [(nrs[name], "enosys") for name in _MODE_UNSEEN if name in nrs]
        targets += [(nr, "eperm") for name, nr in nrs.items() if name in _MOUNT]
        targets += [(nr, _mode_check(*_MODE_ARGUMENT[name])) for name, nr in nrs.items()
                    if name in _MODE_ARGUMENT]
    return targets


def _filter(abis: tuple[tuple[int, dict[str, int]], ...], deny_setid: bool) -> list[Insn]:
    """A classic BPF seccomp program. The keyring system calls of each listed
    ABI fail with ENOSYS (as on a kernel without keyrings). With deny_setid,
    a mode with S_ISUID or S_ISGID fails with EPERM on every call that sets
    one (_MODE_ARGUMENT), the calls whose mode it cannot see fail with
    ENOSYS, and the mount calls (_MOUNT) fail with EPERM. Everything else
    runs, calls of an arch not listed too.

    The arch, then the number, and the arguments only in the branches of
    the calls that _MODE_ARGUMENT names: the kernel (Linux >= 5.11) runs the
    program once per number of its native and compat arch when it is
    installed, and allows from then on, without running it, every call whose
    verdict needed neither the arguments nor the instruction pointer."""
    # x86_64 and x32 share an arch (x32's numbers carry the _X32 bit): one branch.
    by_arch: dict[int, list[tuple[int, str]]] = {}
    for arch, nrs in abis:
        by_arch.setdefault(arch, []).extend(_targets(nrs, deny_setid))
    lines: list[_Line] = [_load(4)]
    lines += [(_JEQ, f"arch {arch}", 0, arch) for arch in by_arch]
    lines.append((_RET, 0, 0, _SECCOMP_RET_ALLOW))
    for arch, targets in by_arch.items():
        lines += [f"arch {arch}", _load(0)]
        lines += [(_JEQ, label, 0, nr) for nr, label in targets]
        lines.append((_RET, 0, 0, _SECCOMP_RET_ALLOW))
    if deny_setid:
        for mode, flags in sorted(set(_MODE_ARGUMENT.values()), key=str):
            lines.append(_mode_check(mode, flags))
            if flags is not None:
                lines += [_load_arg(flags), (_JSET, 0, "allow", _CREATES)]
            lines += [_load_arg(mode), (_JSET, "eperm", "allow", _SETID)]
    # Last: classic BPF jumps forward only.
    lines += ["allow", (_RET, 0, 0, _SECCOMP_RET_ALLOW),
              "enosys", (_RET, 0, 0, _SECCOMP_RET_ERRNO | errno.ENOSYS),
              "eperm", (_RET, 0, 0, _SECCOMP_RET_ERRNO | errno.EPERM)]
    return _assemble(lines)


def install_seccomp_filter(*, deny_setid: bool) -> bool:
    """Install the runtime's seccomp filter (_filter) for this process and its
    descendants. Needs no_new_privs. False where this architecture has no
    table here.

    The keyring calls: inside, uid 0 is the caller's own uid, and the kernel
    grants a key's owner access by uid: without the filter, the command could
    link the caller's user keyring by its serial and read its keys.
    deny_setid: inside, uid 0 is the caller, so a setuid file left in a host
    directory other users can reach would run with the caller's ids for them;
    and no new mounts, through which the kernel would set such modes itself.
    A filter cannot tell one path from another: it applies to every path.
    Install it after the sandbox's own mounts: none can be made after it."""
    abis = _ABIS.get(MACHINE)
    if abis is None:
        return False
    insns = _filter(abis, deny_setid)
    array = (_SockFilter * len(insns))(*(_SockFilter(*i) for i in insns))
    prog = _SockFprog(len(insns), array)
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0) != 0:
        _fail()
    return True


def set_process_title(title: str) -> None:
    """Show `title` as this process's command line and name, and an empty
    environment, in /proc. A forked process keeps its parent's argv and
    environ memory, which /proc/PID/cmdline and environ show. prctl(PR_SET_MM)
    could point them elsewhere but needs CAP_SYS_RESOURCE on the host: the
    areas themselves are overwritten instead, as setproctitle does (Python
    and libc hold their own copies of argv and the environment); the
    command line shown is the title and its NUL alone."""
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    # Fields 48-51: arg_start, arg_end, env_start, env_end; the split starts
    # at field 3, after the command name (which may hold spaces).
    fields = stat[stat.rindex(b")") + 2:].split()
    arg_start, arg_end, env_start, env_end = (int(x) for x in fields[45:49])
    if 0 < arg_start < arg_end:
        size = arg_end - arg_start
        raw = title.encode()[: size - 1]
        _libc.memset(arg_start, 0, size)
        _libc.memmove(arg_start, raw, len(raw))
        if len(raw) + 2 <= size:
            # The area's last byte not NUL: the kernel then shows the area up
            # to its first NUL (get_mm_cmdline's setproctitle case), not the
            # whole area, whose length is that of the host command line.
            _libc.memset(arg_end - 1, ord("."), 1)
    if 0 < env_start < env_end:
        _libc.memset(env_start, 0, env_end - env_start)
    with open("/proc/self/comm", "w") as f:
        f.write(title[:15])  # the kernel keeps 15 bytes


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
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = int(_libc.syscall(_SYS_OPENAT2, c_int(dirfd), _b(path), ctypes.byref(how),
                           c_ulong(ctypes.sizeof(how))))
    if fd < 0:
        _fail(path)
    return fd


def _mount_setattr(dirfd: int, path: str, flags: int, attr: _MountAttr, what: str) -> None:
    ret = _libc.syscall(_SYS_MOUNT_SETATTR, c_int(dirfd), _b(path), c_uint(flags),
                        ctypes.byref(attr), c_ulong(ctypes.sizeof(attr)))
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


class _RLimit64(ctypes.Structure):
    _fields_ = [("soft", c_uint64), ("hard", c_uint64)]


def soft_limit(resource: int) -> int:
    """The soft value of a resource limit, through glibc's prlimit64 (64-bit
    fields on every ABI: RLIM_INFINITY is 2**64 - 1 on each)."""
    limit = _RLimit64()
    if _libc.prlimit64(0, resource, None, ctypes.byref(limit)) != 0:
        _fail()
    return int(limit.soft)
