"""What users rely on: shells, reproducible defaults, config bind mounts,
concurrent first use, and the copy fallback where overlayfs is refused."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from envs_helpers import NSBUILD, chroot_d, nsbuild

from nsbuild.envs.config import load_config
from nsbuild.envs.overlay import overlay_usable
from nsbuild.envs.paths import Layout
from nsbuild.envs.session import throwaway
from nsbuild.sandbox import Bind, run

pytestmark = [pytest.mark.userns, pytest.mark.slow]


def test_shell_reads_commands_and_keeps_no_host_variables(
    bookworm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    monkeypatch.setenv("SECRET_TOKEN", "leak")
    r = subprocess.run(
        [*NSBUILD, "shell", "stable", "--setenv", "EXTRA=1"],
        input="echo $SOURCE_DATE_EPOCH $TZ $LANG $EXTRA x${SECRET_TOKEN}x; date +%Z; exit 3\n",
        capture_output=True,
        text=True,
    )
    assert r.returncode == 3
    assert r.stdout == "1700000000 UTC C.UTF-8 1 xx\nUTC\n"


def test_config_bind_mounts_appear_inside(
    xdg: Path, bookworm_tarball: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "in").write_text("from host\n")
    (chroot_d(xdg) / "b").write_text(
        f"Name: b\nPath: {bookworm_tarball}\nBind-Mounts: {data}:/data:ro\n"
    )
    with throwaway("b") as s:
        assert s.mounts[-1] == Bind(str(data), "/data", readonly=True)
        assert run(s.sandbox(["sh", "-c", "grep -q 'from host' /data/in && ! touch /data/x"])) == 0
    assert not (data / "x").exists()


def test_two_first_uses_unpack_once(xdg: Path, bookworm_tarball: Path) -> None:
    (chroot_d(xdg) / "bookworm").write_text(f"Name: bookworm\nPath: {bookworm_tarball}\n")
    procs = [
        subprocess.Popen([*NSBUILD, "session", "begin", "bookworm"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    results = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    ids = [out.strip() for out, _ in results]
    assert ids[0] != ids[1]
    assert sum("unpacking" in err for _, err in results) == 1
    bases = list((xdg / "cache" / "nsbuild" / "store" / "bases").iterdir())
    assert len(bases) == 1
    nsbuild("session", "end", *ids)


def test_overlay_probe_is_remembered(xdg: Path) -> None:
    layout = Layout.default()
    assert overlay_usable(layout) is True
    record = json.loads((layout.root / "overlay-probe.json").read_text())
    assert record["usable"] is True and record["why"] is None


def test_copy_fallback_when_overlay_is_off(bookworm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NSBUILD_NO_OVERLAY", "1")
    with throwaway(load_config().get(bookworm)) as s:
        assert s.copied and s.root == Bind(str(s.upper), "/", private=True)
        r = run(s.sandbox(["sh", "-c", "stat -c %U /var/cache/apt/archives/partial | "
                                       "grep -qx _apt && echo x > /etc/mark"]))  # fmt: skip
        assert r == 0
        assert not (Path(s.lowers[-1]) / "etc" / "mark").exists()
