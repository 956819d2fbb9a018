"""Local trust of the farm, without a running farm: the worker's password
kept off command lines and terminals, listeners on the master's ports proved
ours before a password goes to them, farm folders and pid files checked
before anything in them runs or is signalled. Real commands and sockets."""

from __future__ import annotations

import contextlib
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nsbuild.farm import daemons, listeners, master, settings, worker
from nsbuild.farm.errors import FarmError
from nsbuild.farm.rest import Rest

# Every command this process starts, as audit events see it: what
# /proc/PID/cmdline shows every local user.
ARGVS: list[str] = []


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event in ("subprocess.Popen", "os.exec", "os.posix_spawn"):
        ARGVS.append(repr(args))


sys.addaudithook(_audit)


def test_the_worker_password_is_on_no_command_line_and_never_printed(
    config: Path, tmp_path: Path
) -> None:
    ARGVS.clear()
    setup = worker.create(tmp_path / "w1", "127.0.0.1:9989", "w1")
    assert len(setup.password) >= 16
    assert not [a for a in ARGVS if setup.password in a]
    tac = setup.folder / "buildbot.tac"
    assert f"passwd = {setup.password!r}\n" in tac.read_text()
    assert tac.stat().st_mode & 0o777 == 0o600
    # For a master elsewhere: a file of the user's alone, named, not shown.
    line = worker.register_line(setup)
    assert setup.password not in line
    saved = Path(line.split()[-1])
    assert setup.password in saved.read_text()
    assert saved.stat().st_mode & 0o777 == 0o600


class _Answer(http.server.BaseHTTPRequestHandler):
    """Whatever squats on a master's port: JSON to every request."""

    seen: list[str] = []

    def do_GET(self) -> None:
        _Answer.seen.append(self.headers.get("Authorization") or "")
        body = b'{"masters": [{"name": "x"}], "meta": {}}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def squatter() -> Iterator[int]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


# Another user's listener, played by one of ours: the check is told the
# master's user is someone else (no port of a real other user is touched).
OTHER = os.getuid() + 1


def test_the_web_password_goes_only_to_the_masters_users_listener(squatter: int) -> None:
    _Answer.seen.clear()
    with pytest.raises(FarmError, match="held by uid"):
        Rest(f"http://127.0.0.1:{squatter}/", "nsbuild", "secret-secret-secret",
             owner=OTHER).login()  # fmt: skip
    assert _Answer.seen == []  # nothing was sent
    assert [x.uid for x in listeners.listening() if x.port == squatter] == [os.getuid()]


def _master(tmp_path: Path, www: int) -> Path:
    folder = tmp_path / "m"
    assert master.create(folder, www, 1, "127.0.0.1")
    return folder


def test_a_squatter_on_the_web_port_is_not_a_started_master(tmp_path: Path,
                                                             squatter: int) -> None:  # fmt: skip
    folder = _master(tmp_path, squatter)
    # A pid file naming a live process that is not the folder's twistd.
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (folder / "twistd.pid").write_text(f"{sleeper.pid}\n")
        # `farm stop` signals only the folder's own daemon.
        with pytest.raises(FarmError, match="not the master"):
            daemons.stop(folder)
        assert sleeper.poll() is None
        # The stale pid file is dropped, and whatever answers on the web
        # port is not taken for the master started.
        with pytest.raises(FarmError):
            master.start(folder)
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_master_folder_is_private(tmp_path: Path) -> None:
    folder = _master(tmp_path, 1)
    assert folder.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("what", ["folder-mode", "cfg-mode", "symlink"])
def test_a_farm_folder_others_could_change_is_refused(tmp_path: Path, what: str) -> None:
    folder = _master(tmp_path, 1)
    target = folder
    if what == "folder-mode":
        folder.chmod(0o777)
    elif what == "cfg-mode":
        (folder / "master.cfg").chmod(0o666)
    else:
        target = tmp_path / "link"
        target.symlink_to(folder)
    for act in (master.start, daemons.stop, master.reconfig):
        with pytest.raises(FarmError, match=r"writable|symbolic"):
            act(target)
    if what != "cfg-mode":
        with pytest.raises(FarmError, match=r"writable|symbolic"):
            settings.master_settings(target)


