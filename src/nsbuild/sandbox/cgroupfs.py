"""cgroup files: where cgroup v2 is mounted (read from mountinfo, never
assumed), and removing a run's cgroup with whatever is left in it.

Used by the runtime's resource limits and by the network layer's nftables
engine (which matches a run's cgroup); it lives here, in the lowest layer.
"""

from __future__ import annotations

import errno
import itertools
import os
import signal
import time


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The first cgroup2 mount point, read from mountinfo (not assumed)."""
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        if len(fields) > sep + 1 and fields[sep + 1] == "cgroup2":
            return _unescape(fields[4])
    return None


def _unescape(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(path):
        if path[i] == "\\" and i + 4 <= len(path) and path[i + 1 : i + 4].isdigit():
            out.append(chr(int(path[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def remove_cgroup(path: str, timeout: float = 10.0) -> None:
    """Kill every process in the cgroup `path` (v1 or v2) and its children,
    then remove them."""
    for entry in list(_subdirs(path)):
        remove_cgroup(entry, timeout)
    kill_file = os.path.join(path, "cgroup.kill")
    deadline = time.monotonic() + timeout
    while True:
        if os.path.exists(kill_file):
            try:
                write(kill_file, "1")
            except OSError:
                pass
        else:
            for pid in _procs(path):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            # EBUSY while killed processes are being reaped (or a fork raced the kill).
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _subdirs(path: str) -> list[str]:
    try:
        return [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _procs(path: str) -> list[int]:
    try:
        return [int(x) for x in read(os.path.join(path, "cgroup.procs")).split()]
    except OSError:
        return []


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a run's owner process still exists (cgroup names carry its pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_counter = itertools.count()


def make_run_cgroup(parent: str, prefix: str) -> str:
    """A new cgroup `prefix`PID.N under `parent`, PID being ours. One of that
    name is a leftover of an earlier process that had our pid: it goes first."""
    path = os.path.join(parent, f"{prefix}{os.getpid()}.{next(_counter)}")
    try:
        os.mkdir(path)
    except FileExistsError:
        remove_cgroup(path)
        os.mkdir(path)
    return path


def run_cgroup_owner(name: str, prefix: str) -> int | None:
    """The pid in a run cgroup's name (see make_run_cgroup); None if not one."""
    if not name.startswith(prefix):
        return None
    pid = name[len(prefix) :].split(".")[0]
    return int(pid) if pid.isdigit() else None
