"""What a package's own files make of the checks after the build and of the
virt server that runs its tests: each read bounded, each name escaped, no
input costing more than its size."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from nsbuild.virtserver.internet import SHOWN, advice, needing
from nsbuild.virtserver.testbed import NetPolicy

from .conftest import Env, make_package
from .qa_packages import as_dsc


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


# -- the install check on a package that leaves more than it can list --


def _many_files_package(parent: Path) -> Path:
    """Its postinst leaves 4500 files of near PATH_MAX names (18 MiB of
    names, past what the check reads of a listing); its purge keeps them."""
    tree = make_package(parent, "qa-many")
    long = "d" * 250
    (tree / "debian" / "postinst").write_text(textwrap.dedent(f"""\
        #!/bin/sh
        set -e
        if [ "$1" = configure ]; then
            mkdir -p /var/lib/qa-many && cd /var/lib/qa-many
            for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do mkdir -p {long}; cd {long}; done
            p=$(printf '%0190d' 0); i=0
            while [ $i -lt 4500 ]; do : > "$p$i"; i=$((i + 1)); done
        fi
        #DEBHELPER#
        """))
    return tree


@pytest.mark.slow
@pytest.mark.userns
def test_files_left_past_what_the_listing_holds_fail_the_install_check(
    bookworm: Env, tmp_path: Path
) -> None:
    # The listing after the purge was cut: the check said it "cannot list the
    # session's files" (error: it could not run) where the package failed it.
    dsc = as_dsc(_many_files_package(tmp_path))
    proc = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(tmp_path / "out"),
                            "--json", "--run-piuparts", str(dsc))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [install] = json.loads(proc.stdout)["checks"]
    assert install["status"] == "fail", install
    assert install["summary"].startswith("files left after purge: more than 16 MiB of file names")
    assert install["details"]["too_many_files"] is True
    assert "check: install: fail (files left after purge: more than 16 MiB" in proc.stderr
