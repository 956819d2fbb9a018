"""Builders per ENV/ARCH: names that cannot be confused, and a builder
chosen by what it builds (its tags), not by splitting its name."""

from __future__ import annotations

from pathlib import Path

import pytest

from nsbuild.farm import settings
from nsbuild.farm.errors import FarmError


def _master(tmp_path: Path, *envs: tuple[str, ...]) -> Path:
    folder = tmp_path / "m"
    folder.mkdir(mode=0o700)
    s = settings.MasterSettings(8010, 9989, "127.0.0.1", "p" * 32)
    settings.write_json(folder / settings.MASTER_FILE, s.to_json())
    for i, pairs in enumerate(envs):
        settings.register(folder, settings.WorkerEntry(f"w{i}", "q" * 32, pairs))
    return folder


def test_two_pairs_of_one_builder_name_are_refused(tmp_path: Path) -> None:
    from nsbuild.farm.buildbot import master_config

    folder = _master(tmp_path, ("foo-hurd/i386",))
    # Refused when registered: else the master would not start again.
    with pytest.raises(FarmError, match="foo-hurd-i386"):
        settings.register(folder, settings.WorkerEntry("w1", "r" * 32, ("foo/hurd-i386",)))
    assert [w.name for w in settings.workers(folder)] == ["w0"]
    # A registry edited by hand: the master's configuration says which.
    doc = settings.read_json(folder / settings.WORKERS_FILE)
    doc["w1"] = {"password": "r" * 32, "envs": ["foo/hurd-i386"]}
    settings.write_json(folder / settings.WORKERS_FILE, doc)
    with pytest.raises(FarmError, match="foo-hurd-i386"):
        master_config(folder)


def test_builders_say_what_they_build_in_tags(tmp_path: Path) -> None:
    from nsbuild.farm.buildbot import master_config

    folder = _master(tmp_path, ("foo/hurd-i386", "bookworm/amd64"))
    tags = {b.name: b.tags for b in master_config(folder)["builders"]}
    assert tags == {"bookworm-amd64": ["env=bookworm", "arch=amd64"],
                    "foo-hurd-i386": ["env=foo", "arch=hurd-i386"]}  # fmt: skip


def test_the_worker_port_may_listen_wider_than_the_web(tmp_path: Path) -> None:
    from nsbuild.farm.buildbot import master_config

    folder = _master(tmp_path, ("bookworm/amd64",))
    doc = settings.read_json(folder / settings.MASTER_FILE)
    settings.write_json(folder / settings.MASTER_FILE, {**doc, "pb_interface": "0.0.0.0"})
    c = master_config(folder)
    assert c["protocols"]["pb"]["port"] == "tcp:9989:interface=0.0.0.0"
    assert c["www"]["port"] == "tcp:8010:interface=127.0.0.1"
    assert c["buildbotURL"] == "http://127.0.0.1:8010/"


def test_the_web_password_never_goes_over_plain_http_to_another_machine() -> None:
    from nsbuild.farm.rest import Rest

    with pytest.raises(FarmError, match="https"):
        Rest("http://nsbuild-no-such-host.invalid:8010/", "nsbuild", "p" * 32).login()


def test_a_second_worker_of_a_name_does_not_replace_the_first(tmp_path: Path) -> None:
    folder = _master(tmp_path, ("bookworm/amd64",))
    settings.register(folder, settings.WorkerEntry("w0", "q" * 32, ("bookworm/arm64",)))
    with pytest.raises(FarmError, match="w0"):
        settings.register(folder, settings.WorkerEntry("w0", "r" * 32, ("bookworm/amd64",)))
    assert [w.envs for w in settings.workers(folder)] == [("bookworm/arm64",)]


def test_workers_are_registered_only_in_a_masters_folder(tmp_path: Path) -> None:
    with pytest.raises(FarmError, match="not a farm master"):
        settings.register(tmp_path, settings.WorkerEntry("w0", "q" * 32, ("bookworm/amd64",)))


@pytest.mark.parametrize("doc", ["[1]", '{"w0": {"envs": []}}', '{"w0": {"password": 5}}'])
def test_a_bad_registry_is_one_line(tmp_path: Path, doc: str) -> None:
    folder = _master(tmp_path)
    (folder / settings.WORKERS_FILE).write_text(doc)
    with pytest.raises(FarmError, match=settings.WORKERS_FILE):
        settings.workers(folder)


def test_a_bad_note_of_the_local_master_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "nsbuild").mkdir()
    (tmp_path / "nsbuild" / "farm-master.json").write_text("[]")
    with pytest.raises(FarmError, match=r"farm-master\.json"):
        settings.local_master()


def test_a_worker_of_another_hosts_master_is_not_registered_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nsbuild.farm import worker

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    folder = _master(tmp_path)
    settings.note_local_master(folder)
    assert worker.local_master_for("127.0.0.1:9989") == folder
    assert worker.local_master_for("localhost:9989") == folder
    assert worker.local_master_for("build-master.invalid:9989") is None
    assert worker.local_master_for("127.0.0.1:9990") is None


def test_a_dsc_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    import os
    import threading

    from nsbuild.farm.dscfiles import dsc_files

    fifo = tmp_path / "x_1.dsc"
    os.mkfifo(fifo)
    said: list[BaseException] = []

    def read() -> None:
        try:
            dsc_files(fifo)
        except BaseException as e:
            said.append(e)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():  # unblock it, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("reading a FIFO .dsc blocked")
    assert said and isinstance(said[0], FarmError)


def test_a_root_worker_needs_saying_so() -> None:
    from nsbuild.farm import worker

    with pytest.raises(FarmError, match="--as-root"):
        worker.check_user(0, as_root=False)
    worker.check_user(0, as_root=True)
    worker.check_user(1000, as_root=False)


def test_an_ipv6_interface_is_a_listener_and_a_url(tmp_path: Path) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from nsbuild.farm.buildbot import master_config

    folder = tmp_path / "m"
    folder.mkdir(mode=0o700)
    s = settings.MasterSettings(8010, 9989, "::1", "p" * 32)
    settings.write_json(folder / settings.MASTER_FILE, s.to_json())
    c = master_config(folder)
    assert c["buildbotURL"] == "http://[::1]:8010/"
    for port in (c["www"]["port"], c["protocols"]["pb"]["port"]):
        assert serverFromString(reactor, port)._interface == "::1"


def test_a_build_error_idles_a_worker_seconds_not_an_hour(tmp_path: Path) -> None:
    from nsbuild.farm.buildbot import master_config

    folder = _master(tmp_path, ("bookworm/amd64",))
    (w,) = master_config(folder)["workers"]
    # Buildbot doubles the pause from the initial one up to the maximum.
    assert w.quarantine_initial_timeout == w.quarantine_max_timeout == 5
