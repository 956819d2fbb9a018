"""The hint for a caller without subordinate ids: a range nobody has, as a
command that works when run as printed."""

from __future__ import annotations

import os
import pwd
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from sandbox_helpers import nonblank_lines, nsbuild

# root holds useradd's first range, and someone else the next one, in gids only.
SUBUID = "root:100000:65536\n"
SUBGID = "other:165536:65536\n"


def _files(tmp_path: Path, subuid: str = SUBUID, subgid: str = SUBGID) -> dict[str, str]:
    (tmp_path / "subuid").write_text(subuid)
    (tmp_path / "subgid").write_text(subgid)
    return {
        **os.environ,
        "NSBUILD_SUBUID_FILE": str(tmp_path / "subuid"),
        "NSBUILD_SUBGID_FILE": str(tmp_path / "subgid"),
    }


def _hint(text: str) -> list[str]:
    m = re.search(r"'((?:sudo )?usermod [^']*)'", text)
    assert m, text
    return shlex.split(m.group(1))


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


@pytest.mark.userns
def test_run_suggests_a_range_free_in_both_files(tmp_path: Path) -> None:
    r = nsbuild("--", "true", cwd=tmp_path, env=_files(tmp_path))
    assert r.returncode == 0
    (line,) = nonblank_lines(r.stderr)
    user = pwd.getpwuid(os.getuid()).pw_name
    prefix = [] if os.getuid() == 0 else ["sudo"]
    assert _hint(line) == [*prefix, "usermod", "--add-subuids", "231072-296607",
                           "--add-subgids", "231072-296607", user]  # fmt: skip


@pytest.mark.userns
def test_env_create_without_a_range_says_how_to_get_one(tmp_path: Path) -> None:
    env = {**_files(tmp_path, subuid="", subgid=""), "XDG_CONFIG_HOME": str(tmp_path / "c"),
           "XDG_CACHE_HOME": str(tmp_path / "k")}  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-m", "nsbuild", "env", "create", "nsb-t", "--suite", "bookworm"],
        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert r.returncode == 2
    (line,) = nonblank_lines(r.stderr)
    assert line.startswith("nsbuild: nsbuild env create needs 65536 subordinate ids")
    assert "--add-subuids 100000-165535 --add-subgids 100000-165535" in " ".join(_hint(line))
    assert not (tmp_path / "c").exists()  # nothing declared


@pytest.mark.root
def test_the_suggested_command_runs_and_takes_a_free_range(tmp_path: Path) -> None:
    # usermod itself, on copies of the account files (--prefix), as printed.
    etc = tmp_path / "etc"
    etc.mkdir()
    user = "nsbtest"
    for name in ("passwd", "group", "shadow", "gshadow"):
        with open(f"/etc/{name}") as f:
            keep = [ln for ln in f if ln.split(":")[0] in ("root", user)]
        (etc / name).write_text("".join(keep))
    env = _files(etc)
    code = (
        "import sys; from nsbuild.sandbox.idmap import range_hint; print(range_hint(sys.argv[1]))"
    )
    hint = subprocess.run([sys.executable, "-c", code, user], env=env, capture_output=True,
                          text=True, check=True).stdout.split()  # fmt: skip
    assert hint[0] == "usermod"  # root needs no sudo
    subprocess.run([hint[0], "--prefix", str(tmp_path), *hint[1:]], check=True)
    for name in ("subuid", "subgid"):
        ranges = {}
        for ln in (etc / name).read_text().splitlines():
            owner, start, count = ln.split(":")
            ranges[owner] = (int(start), int(count))
        assert ranges[user][1] == 65536
        assert not any(_overlaps(ranges[user], r) for o, r in ranges.items() if o != user)
