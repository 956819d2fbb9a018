"""chroot.d parsing: what a user sees for good, malformed and hostile configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from envs_helpers import chroot_d, nsbuild

from nsbuild.envs.config import load_config, parse_dir
from nsbuild.envs.errors import ConfigError, EnvError


def write(d: Path, name: str, text: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(text)
    return d / name


def test_fields_aliases_and_lookup(tmp_path: Path) -> None:
    write(
        tmp_path,
        "sid",
        "Name: sid\nType: tarball\nPath: /srv/sid.tar\nAliases: unstable,\n UNRELEASED\n"
        "Description: Debian unstable\nSuite: sid\nArchitecture: amd64\n"
        "Mirror: http://deb.debian.org/debian\nBind-Mounts: /srv/data:/data:ro, /src\n\n"
        "# a second paragraph in the same file\nname: here\ntype: host\n",
    )
    config = load_config((tmp_path,))
    sid = config.get("UNRELEASED")
    assert sid.name == "sid" and sid.aliases == ("unstable", "UNRELEASED")
    assert sid.path == Path("/srv/sid.tar") and sid.mirrors == ("http://deb.debian.org/debian",)
    assert [str(b) for b in sid.bind_mounts] == ["/srv/data:/data:ro", "/src:/src"]
    assert config.get("here").type == "host"
    assert sid.source == f"{tmp_path / 'sid'}:1"


def test_user_config_wins_over_system(tmp_path: Path) -> None:
    system, user = tmp_path / "etc", tmp_path / "user"
    write(system, "a", "Name: a\nPath: /system.tar\nAliases: x\n")
    write(user, "a", "Name: a\nPath: /user.tar\n")
    config = load_config((system, user))
    assert config.get("a").path == Path("/user.tar")
    assert config.get("x").path == Path("/system.tar")  # an alias only the system has


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("Name: a\nPath: /a.tar\nColour: blue\n", 3, "unknown field 'Colour'"),
        ("Name: a\nPath: /a.tar\nPath: /b.tar\n", 3, "field Path repeated (first on line 2)"),
        ("Name: a\nType: tarball\n", 1, "needs a Path"),
        ("Name: a\nType: zfs\nPath: /a\n", 2, "bad Type 'zfs'"),
        ("Name: a\njust words\n", 2, "expected 'Field: value'"),
        ("Name: a\nPath: relative.tar\n", 2, "Path must be an absolute path"),
        ("Name: ../etc\nPath: /a.tar\n", 1, "bad Name '../etc'"),
        ("Name: a\nPath: /a.tar\nMirror: ftp://x\n", 3, "bad Mirror"),
        ("Name: a\nPath: /a.tar\nBind-Mounts: /x:rel\n", 3, "destination must be absolute"),
        ("Name: a\nType: host\nPath: /\n", 3, "Type host takes no Path"),
        (" continued\nName: a\n", 1, "continuation line without a field"),
    ],
)
def test_bad_config_names_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    f = write(tmp_path, "bad", text)
    with pytest.raises(ConfigError) as e:
        load_config((tmp_path,))
    assert str(e.value).startswith(f"{f}:{line}: ")
    assert message in str(e.value)


def test_duplicate_name_or_alias_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, "one", "Name: a\nPath: /a.tar\nAliases: b\n")
    f = write(tmp_path, "two", "Name: b\nPath: /b.tar\n")
    with pytest.raises(ConfigError, match=rf"^{f}:1: name 'b' already declared at .*one:1$"):
        parse_dir(tmp_path)


def test_unknown_environment_is_a_clear_error(tmp_path: Path) -> None:
    write(tmp_path, "a", "Name: a\nPath: /a.tar\n")
    with pytest.raises(EnvError, match=r"no environment named 'zz' \(known: a\)"):
        load_config((tmp_path,)).get("zz")


def test_backup_and_hidden_files_are_ignored(tmp_path: Path) -> None:
    write(tmp_path, "a", "Name: a\nPath: /a.tar\n")
    write(tmp_path, "a~", "garbage")
    write(tmp_path, ".hidden", "garbage")
    assert [e.name for e in load_config((tmp_path,))] == ["a"]


def test_cli_list_show_and_errors(xdg: Path) -> None:
    d = chroot_d(xdg)
    write(d, "deb", "Name: deb\nPath: /nonexistent.tar\nAliases: stable\n")
    out = nsbuild("env", "show", "stable").stdout
    assert "Name: deb\n" in out and "Path: /nonexistent.tar\n" in out
    assert "deb (aliases: stable): tarball missing" in nsbuild("env", "list").stdout
    write(d, "bad", "Name: x\nPath: /x.tar\nFoo: 1\n")
    bad = nsbuild("env", "list", check=False)
    assert bad.returncode == 2
    known = ("Name, Type, Path, Aliases, Description, Suite, Architecture, Mirror, Bind-Mounts, "
             "Unpack, Unpack-Limit")
    assert bad.stderr == f"nsbuild: {d / 'bad'}:3: unknown field 'Foo' (known: {known})\n"


def test_python_debian_is_not_imported_by_the_cli_module() -> None:
    code = "import sys, nsbuild.cli.envs, nsbuild.envs; print('debian' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.userns
def test_a_host_environment_runs_on_the_host_view(xdg: Path, tmp_path: Path) -> None:
    (chroot_d(xdg) / "h").write_text("Name: h\nType: host\n")
    script = "test -d /usr/bin && test ! -e /home && id -u"
    r = nsbuild("run", "--env", "h", "--", "sh", "-c", script, cwd=tmp_path)
    assert r.stdout == "0\n"


def test_a_redeclared_system_environment_is_listed_once(xdg: Path) -> None:
    from nsbuild.envs.config import load_config

    system = xdg / "system"
    system.mkdir()
    (system / "b").write_text("Name: b\nType: host\nDescription: system\n")
    (chroot_d(xdg) / "b").write_text("Name: b\nType: host\nDescription: mine\n")
    config = load_config((system, chroot_d(xdg)))
    assert [e.description for e in config] == ["mine"]


def test_apt_sources_of_a_layer_are_read_inside_it_only(tmp_path: Path) -> None:
    """A layer may hold what code in a sandbox wrote: its apt sources are read
    without following links out of it, opening FIFOs or devices."""
    import os

    from nsbuild.envs.aptsources import apt_mirrors

    host_file = tmp_path / "host-secret"
    host_file.write_text("deb http://from-the-host.example/ x main\n")
    layer = tmp_path / "layer"
    d = layer / "etc" / "apt" / "sources.list.d"
    d.mkdir(parents=True)
    os.mkfifo(layer / "etc" / "apt" / "sources.list")  # would block a plain open
    (d / "a.list").symlink_to(host_file)  # resolved inside the layer: not there
    (d / "b.list").symlink_to("/dev/zero")  # not a regular file
    (d / "c.sources").write_text("Types: deb\nURIs: http://ok.example/debian\nSuites: x\n")
    assert apt_mirrors(layer) == ("http://ok.example/debian",)
