"""Two environments on the same tarball share one unpacked base: removing
one of them keeps the base the other still uses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from envs_helpers import chroot_d, nsbuild
from test_envs_tarball import GOOD, make_tar

from nsbuild.envs.session import throwaway


@pytest.mark.userns
def test_env_remove_keeps_a_base_another_environment_uses(xdg: Path) -> None:
    tar = make_tar(xdg / "ok.tar", GOOD)
    for name in ("one", "two"):
        (chroot_d(xdg) / name).write_text(f"Name: {name}\nPath: {tar}\n")
    with throwaway("one"):
        pass
    bases = xdg / "cache" / "nsbuild" / "store" / "bases"
    (digest,) = os.listdir(bases)

    assert "unpacked base" not in nsbuild("env", "remove", "one").stdout
    assert os.listdir(bases) == [digest]

    out = nsbuild("env", "remove", "two").stdout
    assert f"removed its unpacked base {digest[:12]}" in out
    assert os.listdir(bases) == []
