"""`nsbuild build --log-file FILE`: the .build log also written to FILE as
the build runs, and still delivered under its usual name; a FILE that is
not the caller's own regular file refused before the build starts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import Env, make_package

pytestmark = [pytest.mark.userns]


@pytest.mark.slow
def test_the_log_file_is_the_delivered_build_log(bookworm: Env, tmp_path: Path) -> None:
    tree = make_package(tmp_path, "nsb-logfile", build="echo nsb-logfile: compiling")
    copy = tmp_path / "live.log"
    # An older file there is the caller's: emptied, not appended to.
    copy.write_text("an older build's log\n")
    done = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(tmp_path / "out"),
                            "--json", "--log-file", str(copy), str(tree))  # fmt: skip
    assert done.returncode == 0, done.stderr
    delivered = Path(json.loads(done.stdout)["log"])
    assert delivered == tmp_path / "out" / "nsb-logfile_1.0_amd64.build"
    text = copy.read_text()
    assert text == delivered.read_text()
    assert "nsb-logfile: compiling" in text
    assert "| Build " in text
    assert "Status: successful" in text
    assert copy.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_a_log_file_that_is_not_a_plain_file_is_refused_first(
    bookworm: Env, tmp_path: Path, kind: str
) -> None:
    target = tmp_path / "precious"
    target.write_text("not to be touched\n")
    at = tmp_path / "build.log"
    if kind == "symlink":
        at.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(at)
    else:
        at.mkdir()
    out = tmp_path / "out"
    # "missing" is an environment whose tarball does not exist: the refusal
    # comes before any environment is touched.
    done = bookworm.nsbuild("build", "--env", "missing", "--out", str(out),
                            "--log-file", str(at), str(tmp_path / "no-such.dsc"))  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"nsbuild build: --log-file {at}: ")
    expected = {"symlink": "a symbolic link, not followed", "fifo": "not a regular file",
                "directory": "not a regular file"}[kind]  # fmt: skip
    assert line.endswith(expected), line
    assert target.read_text() == "not to be touched\n"
    assert not out.exists()
