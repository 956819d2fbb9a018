"""A source package is checked before any environment is touched."""

from __future__ import annotations

from pathlib import Path

import pytest
from inputs import fixture_dsc

from nsbuild.cli.exits import exit_status
from nsbuild.debbuild.dsc import load_dsc
from nsbuild.debbuild.errors import BuildInputError


def test_fixture_packages_are_valid() -> None:
    hello = load_dsc(fixture_dsc("hello_2.10-3"))
    assert (hello.source, hello.version) == ("hello", "2.10-3")
    assert hello.build_depends == "debhelper-compat (= 13), help2man, texinfo"
    assert [f.name for f in hello.files] == [
        "hello_2.10.orig.tar.gz",
        "hello_2.10.orig.tar.gz.asc",
        "hello_2.10-3.debian.tar.xz",
    ]
    assert hello.distribution() == "unstable"
    pv = load_dsc(fixture_dsc("pv_1.6.20-1"))
    assert pv.build_depends == "debhelper (>= 10~)"


def _error(path: Path) -> str:
    with pytest.raises(BuildInputError) as info:
        load_dsc(path)
    assert exit_status(info.value) == 2
    return str(info.value)


def test_missing_dsc(tmp_path: Path) -> None:
    assert "cannot read" in _error(tmp_path / "nothing_1.0.dsc")


def test_missing_listed_file(hello_copy: Path) -> None:
    (hello_copy.parent / "hello_2.10-3.debian.tar.xz").unlink()
    assert "hello_2.10-3.debian.tar.xz is missing" in _error(hello_copy)


def test_checksum_mismatch_same_size(hello_copy: Path) -> None:
    f = hello_copy.parent / "hello_2.10.orig.tar.gz.asc"
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF
    f.write_bytes(bytes(data))
    msg = _error(hello_copy)
    assert "checksum mismatch for hello_2.10.orig.tar.gz.asc" in msg
    assert "Checksums-Sha256" in msg


def test_size_mismatch(hello_copy: Path) -> None:
    f = hello_copy.parent / "hello_2.10.orig.tar.gz.asc"
    f.write_bytes(f.read_bytes() + b"x")
    assert "size mismatch for hello_2.10.orig.tar.gz.asc" in _error(hello_copy)


def test_md5_used_when_no_sha256(hello_copy: Path) -> None:
    text = hello_copy.read_text()
    start = text.index("Checksums-Sha1:")
    end = text.index("Files:")
    hello_copy.write_text(text[:start] + text[end:])
    assert load_dsc(hello_copy).files[0].sha256 is None
    f = hello_copy.parent / "hello_2.10.orig.tar.gz.asc"
    data = bytearray(f.read_bytes())
    data[0] ^= 1
    f.write_bytes(bytes(data))
    assert "(Files)" in _error(hello_copy)


def test_not_text(tmp_path: Path) -> None:
    p = tmp_path / "x_1.dsc"
    p.write_bytes(b"\xff\xfe\x00garbage")
    assert "not UTF-8" in _error(p)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("", "no fields"),
        ("Source: xy\nVersion: 1\n", "no Format"),
        ("Format: 1.0\nVersion: 1\n", "no Source"),
        ("Format: 1.0\nSource: Bad_Name\nVersion: 1\nFiles:\n", "bad Source"),
        ("Format: 1.0\nSource: xy\nVersion: 1\n", "no Checksums-Sha256 or Files"),
        ("Format: 1.0\nSource: xy\nVersion: 1\nFiles:\n abc 12\n", "bad Files line"),
        ("Format: 1.0\nSource: xy\nVersion: 1\nFiles:\n abc 1 ../../etc/passwd\n", "not plain"),
        ("Format: 1.0\nSource: xy\nVersion: 1\n\nFormat: 1.0\n", "more than one paragraph"),
        (
            "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nFormat: 1.0\n",
            "broken PGP signature",
        ),
    ],
)
def test_malformed(tmp_path: Path, body: str, expected: str) -> None:
    p = tmp_path / "x_1.dsc"
    p.write_text(body)
    assert expected in _error(p)


def test_checksum_fields_must_agree(hello_copy: Path) -> None:
    text = hello_copy.read_text()
    files_at = text.index("Files:")
    tail = text[files_at:].replace("819 hello_2.10.orig.tar.gz.asc", "819 other.asc")
    hello_copy.write_text(text[:files_at] + tail)
    assert "list different files" in _error(hello_copy)
