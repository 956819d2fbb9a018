"""Resource limits for one sandbox: a cgroup of its own with pids and memory caps.

    lim = prepare(pids_max=512, memory_max=parse_size("2G"), parent=plan.cgroup)
    try:
        spec = Sandbox(..., cgroup=lim.path or plan.cgroup)
        lim.join()                    # cgroup v1 only: see below
        proc = spawn(spec, leave_keeper=False)
        lim.leave()                   # cgroup v1 only
        status = proc.wait()
    finally:
        lim.close()                   # kills what is left, removes the cgroup(s)

Where the cgroup goes, in order of preference:

- cgroup v2 with the `pids` and `memory` controllers: `<parent>/nsbuild-limits.PID.N`.
  The parent is the one given (e.g. the nftables engine's run cgroup, so both
  apply), else the root of the cgroup2 mount for root, else for a user the
  highest ancestor of its own cgroup that it may write (a delegated subtree:
  systemd's user@UID.service). `Limits.path` is then given to `Sandbox.cgroup`,
  and the runtime moves the sandbox there before anything runs.
- cgroup v1 hierarchies for `pids` and `memory` (hybrid hosts, where those
  controllers are bound to v1 and cgroup2 has none): one cgroup per
  hierarchy. The runtime places a sandbox in a single cgroup, so here the
  sandbox inherits them instead: `join()` moves nsbuild's own process in,
  `spawn()` forks the sandbox, and `leave()` moves nsbuild back (see
  nsbuild.net.launch.run_under). `Limits.path` is None then.

When neither is possible (an unprivileged user without a delegated cgroup),
`prepare()` raises LimitsUnavailable saying why; nothing is left behind.

Names carry the owner's pid, so `gc()` removes the cgroups of dead runs.
Stdlib only; the cgroup2 mount is found by nsbuild.sandbox.cgroupfs.
"""

from __future__ import annotations

import os
import re

from nsbuild.errors import NsbuildError
from nsbuild.sandbox.cgroupfs import make_run_cgroup, run_cgroup_owner
from nsbuild.sandbox.cgroupfs import pid_alive as _pid_alive
from nsbuild.sandbox.cgroupfs import read as _read
from nsbuild.sandbox.cgroupfs import remove_cgroup as remove
from nsbuild.sandbox.cgroupfs import write as _write

PREFIX = "nsbuild-limits."
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
# Smallest memory cap accepted: below this even the sandbox's setup cannot run.
MIN_MEMORY = 4 << 20


class LimitError(NsbuildError):
    """A bad limit value (a usage error, exit status 2)."""


class LimitsUnavailable(LimitError):
    """Limits were asked for but cannot be enforced here; the message says why."""


