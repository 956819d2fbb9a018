"""Debian architectures of environments: names, and what this machine needs
to run an environment of another architecture (a 32-bit personality, or
qemu-user registered with binfmt_misc).

An environment runs one of three ways here (`run_mode`):
- native: the machine's own architecture;
- linux32: its 32-bit companion (i386 on amd64, armhf and armel on arm64),
  which the CPU runs, under the 32-bit personality so that `uname -m` agrees
  with dpkg (as schroot's personality=linux32 does for sbuild);
- qemu-user: any other, through a qemu-user emulator that binfmt_misc starts
  for the environment's programs. Only with the F flag: the kernel then opens
  the emulator once, when it is registered, and needs nothing of it inside
  the environment (Debian's qemu-user-static registers them so).
"""

from __future__ import annotations

import errno
import os
import re
import stat

from nsbuild.envs.errors import EnvError
from nsbuild.printable import printable
from nsbuild.sandbox.syscalls import MACHINE, PER_LINUX32

# dpkg's architecture names: lower-case letters, digits and '-' (musl-linux-mips).
ARCH_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}\Z")

NATIVE, LINUX32, QEMU_USER = "native", "linux32", "qemu-user"

# Kernel machine -> (its Debian architecture, the 32-bit ones it runs under PER_LINUX32).
_MACHINES: dict[str, tuple[str, tuple[str, ...]]] = {
    "x86_64": ("amd64", ("i386",)),
    "aarch64": ("arm64", ("armhf", "armel")),
    "ppc64le": ("ppc64el", ()),
    "s390x": ("s390x", ()),
    "riscv64": ("riscv64", ()),
    "loongarch64": ("loong64", ()),
    "mips64": ("mips64el", ()),
    "i686": ("i386", ()),
    "armv7l": ("armhf", ("armel",)),
}

# Debian architecture -> qemu-user's name for its machine: binfmt_misc's entry
# is qemu-NAME (Debian's qemu-user-static and qemu-user-binfmt name them so).
QEMU_NAMES = {
    "amd64": "x86_64",
    "i386": "i386",
    "arm64": "aarch64",
    "armhf": "arm",
    "armel": "arm",
    "ppc64el": "ppc64le",
    "ppc64": "ppc64",
    "powerpc": "ppc",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "loong64": "loongarch64",
    "mips64el": "mips64el",
    "mipsel": "mipsel",
    "mips": "mips",
    "alpha": "alpha",
    "hppa": "hppa",
    "m68k": "m68k",
    "sh4": "sh4",
    "sparc64": "sparc64",
}

BINFMT = "/proc/sys/fs/binfmt_misc"
_INSTALL = "install it with 'apt install qemu-user-static binfmt-support'"
# An entry is a few lines (status, interpreter, flags, offset, magic, mask).
_ENTRY_MAX = 4096


def check_name(arch: str, what: str = "architecture") -> str:
    """`arch` if it can be a Debian architecture name, else a one-line EnvError
    naming `what` (e.g. "--host-arch")."""
    if not ARCH_RE.match(arch):
        raise EnvError(f"{what}: bad architecture name '{printable(arch, 40)}' "
                       "(e.g. amd64, arm64, armhf, i386)")
    return arch


def machine_arch() -> str:
    """This machine's Debian architecture, from the kernel's machine name
    (dpkg's own may be a 32-bit userland on a 64-bit kernel; the kernel runs
    both). The machine name itself when nsbuild knows no Debian name for it."""
    return _MACHINES.get(MACHINE, (MACHINE, ()))[0]


def run_mode(arch: str) -> str:
    """How programs of `arch` run here: NATIVE, LINUX32 or QEMU_USER (the
    last whether or not an emulator is registered: see require_runnable)."""
    native, companions = _MACHINES.get(MACHINE, (MACHINE, ()))
    if not arch or arch == native:
        return NATIVE
    return LINUX32 if arch in companions else QEMU_USER


def personality_for(arch: str) -> int | None:
    """The personality(2) persona an environment of `arch` runs under on this
    machine (PER_LINUX32 for i386 on amd64), or None for the default."""
    return PER_LINUX32 if run_mode(arch) == LINUX32 else None


def require_runnable(arch: str, env_name: str) -> None:
    """Raise a one-line EnvError saying what to install when this machine
    cannot run programs of `arch` (neither natively nor through qemu-user
    registered with binfmt_misc with the F flag)."""
    if run_mode(arch) != QEMU_USER:
        return
    check_name(arch, f"environment {env_name!r}: Architecture")
    why = emulation_missing(arch)
    if why:
        raise EnvError(f"environment {env_name!r} is {arch}, which this {machine_arch()} "
                       f"machine cannot run: {why}")  # fmt: skip


