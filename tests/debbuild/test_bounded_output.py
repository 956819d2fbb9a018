"""A command whose output passes the capture's bound is cut off, never left
blocked: no process of nsbuild's may hold the capture's read end open."""

from __future__ import annotations

import threading

import pytest
from waiting import HANG_GUARD

from nsbuild.backends import Backend
from nsbuild.backends.base import MAX_OUTPUT


@pytest.mark.slow
def test_output_past_the_bound_ends_the_writer(backend: Backend) -> None:
    done: list[tuple[int, str]] = []
    # Twice the bound: the writer must get EPIPE once the capture stops reading.
    script = f"head -c {2 * MAX_OUTPUT} /dev/zero | tr '\\0' x"
    worker = threading.Thread(
        target=lambda: done.append(backend.check_output(["sh", "-c", script])), daemon=True
    )
    worker.start()
    worker.join(HANG_GUARD)
    assert done, f"the command still runs after {HANG_GUARD:.0f} s: its output pipe never broke"
    status, text = done[0]
    assert len(text) <= MAX_OUTPUT
    assert status != 0  # killed by SIGPIPE, or tr's write error
