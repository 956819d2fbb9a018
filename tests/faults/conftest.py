"""Fault injection: nsbuild is SIGKILLed at random moments, then `nsbuild gc`
must leave nothing behind and the next run must work.

The moments are drawn from a seeded generator: the seed is printed in the
report header, and NSBUILD_FAULT_SEED=N replays a run exactly."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from fault_seed import SEED
from security_helpers import EnvHome, env_home_for


def pytest_report_header() -> str:
    return f"nsbuild fault injection seed: {SEED} (replay with NSBUILD_FAULT_SEED={SEED})"


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A generator of its own per test, so one test's draws do not depend on others'."""
    return random.Random(f"{SEED}:{request.node.nodeid}")


@pytest.fixture(scope="session")
def env_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvHome]:
    yield from env_home_for(tmp_path_factory)
