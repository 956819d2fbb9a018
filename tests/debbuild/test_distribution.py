"""Without --env, a build runs in the environment of its changelog's distribution."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nsbuild.debbuild.distribution import choose, resolve
from nsbuild.debbuild.errors import BuildInputError

from .conftest import make_package


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private chroot.d; the tarballs it names need not exist for a lookup."""
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    chroot_d = tmp_path / "xdg_config_home" / "nsbuild" / "chroot.d"
    chroot_d.mkdir(parents=True)
    return chroot_d


def _declare(chroot_d: Path, name: str, aliases: str = "") -> None:
    text = f"Name: {name}\nType: tarball\nPath: /nonexistent/{name}.tar\n"
    if aliases:
        text += f"Aliases: {aliases}\n"
    (chroot_d / name).write_text(text)


@pytest.mark.parametrize(
    ("distribution", "name", "suite"),
    [
        ("bookworm", "bookworm", "bookworm"),
        ("unstable", "unstable", "unstable"),
        ("sid", "sid", "unstable"),
        ("UNRELEASED", "UNRELEASED", "unstable"),
        ("experimental", "experimental", "unstable"),
        ("bookworm-backports", "bookworm-backports", "bookworm"),
        ("bullseye-backports-sloppy", "bullseye-backports-sloppy", "bullseye"),
        ("bookworm-security", "bookworm-security", "bookworm"),
        (None, "unstable", "unstable"),
    ],
)
def test_distributions_map_onto_suites(distribution: str | None, name: str, suite: str) -> None:
    choice = choose(distribution)
    assert (choice.name, choice.suite) == (name, suite)


def test_an_exact_name_or_alias_wins(config: Path) -> None:
    _declare(config, "sid-amd64", aliases="UNRELEASED")
    _declare(config, "bookworm")
    _declare(config, "bookworm-backports")
    assert resolve(choose("UNRELEASED"), None) == ("sid-amd64", "UNRELEASED: building in sid-amd64")
    assert resolve(choose("bookworm"), None) == ("bookworm", None)
    assert resolve(choose("bookworm-backports"), None) == ("bookworm-backports", None)


def test_unreleased_and_backports_fall_back_to_their_suite(config: Path) -> None:
    _declare(config, "unstable")
    _declare(config, "bookworm")
    name, note = resolve(choose("UNRELEASED"), None)
    assert (name, note) == ("unstable", "UNRELEASED: building in unstable")
    name, note = resolve(choose("bookworm-backports"), None)
    assert name == "bookworm"
    assert note is not None and note.startswith("bookworm-backports: building in bookworm (")
    # The same holds for the default of an environment created for it.
    assert choose("UNRELEASED").aliases == ("sid", "UNRELEASED")


