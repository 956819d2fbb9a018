"""The adversarial escape suite: every test is a real attempt, made from inside a
sandbox, that must fail. See docs/security.md for the table of cases.

The helpers of the sandbox and network tests are reused (their folders go on
sys.path; their module names are unique across tests/)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
for folder in ("sandbox", "net", "security"):
    if str(TESTS / folder) not in sys.path:
        sys.path.insert(0, str(TESTS / folder))

from security_helpers import EnvHome, env_home_for  # noqa: E402


@pytest.fixture(scope="session")
def env_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvHome]:
    """Config and cache folders with the `bookworm` environment (the CI tarball);
    the cache is shared with tests/faults, so the base is unpacked once per run."""
    yield from env_home_for(tmp_path_factory)
