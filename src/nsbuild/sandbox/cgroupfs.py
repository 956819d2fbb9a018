"""Where cgroup v2 is mounted: read from mountinfo, never assumed.

Used by the runtime's resource limits and by the network layer's nftables
engine (which matches a run's cgroup); it lives here, in the lowest layer.
"""

from __future__ import annotations


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
