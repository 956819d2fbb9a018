"""`nsbuild farm master` and `nsbuild farm stop`: a Buildbot master made,
started and stopped with Buildbot's own commands (twistd daemons with pid
files, no systemd), and Buildbot's tools found beside the running Python.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from nsbuild.farm import settings
from nsbuild.farm.errors import FarmError
from nsbuild.printable import printable

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


def tool(name: str) -> str:
    """A Buildbot command installed with nsbuild (the farm extra)."""
    path = Path(sys.executable).parent / name
    if not os.access(path, os.X_OK):
        raise FarmError(f"{name} is not installed beside {sys.executable}: install nsbuild "
                        "with its farm extra (pip install 'nsbuild[farm]')")
    return str(path)


def clean_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a daemon starts with: the caller's identity and
    nsbuild's own variables, nothing else (a worker hands its environment to
    every build command and to the master)."""
    keep = ("HOME", "USER", "LOGNAME", "LANG", "XDG_CONFIG_HOME", "XDG_CACHE_HOME",
            "XDG_RUNTIME_DIR")  # fmt: skip
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update({k: v for k, v in os.environ.items() if k.startswith("NSBUILD_")})
    env.setdefault("LANG", "C.UTF-8")
    env["PATH"] = f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin"
    env.update(extra or {})
    return env


def run_tool(argv: list[str], env: dict[str, str] | None = None, what: str = "") -> str:
    """Run a Buildbot command; its output, or FarmError with its last lines."""
    proc = subprocess.run(argv, env=env or clean_environment(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, errors="replace")  # fmt: skip
    if proc.returncode != 0:
        tail = " / ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        raise FarmError(f"{what or Path(argv[0]).name + ' ' + argv[1]} failed "
                        f"(exit status {proc.returncode}): {printable(tail, 600)}")
    return proc.stdout


def is_master(path: Path) -> bool:
    return (path / settings.MASTER_FILE).is_file()


def create(master_dir: Path, www_port: int, pb_port: int, interface: str) -> bool:
    """Make a master in `master_dir` unless one is there; True if made."""
    master_dir = master_dir.absolute()
    if is_master(master_dir):
        return False
    if master_dir.exists() and any(master_dir.iterdir()):
        raise FarmError(f"{master_dir} exists and is not an nsbuild farm master")
    run_tool([tool("buildbot"), "create-master", "--quiet", "-r", str(master_dir)])
    (master_dir / "master.cfg.sample").unlink(missing_ok=True)
    s = settings.MasterSettings(www_port, pb_port, interface, secrets.token_urlsafe(24))
    settings.write_json(master_dir / settings.MASTER_FILE, s.to_json())
    settings.write_json(master_dir / settings.WORKERS_FILE, {})
    (master_dir / "master.cfg").write_text(
        MASTER_CFG.format(settings=settings.MASTER_FILE, workers=settings.WORKERS_FILE))
    return True


def pid_of(folder: Path) -> int | None:
    """The daemon of a master's or worker's folder, if it runs."""
    try:
        pid = int((folder / "twistd.pid").read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def start(master_dir: Path) -> settings.MasterSettings:
    """Start the master (if it is not running) and wait until its web
    interface answers; a start that fails is tried once more."""
    from nsbuild.farm.rest import Rest

    s = settings.master_settings(master_dir)
    if pid_of(master_dir) is None:
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
    rest = Rest(s.url)  # anonymous: reading needs no login
    deadline = time.monotonic() + START_WAIT
    while not rest.answers():
        if time.monotonic() > deadline or pid_of(master_dir) is None:
            raise FarmError(f"the master in {master_dir} does not answer on {s.url}; "
                            f"see {master_dir / 'twistd.log'}")
        time.sleep(0.5)
    return s


def reconfig(master_dir: Path) -> None:
    """Make a running master read its configuration (and workers) again."""
    if pid_of(master_dir) is not None:
        run_tool([tool("buildbot"), "reconfig", str(master_dir)], what="reconfiguring the master")


def stop(folder: Path) -> bool:
    """Stop the master or worker in `folder`; False if it was not running."""
    if is_master(folder):
        command = tool("buildbot")
    elif (folder / settings.WORKER_FILE).is_file():
        command = tool("buildbot-worker")
    else:
        raise FarmError(f"{folder} is neither a farm master nor a farm worker")
    if pid_of(folder) is None:
        return False
    run_tool([command, "stop", str(folder)])
    return True
