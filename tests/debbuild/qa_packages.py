"""Source packages written for the tests of the checks after the build: one
that every check passes, and one with a problem for each check (a lintian
error, a failing test, a file its purge leaves behind)."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

from .conftest import make_package


def _tests(tree: Path, control: str) -> None:
    (tree / "debian" / "tests").mkdir()
    (tree / "debian" / "tests" / "control").write_text(textwrap.dedent(control))


def clean_package(parent: Path, name: str = "qa-clean") -> Path:
    """Installs a data file; one test that passes; its purge leaves nothing."""
    tree = make_package(
        parent, name,
        install=f"install -D -m 0644 debian/control debian/{name}/usr/share/{name}/control",
    )  # fmt: skip
    _tests(tree, f"""\
        Test-Command: test -s /usr/share/{name}/control && echo all is well
        Depends: @
        """)
    return tree


# What the bad package's postinst makes and its postrm does not remove: a
# file, and one whose name would clear the terminal of whoever prints it.
LEFT_BEHIND = "/var/lib/qa-bad/state"
HOSTILE_NAME = "/var/lib/qa-bad/\x1b[2Jcleared"
# The lintian error the bad package has on purpose: an ELF program in an
# arch:all package.
LINTIAN_ERROR = "arch-independent-package-contains-binary-or-object"


def bad_package(parent: Path, name: str = "qa-bad") -> Path:
    """A lintian error, a test that fails, a file left behind by its purge."""
    tree = make_package(
        parent, name,
        install=f"install -D -m 0755 /bin/true debian/{name}/usr/bin/{name}",
    )  # fmt: skip
    _tests(tree, """\
        Test-Command: echo 'this test fails on purpose'; exit 1
        Depends: @
        """)
    (tree / "debian" / "postinst").write_text(textwrap.dedent(f"""\
        #!/bin/sh
        set -e
        if [ "$1" = configure ]; then
            mkdir -p {Path(LEFT_BEHIND).parent}
            echo made by postinst > {LEFT_BEHIND}
            touch "$(printf '{HOSTILE_NAME.replace(chr(27), chr(92) + "033")}')"
        fi
        #DEBHELPER#
        """))
    return tree


def as_dsc(tree: Path) -> Path:
    """The source package of `tree`, beside it: what a maintainer hands sbuild."""
    subprocess.run(["dpkg-source", "-b", tree.name], cwd=tree.parent, check=True,
                   capture_output=True)  # fmt: skip
    name, version = tree.name.rsplit("-", 1)
    return tree.parent / f"{name}_{version}.dsc"
