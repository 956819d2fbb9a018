"""`farm submit --wait` and `farm status` against a master that answers
with escape sequences and malformed JSON: one line of text, escaped, or a
one-line error; never a traceback, never a raw escape on the terminal.
A real HTTP server in the test plays the master."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nsbuild.farm import submit
from nsbuild.farm.errors import FarmError
from nsbuild.farm.rest import Rest

ESC = "\x1b]0;owned\x07\x1b[2J"

ANSWERS: dict[str, object] = {
    "builders": {"builders": [
        {"builderid": 1, "name": "bookworm-amd64", "tags": ["env=bookworm", "arch=amd64"]},
        {"builderid": 2, "name": "x" + ESC, "tags": ["env=x"]},
        {"builderid": 3, "name": "foo-hurd-i386", "tags": ["env=foo", "arch=hurd-i386"]}]},
    "workers": {"workers": [{"workerid": 7, "name": "w" + ESC}]},
    # --wait asks for its requests by buildrequestid, then for the running builds.
    "buildrequests?ids": {"buildrequests": [
        {"buildrequestid": 5, "complete": True, "builderid": 2},
        {"buildrequestid": 6, "complete": True}, {"buildrequestid": ESC, "complete": True}]},
    "builds": {"builds": [{"buildrequestid": 6, "workerid": 7, "buildid": 3}]},
    "buildrequests/5/builds": {"builds": [{"workerid": 7, "buildid": "not a number"}]},
    "buildrequests/6/builds": {"builds": [
        {"workerid": 7, "buildid": 3, "properties": ["not", "a dict"]},
        {"workerid": 7, "buildid": 2, "properties": {ESC: ESC}}]},
    "buildrequests": {"buildrequests": [{"buildrequestid": ESC, "builderid": 2}]},
    f"buildrequests/{ESC}": ["not", "an", "object"],
    f"buildrequests/{ESC}/builds": {"builds": [{"workerid": 7}]},
}


class _Master(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        from urllib.parse import parse_qs, unquote, urlsplit

        parts = urlsplit(self.path)
        path = unquote(parts.path).removeprefix("/api/v2/")
        if "buildrequestid" in parse_qs(parts.query):
            path += "?ids"
        body = json.dumps(ANSWERS.get(path, {})).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def rest() -> Iterator[Rest]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Master)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield Rest(f"http://127.0.0.1:{server.server_address[1]}/")
    finally:
        server.shutdown()
        server.server_close()


def test_waiting_on_a_hostile_master_prints_no_escape(rest: Rest) -> None:
    said: list[str] = []
    jobs = [submit.Submitted("a.dsc", "bookworm-amd64", 5),
            submit.Submitted("b.dsc", "bookworm-amd64", 6)]  # fmt: skip
    submit.wait(rest, jobs, said.append)
    text = "\n".join(said) + submit.table(jobs)
    assert "\x1b" not in text and "\x07" not in text
    assert said == ["a.dsc: done", "b.dsc: done"]
    assert jobs[1].build is not None and jobs[1].build["worker"].startswith("w")
    assert jobs[1].properties == {}  # not an object: nothing taken from it


def test_status_of_a_hostile_master_prints_no_escape(rest: Rest) -> None:
    text = submit.queue(rest)
    assert "\x1b" not in text and "\x07" not in text


def test_a_builder_name_with_escapes_is_not_taken(rest: Rest) -> None:
    assert submit.choose_builder(rest, "bookworm", None) == "bookworm-amd64"
    # Chosen by its tags: "foo-hurd-i386" split at its last "-" is not foo/hurd-i386.
    assert submit.choose_builder(rest, "foo", "hurd-i386") == "foo-hurd-i386"
    with pytest.raises(FarmError) as e:
        submit.choose_builder(rest, "x", None)
    assert "\x1b" not in str(e.value)


def test_results_fetched_are_debian_names_and_write_over_nothing_of_the_users(
    tmp_path: Path,
) -> None:
    master = tmp_path / "master"
    results = master / "results" / "bookworm-amd64" / "1"
    results.mkdir(parents=True)
    for name in ("Makefile", "conftest.py", "x_1_all.deb", "x_1_amd64.changes"):
        (results / name).write_text(f"from the worker: {name}\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "Makefile").write_text("the user's own\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("the user's own\n")
    (out / "x_1_all.deb").symlink_to(elsewhere)
    job = submit.Submitted("x.dsc", "bookworm-amd64", 1, properties={
        "nsbuild_package": ["x", "nsbuild"], "nsbuild_version": ["1", "nsbuild"],
        "nsbuild_results": ["results/bookworm-amd64/1", "nsbuild"],
        "nsbuild_files": [["Makefile", "conftest.py", "x_1_all.deb", "x_1_amd64.changes"],
                          "nsbuild"]})  # fmt: skip
    got = submit.fetch(master, job, out)
    assert sorted(p.name for p in got) == ["x_1_all.deb", "x_1_amd64.changes"]
    assert (out / "Makefile").read_text() == "the user's own\n"
    assert not (out / "conftest.py").exists()
    assert elsewhere.read_text() == "the user's own\n"
    assert not (out / "x_1_all.deb").is_symlink()
    assert (out / "x_1_all.deb").read_text() == "from the worker: x_1_all.deb\n"


def test_input_is_checked_whole_before_anything_is_submitted(tmp_path: Path) -> None:
    good = tmp_path / "a_1.dsc"
    good.write_text("Format: 1.0\nSource: a\nFiles:\n 00 1 a_1.tar.gz\n")
    (tmp_path / "a_1.tar.gz").write_text("x")
    bad = tmp_path / "b_1.dsc"
    bad.write_text("Format: 1.0\nSource: b\nFiles:\n 00 1 b_1.tar.gz\n")
    master = tmp_path / "master"
    master.mkdir(mode=0o700)
    # No master answers at this URL: a request would be a connection error.
    rest = Rest("http://127.0.0.1:9/")
    with pytest.raises(FarmError, match=r"b_1\.tar\.gz is missing"):
        submit.submit(rest, "bookworm-amd64", master, [good, bad], [])
    with pytest.raises(FarmError, match="not a package"):
        submit.submit(rest, "bookworm-amd64", None, [], ["hello", "Bad Name"])
    assert not (master / "sources").exists()


def test_waiting_outlasts_a_master_restart() -> None:
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    servers: list[http.server.HTTPServer] = []

    def come_back() -> None:
        time.sleep(2)
        server = http.server.HTTPServer(("127.0.0.1", port), _Master)
        servers.append(server)
        server.serve_forever()

    threading.Thread(target=come_back, daemon=True).start()
    said: list[str] = []
    try:
        submit.wait(Rest(f"http://127.0.0.1:{port}/"),
                    [submit.Submitted("b.dsc", "bookworm-amd64", 6)], said.append)  # fmt: skip
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert said[-1] == "b.dsc: done"


def test_a_build_whose_uploads_failed_is_not_built() -> None:
    job = submit.Submitted("x.dsc", "bookworm-amd64", 1, build={"results": 4},
                           properties={"nsbuild_status": ["built", "nsbuild"]})  # fmt: skip
    assert submit.status_of(job) == "error"
    job.build = {"results": 0}
    assert submit.status_of(job) == "built"


def test_step_names_fit_buildbots_limit() -> None:
    from nsbuild.farm.steps import STEP_NAME_LIMIT, step_name

    long = "python-pip_23.0.1+dfsg-1_amd64.network.jsonl"
    name = step_name("upload", long)
    assert len(name) == STEP_NAME_LIMIT <= 50 - len("_9")
    assert name.startswith("upload python-pip_") and name.endswith("network.jsonl")
    assert step_name("upload", "x.deb") == "upload x.deb"
