"""`nsbuild farm master` and `nsbuild farm stop`: a Buildbot master made,
started and stopped with Buildbot's own commands (twistd daemons with pid
files, no systemd), and Buildbot's tools found beside the running Python.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from nsbuild.farm import settings
from nsbuild.farm.daemons import (
    MASTER_FILES,
    drop_stale_pid,
    is_master,
    pid_of,
    run_tool,
    tool,
)
from nsbuild.farm.errors import FarmError

MASTER_CFG = """\
# Written by `nsbuild farm master`. The farm's settings are in {settings},
# its workers in {workers} (`nsbuild farm worker` registers them); this file
# reads both, so it need not change. For a configuration of your own, see
# `pydoc nsbuild.farm.buildbot`.
import os

from nsbuild.farm.buildbot import master_config

BuildmasterConfig = master_config(os.path.dirname(os.path.abspath(__file__)))
"""

# How long a started master may take to answer on its web port.
START_WAIT = 60.0


def create(master_dir: Path, www_port: int, pb_port: int, interface: str,
           pb_interface: str = "", tls: bool = False) -> bool:  # fmt: skip
    """Make a master in `master_dir` unless one is there; True if made."""
    master_dir = master_dir.absolute()
    if is_master(master_dir):
        return False
    settings.make_private_folder(master_dir, "master")
    run_tool([tool("buildbot"), "create-master", "--quiet", "-r", str(master_dir)])
    (master_dir / "master.cfg.sample").unlink(missing_ok=True)
    if tls:
        from nsbuild.farm.tls import make

        make(master_dir)
    s = settings.MasterSettings(www_port, pb_port, interface, secrets.token_urlsafe(24),
                                pb_interface, tls)  # fmt: skip
    settings.write_json(master_dir / settings.MASTER_FILE, s.to_json())
    settings.write_json(master_dir / settings.WORKERS_FILE, {})
    settings.write_text(master_dir / "master.cfg",
                        MASTER_CFG.format(settings=settings.MASTER_FILE,
                                          workers=settings.WORKERS_FILE))  # fmt: skip
    return True


def start(master_dir: Path) -> settings.MasterSettings:
    """Start the master (if it is not running) and wait until its web
    interface answers; a start that fails is tried once more."""
    from nsbuild.farm.rest import Rest

    settings.check_folder(master_dir, *MASTER_FILES)
    s = settings.master_settings(master_dir)
    if pid_of(master_dir) is None:
        drop_stale_pid(master_dir)
        run_tool([tool("buildbot"), "checkconfig", str(master_dir)],
                 what="the master's configuration")
        for attempt in (1, 2):
            try:
                run_tool([tool("buildbot"), "start", str(master_dir)])
                break
            except FarmError:
                # twistd may time out reading its log right after a crash
                # of the previous master; once more, then give up.
                if attempt == 2 or pid_of(master_dir) is not None:
                    raise
    from nsbuild.farm.tls import master_cert

    rest = Rest(s.url, cert=master_cert(master_dir, s.tls))  # anonymous: reading needs no login
    deadline = time.monotonic() + START_WAIT
    while not (serves(master_dir, s) and rest.answers()):
        if time.monotonic() > deadline or pid_of(master_dir) is None:
            raise FarmError(f"the master in {master_dir} does not answer on {s.url}; "
                            f"see {master_dir / 'twistd.log'}")
        time.sleep(0.5)
    return s


def serves(master_dir: Path, s: settings.MasterSettings) -> bool:
    """True if the master's own daemon holds its web port; FarmError if
    another user holds either port (anything may answer on a port)."""
    from nsbuild.farm import listeners

    pid = pid_of(master_dir)
    # The worker port is listened on once a worker is registered.
    listeners.check_ours(s.pb_port, "the master's worker port")
    return pid is not None and pid in listeners.holders(s.www_port)


def reconfig(master_dir: Path) -> None:
    """Make a running master read its configuration (and workers) again."""
    settings.check_folder(master_dir, *MASTER_FILES)
    if pid_of(master_dir) is not None:
        run_tool([tool("buildbot"), "reconfig", str(master_dir)], what="reconfiguring the master")
