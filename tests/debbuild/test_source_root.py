"""`nsbuild build DIR` run by host root: the sandbox that makes the source
package runs on root's subordinate range, whose root must be able to write
the scratch folder host root made for it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nsbuild.debbuild.srctree import source_from_tree

from .conftest import make_package

pytestmark = pytest.mark.root


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    # Not pytest's tmp_path: for root that is below a 0700 folder, which the
    # subordinate ids cannot walk.
    d = Path(tempfile.mkdtemp(prefix="nsbuild-root-src-", dir="/var/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def test_root_makes_the_source_package_of_a_tree(public_tmp: Path) -> None:
    tree = make_package(public_tmp, "nsb-rootsrc")
    work = public_tmp / "work"
    work.mkdir()
    pkg = source_from_tree(tree, work)
    assert pkg.source == "nsb-rootsrc" and pkg.version == "1.0"
    assert sorted(p.name for p in pkg.paths()) == ["nsb-rootsrc_1.0.dsc", "nsb-rootsrc_1.0.tar.xz"]
