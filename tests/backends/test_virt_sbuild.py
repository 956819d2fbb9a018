"""sbuild --chroot-mode=autopkgtest builds through autopkgtest-virt-nsbuild, with no server option.

The real sbuild, as the unprivileged test user: the server is named by
`--autopkgtest-virt-server=nsbuild` and given only the environment; the
build dependencies (debhelper and what it pulls in) come from the
environment's mirrors, which the server lets apt reach by default.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from virt_helpers import HERE, VENV_BIN, Env, run, sessions

pytestmark = [pytest.mark.slow, pytest.mark.userns]

EXAMPLE = HERE.parent.parent / "examples" / "nsbuild-greeting"


def test_sbuild_builds_the_example_through_the_server_with_no_option(
    tools: Env, tmp_path: Path
) -> None:
    tree = tmp_path / "src" / "nsbuild-greeting-1.0"
    shutil.copytree(EXAMPLE, tree)
    subprocess.run(["dpkg-source", "-b", tree.name], cwd=tree.parent, check=True,
                   capture_output=True)  # fmt: skip
    # sbuild looks for the server on its own $path, not the caller's PATH.
    config = tmp_path / "sbuildrc"
    config.write_text(f"$path = '{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                      "/usr/bin:/sbin:/bin';\n1;\n")  # fmt: skip
    env = Env({**tools.vars, "SBUILD_CONFIG": str(config)}, tools.cache)
    results = tmp_path / "results"
    results.mkdir()
    proc = run(env, ["sbuild", "--chroot-mode=autopkgtest", "--autopkgtest-virt-server=nsbuild",
                     "--autopkgtest-virt-server-opts=bookworm", "-d", "bookworm",
                     "--no-run-lintian", "--no-run-piuparts", "--no-run-autopkgtest",
                     str(tree.parent / "nsbuild-greeting_1.0.dsc")], cwd=results)  # fmt: skip
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0, tail
    assert (results / "nsbuild-greeting_1.0_amd64.deb").is_file(), tail
    log = (results / "nsbuild-greeting_1.0_amd64.build").read_text()
    assert re.search(r"^Status: successful$", log, re.M)
    # debhelper is not in the buildd tarball: it came from the mirror.
    assert re.search(r"^Get:\d+ http://deb\.debian\.org/debian bookworm/main amd64 debhelper ",
                     log, re.M), log[-3000:]  # fmt: skip
    assert sessions(tools) == []
