"""Is overlayfs usable for sessions here? If not, sessions copy their base.

Overlayfs in a user namespace needs Linux >= 5.11 and a filesystem under the
store that supports it for upper dirs (not all do, e.g. some network
filesystems). A probe mounts a tiny overlay in a sandbox on the store's
filesystem; the answer is remembered per kernel release and filesystem, and
a refusal is said once, when it is found. `NSBUILD_NO_OVERLAY=1` forces the
copy (for filesystems where overlayfs misbehaves without refusing).

Run by root, the sandbox's root is a subordinate id, which must walk every
folder down to the sessions folder to mount there. A folder closed to it is
a matter of modes, not of kernel or filesystem: it is named (once per
process) and never remembered, nor is a probe's refusal for want of access
(EACCES), so a chmod takes effect on the next run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
from pathlib import Path

from nsbuild.envs.errors import EnvError
from nsbuild.envs.owner import give_to_sandbox_root, sandbox_root_ids, tmp_name
from nsbuild.envs.paths import Layout, cache_dir
from nsbuild.envs.records import read_record, write_record
from nsbuild.envs.remove import remove_tree
from nsbuild.printable import printable

PROBE = "overlay-probe.json"
# How a refusal for want of access reads in a probe's record (SetupError's text).
_NO_ACCESS = errno.errorcode[errno.EACCES]
# Closed folders already named by this process (a virt server opens many sessions).
_named: set[str] = set()


def _walkable(st: os.stat_result, uid: int, gid: int) -> bool:
    mode = st.st_mode
    return bool(mode & stat.S_IXOTH or (st.st_uid == uid and mode & stat.S_IXUSR)
                or (st.st_gid == gid and mode & stat.S_IXGRP))  # fmt: skip


def _closed_folder(directory: Path, uid: int, gid: int) -> tuple[str, int] | None:
    """The first folder on the way to `directory` (itself included) that uid
    and gid cannot walk, with its mode; None if there is none."""
    # The real path is the one the kernel walks when the sandbox mounts.
    here = "/"
    for part in os.path.realpath(directory).split("/"):
        here = os.path.join(here, part)
        try:
            st = os.stat(here)
        except OSError:
            return None  # not there yet: the probe says what is wrong
        if _walkable(st, uid, gid):
            continue
        try:
            os.getxattr(here, "system.posix_acl_access")
        except OSError:
            return here, stat.S_IMODE(st.st_mode)
        # An access ACL may let uid in, whatever the mode says: the probe tells.
    return None


def _name_closed(layout: Layout, uid: int, folder: str, mode: int) -> None:
    if folder in _named:
        return
    _named.add(folder)
    shown = printable(folder)
    advice = f"chmod o+x {shown}"
    above = not folder.startswith(f"{os.path.realpath(layout.root)}/")
    if above and os.environ.get("XDG_CACHE_HOME") and layout.root == cache_dir():
        advice += (", or leave XDG_CACHE_HOME unset (root's cache is "
                   "/var/cache/nsbuild)")  # fmt: skip
    print(
        f"nsbuild: warning: root's sandboxes (uid {uid}) cannot walk into {shown} "
        f"(mode {mode:04o}): sessions fall back to a full copy of their environment; "
        f"{advice}",
        file=sys.stderr,
    )


def _probe(directory: Path) -> str | None:
    """None if an overlay mounts with upper/work in `directory`, else why not."""
    from nsbuild.sandbox import Overlay, Proc, Sandbox, SetupError, caller_idmap, spawn

    tmp = directory / tmp_name()
    for sub in ("lower", "upper", "work"):
        (tmp / sub).mkdir(parents=True)
    give_to_sandbox_root(tmp / "upper", tmp / "work")
    try:
        spec = Sandbox(
            # Nothing to run in an empty root: reaching exec proves the mount worked.
            argv=("/nsbuild-overlay-probe",),
            idmap=caller_idmap(),
            root=Overlay((str(tmp / "lower"),), str(tmp / "upper"), str(tmp / "work"), "/"),
            mounts=(Proc(),),
        )
        spawn(spec).wait()
        return None
    except SetupError as e:
        if "overlay" not in e.step:
            raise  # not about overlayfs: user namespaces off, no subuid range...
        return str(e)
    finally:
        remove_tree(tmp)


def overlay_usable(layout: Layout) -> bool:
    if os.environ.get("NSBUILD_NO_OVERLAY") == "1":
        return False
    layout.sessions.mkdir(parents=True, exist_ok=True)
    ids = sandbox_root_ids()
    if ids is not None:
        # Checked before the record: the modes may have changed since it was written.
        closed = _closed_folder(layout.sessions, *ids)
        if closed is not None:
            _name_closed(layout, ids[0], *closed)
            return False
    key = {"kernel": os.uname().release, "dev": os.stat(layout.sessions).st_dev}
    record = layout.root / PROBE
    # Anything but a record of ours for this key is probed again and replaced;
    # so is a refusal for want of access (written before such were left out).
    with contextlib.suppress(EnvError, KeyError, TypeError, AttributeError):
        data = read_record(record)
        if data.get("key") == key and not (
            data["usable"] is False and _NO_ACCESS in str(data.get("why"))
        ):
            return bool(data["usable"])
    why = _probe(layout.sessions)
    if why:
        print(
            f"nsbuild: warning: overlayfs is refused here ({why}); sessions fall back "
            "to a full copy of their environment (slower, uses disk)",
            file=sys.stderr,
        )
    if why is None or _NO_ACCESS not in why:
        with contextlib.suppress(OSError):  # not remembered: probed again next time
            write_record(record, {"key": key, "usable": why is None, "why": why})
    return why is None
