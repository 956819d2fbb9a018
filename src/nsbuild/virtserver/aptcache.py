"""The environment's apt caches, shared by its testbeds without trusting them.

The same folders the build path keeps (nsbuild.envs.paths.apt_cache_dir:
`apt-lists/` and `apt-archives/` of the environment, and its `.lock`), so a
testbed's `apt-get update` finds the package lists of the last run and
`apt-get install` finds the .debs it downloaded before.

A testbed runs code that is not trusted (the package's build and tests, as
root), and apt does not check what it finds in its caches: a .deb of the
right size is handed to dpkg as it is, and an index under an unchanged
InRelease is believed. So the cache is never mounted writable in a testbed:

- open: a snapshot of the cache (hard links, taken under a shared lock) is
  the lower layer of an overlay on /var/lib/apt/lists and on
  /var/cache/apt/archives; what apt writes goes to an upper directory in the
  session. Later changes of the cache replace files by rename and never
  touch the snapshot's files.
- revert and close, once the testbed's processes are gone: what apt wrote
  is taken into the cache only after the checks apt made when it
  downloaded: an InRelease must be one clearsigned message with a good
  signature by a key of the environment's own pristine layers (gpgv), name
  the suite its file name says (not another suite signed by the same key),
  be the same archive and release as the one cached (Origin, Label,
  Codename),
  not be older than it, and not have expired (Valid-Until); an index must
  have the size and SHA256 its InRelease gives; a .deb the size and SHA256
  of a verified Packages index (aptformats.py reads them). Everything else
  is dropped. This runs under the cache's exclusive lock, the lock the
  build path holds while its apt writes to the same folders.

    sessions/ID/apt/NAME/{lower,upper,work}   NAME: apt-lists, apt-archives
    sessions/ID/apt/trusted.gpg               the layers' apt keys, one keyring
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from nsbuild.envs.owner import sandbox_root_ids
from nsbuild.envs.paths import apt_cache_dir
from nsbuild.virtserver import aptformats
from nsbuild.virtserver.aptformats import DEB_RE
from nsbuild.virtserver.hostfs import open_in_layer, opened_regular, read_bounded

if TYPE_CHECKING:
    from debian.deb822 import Deb822

    from nsbuild.sandbox import Mount

LISTS, ARCHIVES = "apt-lists", "apt-archives"
MOUNTS = {LISTS: "/var/lib/apt/lists", ARCHIVES: "/var/cache/apt/archives"}
# What apt keeps at the top of those folders (not lock, partial/, auxfiles/).
_LIST_RE = re.compile(r"(?!lock$)[A-Za-z0-9][A-Za-z0-9._+~%-]*")
_KEY_DIRS = ("etc/apt/trusted.gpg.d",)
_KEY_FILES = ("etc/apt/trusted.gpg",)
# What the host side reads whole, at most: Debian's InRelease is some 150 KB,
# a keyring some 10 KB. Indexes and .debs are read in chunks, and only up to
# the size a verified InRelease or index gives them.
MAX_RELEASE = 16 << 20
MAX_KEY = 16 << 20

Say = Callable[[str], None]


def _regular(path: Path) -> bool:
    try:
        return path.is_file() and not path.is_symlink()
    except OSError:
        return False


def _files(folder: Path, pattern: re.Pattern[str]) -> dict[str, Path]:
    try:
        return {p.name: p for p in folder.iterdir() if pattern.fullmatch(p.name) and _regular(p)}
    except FileNotFoundError:
        return {}


@contextmanager
def _locked(path: Path, mode: int, notice: Say) -> Iterator[None]:
    from nsbuild.envs.store import locked_file

    def waiting() -> None:
        # A build's apt run holds it for as long as it downloads and installs.
        notice("apt cache: waiting for its lock (an apt run of a build or of "
               "another testbed of this environment holds it)")

    with locked_file(path, mode, on_wait=waiting):
        yield


class AptCache:
    """One testbed's view of its environment's apt caches."""

    def __init__(self, env_name: str, session_dir: str | os.PathLike[str],
                 notice: Say = lambda _text: None) -> None:
        """`notice` gets what the user should hear of at once (a wait)."""
        self.cache = apt_cache_dir(env_name)
        self.dir = Path(session_dir) / "apt"
        self.notice = notice

    def mounts(self, lowers: Sequence[str]) -> tuple[Mount, ...]:
        """The overlays on apt's folders (made by snapshot()): the cached
        files over what the environment's own layers `lowers` (top first)
        hold there, so an environment that ships package lists keeps them."""
        from nsbuild.sandbox import Overlay

        out: list[Mount] = []
        for name, dst in MOUNTS.items():
            mine = [str(self.dir / name / sub) for sub in ("lower", "upper", "work")]
            below = [f"{layer}{dst}" for layer in lowers if _layer_dir(layer, dst)]
            out.append(Overlay((mine[0], *below), mine[1], mine[2], dst, volatile=True))
        return tuple(out)

    def snapshot(self, lowers: Sequence[str]) -> None:
        """Hard links of the cached files, for the testbed to see; and the
        apt keys of the environment's pristine layers `lowers` (top first)."""
        from nsbuild.envs.owner import give_to_sandbox_root, sandbox_root_ids

        for name in MOUNTS:
            parts = [self.dir / name / sub for sub in ("lower", "upper", "work")]
            for part in parts:
                part.mkdir(parents=True)
            give_to_sandbox_root(*parts)
        self._keyring(lowers)
        # The owner's alone: another user must not plant a .deb or a list here.
        self.cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        ids = sandbox_root_ids()
        with _locked(self.cache / ".lock", fcntl.LOCK_SH, self.notice):
            for name, pattern in ((LISTS, _LIST_RE), (ARCHIVES, DEB_RE)):
                for fname, src in _files(self.cache / name, pattern).items():
                    dst = self.dir / name / "lower" / fname
                    try:
                        os.link(src, dst)
                    except OSError:
                        # Another filesystem, or a file of another owner where
                        # hard links are protected: a copy does as well.
                        shutil.copy2(src, dst)
                    if ids is not None:
                        # Run by root: a file of host root's is nobody's in
                        # the testbed, and apt cannot hand it to _apt and
                        # back. The sandbox's root may own the cache's file
                        # too (the link's): it reaches no cache by path, and
                        # the overlay never writes to its lower layer.
                        os.chown(dst, *ids, follow_symlinks=False)

    def _keyring(self, lowers: Sequence[str]) -> None:
        """One binary keyring of the layers' apt keys (armoured ones decoded):
        what gpgv checks the InRelease files against. Read on the host side
        from the read-only layers, never from the testbed."""
        found: dict[str, bytes] = {}
        for layer in reversed(lowers):  # the top layer wins
            for rel in _KEY_DIRS:
                found.update(_layer_keys(layer, rel, None))
            for rel in _KEY_FILES:
                found.update(_layer_keys(layer, os.path.dirname(rel), os.path.basename(rel)))
        with open(self.dir / "trusted.gpg", "wb") as out:
            for rel, data in found.items():
                out.write(aptformats.dearmor(data) if rel.endswith(".asc") else data)

    def harvest(self, say: Say) -> None:
        """Take what the testbed's apt wrote into the cache, once checked."""
        lists_up = _files(self.dir / LISTS / "upper", _LIST_RE)
        debs_up = _files(self.dir / ARCHIVES / "upper", DEB_RE)
        if not lists_up and not debs_up:
            return
        with _locked(self.cache / ".lock", fcntl.LOCK_EX, self.notice):
            for name in MOUNTS:
                (self.cache / name).mkdir(mode=0o700, exist_ok=True)
            if lists_up:
                self._harvest_lists(lists_up, say)
            if debs_up:
                self._harvest_debs(debs_up, say)

    def _harvest_lists(self, new: dict[str, Path], say: Say) -> None:
        cache = self.cache / LISTS
        cached = _files(cache, _LIST_RE)
        take: dict[str, Path] = {}
        drop: set[str] = set()
        dates: dict[str, float] = {}
        # Fetched again, unchanged: nothing to take.
        same = {n for n, path in new.items() if n in cached and _same(path, cached[n])}
        releases = sorted({n for n in (*new, *cached) if n.endswith("_InRelease")})
        prefixes = [r[: -len("InRelease")] for r in releases]
        for rel, prefix in zip(releases, prefixes, strict=True):
            path, release = self._pick_release(rel, new.get(rel), cached.get(rel), say)
            if release is None:
                continue  # nothing of this archive is taken, the cache stays
            changed = path is new.get(rel)
            if changed:
                take[rel] = path
                dates[rel] = aptformats.date(release)
            vouched: set[str] = set()
            for relpath, (size, digest) in aptformats.sha256_entries(release).items():
                fname = prefix + relpath.replace("/", "_")
                vouched.add(fname)
                candidate = new.get(fname)
                if candidate is not None and _matches(candidate, size, digest):
                    take[fname] = candidate
                elif changed and fname in cached and not _matches(cached[fname], size, digest):
                    drop.add(fname)
            if changed:
                # The cached indexes of this archive (not of one whose name
                # merely starts alike) that its new InRelease does not list.
                for fname in cached:
                    owner = max((p for p in prefixes if fname.startswith(p)), key=len, default="")
                    if owner == prefix and fname != rel and fname not in vouched:
                        drop.add(fname)
        for fname in sorted(set(new) - set(take) - same):
            say(f"apt cache: not taken (not verified): lists/{fname}")
        for fname in sorted(drop - set(take)):
            (cache / fname).unlink(missing_ok=True)
        # Indexes first, their InRelease last: a crash in between leaves the
        # old InRelease, under which the new indexes fail apt's own check.
        for fname, path in sorted(take.items(), key=lambda kv: kv[0].endswith("_InRelease")):
            _put(path, cache / fname)
            if dates.get(fname, 0) > 0:
                # apt asks the mirror for an InRelease newer than its file's
                # mtime: the Date it carries, not the time the testbed gave it.
                os.utime(cache / fname, (dates[fname], dates[fname]))
        if take:
            say(f"apt cache: {len(take)} package list files taken")

    def _pick_release(self, name: str, new: Path | None, cached: Path | None,
                      say: Say) -> tuple[Path, Deb822 | None]:  # fmt: skip
        """The InRelease to keep for one archive, and its verified content:
        the new one if it is good and not older than the cached one."""
        if new is not None and cached is not None and _same(new, cached):
            new = None
        old = self._verify(cached) if cached is not None else None
        if new is not None:
            release = self._verify(new)
            if release is None:
                say(f"apt cache: not taken (not one clearsigned message of at most "
                    f"{MAX_RELEASE >> 20} MiB with a good signature): lists/{name}")
            elif not aptformats.names_its_suite(name, release):
                say(f"apt cache: not taken (another suite's release): lists/{name}")
            elif old is not None and aptformats.identity(release) != aptformats.identity(old):
                say(f"apt cache: not taken (another archive than the cached one): lists/{name}")
            elif old is not None and aptformats.date(release) < aptformats.date(old):
                say(f"apt cache: not taken (older than the cached one): lists/{name}")
            elif aptformats.expired(release):
                say(f"apt cache: not taken (expired, Valid-Until): lists/{name}")
            else:
                return new, release
        return (cached, old) if cached is not None else (Path(), None)

    def _verify(self, path: Path) -> Deb822 | None:
        """The signed content of an InRelease that is one clearsigned message
        (no text around it, which gpgv ignores and apt refuses) whose
        signature gpgv accepts, else None. Only what gpgv puts out as signed
        is parsed, never the file itself."""
        if shutil.which("gpgv") is None:
            return None
        try:
            raw = read_bounded(path, MAX_RELEASE)
        except OSError:
            return None
        if not _one_clearsigned_message(raw):
            return None
        with tempfile.TemporaryDirectory(prefix="nsbuild-gpgv-") as home:
            # gpgv checks the very bytes read (and checked) above.
            signed = Path(home) / "InRelease"
            signed.write_bytes(raw)
            out = Path(home) / "signed"
            done = subprocess.run(
                ["gpgv", "--homedir", home, "--quiet", "--keyring", str(self.dir / "trusted.gpg"),
                 "--output", str(out), str(signed)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            if done.returncode != 0 or not out.is_file():
                return None
            return aptformats.parse_release(out.read_bytes().decode(errors="replace"))

    def _harvest_debs(self, new: dict[str, Path], say: Say) -> None:
        cache = self.cache / ARCHIVES
        known = _deb_hashes(list(_files(self.cache / LISTS, _LIST_RE).values()), set(new))
        taken = 0
        for fname, path in sorted(new.items()):
            expected = known.get(fname)
            if expected is None or not _matches(path, *expected):
                say(f"apt cache: not taken (not in a verified index): archives/{fname}")
                continue
            _put(path, cache / fname)
            taken += 1
        if taken:
            say(f"apt cache: {taken} .deb files taken")


def _layer_dir(layer: str, path: str) -> bool:
    """Whether `path` is a directory of the layer itself, reached without a
    symlink: the overlay's lower directory must not be a host folder a link
    names. (The layers are the store's, which nothing changes once unpacked.)"""
    try:
        os.close(open_in_layer(layer, path.lstrip("/"), os.O_PATH | os.O_DIRECTORY))
    except OSError:
        return False  # missing, a symlink on the way, or no directory: not used
    return True


def _layer_keys(layer: str, folder: str, only: str | None) -> dict[str, bytes]:
    """The apt keys in the layer's `folder` (`only` that file, else every
    .gpg and .asc): regular files reached without a symlink, each of at
    most MAX_KEY bytes. Path in the layer -> bytes."""
    try:
        dir_fd = open_in_layer(layer, folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return {}
    keys: dict[str, bytes] = {}
    try:
        names = [only] if only else sorted(n for n in os.listdir(dir_fd)
                                            if n.endswith((".gpg", ".asc")))  # fmt: skip
        for name in names:
            try:
                keys[f"{folder}/{name}"] = read_bounded(name, MAX_KEY, dir_fd)
            except OSError:
                continue  # a link, no regular file, too large for a key: not a key
    finally:
        os.close(dir_fd)
    return keys


_BEGIN, _SIGNATURE, _END = (b"-----BEGIN PGP SIGNED MESSAGE-----\n",
                             b"-----BEGIN PGP SIGNATURE-----\n", b"-----END PGP SIGNATURE-----\n")


def _one_clearsigned_message(raw: bytes) -> bool:
    return (raw.startswith(_BEGIN) and raw.endswith(_END)
            and all(raw.count(mark) == 1 for mark in (_BEGIN, _SIGNATURE, _END)))


def _matches(path: Path, size: int, digest: str) -> bool:
    """Whether a regular file has this size and SHA256 (read in chunks, and
    no further than `size`: the file may grow)."""
    try:
        with opened_regular(path, size) as fd:
            sha = hashlib.sha256()
            left = size + 1
            while left and (chunk := os.read(fd, min(1 << 20, left))):
                sha.update(chunk)
                left -= len(chunk)
            return left == 1 and sha.hexdigest() == digest
    except OSError:
        return False


def _same(a: Path, b: Path) -> bool:
    """Whether two regular files hold the same bytes (compared in chunks)."""
    try:
        with opened_regular(a) as fa, opened_regular(b) as fb:
            if os.fstat(fa).st_size != os.fstat(fb).st_size:
                return False
            while True:
                chunk = os.read(fa, 1 << 20)
                if chunk != os.read(fb, len(chunk) or 1):
                    return False
                if not chunk:
                    return True
    except OSError:
        return False


def _put(src: Path, dst: Path) -> None:
    """Copy a checked file into the cache, whole or not at all: into a new
    file of the cache's own (never through a name a testbed or a build could
    have planted), then renamed over the old one."""
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    try:
        with (os.fdopen(fd, "wb") as out, opened_regular(src) as data_fd,
              open(data_fd, "rb", closefd=False) as data):  # fmt: skip
            shutil.copyfileobj(data, out, 1024 * 1024)
            os.fchmod(out.fileno(), 0o644)
            # Run by root, a file of host root's is nobody's in the sandbox:
            # apt could not chown it to _apt and back (a warning a list).
            if (ids := sandbox_root_ids()) is not None:
                os.fchown(out.fileno(), *ids)
        os.replace(tmp, dst)
    except BaseException:
        os.unlink(tmp)
        raise


def _deb_hashes(indexes: Sequence[Path], wanted: set[str]) -> dict[str, tuple[int, str]]:
    """archive file name -> (size, SHA256) of the `wanted` .debs, from the
    verified Packages indexes. Only the stanzas of the packages wanted are
    parsed, found by name: an index of Debian's main holds some 60,000."""
    names = {m.group(1) for w in wanted if (m := DEB_RE.fullmatch(w))}
    if not names:
        return {}
    start = re.compile(
        rb"^Package: (" + b"|".join(re.escape(n.encode()) for n in sorted(names)) + rb")\n", re.M
    )
    found: dict[str, tuple[int, str]] = {}
    for index in indexes:
        if not index.name.endswith("_Packages"):
            continue
        with opened_regular(index) as fd:
            try:
                data = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except ValueError:  # empty
                continue
            with data:
                found.update(aptformats.deb_sums(_stanzas(data, start), wanted))
    return found


def _stanzas(data: mmap.mmap, start: re.Pattern[bytes]) -> Iterator[bytes]:
    """The whole stanzas (from the blank line before to the one after) in
    which `start` matches."""
    for hit in start.finditer(data):
        before = data.rfind(b"\n\n", 0, hit.start())
        begin = before + 2 if before >= 0 else 0
        end = data.find(b"\n\n", hit.start())
        yield bytes(data[begin : end if end >= 0 else len(data)])
