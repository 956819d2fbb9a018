"""Waiting for an event by polling: the one way the tests wait for something
that happens in another process (a process starts or ends, a file or a lock
appears). A fixed sleep would be too short on a loaded machine and too long
on an idle one."""

from __future__ import annotations

import time
from collections.abc import Callable

# Only a guard against a hang: a hang is the failure (pytest-timeout is the
# last resort, and kills the whole test without saying what it waited for).
HANG_GUARD = 300.0


def wait_for(
    predicate: Callable[[], object], what: str, timeout: float = HANG_GUARD, interval: float = 0.05
) -> None:
    """Poll until `predicate()` is true, at most `timeout` seconds; then fail
    naming `what` was awaited. The predicate may itself fail (an assertion that
    a process it waits on is still running)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"still waiting after {timeout:.0f} s for: {what}")
        time.sleep(interval)
