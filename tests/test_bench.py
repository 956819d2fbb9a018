"""Every benchmark script still starts: its imports follow the code it measures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.iterdir() if p.is_file()))
def test_a_benchmark_answers_help(script: str) -> None:
    done = subprocess.run([sys.executable, str(BENCH / script), "--help"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "usage" in done.stdout.lower(), done.stdout
