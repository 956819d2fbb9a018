"""Architectures of environments (nsbuild.envs.arches): how each runs on
this machine, what is missing to run it, and the architecture read from a
tree's dpkg. binfmt_misc's own state is tested for real where this machine
has it (test_foreign_envs, the root test); the states a CI machine cannot be
put in (an entry without the F flag, binfmt_misc not mounted) are read from
a folder laid out as binfmt_misc is."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from nsbuild.envs import arches
from nsbuild.envs.errors import EnvError
from nsbuild.sandbox.syscalls import MACHINE, PER_LINUX32

AMD64 = MACHINE == "x86_64"


def test_the_machines_own_architecture_runs_natively() -> None:
    arch = arches.machine_arch()
    assert arches.run_mode(arch) == arches.NATIVE
    assert arches.personality_for(arch) is None
    arches.require_runnable(arch, "here")


@pytest.mark.skipif(not AMD64, reason="the companions written here are amd64's")
def test_i386_runs_natively_under_the_32_bit_personality_on_amd64() -> None:
    assert arches.machine_arch() == "amd64"
    assert arches.run_mode("i386") == arches.LINUX32
    assert arches.personality_for("i386") == PER_LINUX32
    assert arches.run_mode("arm64") == arches.QEMU_USER
    assert arches.personality_for("arm64") is None


@pytest.mark.parametrize("bad", ["", "AMD64", "arm64\n", "../x", "a" * 40, "-arm"])
def test_bad_names_are_refused_naming_the_option(bad: str) -> None:
    with pytest.raises(EnvError, match=r"^--arch: bad architecture name"):
        arches.check_name(bad, "--arch")


def test_an_architecture_without_a_known_emulator_says_so_in_one_line() -> None:
    with pytest.raises(EnvError) as e:
        arches.require_runnable("hurd-i386", "gnu")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("environment 'gnu' is hurd-i386, which this")
    assert "knows no qemu-user emulator for hurd-i386" in msg


def _binfmt(tmp: Path, status: str | None = "enabled", **entries: str) -> str:
    folder = tmp / "binfmt_misc"
    folder.mkdir()
    if status is not None:
        (folder / "status").write_text(status + "\n")
    for name, text in entries.items():
        (folder / name.replace("_", "-")).write_text(text)
    return str(folder)


ENTRY = ("{state}\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: {flags}\n"
         "offset 0\nmagic 7f454c460201010000000000000000000200b700\n")


def test_registered_with_the_f_flag_is_enough(tmp_path: Path) -> None:
    folder = _binfmt(tmp_path, qemu_aarch64=ENTRY.format(state="enabled", flags="PF"))
    assert arches.emulation_missing("arm64", folder) is None


def test_binfmt_misc_not_mounted_says_how_to_mount_it(tmp_path: Path) -> None:
    folder = _binfmt(tmp_path, status=None)
    why = arches.emulation_missing("arm64", folder)
    assert why is not None
    assert f"binfmt_misc is not mounted on {folder}" in why
    assert f"mount -t binfmt_misc binfmt_misc {folder}" in why
    assert "apt install qemu-user-static binfmt-support" in why


def test_no_emulator_registered_says_what_to_install(tmp_path: Path) -> None:
    why = arches.emulation_missing("armhf", _binfmt(tmp_path))
    assert why == ("no qemu-user emulator for armhf is registered with binfmt_misc: "
                   "install it with 'apt install qemu-user-static binfmt-support'")


def test_a_disabled_entry_says_how_to_enable_it(tmp_path: Path) -> None:
    folder = _binfmt(tmp_path, qemu_aarch64=ENTRY.format(state="disabled", flags="PF"))
    assert arches.emulation_missing("arm64", folder) == (
        "binfmt_misc's qemu-aarch64 entry is disabled "
        "(as root: 'update-binfmts --enable qemu-aarch64')")


def test_an_entry_without_the_f_flag_is_not_enough(tmp_path: Path) -> None:
    # Without F the kernel looks the interpreter up inside the environment.
    folder = _binfmt(tmp_path, qemu_aarch64=ENTRY.format(state="enabled", flags="P"))
    why = arches.emulation_missing("arm64", folder)
    assert why is not None
    assert "lacks the F flag" in why
    assert "/usr/libexec/qemu-binfmt/aarch64-binfmt-P would have to exist inside" in why


def test_disabled_binfmt_misc(tmp_path: Path) -> None:
    why = arches.emulation_missing("arm64", _binfmt(tmp_path, status="disabled"))
    assert why is not None and why.startswith("binfmt_misc is disabled")


def test_an_entry_is_read_bounded_and_printed_escaped(tmp_path: Path) -> None:
    hostile = ENTRY.format(state="enabled", flags="P").replace(
        "aarch64-binfmt-P", "x\x1b[2Jy") + "z" * (1 << 20)
    why = arches.emulation_missing("arm64", _binfmt(tmp_path, qemu_aarch64=hostile))
    assert why is not None and "\x1b" not in why and "x\\x1b[2Jy" in why


# ------------------------------------------------------------ ELF of dpkg


def _elf(machine: int, bits: int = 64, little: bool = True, flags: int = 0) -> bytes:
    order = "<" if little else ">"
    ident = b"\x7fELF" + bytes([1 if bits == 32 else 2, 1 if little else 2, 1]) + bytes(9)
    head = ident + struct.pack(order + "HHI", 2, machine, 1)
    if bits == 32:
        # entry, phoff, shoff, then e_flags at 36.
        head += struct.pack(order + "IIII", 0, 0, 0, flags) + bytes(12)
    else:
        head += struct.pack(order + "QQQI", 0, 0, 0, flags) + bytes(12)
    return head


def _tree(tmp: Path, dpkg: bytes) -> Path:
    bin_dir = tmp / "root" / "usr" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "dpkg").write_bytes(dpkg + bytes(64))
    return tmp / "root"


@pytest.mark.parametrize(("header", "arch"), [
    (_elf(62), "amd64"),
    (_elf(3, 32), "i386"),
    (_elf(183), "arm64"),
    (_elf(40, 32, flags=0x05000400), "armhf"),
    (_elf(40, 32, flags=0x05000200), "armel"),
    (_elf(21), "ppc64el"),
    (_elf(22, little=False), "s390x"),
    (_elf(243), "riscv64"),
    (_elf(8), "mips64el"),
])  # fmt: skip
def test_the_architecture_of_a_trees_dpkg(tmp_path: Path, header: bytes, arch: str) -> None:
    assert arches.elf_arch(_tree(tmp_path, header)) == arch


def test_the_hosts_own_dpkg_is_the_machines_architecture() -> None:
    assert arches.elf_arch("/") == arches.machine_arch()


def test_an_unknown_or_broken_dpkg_gives_none(tmp_path: Path) -> None:
    assert arches.elf_arch(_tree(tmp_path / "a", _elf(9999))) is None
    assert arches.elf_arch(_tree(tmp_path / "b", b"#!/bin/sh\n")) is None
    short = tmp_path / "c"
    _tree(short, b"")
    (short / "root/usr/bin/dpkg").write_bytes(b"\x7fELF\x02\x01")
    assert arches.elf_arch(short / "root") is None
    assert arches.elf_arch(tmp_path / "nothing-here") is None


def test_a_dpkg_link_out_of_the_tree_is_resolved_inside_it(tmp_path: Path) -> None:
    """A tree's absolute or climbing link leads to the tree's own files,
    never to the host's dpkg (which would say amd64 for an arm64 tree)."""
    for name, target in (("abs", "/usr/bin/dpkg"), ("up", "../../../../../../usr/bin/dpkg")):
        root = tmp_path / name / "root"
        (root / "usr" / "bin").mkdir(parents=True)
        os.symlink(target, root / "usr" / "bin" / "dpkg")
        assert arches.elf_arch(root) is None


def test_a_fifo_or_folder_as_dpkg_is_not_read(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr" / "bin").mkdir(parents=True)
    os.mkfifo(root / "usr" / "bin" / "dpkg")  # a read would wait for a writer
    assert arches.elf_arch(root) is None
    (root / "usr" / "bin" / "dpkg").unlink()
    (root / "usr" / "bin" / "dpkg").mkdir()
    assert arches.elf_arch(root) is None


def test_a_bad_architecture_in_a_config_names_the_environment() -> None:
    with pytest.raises(EnvError, match=r"^environment 'x': Architecture: bad architecture name "
                                       r"'ARM64\\x1b'"):
        arches.require_runnable("ARM64\x1b", "x")
