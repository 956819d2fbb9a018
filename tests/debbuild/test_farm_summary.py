"""What the farm reads of `nsbuild build --json`: a build whose
dependencies cannot be satisfied names them in the summary's `unmet` list,
bounded, so the farm's dep-wait need not parse the message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nsbuild.debbuild.driver import UNMET_COUNT, UNMET_LENGTH

from .conftest import Env, make_package

pytestmark = [pytest.mark.slow, pytest.mark.userns]


def test_an_unsatisfiable_build_lists_what_is_unmet(bookworm: Env, tmp_path: Path) -> None:
    long = "nsbuild-" + "x" * 300
    tree = make_package(tmp_path, "nsb-unmet",
                        build_depends=f"nsbuild-no-such-package (>= 2), {long}")  # fmt: skip
    done = bookworm.nsbuild("build", "--env", "bookworm", "--json", "--out",
                            str(tmp_path / "out"), str(tree))  # fmt: skip
    assert done.returncode == 3, done.stderr
    summary = json.loads(done.stdout)
    assert summary["status"] == "dependency-failed"
    unmet = summary["unmet"]
    assert 0 < len(unmet) <= UNMET_COUNT
    assert all(len(u) <= UNMET_LENGTH for u in unmet)
    # apt's words follow the dependency ("but it is not installable").
    assert unmet[0].startswith("nsbuild-no-such-package (>= 2)")
    assert any(u.startswith("nsbuild-xxxx") for u in unmet), unmet
    assert any(len(u) == UNMET_LENGTH for u in unmet), unmet

