"""The dependency-layer cache: installed build dependencies, kept for reuse.

After build dependencies are installed, what changed in the session (its
overlay upper directory) is kept as a layer. A later build that resolves to the
very same packages on the very same environment mounts that layer below its
session and skips installation.

    $XDG_CACHE_HOME/nsbuild/deps/
        KEY/layer/          the kept upper directory (owned by the sandbox's ids)
        KEY/layer.json      what it holds: environment, base id, arch, packages
        KEY.lock            flock: shared while a build uses it, exclusive to delete
        .tmp-PID-START-RAND/   a layer being stored (renamed to KEY when complete)

KEY is the sha256 of the environment's base id, the architecture, the exact
resolved package set (name, version, architecture of every package apt chose
to install or remove) and the checksums of any extra packages given. A changed
base (the environment was updated) gives a different key, so old layers are
never used against a new base; `nsbuild gc` trims the unused ones.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TMP_PREFIX = ".tmp-"


def cache_root() -> Path:
    value = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(value) if value and os.path.isabs(value) else Path.home() / ".cache"
    return base / "nsbuild" / "deps"


def layer_key(
    base_id: str, arch: str, resolution: Sequence[str], extras: Sequence[str] = ()
) -> str:
    h = hashlib.sha256()
    for part in ("nsbuild-deps-v1", base_id, arch, *sorted(resolution), "--", *sorted(extras)):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class Layer:
    key: str
    path: Path  # the directory to mount as a lower


class DepCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_root()

    def _lock_path(self, key: str) -> Path:
        return self.root / f"{key}.lock"

    @contextmanager
    def use(self, key: str) -> Iterator[Layer | None]:
        """The layer for `key` if one is complete, held (shared lock) until exit
        so that gc cannot remove it from under a running build."""
        entry = self.root / key
        if not (entry / "layer.json").is_file():
            yield None
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path(key), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            # gc may have removed it between the check and the lock.
            if not (entry / "layer.json").is_file():
                yield None
                return
            os.utime(entry / "layer.json")  # last use, for gc
            yield Layer(key, entry / "layer")

    def staging(self) -> Path:
        """A fresh directory to store a new layer in; commit() it or let gc take it."""
        import secrets

        self.root.mkdir(parents=True, exist_ok=True)
        stat = Path(f"/proc/{os.getpid()}/stat").read_bytes()
        start = stat[stat.rindex(b")") + 2 :].split()[19].decode()
        tmp = self.root / f"{TMP_PREFIX}{os.getpid()}-{start}-{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o700)
        return tmp

    def commit(self, staging: Path, key: str, meta: dict[str, object]) -> Layer | None:
        """Publish `staging` (holding `layer/`) as KEY. Returns None when another
        build published the same key first (the staging dir is then left for
        the caller to remove)."""
        meta = {**meta, "key": key, "created": int(time.time())}
        (staging / "layer.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        try:
            os.rename(staging, self.root / key)
        except OSError:
            return None
        return Layer(key, self.root / key / "layer")

    def discard(self, path: Path) -> None:
        """Remove a staging dir or a layer: its files belong to the sandbox's ids."""
        from nsbuild.envs.remove import remove_tree

        remove_tree(path)

    def entries(self) -> list[tuple[str, dict[str, object], float]]:
        """(key, metadata, last use time) of every complete layer."""
        out: list[tuple[str, dict[str, object], float]] = []
        if not self.root.is_dir():
            return out
        for d in self.root.iterdir():
            meta_path = d / "layer.json"
            if d.name.startswith(TMP_PREFIX) or not meta_path.is_file():
                continue
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            out.append((d.name, meta, meta_path.stat().st_mtime))
        return out
