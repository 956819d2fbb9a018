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

    folder = _master(tmp_path, ("foo-hurd/i386",), ("foo/hurd-i386",))
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
