"""What a package's own files make of the checks after the build and of the
virt server that runs its tests: each read bounded, each name escaped, no
input costing more than its size."""

from __future__ import annotations

from nsbuild.virtserver.internet import SHOWN, advice, needing
from nsbuild.virtserver.testbed import NetPolicy


def test_a_control_file_of_many_test_names_is_read_in_one_pass() -> None:
    # A testbed writes debian/tests/control (a megabyte at most, read on the
    # host at each copy): 150000 names, each checked against those seen in a
    # list, took minutes; the names are kept once each, in their order.
    n = 150_000
    control = (
        "Tests: " + " ".join(f"{i:x}" for i in range(n)) + " 0 1\n"
        "Restrictions: needs-internet\n\n"
        "Tests: 2, other\nRestrictions: needs-internet\n"
    )
    assert len(control) < 1 << 20
    names = needing(control)
    assert len(names) == n + 1
    assert names[:3] == ["0", "1", "2"] and names[-1] == "other"
    line = advice(names, NetPolicy(mode="allow", allow_from_env=True), "bookworm")
    assert f"and {n + 1 - SHOWN} more" in line
    assert "\n" not in line and len(line) < 1000
