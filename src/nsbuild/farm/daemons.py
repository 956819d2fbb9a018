"""The daemons of the farm, a master's and a worker's: Buildbot's tools
found beside the running Python, run with a clean environment, and the
twistd each leaves running, known by its pid file only once the process
it names is proved to be that folder's daemon.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nsbuild.farm import settings
from nsbuild.farm.errors import FarmError
from nsbuild.printable import printable
from nsbuild.userfile import read_small


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
    if os.geteuid() == 0:
        # root's own path (login.defs' ENV_SUPATH): a root worker's builds
        # run nft, which Debian installs in /usr/sbin.
        env["PATH"] = f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:" \
                      "/usr/sbin:/usr/bin:/sbin:/bin"  # fmt: skip
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
            argv = f.read(1 << 16).split(b"\0")
    except OSError:
        return False
    # buildbot start execs a Python running twistd; buildbot-worker start
    # forks into twistd with its own command line kept.
    daemon = any(b"twistd" in a for a in argv) or (
        len(argv) > 2 and argv[1].endswith(b"/buildbot-worker") and argv[2] == b"start")
    return cwd == str(folder.resolve()) and daemon


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


def is_master(path: Path) -> bool:
    return (path / settings.MASTER_FILE).is_file()


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
