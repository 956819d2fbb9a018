"""The environment's apt caches, shared by its testbeds without trusting them.

The same folders the build path keeps (nsbuild.debbuild.cache.apt_cache_dir:
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
  have the size and SHA256 its InRelease gives; a
  .deb the size and SHA256 of a verified Packages index. Everything else
  is dropped. This runs under the cache's exclusive lock, the lock the
  build path holds while its apt writes to the same folders.

    sessions/ID/apt/NAME/{lower,upper,work}   NAME: apt-lists, apt-archives
    sessions/ID/apt/trusted.gpg               the layers' apt keys, one keyring
"""

from __future__ import annotations

import email.utils
import fcntl
import hashlib
import mmap
import os
import re
import shutil
import subprocess
import tempfile
import time
from base64 import b64decode
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from nsbuild.virtserver.hostfs import open_in_layer, opened_regular, read_bounded

if TYPE_CHECKING:
    from nsbuild.sandbox import Mount

LISTS, ARCHIVES = "apt-lists", "apt-archives"
MOUNTS = {LISTS: "/var/lib/apt/lists", ARCHIVES: "/var/cache/apt/archives"}
# What apt keeps at the top of those folders (not lock, partial/, auxfiles/).
_LIST_RE = re.compile(r"(?!lock$)[A-Za-z0-9][A-Za-z0-9._+~%-]*")
_DEB_RE = re.compile(r"([a-z0-9][a-z0-9.+-]*)_([A-Za-z0-9.+~%-]+)_([a-z0-9-]+)\.deb")
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


def _sha256(fd: int) -> str:
    with open(fd, "rb", closefd=False) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
        from nsbuild.debbuild.cache import apt_cache_dir

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
        from nsbuild.envs.owner import give_to_sandbox_root

        for name in MOUNTS:
            parts = [self.dir / name / sub for sub in ("lower", "upper", "work")]
            for part in parts:
                part.mkdir(parents=True)
            give_to_sandbox_root(*parts)
        self._keyring(lowers)
        # The owner's alone: another user must not plant a .deb or a list here.
        self.cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _locked(self.cache / ".lock", fcntl.LOCK_SH, self.notice):
            for name, pattern in ((LISTS, _LIST_RE), (ARCHIVES, _DEB_RE)):
                for fname, src in _files(self.cache / name, pattern).items():
                    dst = self.dir / name / "lower" / fname
                    try:
                        os.link(src, dst)
                    except OSError:
                        # Another filesystem, or a file of another owner where
                        # hard links are protected: a copy does as well.
                        shutil.copy2(src, dst)

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
                out.write(_dearmor(data) if rel.endswith(".asc") else data)

    def harvest(self, say: Say) -> None:
        """Take what the testbed's apt wrote into the cache, once checked."""
        lists_up = _files(self.dir / LISTS / "upper", _LIST_RE)
        debs_up = _files(self.dir / ARCHIVES / "upper", _DEB_RE)
        if not lists_up and not debs_up:
            return
        with _locked(self.cache / ".lock", fcntl.LOCK_EX, self.notice):
            self._harvest_lists(lists_up, say)
            self._harvest_debs(debs_up, say)

    def _harvest_lists(self, new: dict[str, Path], say: Say) -> None:
        if not new:
            return
        cache = self.cache / LISTS
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        cached = _files(cache, _LIST_RE)
        take: dict[str, Path] = {}
        drop: set[str] = set()
        # Fetched again, unchanged: nothing to take.
        same = {n for n, path in new.items() if n in cached and _same(path, cached[n])}
        releases = sorted({n for n in (*new, *cached) if n.endswith("_InRelease")})
        prefixes = [r[: -len("InRelease")] for r in releases]
        for rel, prefix in zip(releases, prefixes, strict=True):
            release, body = self._pick_release(rel, new.get(rel), cached.get(rel), say)
            if body is None:
                continue  # nothing of this archive is taken, the cache stays
            changed = release is new.get(rel)
            if changed:
                take[rel] = release
            vouched: set[str] = set()
            for relpath, (size, digest) in _sha256_entries(body).items():
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
            if fname.endswith("_InRelease"):
                _set_mtime_to_date(cache / fname)
        if take:
            say(f"apt cache: {len(take)} package list files taken")

    def _pick_release(self, name: str, new: Path | None, cached: Path | None,
                      say: Say) -> tuple[Path, str | None]:  # fmt: skip
        """The InRelease to keep for one archive, and its verified text: the
        new one if it is good and not older than the cached one."""
        if new is not None and cached is not None and _same(new, cached):
            new = None
        cached_body = self._verify(cached) if cached is not None else None
        if new is not None:
            body = self._verify(new)
            if body is None:
                say(f"apt cache: not taken (not one clearsigned message of at most "
                    f"{MAX_RELEASE >> 20} MiB with a good signature): lists/{name}")
            elif not _names_its_suite(name, body):
                say(f"apt cache: not taken (another suite's release): lists/{name}")
            elif cached_body is not None and _identity(body) != _identity(cached_body):
                say(f"apt cache: not taken (another archive than the cached one): lists/{name}")
            elif cached_body is not None and _date(body) < _date(cached_body):
                say(f"apt cache: not taken (older than the cached one): lists/{name}")
            elif _expired(body):
                say(f"apt cache: not taken (expired, Valid-Until): lists/{name}")
            else:
                return new, body
        return (cached, cached_body) if cached is not None else (Path(), None)

    def _verify(self, release: Path) -> str | None:
        """The signed text of an InRelease that is one clearsigned message (no
        text around it, which gpgv ignores and apt refuses) whose signature
        gpgv accepts, else None."""
        if shutil.which("gpgv") is None:
            return None
        try:
            raw = read_bounded(release, MAX_RELEASE)
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
            return out.read_text(errors="replace")

    def _harvest_debs(self, new: dict[str, Path], say: Say) -> None:
        if not new:
            return
        cache = self.cache / ARCHIVES
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
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