def parse_size(text: str) -> int:
    """Bytes from `512M`, `2G`, `1.5GiB`, `4096` (binary units; B and iB optional)."""
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise LimitError(f"bad size {text!r}: expected a number with an optional unit "
                         "K, M, G or T (e.g. 512M, 2G)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < MIN_MEMORY:
        raise LimitError(f"size {text!r} is too small: at least {MIN_MEMORY >> 20}M")
    return value


def parse_pids(text: str) -> int:
    """A process count of at least 1."""
    if not re.fullmatch(r"[0-9]+", text.strip()) or int(text) < 1:
        raise LimitError(f"bad process limit {text!r}: expected a whole number >= 1")
    return int(text)


class Limits:
    """The cgroup(s) of one run. `path` is for `Sandbox.cgroup` (cgroup v2), or None
    when the sandbox inherits v1 cgroups through `join()`/`leave()`."""

    def __init__(self, path: str | None, v1: dict[str, str], pids_max: int | None,
                 memory_max: int | None) -> None:
        self.path = path
        self.pids_max = pids_max
        self.memory_max = memory_max
        self._v1 = v1  # controller -> cgroup dir
        self._home: dict[str, str] = {}  # controller -> dir nsbuild came from
        # v1: pids.max once nsbuild has left (it counted while it was there).
        self.after_leave_pids: int | None = None

    @property
    def paths(self) -> tuple[str, ...]:
        return ((self.path,) if self.path else ()) + tuple(self._v1.values())

    def describe(self) -> str:
        parts = []
        if self.pids_max is not None:
            parts.append(f"pids.max {self.pids_max}")
        if self.memory_max is not None:
            parts.append(f"memory.max {self.memory_max >> 20}M (no swap)")
        return f"{', '.join(parts)} in {' and '.join(self.paths)}"

    def join(self) -> None:
        """cgroup v1: move nsbuild itself into the limit cgroups, so that the sandbox
        it forks next starts there. No-op with cgroup v2 (the runtime places it)."""
        for controller, path in self._v1.items():
            if controller not in self._home:
                self._home[controller] = _own_v1_cgroup(controller, os.path.dirname(path))
            _write(os.path.join(path, "cgroup.procs"), str(os.getpid()))

    def leave(self) -> None:
        """cgroup v1: move nsbuild back where it was (the sandbox stays)."""
        home, self._home = self._home, {}
        for path in home.values():
            try:
                _write(os.path.join(path, "cgroup.procs"), str(os.getpid()))
            except OSError:
                pass
        if home and self.after_leave_pids is not None and "pids" in self._v1:
            _write(os.path.join(self._v1["pids"], "pids.max"), str(self.after_leave_pids))
            self.pids_max = self.after_leave_pids

    def close(self) -> None:
        """Kill whatever is left in the cgroups and remove them. Idempotent."""
        self.leave()
        for path in self.paths:
            remove(path)
        self.path, self._v1 = None, {}

    def __enter__(self) -> Limits:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prepare(pids_max: int | None = None, memory_max: int | None = None, *,
            parent: str | None = None, runtime: int = 0) -> Limits:
    """A fresh cgroup (or pair of v1 cgroups) with the given caps.

    `runtime`: processes of the sandbox's own machinery that live in the
    cgroup beside what the cap is for (its helper and init); they are added
    to pids.max, and with v1 cgroups one more, for nsbuild itself, which
    stays there until the sandbox has started (join() to leave()).

    Raises LimitsUnavailable (one line, naming the reason) when the caller
    cannot get a cgroup with the needed controllers."""
    if pids_max is not None and pids_max < 1:
        raise LimitError(f"bad process limit {pids_max}: must be at least 1")
    if memory_max is not None and memory_max < MIN_MEMORY:
        raise LimitError(f"memory limit {memory_max} is too small: at least "
                         f"{MIN_MEMORY >> 20}M")
    wanted = [c for c, v in (("pids", pids_max), ("memory", memory_max)) if v is not None]
    if not wanted:
        return Limits(None, {}, None, None)
    reasons: list[str] = []
    def plus(n: int) -> int | None:
        return None if pids_max is None else pids_max + n

    try:
        return _prepare_v2(wanted, plus(runtime), memory_max, parent)
    except _NotHere as e:
        reasons.append(str(e))
    # v1 cgroups are a hierarchy of their own: they apply alongside a v2 parent
    # (the nftables engine's cgroup), which then only does its own job.
    try:
        lim = _prepare_v1(wanted, plus(runtime + 1 if runtime else 0), memory_max)
        lim.after_leave_pids = plus(runtime) if runtime else None
        return lim
    except _NotHere as e:
        reasons.append(str(e))
    raise LimitsUnavailable(
        f"--pids-max/--memory-max cannot be enforced here: {'; '.join(reasons)}")


def gc() -> list[str]:
    """Remove limit cgroups whose owner process is gone. Returns what went."""
    removed: list[str] = []
    for top in _gc_roots():
        for dirpath, dirnames, _files in os.walk(top):
            for name in list(dirnames):
                if not name.startswith(PREFIX):
                    continue
                dirnames.remove(name)  # never descend into one we judge
                pid = run_cgroup_owner(name, PREFIX)
                if pid is not None and not _pid_alive(pid):
                    path = os.path.join(dirpath, name)
                    try:
                        remove(path)
                        removed.append(f"cgroup {path}")
                    except OSError:
                        pass
    return removed


# ------------------------------------------------------------------ cgroup v2

class _NotHere(Exception):
    """This kind of cgroup cannot be used here; the message says why."""


def _prepare_v2(wanted: list[str], pids_max: int | None, memory_max: int | None,
                parent: str | None) -> Limits:
    from nsbuild.sandbox.cgroupfs import cgroup2_mount

    mount = cgroup2_mount()
    if mount is None:
        raise _NotHere("no cgroup v2 mount")
    if parent is None:
        parent = _v2_parent(mount)
    missing = [c for c in wanted if c not in _controllers(parent)]
    if missing:
        hint = (" (they are bound to cgroup v1 hierarchies on this host)"
                if _v1_mounts() else "")
        raise _NotHere(f"cgroup v2 {parent} offers no {' and '.join(missing)} "
                       f"controller{hint}")
    try:
        _enable(parent, wanted)
        path = make_run_cgroup(parent, PREFIX)
    except OSError as e:
        raise _NotHere(f"cannot create a cgroup under {parent}: {e.strerror}") from None
    try:
        if pids_max is not None:
            _write(os.path.join(path, "pids.max"), str(pids_max))
        if memory_max is not None:
            _write(os.path.join(path, "memory.max"), str(memory_max))
            swap = os.path.join(path, "memory.swap.max")
            if os.path.exists(swap):
                # Otherwise a hog swaps instead of meeting the cap.
                _write(swap, "0")
    except BaseException:
        remove(path)
        raise
    return Limits(path, {}, pids_max, memory_max)


def _v2_parent(mount: str) -> str:
    if os.geteuid() == 0:
        return mount
    own = _own_v2_cgroup(mount)
    if own is None:
        raise _NotHere("this process is not in the cgroup v2 hierarchy")
    # The highest ancestor we may write: the top of a delegated subtree.
    path, best = own, None
    while path.startswith(mount) and len(path) >= len(mount):
        if _writable(path):
            best = path
        if path == mount:
            break
        path = os.path.dirname(path)
    if best is None:
        raise _NotHere(f"your cgroup {own} is not delegated to you (not writable); run "
                       "under a systemd user session (user@UID.service, Delegate=yes), or "
                       "as root")
    return best


def _own_v2_cgroup(mount: str) -> str | None:
    for line in _read("/proc/self/cgroup").splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hier == "0" and controllers == "":
            return os.path.normpath(mount + rel)
    return None


def _controllers(path: str) -> set[str]:
    try:
        return set(_read(os.path.join(path, "cgroup.controllers")).split())
    except OSError:
        return set()


def _enable(parent: str, wanted: list[str]) -> None:
    enabled = set(_read(os.path.join(parent, "cgroup.subtree_control")).split())
    todo = [c for c in wanted if c not in enabled]
    if todo:
        _write(os.path.join(parent, "cgroup.subtree_control"),
               " ".join(f"+{c}" for c in todo))


def _writable(path: str) -> bool:
    return all(os.access(p, os.W_OK) for p in
               (path, os.path.join(path, "cgroup.procs"),
                os.path.join(path, "cgroup.subtree_control")))


# ------------------------------------------------------------------ cgroup v1

def _v1_mounts() -> dict[str, str]:
    """controller -> mount point of its cgroup v1 hierarchy (pids and memory only)."""
    found: dict[str, str] = {}
    for line in _read("/proc/self/mountinfo").splitlines():
        fields = line.split()
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        if len(fields) > sep + 3 and fields[sep + 1] == "cgroup":
            options = fields[sep + 3].split(",")
            for controller in ("pids", "memory"):
                if controller in options and controller not in found:
                    found[controller] = fields[4]
    return found


def _prepare_v1(wanted: list[str], pids_max: int | None, memory_max: int | None) -> Limits:
    mounts = _v1_mounts()
    missing = [c for c in wanted if c not in mounts]
    if missing:
        raise _NotHere(f"no cgroup v1 hierarchy for {' and '.join(missing)} either")
    made: dict[str, str] = {}
    try:
        for controller in wanted:
            if not _writable_v1(mounts[controller]):
                raise _NotHere(f"cgroup v1 {mounts[controller]} is writable by root only")
            made[controller] = make_run_cgroup(mounts[controller], PREFIX)
        if pids_max is not None:
            _write(os.path.join(made["pids"], "pids.max"), str(pids_max))
        if memory_max is not None:
            mem = made["memory"]
            _write(os.path.join(mem, "memory.limit_in_bytes"), str(memory_max))
            memsw = os.path.join(mem, "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):
                _write(memsw, str(memory_max))
    except OSError as e:
        for path in made.values():
            remove(path)
        raise _NotHere(f"cannot set up cgroup v1 limits: {e.filename}: {e.strerror}") from None
    except BaseException:
        for path in made.values():
            remove(path)
        raise
    return Limits(None, made, pids_max, memory_max)


def _writable_v1(mount: str) -> bool:
    return os.access(mount, os.W_OK) and os.access(os.path.join(mount, "cgroup.procs"),
                                                    os.W_OK)


def _own_v1_cgroup(controller: str, mount: str) -> str:
    for line in _read("/proc/self/cgroup").splitlines():
        _hier, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if controller in controllers.split(","):
            return os.path.normpath(mount + rel)
    return mount


# ------------------------------------------------------------------- helpers

def _gc_roots() -> list[str]:
    from nsbuild.sandbox.cgroupfs import cgroup2_mount

    roots = list(dict.fromkeys(_v1_mounts().values()))
    mount = cgroup2_mount()
    if mount is not None:
        if os.geteuid() == 0:
            roots.append(mount)
        else:
            try:
                roots.append(_v2_parent(mount))
            except _NotHere:
                pass
    return roots

