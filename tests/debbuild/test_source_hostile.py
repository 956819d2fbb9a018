"""`nsbuild build DIR`: nothing of the tree runs on the host.

dpkg-source reads the tree's configuration (debian/source/options, the
format, a VCS's own config) and a `3.0 (git)` tree makes it run git, which
honours the tree's .git/config. So the source package is made in a sandbox
that sees the tree read-only, has no network and no home of the user's, and
what it writes is taken in only as the .dsc and the files it lists.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .conftest import Env, kept_log, make_package

pytestmark = [pytest.mark.slow, pytest.mark.userns]


def _git(tree: Path, home: Path, *args: str) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@nsbuild.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@nsbuild.invalid",
    }
    subprocess.run(["git", *args], cwd=tree, env=env, check=True, capture_output=True)


def _git_tree(tmp_path: Path, name: str, home: Path) -> Path:
    """A `3.0 (git)` tree, committed, whose .git/config was then made hostile."""
    tree = make_package(tmp_path, name)
    (tree / "debian" / "source" / "format").write_text("3.0 (git)\n")
    _git(tree, home, "init", "-q", "-b", "main")
    _git(tree, home, "add", "-A")
    _git(tree, home, "commit", "-q", "-m", "packaged")
    return tree


def _errors(stderr: str) -> list[str]:
    """The lines nsbuild printed about a failure (not progress or the log's path)."""
    return [
        line
        for line in stderr.splitlines()
        if line.strip()
        and not line.startswith(("nsbuild: ", "nsbuild build: log: "))
    ]


def test_git_fsmonitor_of_a_tree_does_not_run_on_the_host(bookworm: Env, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    marker = tmp_path / "marker"
    tree = _git_tree(tmp_path, "nsb-gitmon", home)
    # git runs core.fsmonitor as a shell command on `git status`, which
    # dpkg-source's 3.0 (git) format calls.
    _git(tree, home, "config", "core.fsmonitor", f"touch ~/PWNED; touch {marker}; false #")
    env = Env({**bookworm.vars, "HOME": str(home)}, bookworm.cache)

    result = env.nsbuild("build", "--env", "bookworm", "--out", str(tmp_path / "out"), str(tree))

    assert not (home / "PWNED").exists()
    assert not marker.exists()
    if result.returncode != 0:
        # Failing is allowed (unpacking the format needs git in the
        # environment too), but in one line, and what it points to says why.
        errors = _errors(result.stderr)
        assert len(errors) == 1, result.stderr
        assert "Traceback" not in result.stderr
        if "see the log" in errors[0]:
            log = kept_log(env, result.stderr, "nsb-gitmon_1.0_amd64.build").read_text()
            assert "git is not in the PATH" in log
        else:
            assert "git" in errors[0], result.stderr


def test_what_the_source_sandbox_leaves_is_taken_in_only_as_listed(
    bookworm: Env, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    tree = _git_tree(tmp_path, "nsb-gitleave", home)
    # Run inside the sandbox now, the tree's command can still write to the
    # output directory: a link to a host file must not be followed out.
    _git(tree, home, "config", "core.fsmonitor", "ln -sf /etc/passwd ../../out/planted; false #")
    env = Env({**bookworm.vars, "HOME": str(home)}, bookworm.cache)

    result = env.nsbuild("build", "--env", "bookworm", "--out", str(tmp_path / "out"), str(tree))

    assert result.returncode != 0
    errors = _errors(result.stderr)
    assert len(errors) == 1, result.stderr
    assert "dpkg-source -b left planted, not a plain file" in errors[0]
    assert not (tmp_path / "out").exists()


def test_a_quilt_tree_builds_and_stays_as_it_was(bookworm: Env, tmp_path: Path) -> None:
    """The usual case: an orig tarball beside the tree, a patch not yet applied.
    dpkg-source applies it to get the source package, in the sandbox's copy."""
    upstream = tmp_path / "nsb-quilt-1.0"
    upstream.mkdir()
    (upstream / "greeting").write_text("hello\n")
    subprocess.run(
        ["tar", "-czf", "nsb-quilt_1.0.orig.tar.gz", "nsb-quilt-1.0"], cwd=tmp_path, check=True
    )
    tree = make_package(tmp_path, "nsb-quilt", build="grep -q patched greeting")
    (tree / "debian" / "changelog").write_text(
        (tree / "debian" / "changelog").read_text().replace("(1.0)", "(1.0-1)")
    )
    (tree / "debian" / "source" / "format").write_text("3.0 (quilt)\n")
    (tree / "debian" / "patches").mkdir()
    (tree / "debian" / "patches" / "series").write_text("greet.patch\n")
    (tree / "debian" / "patches" / "greet.patch").write_text(
        "--- a/greeting\n+++ b/greeting\n@@ -1 +1 @@\n-hello\n+hello, patched\n"
    )
    before = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))

    result = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(tmp_path / "out"),
                              str(tree))

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "nsb-quilt_1.0-1_all.deb").is_file()
    assert sorted(str(p.relative_to(tree)) for p in tree.rglob("*")) == before
    assert (tree / "greeting").read_text() == "hello\n"


def test_a_dsc_is_read_only_as_a_bounded_regular_file(tmp_path: Path) -> None:
    from nsbuild.debbuild.dsc import load_dsc
    from nsbuild.debbuild.errors import BuildInputError

    fifo = tmp_path / "fifo.dsc"
    os.mkfifo(fifo)  # opened as it is, reading it would wait for a writer forever
    with pytest.raises(BuildInputError, match="not a regular file"):
        load_dsc(fifo)
    huge = tmp_path / "huge.dsc"
    with huge.open("wb") as f:
        f.truncate(1 << 30)  # sparse: a GiB would be read into memory
    with pytest.raises(BuildInputError, match=r"too large for a \.dsc"):
        load_dsc(huge)
