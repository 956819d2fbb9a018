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
        empty/                            an empty folder: what a sandbox sees of the
                                          cache through a writable bind (masks.py)
        unpack-folders                    the Unpack folders used so far (masks.py)
        deps/                             dependency layers of builds (deps_root)
        builds/                           running builds' private work folders
        apt/ENV/                          an environment's apt lists and archives

The top folder is private (mode 0700, see `ensure_private`): below it lie
unpacked bases with world-writable directories and setuid files, and open
sessions' trees; no other local user may walk into them. Folders above it
that nsbuild makes are 0700 too, but 0711 for root, whose sandboxes (its
subordinate ids, owners of its cache) must walk through them to mount there.

Everything being created is first made under a `.tmp-PID-START-RANDOM` name
and renamed into place when complete, so a crash leaves only names that say
which (dead) process made them, and `nsbuild gc` can remove them safely.
Upper and work dirs of one session share a directory, hence a filesystem, as
overlayfs requires.
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from nsbuild.envs.errors import CacheNotPrivate
from nsbuild.envs.masks import cache_path, remember_unpack

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
    return Path(cache_path())


def private_cache_dir() -> Path:
    """`cache_dir()`, made or checked private: use this to open the cache."""
    return ensure_private(cache_dir())


def deps_root() -> Path:
    """Where dependency layers of builds are kept."""
    return private_cache_dir() / "deps"


def builds_root() -> Path:
    """Where running builds keep their private work folders."""
    return private_cache_dir() / "builds"


def apt_cache_root() -> Path:
    """Where each environment's apt lists and archives are kept."""
    return private_cache_dir() / "apt"


def apt_cache_dir(env_name: str) -> Path:
    """One environment's apt caches: `apt-lists/`, `apt-archives/` and `.lock`,
    held exclusively by whoever writes them or mounts them as an overlay's
    lower (shared by the virt server while it takes a snapshot of them). No
    sandbox writes them: nsbuild copies in what apt downloaded, once checked
    (the local backend's take_downloads, the virt server's harvest)."""
    return apt_cache_root() / env_name


def _owners() -> tuple[int, ...]:
    """Who may own a cache root. Root's sandboxes run as the first id of its
    subordinate range, and must walk into the cache to mount their layers:
    root's cache belongs to that id (no other user has it)."""
    me = os.geteuid()
    if me != 0:
        return (me,)
    from nsbuild.envs.owner import sandbox_root_ids

    ids = sandbox_root_ids()
    return (me,) if ids is None else (ids[0], me)


# Symlinks followed on the way to a cache folder, at most (as the kernel's limit).
_MAX_LINKS = 40


def _trusted_owners() -> tuple[int, ...]:
    """Root, the user and, where nsbuild itself runs in a user namespace that
    maps only some ids (a container), the overflow id: there the host's own
    folders (`/`, `/tmp`) show as owned by it, and nsbuild could not run at
    all otherwise. Who really owns such a folder cannot be told from inside;
    the mode check still applies."""
    owners: tuple[int, ...] = (0, os.geteuid())
    try:
        with open("/proc/self/uid_map") as f:
            identity = f.read().split() == ["0", "0", "4294967295"]
        if not identity:
            with open("/proc/sys/kernel/overflowuid") as f:
                owners += (int(f.read()),)
    except (OSError, ValueError):
        pass
    return owners


def _judge_ancestor(root: Path, path: str, st: os.stat_result) -> None:
    """Refuse `path` on the way to the cache `root` unless only root or the
    user can change what it holds: it is theirs, and no one else may write
    in it, or only with the sticky bit (as /tmp), where no one can rename
    or remove another's entries (OpenSSH's StrictModes, with sticky folders
    allowed)."""
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):
        problem = "is not a folder"
    elif st.st_uid not in _trusted_owners():
        problem = f"belongs to uid {st.st_uid}"
    elif mode & 0o022 and not mode & stat.S_ISVTX:
        problem = f"can be written by other users (mode {mode:04o}, not sticky)"
    else:
        return
    raise CacheNotPrivate(
        f"{root}: the folder {path} on its way {problem}, so another user could swap "
        "the cache; refusing to use it (choose a folder of your own)"
    )


def _new_folder_mode() -> int:
    """0700 as XDG asks; for root 0711, so that its sandboxes, which own the
    cache but not the folders above, may walk through (none may list them):
    a folder closed to them forces every session to copy its environment."""
    from nsbuild.envs.owner import sandbox_root_ids

    return 0o700 if sandbox_root_ids() is None else 0o711