def emulation_missing(arch: str, binfmt: str = BINFMT) -> str | None:
    """What is missing for binfmt_misc (mounted on `binfmt`) to run programs
    of `arch` through qemu-user, in words with the fix; None when nothing is."""
    qemu = QEMU_NAMES.get(arch)
    if qemu is None:
        return f"nsbuild knows no qemu-user emulator for {arch}"
    status = _read(f"{binfmt}/status")
    if status is None:
        return (f"binfmt_misc is not mounted on {binfmt} (as root: 'mount -t binfmt_misc "
                f"binfmt_misc {binfmt}'); then {_INSTALL}")  # fmt: skip
    if status.strip() != "enabled":
        return f"binfmt_misc is disabled (as root: 'echo 1 > {binfmt}/status')"
    entry = _read(f"{binfmt}/qemu-{qemu}")
    if entry is None:
        return f"no qemu-user emulator for {arch} is registered with binfmt_misc: {_INSTALL}"
    lines = entry.splitlines()
    if lines[:1] != ["enabled"]:
        return (f"binfmt_misc's qemu-{qemu} entry is disabled (as root: "
                f"'update-binfmts --enable qemu-{qemu}')")  # fmt: skip
    flags = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("flags:")),
                 "")  # fmt: skip
    if "F" not in flags:
        interpreter = next((printable(line.split(" ", 1)[1], 200) for line in lines
                            if line.startswith("interpreter ")), "its interpreter")  # fmt: skip
        return (f"binfmt_misc's qemu-{qemu} entry lacks the F flag, so {interpreter} would "
                f"have to exist inside the environment: {_INSTALL}, whose entries have it")
    return None


def _read(path: str) -> str | None:
    """A small file of binfmt_misc; None if it does not exist (not mounted,
    not registered)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise EnvError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return os.read(fd, _ENTRY_MAX).decode(errors="replace")
    finally:
        os.close(fd)


# ELF e_machine -> Debian architecture, by (class, byte order) where it matters:
# 1 = 32-bit or little-endian, 2 = 64-bit or big-endian.
_EM_X86_64, _EM_ARM, _EM_MIPS, _EM_PPC64 = 62, 40, 8, 21
_ELF_MACHINES: dict[tuple[int, int, int], str] = {
    (_EM_X86_64, 2, 1): "amd64",
    (_EM_X86_64, 1, 1): "x32",
    (3, 1, 1): "i386",
    (183, 2, 1): "arm64",
    (_EM_ARM, 1, 1): "armhf",  # armel without the hard-float flag (below)
    (_EM_PPC64, 2, 1): "ppc64el",
    (_EM_PPC64, 2, 2): "ppc64",
    (20, 1, 2): "powerpc",
    (22, 2, 2): "s390x",
    (243, 2, 1): "riscv64",
    (258, 2, 1): "loong64",
    (_EM_MIPS, 2, 1): "mips64el",
    (_EM_MIPS, 1, 1): "mipsel",
    (_EM_MIPS, 1, 2): "mips",
}
_EF_ARM_ABI_FLOAT_HARD = 0x400
_ELF_HEADER = 52  # a 32-bit header; enough of a 64-bit one for e_machine
DPKG = "usr/bin/dpkg"


def elf_arch(root: str | os.PathLike[str]) -> str | None:
    """The Debian architecture of a tree's dpkg, from its ELF header: where an
    environment declares no Architecture. None if it has no readable dpkg.
    The tree may be the user's own or one nsbuild unpacked: the path is
    resolved inside it, and a regular file's first bytes only are read."""
    from nsbuild.sandbox import syscalls as sc

    try:
        dirfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        # O_PATH first: opening a device node for reading may act on it.
        path_fd = sc.openat2(dirfd, DPKG, os.O_PATH | os.O_CLOEXEC,
                             sc.RESOLVE_IN_ROOT | sc.RESOLVE_NO_MAGICLINKS)  # fmt: skip
    except OSError:
        return None
    finally:
        os.close(dirfd)
    try:
        if not stat.S_ISREG(os.fstat(path_fd).st_mode):
            return None
        fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    finally:
        os.close(path_fd)
    try:
        head = os.pread(fd, _ELF_HEADER, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    return _arch_of_header(head)


def _arch_of_header(head: bytes) -> str | None:
    if len(head) < _ELF_HEADER or head[:4] != b"\x7fELF" or head[5] not in (1, 2):
        return None
    little = head[5] == 1

    def number(at: int, size: int) -> int:
        part = head[at : at + size]
        return int.from_bytes(part, "little") if little else int.from_bytes(part, "big")

    arch = _ELF_MACHINES.get((number(18, 2), head[4], head[5]))
    if arch == "armhf" and not number(36, 4) & _EF_ARM_ABI_FLOAT_HARD:
        return "armel"
    return arch
