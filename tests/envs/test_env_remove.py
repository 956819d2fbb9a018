"""`nsbuild env remove` while sessions use the environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from envs_helpers import chroot_d, nsbuild
from test_envs_tarball import GOOD, make_tar

from nsbuild.envs.paths import Layout
from nsbuild.envs.session import begin_session, end_session, get_session, throwaway

pytestmark = [pytest.mark.userns]


def _made_by_nsbuild(xdg: Path) -> tuple[Path, Path]:
    """An environment `t` whose tarball sits where `env create` puts its own."""
    layout = Layout.default()
    layout.ensure()
    tar = make_tar(layout.tarballs / "t.tar", GOOD)
    conf = chroot_d(xdg) / "t"
    conf.write_text(f"Name: t\nPath: {tar}\nAliases: tee\n")
    return conf, tar


def _bases() -> list[str]:
    return os.listdir(Layout.default().bases)


def test_remove_refuses_while_a_session_is_open(xdg: Path) -> None:
    conf, tar = _made_by_nsbuild(xdg)
    a = nsbuild("session", "begin", "tee").stdout.strip()
    b = begin_session("t").id
    a, b = sorted((a, b))
    r = nsbuild("env", "remove", "t", check=False)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr == (
        f"nsbuild: environment 't' is used by sessions {a}, {b}; nothing removed: "
        f"end them with: nsbuild session end {a} {b} (or give --force)\n"
    )
    assert conf.exists() and tar.exists() and len(_bases()) == 1
    assert get_session(a).dir.is_dir()
    # The hint, run as printed, frees the way.
    nsbuild(*r.stderr.split("end them with: ")[1].split(" (or")[0].split()[1:])
    out = nsbuild("env", "remove", "t").stdout
    assert out == f"removed {conf}\nremoved {tar}\nremoved its unpacked base {_digest(out)}\n"
    assert not conf.exists() and not tar.exists() and _bases() == []


def _digest(out: str) -> str:
    return out.rsplit(" ", 1)[1].strip()


def test_remove_force_ends_sessions_and_frees_everything(xdg: Path) -> None:
    conf, tar = _made_by_nsbuild(xdg)
    s = begin_session("t")
    r = nsbuild("env", "remove", "--force", "t")
    assert r.stdout.splitlines() == [
        f"ended session {s.id}",
        f"removed {conf}",
        f"removed {tar}",
        f"removed its unpacked base {_digest(r.stdout)}",
    ]
    assert not s.dir.exists() and not conf.exists() and not tar.exists()
    assert _bases() == [] and nsbuild("session", "list").stdout == ""


def test_remove_force_keeps_what_still_runs_and_says_so(xdg: Path) -> None:
    conf, tar = _made_by_nsbuild(xdg)
    busy = begin_session("t")
    with throwaway("t") as mine, busy.in_use():
        # A throw-away session is its process's: waited for, never ended.
        refused = nsbuild("env", "remove", "t", check=False)
        ids = sorted((busy.id, mine.id))
        assert refused.stderr == (
            f"nsbuild: environment 't' is used by sessions {ids[0]}, {ids[1]}; nothing removed: "
            f"end it with: nsbuild session end {busy.id}; wait for process {os.getpid()} "
            "to finish (or give --force)\n"
        )
        r = nsbuild("env", "remove", "--force", "t")
        lines = r.stdout.splitlines()
        assert sorted(lines[:2]) == sorted([
            f"kept session {busy.id}: a command is running in it; "
            f"end it later with: nsbuild session end {busy.id}",
            f"kept session {mine.id}: its process {os.getpid()} is running; "
            "it goes when that process ends",
        ])
        assert lines[2:] == [
            f"removed {conf}",
            f"removed {tar}",
            "kept its unpacked base: sessions still use it; nsbuild gc frees it once they end",
        ]
        assert busy.dir.exists() and mine.dir.exists() and len(_bases()) == 1
    end_session(busy.id)
    assert nsbuild("gc").stdout.startswith("removed unused base ")
    assert _bases() == []


def test_remove_by_alias_names_the_command_that_works(xdg: Path) -> None:
    conf, _ = _made_by_nsbuild(xdg)
    r = nsbuild("env", "remove", "tee", check=False)
    assert r.returncode == 2
    assert r.stderr == (
        "nsbuild: 'tee' is an alias of 't': remove the environment by its name: "
        "nsbuild env remove t\n"
    )
    assert conf.exists()
    nsbuild(*r.stderr.split(": nsbuild ")[1].split())
    assert not conf.exists()


def test_remove_help_says_what_force_frees() -> None:
    out = " ".join(nsbuild("env", "remove", "--help").stdout.split())
    assert "--keep-tarball keep the tarball" in out
    assert "--force also end the environment's sessions" in out
