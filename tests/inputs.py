"""What the slow tests read from outside the repository: a Debian 12 buildd
tarball and real Debian source packages (hello 2.10-3, pv 1.6.20-1); and
what the machine must have for emulated environments (qemu-user registered
with binfmt_misc).

`scripts/setup-and-test` makes the tarball and fetches the source packages
once, into a cache, and names them in NSBUILD_TEST_TARBALL and
NSBUILD_TEST_SOURCES; the defaults are where it puts them. A test whose input
is missing fails and says how to get it: a skip would let a clone silently
test less.

Emulation is the machine's, not an input: `scripts/setup-and-test`, as root,
mounts binfmt_misc and enables Debian's qemu-user entries. Where root truly
cannot (a container that may not mount binfmt_misc), it says why in the
file BINFMT_UNAVAILABLE, and the emulated tests skip with that reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SETUP = "scripts/setup-and-test --setup-only"


def _cache() -> Path:
    """scripts/setup-and-test's cache: the system's as root, else the user's."""
    if os.geteuid() == 0:
        return Path("/var/cache/nsbuild-ci")
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nsbuild" / "test"


TARBALL = Path(os.environ.get("NSBUILD_TEST_TARBALL") or _cache() / "bookworm-buildd.tar")
SOURCES = Path(os.environ.get("NSBUILD_TEST_SOURCES") or TARBALL.parent / "sources")
BINFMT_UNAVAILABLE = TARBALL.parent / "binfmt-unavailable"


def tarball() -> Path:
    """The bookworm buildd tarball; the calling test fails without it."""
    if not TARBALL.is_file():
        pytest.fail(f"no bookworm buildd tarball at {TARBALL}: `{SETUP}` makes it "
                    "(or set NSBUILD_TEST_TARBALL to one)", pytrace=False)
    return TARBALL


def bookworm_config(config_home: Path) -> Path:
    """An XDG_CONFIG_HOME with the environment `bookworm`: the test tarball,
    the main archive as its mirror. Returns `config_home`."""
    chroot_d = config_home / "nsbuild" / "chroot.d"
    chroot_d.mkdir(parents=True)
    (chroot_d / "bookworm").write_text(
        f"Name: bookworm\nType: tarball\nPath: {tarball()}\nSuite: bookworm\n"
        "Architecture: amd64\nMirror: http://deb.debian.org/debian\n"
    )
    return config_home


def fixture_dsc(name: str) -> Path:
    """The .dsc of a fetched source package (`hello_2.10-3`); the calling test
    fails without it."""
    path = SOURCES / f"{name}.dsc"
    if not path.is_file():
        pytest.fail(f"no source package {path}: `{SETUP}` fetches it "
                    "(or set NSBUILD_TEST_SOURCES to a folder holding it)", pytrace=False)
    return path


def emulation(arch: str) -> None:
    """Return if this machine runs `arch` programs through qemu-user; else
    skip where the setup found it cannot be set up (saying why), or fail
    saying what is missing."""
    from nsbuild.envs.arches import emulation_missing

    why = emulation_missing(arch)
    if why is None:
        return
    if BINFMT_UNAVAILABLE.is_file():
        pytest.skip("emulated environments cannot be tested on this machine: "
                    + BINFMT_UNAVAILABLE.read_text(errors="replace").strip()[:500])
    pytest.fail(f"{arch} programs cannot run here: {why} (as root, `{SETUP}` sets it up)",
                pytrace=False)
