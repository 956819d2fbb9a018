"""Shared fixtures for the build tests.

The slow tests build real packages in a real bookworm environment, on the
tarball and source packages of tests/inputs.py. Each test session gets its
own config and cache directories, so the store is unpacked once per session
and dependency layers never leak in from elsewhere.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from inputs import SOURCES, fixture_dsc, tarball

from nsbuild.backends import Backend


@pytest.fixture
def hello_copy(tmp_path: Path) -> Path:
    """A writable copy of hello's source package, for tests that corrupt it."""
    src = fixture_dsc("hello_2.10-3")
    for f in SOURCES.glob("hello_2.10*"):
        shutil.copy(f, tmp_path / f.name)
        # The cached sources may be read-only; the copies are for corrupting.
        (tmp_path / f.name).chmod(0o644)
    return tmp_path / src.name


@dataclass
class Env:
    """The process environment of a test session: its own XDG directories."""

    vars: dict[str, str]
    cache: Path

    def nsbuild(
        self, *args: str, cwd: Path | None = None, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "nsbuild", *args],
            env=self.vars,
            cwd=cwd,
            capture_output=True,
            text=True,
            check=check,
        )

    def popen(
        self, *args: str, stdin: int | None = subprocess.DEVNULL, new_session: bool = False
    ) -> subprocess.Popen[str]:
        """`nsbuild ARGS` started; with new_session, without the test's
        controlling terminal (a shell it opens reads stdin, not the terminal)."""
        return subprocess.Popen(
            [sys.executable, "-m", "nsbuild", *args],
            env=self.vars,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # As from a terminal: a test runner started in the background
            # inherits SIGINT ignored, and Python would keep it so.
            preexec_fn=_default_sigint,
            start_new_session=new_session,
        )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def bookworm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if os.geteuid() == 0:
        pytest.skip("build tests run as an unprivileged user (the sandbox maps subuids)")
    root = tmp_path_factory.mktemp("nsbuild-home")
    config = root / "config" / "nsbuild" / "chroot.d"
    config.mkdir(parents=True)
    (config / "bookworm").write_text(
        f"Name: bookworm\nType: tarball\nPath: {tarball()}\nSuite: bookworm\n"
        "Architecture: amd64\nMirror: http://deb.debian.org/debian\n"
        # A second name whose tarball does not exist: touching it would fail.
        "\nName: missing\nType: tarball\nPath: /nonexistent/missing.tar\nSuite: bookworm\n"
    )
    yield from private_home(root)


def private_home(root: Path) -> Iterator[Env]:
    """nsbuild with its config and cache folders under `root`, its cache
    cleaned up after (for a fixture to yield from)."""
    env = dict(os.environ)
    env["XDG_CONFIG_HOME"] = str(root / "config")
    env["XDG_CACHE_HOME"] = str(root / "cache")
    yield Env(env, root / "cache")
    subprocess.run([sys.executable, "-m", "nsbuild", "gc"], env=env, capture_output=True)
    # Dependency layers and apt caches hold files of the subuid range, which
    # pytest's own clean-up of old temporary folders could not delete.
    from nsbuild.envs.remove import remove_tree

    remove_tree(root / "cache")


@pytest.fixture
def bookworm_here(bookworm: Env, monkeypatch: pytest.MonkeyPatch) -> Env:
    """nsbuild's own environment variables in this process, for backends and
    builds run in it rather than through the command."""
    for name, value in bookworm.vars.items():
        monkeypatch.setenv(name, value)
    return bookworm


def processes(cmdline: bytes) -> list[int]:
    """The processes whose command line starts with `cmdline`."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().startswith(cmdline):
                        found.append(int(pid))
            except OSError:
                continue
    return found


def kept_log(env: Env, stderr: str, name: str) -> Path:
    """The log a failed build names on stderr: kept under the cache, not in --out."""
    paths = [
        Path(line.split("log: ", 1)[1])
        for line in stderr.splitlines()
        if line.startswith("nsbuild build: log: ")
    ]
    assert len(paths) == 1, stderr
    assert paths[0].name == name
    assert paths[0].is_relative_to(env.cache / "nsbuild" / "logs")
    return paths[0]


def make_package(
    parent: Path,
    name: str,
    *,
    build: str = "true",
    build_depends: str = "",
    install: str = "",
    check: str = "",
    builddeb: str = "",
    distribution: str = "bookworm",
) -> Path:
    """A small native source tree written for a test: `build` is the shell text of
    its override_dh_auto_build, `check` of its test suite (override_dh_auto_test),
    `install` of override_dh_auto_install, `builddeb` what runs after
    dh_builddeb (the .debs are in .. then)."""
    tree = parent / f"{name}-1.0"
    (tree / "debian" / "source").mkdir(parents=True)
    deps = "debhelper-compat (= 13)" + (f", {build_depends}" if build_depends else "")
    (tree / "debian" / "control").write_text(
        textwrap.dedent(f"""\
        Source: {name}
        Section: misc
        Priority: optional
        Maintainer: nsbuild tests <tests@nsbuild.invalid>
        Build-Depends: {deps}
        Standards-Version: 4.6.2
        Rules-Requires-Root: no

        Package: {name}
        Architecture: all
        Description: nsbuild test package {name}
         Written for nsbuild's build tests.
        """)
    )
    (tree / "debian" / "changelog").write_text(
        f"{name} (1.0) {distribution}; urgency=medium\n\n  * Test package.\n\n"
        " -- nsbuild tests <tests@nsbuild.invalid>  Mon, 01 Jan 2024 00:00:00 +0000\n"
    )
    (tree / "debian" / "source" / "format").write_text("3.0 (native)\n")
    (tree / "debian" / "copyright").write_text("Written for nsbuild's tests.\n")
    rules = "#!/usr/bin/make -f\n%:\n\tdh $@\n\noverride_dh_auto_build:\n"
    rules += "".join(f"\t{line}\n" for line in build.splitlines())
    rules += "\noverride_dh_auto_install:\n"
    rules += "".join(f"\t{line}\n" for line in (install or "true").splitlines())
    if check:
        rules += "\noverride_dh_auto_test:\n"
        rules += "".join(f"\t{line}\n" for line in check.splitlines())
    if builddeb:
        rules += "\noverride_dh_builddeb:\n\tdh_builddeb\n"
        rules += "".join(f"\t{line}\n" for line in builddeb.splitlines())
    (tree / "debian" / "rules").write_text(rules)
    (tree / "debian" / "rules").chmod(0o755)
    return tree


@pytest.fixture
def backend(bookworm: Env) -> Iterator[Backend]:
    """The local backend on the test environment, nsbuild's variables set in
    this process while it is open."""
    from nsbuild.backends import BackendOptions, open_backend

    old = dict(os.environ)
    os.environ.update(bookworm.vars)
    try:
        with open_backend("local", BackendOptions(env="bookworm")) as b:
            yield b
    finally:
        os.environ.clear()
        os.environ.update(old)
