"""The farm's web UI, as a browser shows it: Debian's Chromium, headless,
opens the builders page; the page it renders names the builder and its
builds, and a screenshot of it is kept."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import Farm

pytestmark = [pytest.mark.slow, pytest.mark.userns]

# The UI is a single-page application: Chromium must let its scripts run
# (virtual time) before it prints the page.
CHROMIUM = ["chromium", "--headless", "--disable-gpu", "--window-size=1280,800",
            "--virtual-time-budget=15000"]  # fmt: skip


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("chromium") is None:
        pytest.fail("Debian's chromium is not installed (.ci/apt-packages lists it)",
                    pytrace=False)
    env = {**os.environ, "HOME": str(tmp_path)}  # its profile, not the user's
    return subprocess.run([*CHROMIUM, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_the_builders_page_shows_the_builds(farm: Farm, tmp_path: Path) -> None:
    # At least one finished build, whichever tests ran before.
    proc = farm.nsbuild("farm", "submit", "--from-archive", "bookworm", "hello=2.10-3", "--wait",
                        "--out", str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    page = f"{farm.url}#/builders"
    dom = _chromium(tmp_path, "--dump-dom", page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "bookworm-amd64" in dom.stdout
    assert ">w1<" in dom.stdout and ">w2<" in dom.stdout
    # A build's bubble: its link, coloured by its result.
    assert 'href="#/builders/1/builds/' in dom.stdout
    assert "results_SUCCESS" in dom.stdout
    shot = Path(os.environ.get("NSBUILD_TEST_ARTIFACTS", tmp_path)) / "farm-builders.png"
    taken = _chromium(tmp_path, f"--screenshot={shot}", page)
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
