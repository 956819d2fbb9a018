"""What nsbuild suggests when an environment is missing: its names and
aliases, and commands that work when run as printed."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from envs_helpers import chroot_d, nsbuild

from nsbuild.envs.config import load_config
from nsbuild.envs.errors import EnvError


def _suggested(stderr: str) -> list[str]:
    """The command after "create one with: " (the rest of the line)."""
    return shlex.split(stderr.split("create one with: ", 1)[1].strip())[1:]


def _get_error(name: str) -> str:
    with pytest.raises(EnvError) as e:
        load_config().get(name)
    return str(e.value)


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("trixie", "create one with: nsbuild env create trixie --suite trixie"),
        ("sid", "create one with: nsbuild env create unstable --suite unstable --alias sid"),
        ("mine", "create one with: nsbuild env create mine --suite unstable"),
        ("a b", "environment names are letters, digits and . _ + ~ - only"),
        ("bookworm-backports",
         "to build in 'bookworm' by that name, add bookworm-backports to its Aliases: in "),
    ],
)
def test_unknown_names_get_known_ones_and_a_way(xdg: Path, name: str, hint: str) -> None:
    (chroot_d(xdg) / "bookworm").write_text("Name: bookworm\nPath: /b.tar\nAliases: stable\n")
    (chroot_d(xdg) / "zz").write_text("Name: zz\nPath: /z.tar\n")
    message = _get_error(name)
    assert message.startswith(
        f"no environment named {name!r} (known: bookworm (aliases: stable), zz); {hint}"
    )


@pytest.mark.userns
def test_the_aliases_hint_works_as_said(xdg: Path, bookworm_tarball: Path) -> None:
    conf = chroot_d(xdg) / "bookworm"
    conf.write_text(f"Name: bookworm\nPath: {bookworm_tarball}\n")
    r = nsbuild("run", "--env", "bookworm-backports", "--", "true", check=False)
    assert r.returncode == 2
    assert r.stderr.endswith(f"add bookworm-backports to its Aliases: in {conf}\n")
    with conf.open("a") as f:
        f.write("Aliases: bookworm-backports\n")
    nsbuild("run", "--env", "bookworm-backports", "--", "true")


def test_no_environments_says_what_to_run(xdg: Path) -> None:
    assert nsbuild("env", "list").stdout == (
        "no environments; create one with: nsbuild env create unstable --suite unstable\n"
    )


@pytest.mark.userns
@pytest.mark.slow
def test_the_create_hint_works_as_printed(xdg: Path) -> None:
    # The suggestion is run exactly as printed (mmdebstrap, Debian's mirror),
    # then what failed works.
    r = nsbuild("session", "begin", "bookworm", check=False)
    assert r.returncode == 2
    assert r.stderr.endswith("create one with: nsbuild env create bookworm --suite bookworm\n")
    nsbuild(*_suggested(r.stderr), timeout=1800)
    session = nsbuild("session", "begin", "bookworm").stdout.strip()
    nsbuild("session", "end", session)


def test_create_refuses_a_taken_alias_before_bootstrapping(xdg: Path) -> None:
    (chroot_d(xdg) / "bookworm").write_text("Name: bookworm\nPath: /b.tar\nAliases: stable\n")
    r = nsbuild("env", "create", "trixie", "--suite", "trixie", "--alias", "stable", check=False)
    assert r.returncode == 2
    assert r.stderr == (
        f"nsbuild: 'stable' already names environment 'bookworm' ({chroot_d(xdg)}/bookworm:1): "
        "choose another alias\n"
    )
    assert sorted(p.name for p in chroot_d(xdg).iterdir()) == ["bookworm"]
