"""The seed of this run's fault injection: NSBUILD_FAULT_SEED, or a fresh one.

Its own module (not conftest) so tests can import it: pytest's conftest
modules share one name across folders."""

from __future__ import annotations

import os
import random

SEED = int(os.environ.get("NSBUILD_FAULT_SEED") or random.SystemRandom().randrange(10**6))
