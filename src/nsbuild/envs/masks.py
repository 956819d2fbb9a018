"""What a sandbox sees of nsbuild's caches through a writable bind: an empty,
read-only folder.

A bind of the home, of a working directory, or of any folder holding the
cache or an `Unpack:` folder would show the sandbox the store: inside, uid 0
is the user, who could hard-link the store's setuid files to where other
users reach them, or rewrite the bases every later build uses.
`cache_masks(mounts)` gives a read-only bind of an empty folder over each of
them, to be mounted after the binds.

`nsbuild run` calls this on every run: no pathlib or config parsing. The
`Unpack:` folders are those used so far, each written down in the cache
(`remember_unpack`) when first used.
"""

from __future__ import annotations

import os
from stat import S_ISDIR

from nsbuild.envs.errors import CacheNotPrivate
from nsbuild.sandbox.spec import Bind

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

# In the cache folder: the Unpack folders used so far, each ended by a NUL.
UNPACK_LIST = "unpack-folders"
EMPTY = "empty"
_MAX_LIST = 1 << 20


def cache_path() -> str:
    """$XDG_CACHE_HOME/nsbuild, else ~/.cache/nsbuild (root: /var/cache/nsbuild)."""
    xdg = os.environ.get("XDG_CACHE_HOME") or ""
    # The XDG spec says relative values are invalid and must be ignored.
    if xdg.startswith("/"):
        return xdg.rstrip("/") + "/nsbuild"
    # Root's sandboxes run as its subordinate ids, which cannot walk into
    # /root (mode 0700): root's cache is the system one.
    if os.geteuid() == 0:
        return "/var/cache/nsbuild"
    home = os.environ.get("HOME")
    if home is None:
        import pwd

        home = pwd.getpwuid(os.getuid()).pw_dir
    return home.rstrip("/") + "/.cache/nsbuild"


def _read_list(cache: str) -> list[str]:
    try:
        fd = os.open(f"{cache}/{UNPACK_LIST}", os.O_RDONLY | os.O_NOFOLLOW
                        | os.O_NONBLOCK | os.O_CLOEXEC)  # fmt: skip
    except OSError:
        return []
    try:
        data = os.read(fd, _MAX_LIST)
    finally:
        os.close(fd)
    names = data.decode("utf-8", "surrogateescape").split("\0")
    return [name for name in names if name.startswith("/")]


def remember_unpack(cache: str, folder: str) -> None:
    """Write down `folder` (an Unpack folder now in use) in the private cache
    folder `cache`, so that later runs mask it too."""
    if folder in _read_list(cache):
        return
    fd = os.open(f"{cache}/{UNPACK_LIST}", os.O_WRONLY | os.O_APPEND | os.O_CREAT
                    | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)  # fmt: skip
    try:
        os.write(fd, os.fsencode(folder) + b"\0")
    finally:
        os.close(fd)


def protected_dirs() -> list[str]:
    """The cache folder and the Unpack folders used so far."""
    cache = cache_path()
    return [cache, *_read_list(cache)]


def _is_ours(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    # A folder of someone else's is no store of ours: the sandbox, as the
    # user, can do there no more than the user can. (Root's cache belongs to
    # its sandboxes' first subordinate id.)
    return S_ISDIR(st.st_mode) and os.geteuid() in (0, st.st_uid)


def _empty_dir(top: str) -> str:
    """`top`/empty, an empty folder of ours that only nsbuild writes in."""
    path = f"{top}/{EMPTY}"
    try:
        try:
            os.mkdir(path, 0o555)
        except FileExistsError:
            pass
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                        | os.O_CLOEXEC)  # fmt: skip
    except OSError as e:
        raise CacheNotPrivate(f"{path}: cannot make it an empty folder: {e.strerror}") from None
    try:
        if os.fstat(fd).st_uid != os.geteuid() or os.listdir(fd):
            raise CacheNotPrivate(f"{path}: not an empty folder of yours; remove it")
    finally:
        os.close(fd)
    return path


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _covered(src: str, dirs: list[str]) -> list[str]:
    """The folders of `dirs` at or under `src`, but none under another one."""
    under = [d for d in dirs if _under(d, src)]
    return [d for d in under if not any(o != d and _under(d, o) for o in under)]


def cache_masks(mounts: Iterable[object], protected: Iterable[str] | None = None) -> list[Bind]:
    """Read-only binds of an empty folder over every cache folder (default:
    `protected_dirs()`) that a writable bind of `mounts` shows (sources and
    cache folders compared with all symlinks resolved), to be mounted after
    them. Binds made private by nsbuild are its own folders, not the user's,
    and need none; masks already in `mounts` are not given again."""
    mounts = list(mounts)
    binds = [m for m in mounts if isinstance(m, Bind) and not m.readonly and not m.private]
    if not binds:
        return []
    existing = []
    for folder in protected_dirs() if protected is None else protected:
        try:
            real = os.path.realpath(str(folder), strict=True)
        except OSError:
            continue  # no such folder, no store to hide
        if _is_ours(real) and real not in existing:
            existing.append(real)
    masks: list[Bind] = []
    for bind in binds:
        try:
            src = os.path.realpath(bind.src, strict=True)
        except OSError:
            continue  # the sandbox will say it cannot bind it
        for top in _covered(src, existing):
            rel = top[len(src):].lstrip("/")
            dst = os.path.normpath(os.path.join(bind.dst, rel)) if rel else bind.dst
            mask = Bind(_empty_dir(top), dst, readonly=True)
            if mask not in masks and mask not in mounts:
                masks.append(mask)
    return masks
