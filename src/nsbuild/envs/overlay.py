"""Is overlayfs usable for sessions here? If not, sessions copy their base.

Overlayfs in a user namespace needs Linux >= 5.11 and a filesystem under the
store that supports it for upper dirs (not all do, e.g. some network
filesystems). A probe mounts a tiny overlay in a sandbox on the store's
filesystem; the answer is remembered per kernel release and filesystem, and
a refusal is said once, when it is found. `NSBUILD_NO_OVERLAY=1` forces the
copy (for filesystems where overlayfs misbehaves without refusing).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from nsbuild.envs.errors import EnvError
from nsbuild.envs.owner import give_to_sandbox_root, tmp_name
from nsbuild.envs.paths import Layout
from nsbuild.envs.records import read_record, write_record
from nsbuild.envs.remove import remove_tree

PROBE = "overlay-probe.json"


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
    key = {"kernel": os.uname().release, "dev": os.stat(layout.sessions).st_dev}
    record = layout.root / PROBE
    # Anything but a record of ours for this key is probed again and replaced.
    with contextlib.suppress(EnvError, KeyError, TypeError, AttributeError):
        data = read_record(record)
        if data.get("key") == key:
            return bool(data["usable"])
    why = _probe(layout.sessions)
    if why:
        print(
            f"nsbuild: warning: overlayfs is refused here ({why}); sessions fall back "
            "to a full copy of their environment (slower, uses disk)",
            file=sys.stderr,
        )
    with contextlib.suppress(OSError):  # not remembered: probed again next time
        write_record(record, {"key": key, "usable": why is None, "why": why})
    return why is None
