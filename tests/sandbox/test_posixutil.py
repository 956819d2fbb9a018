"""posixutil: the os conveniences of the run path, checked against os itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nsbuild.sandbox import posixutil

# Paths made of the parts that matter to path arithmetic.
paths = st.lists(st.sampled_from(["", ".", "..", "a", "b.c", "..d", " "]), max_size=8).map(
    "/".join)


@given(paths, st.booleans())
def test_normalize_is_normpath(path: str, rooted: bool) -> None:
    path = "/" + path if rooted else path
    # os.path.normpath keeps a leading "//" (POSIX leaves it to the system);
    # a mount destination or a bind source never needs that.
    assert posixutil.normalize(path) == os.path.normpath(path).replace("//", "/", 1)


@given(paths, st.booleans())
def test_split_is_os_path_split(path: str, rooted: bool) -> None:
    path = "/" + path if rooted else path
    assert posixutil.split(path) == os.path.split(path)


def test_absolute_and_real(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to("dir")
    monkeypatch.chdir(tmp_path)
    assert posixutil.absolute("link/../dir/.") == str(tmp_path / "dir")
    assert posixutil.real("link") == os.path.realpath(tmp_path / "link")
    assert (posixutil.is_link("link"), posixutil.is_dir("link"), posixutil.exists("link")) \
        == (True, True, True)
    assert not posixutil.exists("missing") and not posixutil.is_dir("missing")
    with pytest.raises(FileNotFoundError):
        posixutil.real("missing")


def test_environment_is_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NSBUILD_TEST_VALUE", "caf\udce9")  # undecodable byte, kept
    assert posixutil.environ() == dict(os.environ)
    assert posixutil.getenv("NSBUILD_TEST_VALUE") == os.environ["NSBUILD_TEST_VALUE"]
    assert posixutil.getenv("NSBUILD_TEST_NOT_SET") is None
