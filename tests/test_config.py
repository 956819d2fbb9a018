"""The user's configuration file and `nsbuild config`, as a user sees them:
the settings shown with where each came from, the command line over the
file, and every bad file refused in one line naming file, key and problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nsbuild.cli.buildopts import COMMAND_STAGES, OPTIONS, REFUSED
from nsbuild.debbuild.hooks import STAGES


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DEB_BUILD_PROFILES", "DEB_BUILD_OPTIONS")}  # fmt: skip
    env.update(XDG_CONFIG_HOME=str(home / "config"), XDG_CACHE_HOME=str(home / "cache"))
    env.update(extra)
    return env


def _nsbuild(home: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nsbuild", *args], env=_env(home, **extra),
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def _write(home: Path, text: str) -> Path:
    path = home / "config" / "nsbuild" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _settings(home: Path, *args: str, **extra: str) -> dict[str, dict[str, object]]:
    r = _nsbuild(home, "config", "--json", *args, **extra)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["file"] == str(home / "config" / "nsbuild" / "config.toml")
    settings: dict[str, dict[str, object]] = doc["settings"]
    return settings


def _one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_the_command_stages_are_the_hooks_stages() -> None:
    assert COMMAND_STAGES == STAGES


def test_every_option_has_one_spelling() -> None:
    flags = [f for o in OPTIONS for f in o.flags] + list(REFUSED)
    assert len(flags) == len(set(flags))


def test_without_a_file_every_setting_is_its_default(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert settings["arch-any"] == {"value": True, "from": "default"}
    assert settings["arch-all"] == {"value": True, "from": "default"}
    assert settings["source"] == {"value": False, "from": "default"}
    assert settings["purge-build"] == {"value": "always", "from": "default"}
    assert settings["env"] == {"value": None, "from": "default"}
    r = _nsbuild(tmp_path, "config")
    assert r.returncode == 0, r.stderr
    assert "(no such file)" in r.stdout
    assert "purge-build = \"always\"  # default" in r.stdout.splitlines()


def test_the_file_gives_defaults_and_the_command_line_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, """\
[build]
jobs = 3
no-arch-all = true
chroot = "sid"
lintian-opts = "--info --display-info"
extra-repository = ["deb http://deb.example.org/debian bookworm main"]
extra-repository-key = "~/example.asc"
run-lintian = true
""")
    settings = _settings(tmp_path)
    assert settings["jobs"] == {"value": 3, "from": str(path)}
    assert settings["arch-all"] == {"value": False, "from": str(path)}
    assert settings["env"] == {"value": "sid", "from": str(path)}
    assert settings["lintian-opts"] == {"value": ["--info", "--display-info"], "from": str(path)}
    assert settings["extra-repository-key"]["value"] == [os.path.expanduser("~/example.asc")]
    assert settings["run-lintian"] == {"value": True, "from": str(path)}

    settings = _settings(tmp_path, "-j", "5", "-A", "-c", "bookworm", "--no-run-lintian",
                         "--lintian-opt", "-I",
                         "--extra-repository", "deb http://b.example.org/debian bookworm main")
    assert settings["jobs"] == {"value": 5, "from": "command line"}
    assert settings["arch-all"] == {"value": True, "from": "command line"}
    assert settings["env"] == {"value": "bookworm", "from": "command line"}
    assert settings["run-lintian"] == {"value": False, "from": "command line"}
    # Repeatable options: the file's entries first, then the command line's (sbuild's order).
    both = f"{path} + command line"
    assert settings["lintian-opts"] == {"value": ["--info", "--display-info", "-I"], "from": both}
    assert settings["extra-repository"] == {
        "value": ["deb http://deb.example.org/debian bookworm main",
                  "deb http://b.example.org/debian bookworm main"],
        "from": both,
    }
    # The text form says the same, in the file's own syntax.
    r = _nsbuild(tmp_path, "config", "-j", "5")
    assert "jobs = 5  # command line" in r.stdout.splitlines()
    assert f"arch-all = false  # {path}" in r.stdout.splitlines()


def test_the_build_reads_the_file(tmp_path: Path) -> None:
    """A build refused for what only the file says: the file is read, before any work."""
    _write(tmp_path, "[build]\nno-arch-any = true\nno-arch-all = true\n")
    r = _nsbuild(tmp_path, "build", "nosuch.dsc")
    _one_line_error(r, "nothing to build")
    # The command line puts back what the file took away.
    r = _nsbuild(tmp_path, "config", "--arch-any", "--json")
    assert json.loads(r.stdout)["settings"]["arch-any"]["value"] is True


def test_profiles_default_to_the_callers_DEB_BUILD_PROFILES(tmp_path: Path) -> None:
    settings = _settings(tmp_path, DEB_BUILD_PROFILES="nocheck nodoc")
    assert settings["profiles"] == {"value": ["nocheck", "nodoc"],
                                    "from": "environment (DEB_BUILD_PROFILES)"}
    settings = _settings(tmp_path, "-P", "nocheck,noudeb", DEB_BUILD_PROFILES="nodoc")
    assert settings["profiles"] == {"value": ["nocheck", "noudeb"], "from": "command line"}
    _one_line_error(_nsbuild(tmp_path, "config", "-P", "No Such"), "-P", "No")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[build]\njobs = \n", ("config.toml", "not valid TOML")),
        ("[build]\nnosuchkey = 1\n", ("config.toml", "nosuchkey", "unknown key")),
        ("jobs = 3\n", ("config.toml", "jobs", "[build]")),
        ("[build]\njobs = 0\n", ("config.toml", "jobs", "at least 1")),
        ("[build]\njobs = true\n", ("config.toml", "jobs", "expected")),
        ("[build]\narch-all = \"no\"\n", ("config.toml", "arch-all", "true or false")),
        ("[build]\narch-all = true\nno-arch-all = true\n", ("config.toml", "no-arch-all")),
        ("[build]\npurge-build = \"sometimes\"\n", ("config.toml", "purge-build", "sometimes")),
        ("[build]\nadd-depends = [1]\n", ("config.toml", "add-depends", "list of strings")),
        ("[build]\nkeyid = \"x\"\n", ("config.toml", "keyid", "unknown key")),
        ("\xff", ("config.toml", "UTF-8")),
    ],
)
def test_a_bad_file_is_refused_in_one_line(
    tmp_path: Path, text: str, words: tuple[str, ...]
) -> None:
    path = _write(tmp_path, "")
    path.write_bytes(text.encode("latin-1"))
    for command in (("config",), ("build", "nosuch.dsc")):
        _one_line_error(_nsbuild(tmp_path, *command), *words)


def test_a_file_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    path.unlink()
    path.mkdir()
    _one_line_error(_nsbuild(tmp_path, "config"), str(path), "not a regular file")
