"""Attacks on the farm by another local user and by a master's answers,
each seen failing on the hole first: the worker's connection guard for a
master named other than by a loopback literal; farm folders inside a
folder others may write; answers of whatever holds the web port after the
login; results written over files of --out a local build would leave
alone; a master's answer that is not an object; a worker folder left
readable by all."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nsbuild.farm import daemons, master, settings, submit, worker
from nsbuild.farm.errors import FarmError
from nsbuild.farm.rest import Rest

OTHER = os.getuid() + 1  # another user's listener, played by one of ours


# 127.1 and the host's name (127.0.0.1 in its /etc/hosts here) are this
# machine as surely as 127.0.0.1 is.
@pytest.mark.parametrize("host", ["127.1", socket.gethostname()])
def test_a_worker_naming_its_master_otherwise_is_guarded_too(
        config: Path, tmp_path: Path, host: str) -> None:
    assert socket.gethostbyname(host) == "127.0.0.1"
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(5)
        port = int(srv.getsockname()[1])
        setup = worker.create(tmp_path / "w1", f"{host}:{port}", "w1")
        tac = setup.folder / "buildbot.tac"
        mine = f"guard(s, buildmaster_host, port, {os.getuid()}, None)"
        assert mine in tac.read_text()
        settings.write_text(tac, tac.read_text().replace(
            mine, f"guard(s, buildmaster_host, port, {OTHER}, None)"))
        with contextlib.suppress(FarmError):
            daemons.run_tool([daemons.tool("buildbot-worker"), "start", str(setup.folder)],
                             env=worker.environment(setup.folder))
        try:
            srv.settimeout(5)
            with pytest.raises(TimeoutError):
                srv.accept()
        finally:
            daemons.stop(setup.folder)


def test_a_farm_folder_in_a_folder_others_may_write_is_refused(tmp_path: Path) -> None:
    """They could put a folder of theirs (its master.cfg) in its place
    between the check and Buildbot reading it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # no sticky bit: anyone may rename what is in it
    with pytest.raises(FarmError, match="shared"):
        master.create(shared / "m", 1, 2, "127.0.0.1")


class _Fake(http.server.BaseHTTPRequestHandler):
    answers: dict[str, object] = {}

    def do_GET(self) -> None:
        path = self.path.split("?")[0].removeprefix("/api/v2/")
        body = json.dumps(self.answers.get(path, {})).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def fake() -> Iterator[str]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_after_the_login_a_squatter_is_not_believed(fake: str) -> None:
    """--wait outlasts a master restart: whoever binds the port meanwhile
    must not say the build was built, nor where its files are."""
    _Fake.answers = {
        "builds": {"builds": []},
        "buildrequests": {"buildrequests": [{"buildrequestid": 5, "complete": True}]},
        "buildrequests/5/builds": {"builds": [{"buildid": 3, "workerid": 1, "properties": {
            "nsbuild_status": ["built", "x"], "nsbuild_results": ["results/b/1", "x"]}}]}}
    rest = Rest(fake, "nsbuild", "a-password-a-password", owner=OTHER)
    rest.logged_in = True  # logged in to the real master before it went away
    job = submit.Submitted("x.dsc", "b", 5)
    with pytest.raises(FarmError, match="held by uid"):
        submit.wait(rest, [job], lambda _: None)
    with pytest.raises(FarmError, match="held by uid"):
        submit.queue(Rest(fake, owner=OTHER))  # farm status


@pytest.mark.parametrize("answer", [["a", "list"], "error", 5])
def test_an_answer_that_is_no_object_is_one_line(fake: str, answer: object) -> None:
    _Fake.answers = {"builders": answer, "forceschedulers/build": answer}
    with pytest.raises(FarmError):
        submit.choose_builder(Rest(fake), None, None)
    rest = Rest(fake, "nsbuild", "a-password-a-password")
    with pytest.raises(FarmError):
        rest.force("build", "b", dsc="x")


def test_results_write_over_no_file_a_local_build_would_keep(tmp_path: Path) -> None:
    """A local build never replaces another version's .deb in --out (it may
    be another source's), nor the source it was given."""
    results = tmp_path / "master" / "results" / "b" / "1"
    results.mkdir(parents=True)
    names = ["hello_2.10-3.dsc", "openssl_3.0.11-1_amd64.deb", "hello_2.10-3_amd64.deb"]
    out = tmp_path / "out"
    out.mkdir()
    for n in names:
        (results / n).write_text("from the worker\n")
        (out / n).write_text("the user's own\n")
    job = submit.Submitted("hello_2.10-3.dsc", "b", 1, properties={
        "nsbuild_package": ["hello", "nsbuild"], "nsbuild_version": ["2.10-3", "nsbuild"],
        "nsbuild_results": ["results/b/1", "nsbuild"], "nsbuild_files": [names, "nsbuild"]})
    submit.fetch(tmp_path / "master", job, out)
    assert (out / "hello_2.10-3.dsc").read_text() == "the user's own\n"
    assert (out / "openssl_3.0.11-1_amd64.deb").read_text() == "the user's own\n"
    assert (out / "hello_2.10-3_amd64.deb").read_text() == "from the worker\n"


def test_a_worker_folder_made_by_the_user_is_made_private(config: Path, tmp_path: Path) -> None:
    """Its builds' sources and results (umask 022) are under it: a folder
    the user made beforehand (0755) must not show them to every local user."""
    folder = tmp_path / "w1"
    folder.mkdir(mode=0o755)
    worker.create(folder, "127.0.0.1:9989", "w1")
    assert folder.stat().st_mode & 0o077 == 0
