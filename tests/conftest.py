"""Test tiers for the whole suite.

- unmarked: pure unit tests, run anywhere.
- ``@pytest.mark.userns``: need unprivileged user namespaces and must run as an
  unprivileged user with /etc/subuid and /etc/subgid ranges. Run as root, they
  would exercise the root code path and pass without proving anything about
  the rootless one, so they *fail* loudly as root unless
  ``NSBUILD_TEST_AS_ROOT=1`` says that is really what you want. They are
  skipped only when the kernel truly lacks user namespaces.
- ``@pytest.mark.root``: need host root (nftables, cgroups, the root path of
  the id mapping). CI runs them as root with ``-m root``; as an unprivileged
  user they are skipped with that reason.

CI (``.ci/run`` -> ``scripts/setup-and-test``) runs ``-m "not root"`` as an
unprivileged test user and ``-m root`` as root. What the slow tests read from
outside the repository is in tests/inputs.py; tests/waiting.py is the one way
to wait for an event; every test has a time limit (``timeout`` in
pyproject.toml).
"""

from __future__ import annotations

import os

import pytest

AS_ROOT_OPT_IN = "NSBUILD_TEST_AS_ROOT"


def _kernel_lacks_userns() -> str | None:
    if not os.path.exists("/proc/self/ns/user"):
        return "kernel built without user namespaces (no /proc/self/ns/user)"
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            if int(f.read()) == 0:
                return "user namespaces disabled: /proc/sys/user/max_user_namespaces is 0"
    except OSError:
        pass
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None:
        if os.geteuid() != 0:
            pytest.skip("needs host root; CI runs these as root with -m root")
        return
    if item.get_closest_marker("userns") is not None:
        if os.geteuid() == 0 and os.environ.get(AS_ROOT_OPT_IN) != "1":
            pytest.fail(
                "userns tests must run as an unprivileged user with /etc/subuid and "
                "/etc/subgid ranges (as root they test the root path, not the rootless "
                f"one); run them as such a user, or set {AS_ROOT_OPT_IN}=1 to run them "
                "as root anyway",
                pytrace=False,
            )
        reason = _kernel_lacks_userns()
        if reason:
            pytest.skip(reason)
