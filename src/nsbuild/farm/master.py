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
from nsbuild.userfile import read_small

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


def create(master_dir: Path, www_port: int, pb_port: int, interface: str,
           pb_interface: str = "") -> bool:  # fmt: skip
    """Make a master in `master_dir` unless one is there; True if made."""
    master_dir = master_dir.absolute()
    if is_master(master_dir):
        return False
    if master_dir.exists() and any(master_dir.iterdir()):
        raise FarmError(f"{master_dir} exists and is not an nsbuild farm master")
    master_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Its files hold the web password and the workers' (and Python).
    master_dir.chmod(0o700)
    settings.check_private(master_dir)
    run_tool([tool("buildbot"), "create-master", "--quiet", "-r", str(master_dir)])
    (master_dir / "master.cfg.sample").unlink(missing_ok=True)
    s = settings.MasterSettings(www_port, pb_port, interface, secrets.token_urlsafe(24),
                                pb_interface)  # fmt: skip
    settings.write_json(master_dir / settings.MASTER_FILE, s.to_json())
    settings.write_json(master_dir / settings.WORKERS_FILE, {})
    settings.write_text(master_dir / "master.cfg",
                        MASTER_CFG.format(settings=settings.MASTER_FILE,
                                          workers=settings.WORKERS_FILE))  # fmt: skip
    return True


# What Buildbot runs or reads in a master's and a worker's folder.
MASTER_FILES = ("master.cfg", "buildbot.tac", settings.MASTER_FILE, settings.WORKERS_FILE,
                "twistd.pid")  # fmt: skip
WORKER_FILES = ("buildbot.tac", settings.WORKER_FILE, "twistd.pid")


def _is_daemon_of(pid: int, folder: Path) -> bool:
    """True if `pid` is the caller's twistd working in `folder` (Buildbot's
    start runs it there): a pid file outlives its daemon, and its number may
    since name anything."""
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return False
        cwd = os.readlink(f"/proc/{pid}/cwd")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read(1 << 16)
    except OSError:
        return False
    return cwd == str(folder.resolve()) and b"twistd" in cmdline


def recorded_pid(folder: Path) -> int | None:
    """The live process twistd.pid names, whatever it is."""
    path = folder / "twistd.pid"
    if not os.path.lexists(path):
        return None
    settings.check_private(path)
    try:
        pid = int(read_small(path, 64).decode().strip())
        os.kill(pid, 0)
    except PermissionError:
        return pid  # alive, someone else's
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def pid_of(folder: Path) -> int | None:
    """The daemon of a master's or worker's folder, if it runs."""
    pid = recorded_pid(folder)
    return pid if pid is not None and _is_daemon_of(pid, folder) else None


def drop_stale_pid(folder: Path) -> None:
    """Remove a twistd.pid whose process is not the folder's daemon (twistd
    would refuse to start while its number is alive)."""
    if recorded_pid(folder) is not None and pid_of(folder) is None:
        (folder / "twistd.pid").unlink(missing_ok=True)


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
    rest = Rest(s.url)  # anonymous: reading needs no login
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


def stop(folder: Path) -> bool:
    """Stop the master or worker in `folder`; False if it was not running."""
    settings.check_private(folder)
    if is_master(folder):
        command, what = tool("buildbot"), "master"
        settings.check_folder(folder, *MASTER_FILES)
    elif (folder / settings.WORKER_FILE).is_file():
        command, what = tool("buildbot-worker"), "worker"
        settings.check_folder(folder, *WORKER_FILES)
    else:
        raise FarmError(f"{folder} is neither a farm master nor a farm worker")
    recorded = recorded_pid(folder)
    if recorded is None:
        return False
    if pid_of(folder) is None:
        # Buildbot's stop signals whatever the pid file names.
        raise FarmError(f"{folder / 'twistd.pid'} names process {recorded}, which is not "
                        f"the {what} of {folder}: not signalling it (remove the stale file)")
    run_tool([command, "stop", str(folder)])
    return True