def _dearmor(data: bytes) -> bytes:
    """An ASCII-armoured OpenPGP block as binary (its CRC line left out)."""
    lines = data.decode("ascii", errors="replace").splitlines()
    body: list[str] = []
    inside = headers = False
    for line in lines:
        if line.startswith("-----BEGIN PGP"):
            inside = headers = True
        elif line.startswith("-----END PGP"):
            inside = False
        elif inside and headers:
            headers = bool(line.strip())  # headers end at the first empty line
        elif inside and not line.startswith("="):
            body.append(line.strip())
    try:
        return b64decode("".join(body))
    except ValueError:
        return b""


def _sha256_entries(body: str) -> dict[str, tuple[int, str]]:
    """The SHA256 field of a Release text: path -> (size, hash)."""
    entries: dict[str, tuple[int, str]] = {}
    inside = False
    for line in body.splitlines():
        if not line.startswith(" "):
            inside = line.startswith("SHA256:")
            continue
        if inside:
            parts = line.split()
            if len(parts) == 3 and parts[1].isdigit():
                entries[parts[2]] = (int(parts[1]), parts[0].lower())
    return entries


_BEGIN, _SIGNATURE, _END = (b"-----BEGIN PGP SIGNED MESSAGE-----\n",
                             b"-----BEGIN PGP SIGNATURE-----\n", b"-----END PGP SIGNATURE-----\n")


def _one_clearsigned_message(raw: bytes) -> bool:
    return (raw.startswith(_BEGIN) and raw.endswith(_END)
            and all(raw.count(mark) == 1 for mark in (_BEGIN, _SIGNATURE, _END)))


def _field(body: str, name: str) -> str:
    """A field of the Release paragraph (its first lines, up to the hashes)."""
    m = re.search(rf"^{name}: *(\S.*)$", body.split("\n\n", 1)[0], re.M)
    return m.group(1).strip() if m else ""


def _names_its_suite(fname: str, body: str) -> bool:
    """Whether the InRelease names the suite its file name says: apt names it
    ..._dists_DIST_InRelease, with DIST's '/' as '_' (a flat archive has no
    suite to check and is not cached)."""
    head, sep, dist = fname.removesuffix("_InRelease").rpartition("_dists_")
    if not sep or not head:
        return False
    named = {_field(body, "Codename"), _field(body, "Suite")} - {""}
    return dist in {n.replace("/", "_") for n in named}


def _identity(body: str) -> tuple[str, ...]:
    # Which archive and release: not Suite, which moves on at each Debian
    # release (stable -> oldstable) while the archive stays the same.
    return tuple(_field(body, f) for f in ("Origin", "Label", "Codename"))


def _expired(body: str) -> bool:
    until = _parse_date(_field(body, "Valid-Until"))
    return until > 0 and until < time.time()


def _date(body: str) -> float:
    return _parse_date(_field(body, "Date"))


def _parse_date(text: str) -> float:
    if not text:
        return 0.0
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return 0.0


def _set_mtime_to_date(path: Path) -> None:
    # apt asks the mirror for a newer InRelease than its file's mtime: the
    # Date it carries, not whatever time the testbed gave the file.
    try:
        text = read_bounded(path, MAX_RELEASE).decode(errors="replace")
    except OSError:
        return
    if text.startswith(_BEGIN.decode()):
        text = text.split("\n\n", 1)[-1]  # past the armour's own header lines
    when = _date(text)
    if when > 0:
        os.utime(path, (when, when))


def _matches(path: Path, size: int, digest: str) -> bool:
    try:
        with opened_regular(path, size) as fd:
            return os.fstat(fd).st_size == size and _sha256(fd) == digest
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
        os.replace(tmp, dst)
    except BaseException:
        os.unlink(tmp)
        raise


def _deb_hashes(indexes: Sequence[Path], wanted: set[str]) -> dict[str, tuple[int, str]]:
    """archive file name -> (size, SHA256) of the `wanted` .debs, from the
    verified Packages indexes (apt names a .deb NAME_VERSION_ARCH.deb, with
    the epoch's ':' as %3a)."""
    names = {m.group(1) for w in wanted if (m := _DEB_RE.fullmatch(w))}
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
                for hit in start.finditer(data):
                    end = data.find(b"\n\n", hit.start())
                    stanza = bytes(data[hit.start() : end if end >= 0 else len(data)]).decode(
                        errors="replace"
                    )
                    fields = dict(re.findall(r"^([A-Za-z0-9-]+): (.*)$", stanza, re.M))
                    try:
                        version = fields["Version"].replace(":", "%3a")
                        fname = f"{fields['Package']}_{version}_{fields['Architecture']}.deb"
                        entry = (int(fields["Size"]), fields["SHA256"].lower())
                    except (KeyError, ValueError):
                        continue
                    if fname in wanted:
                        found[fname] = entry
    return found


__all__ = ["MOUNTS", "AptCache"]
