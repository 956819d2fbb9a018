"""Attacks on the farm through what names a file: a `dsc` property asked of
the master's force scheduler that leads out of its sources/ folder, and a
results folder a master's answer names outside the master's folder. The
real farm of the session (master and workers) for the first; real files
for the second."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from inputs import fixture_dsc

from nsbuild.farm import submit
from nsbuild.farm.dscfiles import dsc_files
from nsbuild.farm.rest import Rest

from .conftest import WORKERS, Farm

# A source package of the user's outside the master's sources/.
PRIVATE = "hello_2.10-3"


def _rest(farm: Farm) -> Rest:
    password = json.loads((farm.master / "nsbuild-master.json").read_text())["password"]
    return Rest(farm.url, "nsbuild", password)


def _private(farm: Farm) -> Path:
    """The .dsc and its files, all present, in a folder beside the master."""
    folder = farm.root / "private"
    if not folder.is_dir():
        folder.mkdir()
        dsc = fixture_dsc(PRIVATE)
        for n in [dsc.name, *dsc_files(dsc)]:
            shutil.copy(dsc.parent / n, folder / n)
    link = farm.master / "sources" / "attack-link"
    link.parent.mkdir(exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(folder)
    return folder


def _sent_to_workers(farm: Farm) -> list[str]:
    found = []
    for name in WORKERS:
        for _dirpath, _dirs, files in os.walk(farm.root / name):
            found += [f for f in files if f.startswith("hello_")]
    return found


@pytest.mark.parametrize("dsc", [
    f"sources/../../private/{PRIVATE}.dsc",
    f"sources/attack/../../../private/{PRIVATE}.dsc",
    f"ABSOLUTE/{PRIVATE}.dsc",
    f"sources/attack-link/{PRIVATE}.dsc",
])  # fmt: skip
def test_a_dsc_property_leading_out_of_sources_is_an_error(farm: Farm, dsc: str) -> None:
    """Whoever holds the web password chooses the property: only a .dsc
    under the master's sources/ (links resolved) goes to a worker, never a
    source package elsewhere on the master's machine."""
    folder = _private(farm)
    dsc = dsc.replace("ABSOLUTE", str(folder))
    assert (farm.master / dsc).resolve().is_file()
    rest = _rest(farm)
    job = submit.Submitted(dsc, "bookworm-amd64", rest.force("build", "bookworm-amd64", dsc=dsc))
    submit.wait(rest, [job], lambda _: None)
    assert submit.status_of(job) == "error"
    assert _sent_to_workers(farm) == []


def _job(where: str) -> submit.Submitted:
    return submit.Submitted("x.dsc", "bookworm-amd64", 1, properties={
        "nsbuild_results": [where, "nsbuild"],
        "nsbuild_files": [["x_1_all.deb"], "nsbuild"]})  # fmt: skip


@pytest.mark.parametrize("where", ["../elsewhere", "results/../../elsewhere", "ELSEWHERE",
                                   "results/link"])  # fmt: skip
def test_results_are_fetched_from_the_masters_folder_only(tmp_path: Path, where: str) -> None:
    """A master's answer names the results folder: one outside the master's
    folder (by .., an absolute path or a link) gives nothing."""
    master = tmp_path / "master"
    (master / "results").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x_1_all.deb").write_text("not the master's\n")
    (master / "results" / "link").symlink_to(elsewhere)
    out = tmp_path / "out"
    assert submit.fetch(master, _job(where.replace("ELSEWHERE", str(elsewhere))), out) == []
    assert not (out / "x_1_all.deb").exists()
