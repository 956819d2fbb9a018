"""The files that make a farm: a master's settings and its registry of
workers (in the master's folder), a worker's own record (in the worker's
folder), and where the master `nsbuild farm master` runs on this machine
(in the user's nsbuild config). JSON, written whole and atomically; the files
holding passwords are 0600.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsbuild.farm.errors import FarmError
from nsbuild.printable import printable
from nsbuild.userfile import read_small

MASTER_FILE = "nsbuild-master.json"  # in a master's folder: ports, web password (0600)
WORKERS_FILE = "workers.json"  # in a master's folder: name -> password, environments
WORKER_FILE = "nsbuild-worker.json"  # in a worker's folder: name, master, environment
SOURCES_DIR = "sources"  # under a master's folder: the .dsc files submitted
RESULTS_DIR = "results"  # under a master's folder: BUILDER/NUMBER/ of each build
LIMIT = 1 << 20  # none of these files is near this; a bigger one is not read

# Buildbot's identifiers (worker names), and at most 50 characters.
WORKER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,49}")
# ENV/ARCH: an environment's name (nsbuild's rule) and a dpkg architecture.
ENV_PAIR = re.compile(r"([A-Za-z0-9][A-Za-z0-9._+~-]{0,63})/([a-z0-9][a-z0-9-]{0,31})")


def check_above(path: Path) -> None:
    """FarmError unless every folder above `path` (as named, and resolved)
    is root's or the caller's and writable by no one else, or sticky (as
    /tmp): else its owner could put a folder of theirs in the farm's place
    between a check and Buildbot reading it (as ssh's StrictModes)."""
    absolute = path.absolute()
    for folder in {*absolute.parents, *absolute.parent.resolve().parents,
                   absolute.parent.resolve()}:  # fmt: skip
        try:
            st = folder.stat()
        except FileNotFoundError:
            continue  # made by the caller on the way (mkdir -p)
        except OSError as e:
            raise FarmError(f"cannot read {folder}: {e.strerror}") from None
        if st.st_uid not in (0, os.getuid()):
            raise FarmError(f"{path} is inside {folder}, which belongs to uid {st.st_uid}: "
                            "put the farm's folders where only you may change them")  # fmt: skip
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise FarmError(f"{path} is inside {folder}, which others may write: put the "
                            "farm's folders where only you may change them")  # fmt: skip


def check_private(path: Path) -> None:
    """FarmError unless `path` is the caller's, writable by no one else and
    not a symbolic link, and so are the folders above it (check_above):
    the farm's folders hold Python (master.cfg, buildbot.tac) that
    Buildbot runs as the caller, and passwords."""
    check_above(path)
    try:
        st = path.lstat()
    except OSError as e:
        raise FarmError(f"cannot read {path}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise FarmError(f"{path} is a symbolic link: name the farm's folder itself")
    if st.st_uid != os.getuid():
        raise FarmError(f"{path} belongs to uid {st.st_uid}, not to you")
    if st.st_mode & 0o022:
        raise FarmError(f"{path} is group- or world-writable: chmod go-w it")


def make_private_folder(folder: Path, kind: str) -> None:
    """Make `folder` (new, or empty) the caller's alone, 0700: a master's
    holds passwords and Python Buildbot runs, a worker's its builds'
    sources and results (made with umask 022), so a folder made beforehand
    at 0755 is closed too."""
    if folder.exists():
        check_private(folder)  # before chmod: someone else's is refused
        if any(folder.iterdir()):
            raise FarmError(f"{folder} exists and is not an nsbuild farm {kind}")
    check_above(folder)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)
    except OSError as e:
        raise FarmError(f"cannot make {folder}: {e.strerror}") from None
    check_private(folder)


def check_folder(folder: Path, *names: str) -> Path:
    """`folder` and those of its files `names` that exist, checked private."""
    check_private(folder)
    for name in names:
        if os.path.lexists(folder / name):
            check_private(folder / name)
    return folder


def read_json(path: Path) -> Any:
    """A JSON file nsbuild wrote (checked private); FarmError naming it if
    it cannot be read."""
    check_private(path)
    try:
        data = read_small(path, LIMIT)
        return json.loads(data)
    except (OSError, ValueError, RecursionError) as e:
        raise FarmError(f"cannot read {path}: {printable(str(e), 200)}") from None


def write_json(path: Path, doc: object, mode: int = 0o600) -> None:
    """Write `doc` to `path` whole: a reader sees the old file or the new one."""
    write_text(path, json.dumps(doc, indent=1, sort_keys=True) + "\n", mode)


def write_text(path: Path, text: str, mode: int = 0o600) -> None:
    """Write `text` to `path` whole, created with `mode` (never wider first)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a stale one of a crashed writer with this pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


WEB_USER = "nsbuild"  # the one web user, who may start and stop builds


@dataclass(frozen=True)
class MasterSettings:
    www_port: int
    pb_port: int
    interface: str  # the web's
    password: str  # WEB_USER's, generated; reading needs none
    # The workers' port may listen wider than the web (remote workers, the
    # web on loopback); "" is the web's interface.
    pb_interface: str = ""
    # Both ports on TLS with the master's own certificate (farm.tls): for
    # workers and submitters on other machines.
    tls: bool = False

    @property
    def pb_address(self) -> str:
        return self.pb_interface or self.interface

    @property
    def url(self) -> str:
        host = f"[{self.interface}]" if ":" in self.interface else self.interface
        return f"{'https' if self.tls else 'http'}://{host}:{self.www_port}/"

    def to_json(self) -> dict[str, object]:
        return {"www_port": self.www_port, "pb_port": self.pb_port, "interface": self.interface,
                "password": self.password, "pb_interface": self.pb_interface,
                "tls": self.tls}  # fmt: skip


def master_settings(master_dir: Path) -> MasterSettings:
    doc = read_json(check_folder(master_dir) / MASTER_FILE)
    try:
        return MasterSettings(int(doc["www_port"]), int(doc["pb_port"]), str(doc["interface"]),
                              str(doc["password"]), str(doc.get("pb_interface") or ""),
                              doc.get("tls") is True)  # fmt: skip
    except (KeyError, TypeError, ValueError):
        raise FarmError(f"{master_dir / MASTER_FILE}: not a master's settings") from None


@dataclass(frozen=True)
class WorkerEntry:
    name: str
    password: str
    envs: tuple[str, ...]  # ENV/ARCH pairs it builds for


def workers(master_dir: Path) -> list[WorkerEntry]:
    """The master's registered workers, sorted by name."""
    path = master_dir / WORKERS_FILE
    doc = read_json(path) if os.path.lexists(path) else {}
    if not isinstance(doc, dict):
        raise FarmError(f"{path}: not a registry of workers")
    out = []
    for name, entry in sorted(doc.items()):
        password = entry.get("password") if isinstance(entry, dict) else None
        envs = entry.get("envs", []) if isinstance(entry, dict) else None
        # A worker without its password would be one anybody could be.
        if not (WORKER_NAME.fullmatch(name) and isinstance(password, str) and password
                and isinstance(envs, list)):  # fmt: skip
            raise FarmError(f"{path}: bad entry {printable(name, 60)}")
        out.append(WorkerEntry(name, password, tuple(
            e for e in envs if isinstance(e, str) and ENV_PAIR.fullmatch(e))))  # fmt: skip
    return out


def register(master_dir: Path, entry: WorkerEntry) -> None:
    """Add a worker to the master's registry, or its environments anew; a
    second worker of a name (another password) is refused, not put in the
    first one's place. One registration at a time (a lock beside it)."""
    check_worker_name(entry.name)
    for pair in entry.envs:
        if not ENV_PAIR.fullmatch(pair):
            raise FarmError(f"not an ENV/ARCH pair: {pair!r}")
    if not os.path.lexists(master_dir / MASTER_FILE):
        raise FarmError(f"{master_dir} is not a farm master (no {MASTER_FILE})")
    check_folder(master_dir, MASTER_FILE, WORKERS_FILE)
    path = master_dir / WORKERS_FILE
    fd = os.open(master_dir / ".workers.lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        have = {w.name: w for w in workers(master_dir)}
        old = have.get(entry.name)
        if old is not None and old.password != entry.password:
            raise FarmError(f"a worker {entry.name} is registered with {master_dir} already; "
                            "choose another name, or remove it from "
                            f"{WORKERS_FILE} first")  # fmt: skip
        have[entry.name] = entry
        builder_pairs(list(have.values()))  # refused here, not at the master's next start
        write_json(path, {w.name: {"password": w.password, "envs": list(w.envs)}
                          for w in have.values()})  # fmt: skip
    finally:
        os.close(fd)


def builder_pairs(entries: list[WorkerEntry]) -> list[str]:
    """The ENV/ARCH pairs of the workers, one builder each; FarmError if two
    would get one name: ENV and ARCH may both hold "-" (foo-hurd/i386 and
    foo/hurd-i386), and Buildbot refuses a duplicate builder."""
    pairs = sorted({p for w in entries for p in w.envs})
    named: dict[str, str] = {}
    for p in pairs:
        other = named.setdefault(builder_name(p), p)
        if other != p:
            raise FarmError(f"{other} and {p} would both be the builder "
                            f"{builder_name(p)}: register one of them only")  # fmt: skip
    return pairs


def check_worker_name(name: str) -> str:
    if not WORKER_NAME.fullmatch(name):
        raise FarmError(f"bad worker name {name!r}: letters, digits, _ and -, at most 50, "
                        "not starting with a digit or -")
    return name


def builder_name(pair: str) -> str:
    """The builder of ENV/ARCH: `ENV-ARCH` (Buildbot's names cannot hold /)."""
    env, arch = pair.split("/")
    return f"{env}-{arch}"


def builder_tags(pair: str) -> list[str]:
    """What a builder builds, for a client to choose it by (its name, with
    "-" in both parts, cannot be split back)."""
    env, arch = pair.split("/")
    return [f"env={env}", f"arch={arch}"]


def local_master_file() -> Path:
    """Where `nsbuild farm master` notes the master it made, for the farm
    commands run later on this machine."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".config"
    return root / "nsbuild" / "farm-master.json"


def note_local_master(master_dir: Path) -> None:
    path = local_master_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"dir": str(master_dir)}, mode=0o644)


def local_master() -> Path | None:
    """The master `nsbuild farm master` made last on this machine, if any."""
    path = local_master_file()
    if not path.exists():
        return None
    doc = read_json(path)
    found = doc.get("dir") if isinstance(doc, dict) else None
    if not isinstance(found, str):
        raise FarmError(f"{path}: names no master's folder")
    return Path(found) if isinstance(found, str) and (Path(found) / MASTER_FILE).is_file() else None
