"""The adversarial escape suite: every test is a real attempt, made from inside a
sandbox, that must fail. See docs/security.md for the table of cases."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from security_helpers import EnvHome, env_home_for


@pytest.fixture(scope="session")
def env_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvHome]:
    """Config and cache folders with the `bookworm` environment (the CI tarball);
    the cache is shared with tests/faults, so the base is unpacked once per run."""
    yield from env_home_for(tmp_path_factory)
