"""`nsbuild farm worker`: a Buildbot worker made, registered with its master,
and started, as the calling (unprivileged) user.

The worker says what it can build in its info files, sent at every
connection: info/nsbuild-envs (ENV/ARCH pairs from `nsbuild env list`),
info/nsbuild-command (the nsbuild its builds run) and
info/nsbuild-egress-engine (what limits its builds' dependency phase to the
mirror: `proxy`, or for a worker run as root `nftables`, the kernel firewall
matching each run's cgroup, which the build step then asks for with
`--egress-engine nftables`). It starts with a clean,
explicit environment, which every build command inherits, and `nsbuild gc`
runs first, so a crashed predecessor leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsbuild.farm import daemons, master, settings
from nsbuild.farm.errors import FarmError
from nsbuild.printable import printable

# How long orphaned build commands get to end after a signal (nsbuild's
# tear-down of a build takes seconds).
ORPHAN_WAIT = 60.0


def nsbuild_command() -> str:
    """The nsbuild installed with the running one (a venv's), else PATH's."""
    beside = Path(sys.executable).parent / "nsbuild"
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nsbuild")
    if not found:
        raise FarmError("no nsbuild command beside this Python or on PATH")
    return os.path.abspath(found)


def environments(env: dict[str, str]) -> list[str]:
    """The ENV/ARCH pairs this user's nsbuild can build in here."""
    proc = subprocess.run([nsbuild_command(), "env", "list", "--json"], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise FarmError(f"nsbuild env list failed: {printable(proc.stderr.strip(), 300)}")
    pairs = []
    for row in json.loads(proc.stdout):
        pair = f"{row.get('name')}/{row.get('architecture')}"
        if not row.get("cannot_run") and settings.ENV_PAIR.fullmatch(pair):
            pairs.append(pair)
    return sorted(set(pairs))


def split_master(spec: str) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FarmError(f"bad --master {spec!r}: expected HOST:PORT (the master's worker port)")
    return host, int(port)


@dataclass(frozen=True)
class WorkerSetup:
    folder: Path
    name: str
    master: str  # HOST:PORT
    password: str
    envs: tuple[str, ...]

    environment: tuple[tuple[str, str], ...] = ()  # KEPT's values at its making

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "master": self.master, "password": self.password,
                "envs": list(self.envs), "environment": dict(self.environment)}  # fmt: skip


# What of the caller's environment a worker keeps from its making: its
# builds' config and cache are its own, whichever shell starts it again.
KEPT = ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_RUNTIME_DIR")


def environment(folder: Path) -> dict[str, str]:
    """The environment the worker in `folder` runs with: the clean one,
    the variables it was made with, and its marker."""
    record = settings.read_json(folder / settings.WORKER_FILE)
    kept = record.get("environment") if isinstance(record, dict) else None
    kept = {k: v for k, v in kept.items() if k in KEPT and isinstance(v, str)} \
        if isinstance(kept, dict) else {}  # fmt: skip
    return daemons.clean_environment({**kept, **marker(folder)})


# The password create-worker is given; never one a master accepts.
PLACEHOLDER = "nsbuild-placeholder-replaced-at-once"


GUARD = """
# Added by `nsbuild farm worker`: to a master on this machine, connect only
# while its port is held by the master's user; to a master on TLS, only if
# it shows the pinned certificate (nsbuild.farm.pbguard).
from nsbuild.farm.pbguard import guard
guard(s, buildmaster_host, port, {uid}, {cert!r})
"""


def set_password(tac: Path, password: str, cert: Path | None = None) -> None:
    """Put the worker's password in its buildbot.tac (Python, 0600), whole,
    and the guard of its connection (pinned to the master's certificate in
    the file `cert`, if given)."""
    text = tac.read_text()
    line = f"passwd = {PLACEHOLDER!r}\n"
    if text.count(line) != 1 or "s.setServiceParent(application)\n" not in text:
        raise FarmError(f"{tac}: not the buildbot.tac create-worker writes")
    # The master's user: the worker's own (a master of another user here
    # is not supported by the guard).
    guard = GUARD.format(uid=os.getuid(), cert=str(cert) if cert is not None else None)
    text = text.replace(line, f"passwd = {password!r}\n") + guard
    settings.write_text(tac, text)


def check_user(euid: int, as_root: bool) -> None:
    """A worker runs whatever its master (or whatever holds the master's
    port) sends: as root only when asked for (kernel firewall engines)."""
    if euid == 0 and not as_root:
        raise FarmError("farm worker as root runs the master's commands as root: run it as "
                        "an unprivileged user, or pass --as-root if that is meant")  # fmt: skip


def egress_engine(euid: int) -> str:
    """The egress engine of a worker's builds: as root the kernel firewall,
    which must then be usable here (a root worker whose builds would fall
    back to the proxy is refused, not made)."""
    if euid != 0:
        return "proxy"
    from nsbuild.net import NetError
    from nsbuild.net.options import check_nftables_usable

    try:
        check_nftables_usable(None)
    except NetError as e:
        raise FarmError(f"a worker run as root builds with {e}") from None
    return "nftables"


def master_cert_for(master_spec: str, master_dir: Path | None, given: Path | None) -> str | None:
    """The certificate the worker pins: --master-cert's, else that of the
    master on this machine if it is on TLS. A master elsewhere must have one:
    without it anyone on the way could pose as the master (nsbuild.farm.tls)."""
    from nsbuild.farm import listeners, tls

    if given is not None:
        return tls.read_cert(given)
    if master_dir is not None:
        return tls.master_cert(master_dir, settings.master_settings(master_dir).tls)
    host, _ = split_master(master_spec)
    if listeners.is_local(host):
        return None
    raise FarmError(f"a master on another machine is trusted by its certificate: pass "
                    f"--master-cert FILE, a copy of its tls/{tls.CERT} (`nsbuild farm "
                    f"master --tls` makes one)")  # fmt: skip


def _pin_cert(folder: Path, cert: str | None, made: bool) -> Path | None:
    """Write the pinned certificate into the worker's folder; its path."""
    from nsbuild.farm import tls

    path = folder / tls.WORKER_CERT
    if not made and path.exists() != (cert is not None):
        raise FarmError(f"{folder} was made {'with' if path.exists() else 'without'} a pinned "
                        "master certificate; remove it to make another")  # fmt: skip
    if cert is None:
        return None
    settings.write_text(path, cert, mode=0o644)
    return path


def create(folder: Path, master_spec: str, name: str, as_root: bool = False,
           cert: str | None = None) -> WorkerSetup:  # fmt: skip
    """Make the worker (or read the one there) and note its environments;
    `cert`: the master's certificate to pin (master_cert_for)."""
    check_user(os.geteuid(), as_root)
    engine = egress_engine(os.geteuid())
    folder = folder.absolute()
    settings.check_worker_name(name)
    split_master(master_spec)
    from nsbuild.sandbox.idmap import caller_idmap

    lacking = caller_idmap().warning
    if lacking:
        # Every build installs packages as apt's _apt and builds as a user of its own.
        raise FarmError(f"a worker's builds need a subordinate id range: {lacking}")
    record = folder / settings.WORKER_FILE
    env = daemons.clean_environment()
    envs = tuple(environments(env))
    if not envs:
        raise FarmError("no environment to build in: create one first "
                        "(nsbuild env create bookworm --suite bookworm)")
    old: dict[str, Any] = {}
    if record.is_file():
        settings.check_folder(folder, *daemons.WORKER_FILES)
        old = settings.read_json(record)
        if not (isinstance(old, dict) and isinstance(old.get("password"), str)
                and old["password"]):  # fmt: skip
            raise FarmError(f"{record}: not a worker's record (remove the folder to make one)")
        if old.get("name") != name or old.get("master") != master_spec:
            raise FarmError(f"{folder} is the worker {old.get('name')!r} of "
                            f"{old.get('master')!r}; remove it to make another")
        password = str(old["password"])
        _pin_cert(folder, cert, made=False)
    else:
        settings.make_private_folder(folder, "worker")
        password = secrets.token_urlsafe(24)
        # A command line is readable by every local user (/proc/PID/cmdline):
        # the worker is made with a placeholder, its .tac then rewritten.
        daemons.run_tool([daemons.tool("buildbot-worker"), "create-worker", "--quiet",
                         "--umask=0o22", "--maxdelay=10", str(folder), master_spec, name,
                         PLACEHOLDER], env=env)  # fmt: skip
        set_password(folder / "buildbot.tac", password, _pin_cert(folder, cert, made=True))
    made = old.get("environment")
    kept = {k: v for k, v in made.items() if k in KEPT and isinstance(v, str)} \
        if isinstance(made, dict) else {k: env[k] for k in KEPT if k in env}  # fmt: skip
    setup = WorkerSetup(folder, name, master_spec, password, envs, tuple(sorted(kept.items())))
    info = folder / "info"
    try:
        info.mkdir(exist_ok=True)
        (info / "nsbuild-envs").write_text(" ".join(envs) + "\n")
        (info / "nsbuild-command").write_text(nsbuild_command() + "\n")
        (info / "nsbuild-egress-engine").write_text(engine + "\n")
        (info / "admin").write_text(f"{env.get('USER', os.getuid())} (nsbuild farm worker)\n")
        (info / "host").write_text(socket.gethostname() + "\n")
        settings.write_json(record, setup.to_json())
    except OSError as e:
        raise FarmError(f"cannot write the worker's {e.filename or info}: {e.strerror}") from None
    return setup


def local_master_for(master_spec: str) -> Path | None:
    """The master `nsbuild farm master` made here, if `master_spec` names
    it: this machine, and its worker port (another host's master of the
    same port is not this one)."""
    from nsbuild.farm import listeners

    host, port = split_master(master_spec)
    local = settings.local_master()
    if local is None or not listeners.is_local(host):
        return None
    return local if settings.master_settings(local).pb_port == port else None


def register_locally(setup: WorkerSetup, master_dir: Path) -> None:
    """Add the worker to a master on this machine and make it read its workers again."""
    settings.register(master_dir, settings.WorkerEntry(setup.name, setup.password, setup.envs))
    master.reconfig(master_dir)


REGISTER_FILE = "register-on-master"  # in a worker's folder, 0600


def register_line(setup: WorkerSetup) -> str:
    """What to run on the master's machine, for a master elsewhere: the
    password stays in a file of the user's alone (a terminal, a CI log or a
    shell history would keep it), which the command reads."""
    path = setup.folder / REGISTER_FILE
    settings.write_text(path, setup.password + "\n")
    return (f"nsbuild farm add-worker MASTER-DIR {setup.name} {' '.join(setup.envs)} "
            f"< {path}")


MARKER = "NSBUILD_FARM_WORKER"  # in a worker's environment: its folder


def marker(folder: Path) -> dict[str, str]:
    """The variable a worker, and so every command it runs, carries: what
    tells its commands from the user's own processes in its folder."""
    return {MARKER: str(folder.resolve())}


def _is_orphan(pid: int, folder: Path) -> bool:
    inside = str(folder) + "/"
    want = f"{MARKER}={folder}".encode()
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return False
        if not os.readlink(f"/proc/{pid}/cwd").startswith(inside):
            return False
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read(1 << 20)
    except OSError:
        return False
    return want in environ.split(b"\0")


def orphans(folder: Path) -> list[int]:
    """This user's processes a worker of `folder` started and that still
    work in it: commands of builds a killed worker left running (Buildbot
    starts each in a process group of its own, with no parent-death
    signal). A shell or an editor of the user's in there is not one: it
    lacks the worker's variable."""
    folder = folder.resolve()  # /proc/PID/cwd is the real path
    return [int(e) for e in os.listdir("/proc")
            if e.isdigit() and int(e) != os.getpid() and _is_orphan(int(e), folder)]  # fmt: skip


def _pin(pids: list[int], folder: Path) -> list[int]:
    """pidfds of those still orphans once pinned: a pid freed and reused
    between the scan and the signal gets none."""
    fds = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        if _is_orphan(pid, folder.resolve()):
            fds.append(fd)
        else:
            os.close(fd)
    return fds


def end_orphans(folder: Path) -> None:
    """End what a killed worker's builds left running: SIGTERM (nsbuild tears
    its sandbox down), and SIGKILL for what is still there after a while."""
    pids = orphans(folder)
    if pids:
        sys.stderr.write(f"nsbuild farm: ending what a killed worker left running: "
                         f"processes {' '.join(map(str, pids))}\n")  # fmt: skip
    for sig in (signal.SIGTERM, signal.SIGKILL):
        fds = _pin(pids, folder)
        try:
            for fd in fds:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(fd, sig)
        finally:
            for fd in fds:
                os.close(fd)
        deadline = time.monotonic() + ORPHAN_WAIT
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = orphans(folder)


def start(folder: Path) -> None:
    """End a predecessor's orphaned builds, `nsbuild gc`, then the worker,
    all with the clean environment."""
    from nsbuild.farm import listeners

    settings.check_folder(folder, *daemons.WORKER_FILES)
    record = settings.read_json(folder / settings.WORKER_FILE)
    host, port = split_master(str(record.get("master", "")) if isinstance(record, dict) else "")
    if listeners.is_local(host):
        # A PB login proves the worker to the master, not the master to the
        # worker: on this machine, what holds the port must be the user's.
        listeners.check_ours(port, "the master's worker port")
    env = environment(folder)
    if daemons.pid_of(folder) is None:
        daemons.drop_stale_pid(folder)
        end_orphans(folder)
    gc = subprocess.run([nsbuild_command(), "gc"], env=env, stdin=subprocess.DEVNULL,
                        capture_output=True, text=True)  # fmt: skip
    if gc.returncode != 0:
        sys.stderr.write(f"nsbuild farm: nsbuild gc: {printable(gc.stderr.strip(), 500)}\n")
    if daemons.pid_of(folder) is None:
        daemons.run_tool([daemons.tool("buildbot-worker"), "start", str(folder)], env=env)
