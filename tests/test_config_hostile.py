"""The configuration file as an attacker would write it: TOML that breaks
the parser, and a file another user can write (its commands run as the
caller, its keys and repositories are trusted). Each is refused in one line
naming the file, exit status 2, before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _nsbuild(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DEB_BUILD_PROFILES", "DEB_BUILD_OPTIONS")}  # fmt: skip
    env.update(XDG_CONFIG_HOME=str(home / "config"), XDG_CACHE_HOME=str(home / "cache"))
    return subprocess.run([sys.executable, "-m", "nsbuild", *args], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def _write(home: Path, text: str, mode: int = 0o644) -> Path:
    path = home / "config" / "nsbuild" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def _refused(home: Path, path: Path, *words: str) -> None:
    """`nsbuild config` and `nsbuild build` both refuse the file in one line."""
    for args in (("config",), ("build", str(home / "nosuch.dsc"))):
        r = _nsbuild(home, *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
        lines = r.stderr.splitlines()
        assert len(lines) == 1, r.stderr[-2000:]
        for word in (str(path), *words):
            assert word in lines[0], lines[0]


@pytest.mark.parametrize(
    "value",
    [
        "[" * 100_000 + "]" * 100_000,  # deeper than Python's recursion limit
        "{a = " * 50_000 + "1" + "}" * 50_000,
        "9" * 5000,  # more digits than Python converts to an integer
    ],
    ids=["arrays", "inline-tables", "huge-integer"],
)
def test_toml_that_breaks_the_parser_is_one_line(tmp_path: Path, value: str) -> None:
    path = _write(tmp_path, f"[build]\njobs = {value}\n")
    _refused(tmp_path, path, "not valid TOML")


def test_a_file_anyone_may_write_is_not_used(tmp_path: Path) -> None:
    path = _write(tmp_path, '[build]\npre-build-commands = ["touch /tmp/owned"]\n', 0o666)
    _refused(tmp_path, path, "writable by others", "chmod go-w")


def test_the_users_own_file_through_a_link_is_used(tmp_path: Path) -> None:
    # Dotfile managers (stow, home-manager) link the file from elsewhere.
    real = tmp_path / "dotfiles" / "config.toml"
    real.parent.mkdir()
    real.write_text("[build]\njobs = 3\n")
    link = tmp_path / "config" / "nsbuild" / "config.toml"
    link.parent.mkdir(parents=True)
    link.symlink_to(real)
    r = _nsbuild(tmp_path, "config")
    assert r.returncode == 0, r.stderr
    assert f"jobs = 3  # {link}" in r.stdout


@pytest.mark.root
def test_another_users_file_is_not_used(tmp_path: Path) -> None:
    # Root's HOME kept by `sudo` names the user's file; or a user's
    # XDG_CONFIG_HOME on a shared folder: its commands would run as the caller.
    if os.geteuid() != 0:
        pytest.fail("a root test: run it as root (-m root)")
    tmp_path.chmod(0o755)
    path = _write(tmp_path, '[build]\npre-build-commands = ["touch /tmp/owned"]\n')
    os.chown(path, 65534, 65534)
    _refused(tmp_path, path, "owned by uid 65534", "not by you")
    # Root's own file, writable by a group that is not root's: refused too.
    os.chown(path, 0, 65534)
    path.chmod(0o664)
    _refused(tmp_path, path, "writable by others (mode 0664)")
    path.chmod(0o644)
    r = _nsbuild(tmp_path, "config")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85", "\x1b"])
def test_a_line_break_python_sees_in_a_name_is_refused(tmp_path: Path, char: str) -> None:
    # python-debian (and any splitlines()) would read "Files: ..." as a field
    # of the .changes that dpkg-genchanges wrote with this Maintainer.
    value = f"Mallory{char}Files: 0 0 evil.deb"
    r = _nsbuild(tmp_path, "build", "--maintainer", value, str(tmp_path / "x.dsc"))
    assert r.returncode == 2, r.stderr
    assert "--maintainer" in r.stderr and "line separator" in r.stderr, r.stderr
    path = _write(tmp_path, f"[build]\nuploader = {json.dumps(value)}\n")
    _refused(tmp_path, path, "uploader", "line separator")