def _make_ancestors(root: Path) -> None:
    """Walk to `root`'s parent as the kernel would, making missing folders
    (see `_new_folder_mode`), and refuse it (CacheNotPrivate) if another user
    could change any folder or symlink on the way: a check of the cache
    folder alone holds only while no one else can swap it, or a folder above
    it, between the check and every later use by path."""
    todo = [part for part in reversed(str(root.parent).split("/")) if part]
    new_mode: int | None = None
    here, links = "/", 0
    _judge_ancestor(root, here, os.lstat(here))
    while todo:
        name = todo.pop()
        if name == ".":
            continue
        if name == "..":
            here = os.path.dirname(here)  # `here` is a real folder: its parent is judged
            continue
        path = os.path.join(here, name)
        try:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if new_mode is None:
                    new_mode = _new_folder_mode()
                os.mkdir(path, new_mode)
                os.chmod(path, new_mode)  # whatever the umask: root's sandboxes walk it
                st = os.lstat(path)
        except OSError as e:
            raise CacheNotPrivate(f"{root}: cannot make or reach {path}: {e.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            # A link of root's or ours, in a folder judged above: no one else can change it.
            links += 1
            if st.st_uid not in (0, os.geteuid()) or links > _MAX_LINKS:
                why = (f"belongs to uid {st.st_uid}" if links <= _MAX_LINKS
                       else f"is one more than {_MAX_LINKS} symlinks")
                raise CacheNotPrivate(
                    f"{root}: the symlink {path} on its way {why}; refusing to use it"
                )
            target = os.readlink(path)
            here = "/" if target.startswith("/") else here
            todo += [part for part in reversed(target.split("/")) if part]
            continue
        _judge_ancestor(root, path, st)
        here = path


def ensure_private(root: Path) -> Path:
    """Make the cache folder `root` (mode 0700, owned by the user) if missing;
    return it once no other user can walk into it, nor swap it.

    A folder of ours open to others is closed (chmod 0700) with a notice; a
    symlink, a non-folder or a folder of someone else is refused
    (CacheNotPrivate): a link or a folder another user controls could put
    the store, sessions and logs where that user reads and writes them. So
    is a folder under one another user can write (see `_make_ancestors`)."""
    owners = _owners()
    _make_ancestors(root)
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise CacheNotPrivate(f"{root}: cannot make the cache folder: {e.strerror}") from e
    try:
        # O_NOFOLLOW: what is checked and repaired is the folder itself, not
        # where a link swapped in meanwhile points. O_PATH: a folder of
        # someone else may be unreadable, and must still be named.
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        what = "a symlink" if os.path.islink(root) else f"not a usable folder ({e.strerror})"
        raise CacheNotPrivate(
            f"{root}: the cache folder is {what}; refusing to use it "
            "(remove it, or set XDG_CACHE_HOME elsewhere)"
        ) from None
    try:
        st = os.fstat(fd)
        if st.st_uid not in owners:
            raise CacheNotPrivate(
                f"{root}: the cache folder belongs to uid {st.st_uid}, not to you; "
                "refusing to use it (set XDG_CACHE_HOME elsewhere)"
            )
        here = f"/proc/self/fd/{fd}"  # the opened folder itself, whatever its path is now
        if st.st_uid != owners[0]:
            os.chown(here, owners[0], -1)  # root's cache, made before it was handed over
        mode = stat.S_IMODE(st.st_mode)
        if mode != 0o700:
            os.chmod(here, 0o700)
            if mode & 0o077:
                print(f"nsbuild: {root} was open to other users: made it private (mode 0700)",
                      file=sys.stderr, flush=True)  # fmt: skip
    finally:
        os.close(fd)
    return root


@dataclass(frozen=True)
class Layout:
    """The folders of one cache root; `Layout.default()` follows $XDG_CACHE_HOME."""

    root: Path

    @classmethod
    def default(cls) -> Layout:
        return cls(private_cache_dir())

    @classmethod
    def private(cls, root: Path) -> Layout:
        """The layout at `root` (an environment's `Unpack:`), checked private,
        and written down in the cache: `cache_masks` hides it from sandboxes."""
        layout = cls(ensure_private(root))
        remember_unpack(str(private_cache_dir()), str(layout.root))
        return layout

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
        ensure_private(self.root)
        for d in (self.tarballs, self.digests, self.bases, self.locks, self.sessions):
            d.mkdir(parents=True, exist_ok=True)

