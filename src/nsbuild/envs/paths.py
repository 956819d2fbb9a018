"""Where environments live on disk.

    $XDG_CONFIG_HOME/nsbuild/chroot.d/    user environment configs (win over system)
    /etc/nsbuild/chroot.d/                system environment configs
    $XDG_CACHE_HOME/nsbuild/              (root: /var/cache/nsbuild/)
        tarballs/NAME.tar                 tarballs made by `nsbuild env create`
        store/digests/KEY.json            sha256 of a tarball, keyed by its path and stat
        store/bases/SHA256/root/          a tarball unpacked once (content-addressed)
        store/locks/SHA256.lock           flock: exclusive to unpack or delete, shared to use
        sessions/ID/{upper,work}/         a copy-on-write session over a base
        sessions/ID/session.json          what it is, and who owns it

Everything being created is first made under a `.tmp-PID-START-RANDOM` name
and renamed into place when complete, so a crash leaves only names that say
which (dead) process made them, and `nsbuild gc` can remove them safely.
Upper and work dirs of one session share a directory, hence a filesystem, as
overlayfs requires.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SYSTEM_CONFIG_DIR = Path("/etc/nsbuild/chroot.d")


def _xdg(var: str, default: str) -> Path:
    value = os.environ.get(var, "")
    # The XDG spec says relative values are invalid and must be ignored.
    if value and os.path.isabs(value):
        return Path(value)
    return Path.home() / default


def user_config_dir() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "nsbuild" / "chroot.d"


def config_dirs() -> tuple[Path, ...]:
    """Config folders, lowest precedence first."""
    return (SYSTEM_CONFIG_DIR, user_config_dir())


def cache_dir() -> Path:
    # Root's sandboxes run as its subordinate ids, which cannot walk into
    # /root (mode 0700): root's cache is the system one.
    if os.geteuid() == 0 and not os.path.isabs(os.environ.get("XDG_CACHE_HOME", "")):
        return Path("/var/cache/nsbuild")
    return _xdg("XDG_CACHE_HOME", ".cache") / "nsbuild"


@dataclass(frozen=True)
class Layout:
    """The folders of one cache root; `Layout.default()` follows $XDG_CACHE_HOME."""

    root: Path

    @classmethod
    def default(cls) -> Layout:
        return cls(cache_dir())

    @property
    def tarballs(self) -> Path:
        return self.root / "tarballs"

    @property
    def digests(self) -> Path:
        return self.root / "store" / "digests"

    @property
    def bases(self) -> Path:
        return self.root / "store" / "bases"

    @property
    def locks(self) -> Path:
        return self.root / "store" / "locks"

    @property
    def sessions(self) -> Path:
        return self.root / "sessions"

    def base_dir(self, digest: str) -> Path:
        return self.bases / digest

    def base_lock(self, digest: str) -> Path:
        return self.locks / f"{digest}.lock"

    def session_dir(self, session_id: str) -> Path:
        return self.sessions / session_id

    def ensure(self) -> None:
        for d in (self.tarballs, self.digests, self.bases, self.locks, self.sessions):
            d.mkdir(parents=True, exist_ok=True)