def test_a_distribution_that_is_no_debian_suite_exits_2(config: Path, tmp_path: Path) -> None:
    with pytest.raises(BuildInputError, match="'nsb-nowhere'"):
        resolve(choose("nsb-nowhere"), None)
    tree = make_package(tmp_path, "nsb-nowhere", distribution="nsb-nowhere")
    result = subprocess.run(
        [sys.executable, "-m", "nsbuild", "build", "--out", str(tmp_path / "out"), str(tree)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "nsbuild build: no environment for the changelog's distribution 'nsb-nowhere' and it is "
        "not a Debian suite nsbuild can create: create one with: "
        "nsbuild env create nsb-nowhere --suite unstable"
    )
    assert not (tmp_path / "out").exists()
    # With environments, they are offered by name, aliases too.
    _declare(config, "bookworm", aliases="stable, UNRELEASED")
    with pytest.raises(BuildInputError) as e:
        resolve(choose("nsb-nowhere"), None)
    assert "give --env with one of: bookworm (aliases: stable, UNRELEASED); or create" in str(
        e.value
    )


@pytest.mark.parametrize(
    ("distribution", "note"),
    [
        ("bookworm-backports", "bookworm-backports: building in bookworm (bookworm-backports's "
         "own packages are not in it; add them with --extra-repository "
         "'deb http://deb.debian.org/debian bookworm-backports main')"),
        ("experimental", "experimental: building in unstable (experimental's own packages are "
         "not in it; add them with --extra-repository "
         "'deb http://deb.debian.org/debian experimental main')"),
        # mmdebstrap puts these archives in a stable suite's environment itself.
        ("bookworm-security", "bookworm-security: building in bookworm"),
        ("UNRELEASED", "UNRELEASED: building in unstable"),
    ],
)
def test_the_note_says_how_to_add_the_targets_archive(
    config: Path, distribution: str, note: str
) -> None:
    _declare(config, "bookworm")
    _declare(config, "unstable")
    assert resolve(choose(distribution), None)[1] == note


def test_no_create_refuses_and_names_the_command(config: Path) -> None:
    _declare(config, "trixie")
    with pytest.raises(BuildInputError) as e:
        resolve(choose("bookworm-backports"), None, create=False)
    assert str(e.value) == (
        "no environment for the changelog's distribution 'bookworm-backports': "
        "create it with: nsbuild env create bookworm --suite bookworm"
    )
    # What exists is still used.
    assert resolve(choose("trixie"), None, create=False) == ("trixie", None)


def test_creation_is_announced_and_no_create_refuses(config: Path, tmp_path: Path) -> None:
    # Without subordinate ids the creation stops at its first check, after
    # the announcement: no mmdebstrap runs in this test.
    (tmp_path / "subid").write_text("")
    env = {**os.environ, "NSBUILD_SUBUID_FILE": str(tmp_path / "subid"),
           "NSBUILD_SUBGID_FILE": str(tmp_path / "subid")}  # fmt: skip
    tree = make_package(tmp_path, "nsb-new", distribution="trixie")
    argv = [sys.executable, "-m", "nsbuild", "build", "--out", str(tmp_path / "out"), str(tree)]
    made = subprocess.run(argv, capture_output=True, text=True, env=env)
    tarballs = tmp_path / "xdg_cache_home" / "nsbuild" / "tarballs"
    assert (
        "nsbuild: no environment 'trixie' yet: creating it once with mmdebstrap, Debian trixie "
        f"from http://deb.debian.org/debian, in {tarballs}/trixie.tar (about 450 MB of tarball "
        "and as much again unpacked; a few minutes; progress follows); --no-create refuses "
        "instead\n"
    ) in made.stderr
    assert made.returncode == 2 and "needs 65536 subordinate ids" in made.stderr
    refused = subprocess.run([*argv[:4], "--no-create", *argv[4:]], capture_output=True,
                             text=True, env=env)  # fmt: skip
    assert refused.returncode == 2
    assert "creating it" not in refused.stderr
    assert refused.stderr.splitlines()[-1] == (
        "nsbuild build: no environment for the changelog's distribution 'trixie': "
        "create it with: nsbuild env create trixie --suite trixie"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.userns
def test_unreleased_and_env_build_through_aliases(tmp_path: Path) -> None:
    # As schroot users declare it: work in progress builds in the
    # environment that takes UNRELEASED as an alias.
    from inputs import tarball

    home = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "XDG_CACHE_HOME": str(tmp_path / "cache")}  # fmt: skip
    chroot_d = tmp_path / "config" / "nsbuild" / "chroot.d"
    chroot_d.mkdir(parents=True)
    (chroot_d / "bookworm").write_text(
        f"Name: bookworm\nPath: {tarball()}\nAliases: UNRELEASED, nsb-alias\n"
    )
    tree = make_package(tmp_path, "nsb-wip", distribution="UNRELEASED")
    try:
        for extra, out in (((), "one"), (("--env", "nsb-alias"), "two")):
            r = subprocess.run(
                [sys.executable, "-m", "nsbuild", "build", *extra, "--out",
                 str(tmp_path / out), str(tree)],
                capture_output=True, text=True, env=home,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert list((tmp_path / out).glob("nsb-wip_1.0_*.changes")), r.stderr
            if not extra:
                assert "UNRELEASED: building in bookworm" in r.stderr
    finally:
        from nsbuild.envs.remove import remove_tree

        remove_tree(tmp_path / "cache")