class _Deep(_Answer):
    def do_GET(self) -> None:
        body = b"[" * 100_000 + b"]" * 100_000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_a_deeply_nested_answer_is_one_line_not_a_traceback() -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Deep)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(FarmError, match="not JSON"):
            Rest(f"http://127.0.0.1:{server.server_address[1]}/").get("masters")
    finally:
        server.shutdown()
        server.server_close()


def test_the_orphan_killer_ends_only_a_workers_own_commands(tmp_path: Path) -> None:
    real = tmp_path / "real-w1"
    (real / "build").mkdir(parents=True)
    link = tmp_path / "w1"
    link.symlink_to(real)
    marked = daemons.clean_environment(worker.marker(link))
    # A build command the killed worker left, and the user's shell in there.
    orphan = subprocess.Popen(["sleep", "60"], cwd=real / "build", env=marked)
    shell = subprocess.Popen(["sleep", "60"], cwd=real / "build")
    try:
        assert worker.orphans(link) == [orphan.pid]
        worker.end_orphans(link)
        assert orphan.wait(timeout=10) != 0
        assert shell.poll() is None
    finally:
        for p in (orphan, shell):
            p.kill()
            p.wait()


@pytest.mark.parametrize("doc", ['{"name": "w1", "master": "127.0.0.1:9989"}', "[]"])
def test_a_bad_worker_record_is_one_line(config: Path, tmp_path: Path, doc: str) -> None:
    folder = tmp_path / "w1"
    folder.mkdir()
    (folder / settings.WORKER_FILE).write_text(doc)
    (folder / settings.WORKER_FILE).chmod(0o600)
    with pytest.raises(FarmError, match=settings.WORKER_FILE):
        worker.create(folder, "127.0.0.1:9989", "w1")


def test_a_running_worker_does_not_connect_to_another_users_port(
    config: Path, tmp_path: Path
) -> None:
    """The worker reconnects by itself: what holds the master's port then
    is checked by the worker too, not only by `farm worker` at its start."""
    import socket
    import time

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(5)
        port = int(srv.getsockname()[1])
        setup = worker.create(tmp_path / "w1", f"127.0.0.1:{port}", "w1")
        tac = setup.folder / "buildbot.tac"
        text = tac.read_text()
        mine = f"guard(s, buildmaster_host, port, {os.getuid()}, None)"
        assert mine in text
        # The master's user is another: this listener, ours, is not its.
        settings.write_text(tac, text.replace(mine, f"guard(s, buildmaster_host, port, {OTHER}, "
                                                    "None)"))
        # Started as `farm worker` would, without its own check at the start
        # (buildbot-worker start fails when no master answers in 10 s; the
        # daemon stays and keeps trying).
        with contextlib.suppress(FarmError):
            daemons.run_tool([daemons.tool("buildbot-worker"), "start", str(setup.folder)],
                             env=worker.environment(setup.folder))  # fmt: skip
        try:
            srv.settimeout(5)
            with pytest.raises(TimeoutError):
                srv.accept()
            log = setup.folder / "twistd.log"
            deadline = time.monotonic() + 20
            while "held by uid" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert "held by uid" in log.read_text()
        finally:
            daemons.stop(setup.folder)


def test_a_worker_keeps_the_environment_it_was_made_with(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-w1"))
    setup = worker.create(tmp_path / "w1", "127.0.0.1:9989", "w1")
    # Started again later from another shell: its cache is still its own.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.delenv("XDG_CONFIG_HOME")
    env = worker.environment(setup.folder)
    assert env["XDG_CACHE_HOME"] == str(tmp_path / "cache-w1")
    assert env["XDG_CONFIG_HOME"] == str(config)
    assert env[worker.MARKER] == str(setup.folder.resolve())


def test_a_worker_folder_that_cannot_be_written_is_one_line(config: Path, tmp_path: Path) -> None:
    setup = worker.create(tmp_path / "w1", "127.0.0.1:9989", "w1")
    import shutil

    shutil.rmtree(setup.folder / "info")
    (setup.folder / "info").write_text("not a folder\n")
    with pytest.raises(FarmError, match="info"):
        worker.create(setup.folder, "127.0.0.1:9989", "w1")
