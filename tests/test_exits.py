"""Exit statuses: the one table in nsbuild.cli.exits, and what a user sees."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nsbuild.backends import UnknownBackend
from nsbuild.backends.errors import BackendError, CopyRefused
from nsbuild.backends.virtproto import VirtServerError
from nsbuild.cli.exits import exit_status
from nsbuild.debbuild.errors import (
    BuildFailed,
    BuildInputError,
    BuildInterrupted,
    UnsatisfiableDependencies,
)
from nsbuild.envs.errors import ConfigError, EnvError
from nsbuild.errors import NsbuildError
from nsbuild.net.errors import NetError
from nsbuild.sandbox.errors import SandboxError, SetupError
from nsbuild.sandbox.limits import LimitError
from nsbuild.sandbox.spec import SpecError

# A guard against hangs only.
TIMEOUT = 120


@pytest.mark.parametrize(
    ("err", "status"),
    [
        (NsbuildError("x"), 2),
        (EnvError("x"), 2),
        (ConfigError("x"), 2),
        (NetError("x"), 2),
        (LimitError("x"), 2),
        (BuildInputError("x"), 2),
        (SpecError("x"), 2),
        (UnknownBackend("x"), 2),
        (BuildFailed("x"), 1),
        (CopyRefused("x"), 1),
        (UnsatisfiableDependencies("x", ("libfoo-dev",)), 3),
        (SandboxError("x"), 125),
        (SetupError("mount /proc", errno.EPERM, "/proc"), 125),
        (BackendError("x"), 125),
        (VirtServerError("x"), 125),
        (BuildInterrupted("x"), 130),
        (KeyboardInterrupt(), 130),
        (RuntimeError("x"), 125),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_table(err: BaseException, status: int) -> None:
    assert exit_status(err) == status


def test_no_error_class_carries_a_number() -> None:
    def below(cls: type[BaseException]) -> Iterator[type[BaseException]]:
        yield cls
        for sub in cls.__subclasses__():
            yield from below(sub)

    assert [c for c in below(NsbuildError) if "exit_status" in vars(c)] == []


# -- through a real `nsbuild`, for what a user reaches cheaply --


def nsbuild(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nsbuild", *args],
        cwd=tmp_path,
        env=_env(tmp_path),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def _env(tmp_path: Path) -> dict[str, str]:
    """The caller's environment with nsbuild's config and cache of its own."""
    env = dict(os.environ)
    for name in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        env[name] = str(tmp_path / name.lower())
    return env


def tiny_dsc(folder: Path) -> Path:
    """A .dsc that load_dsc accepts: its one file's size and checksum agree.
    Nothing builds it: what is tested ends before a build starts."""
    data = b"not a tarball: the tests stop before it is unpacked\n"
    (folder / "tiny_1.0.tar.xz").write_bytes(data)
    dsc = folder / "tiny_1.0.dsc"
    dsc.write_text(
        "Format: 3.0 (native)\nSource: tiny\nVersion: 1.0\nChecksums-Sha256:\n"
        f" {hashlib.sha256(data).hexdigest()} {len(data)} tiny_1.0.tar.xz\n"
    )
    return dsc


def explain(r: subprocess.CompletedProcess[str]) -> str:
    return f"exit status {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"


def test_bad_option_is_2(tmp_path: Path) -> None:
    r = nsbuild(tmp_path, "run", "--no-such-option", "--", "true")
    assert r.returncode == 2, explain(r)


def test_no_command_is_2(tmp_path: Path) -> None:
    r = nsbuild(tmp_path)
    assert r.returncode == 2, explain(r)


def test_missing_dsc_is_2_also_in_the_json(tmp_path: Path) -> None:
    r = nsbuild(tmp_path, "build", "--json", str(tmp_path / "missing_1.0.dsc"))
    assert r.returncode == 2, explain(r)
    assert json.loads(r.stdout)["exit_status"] == 2


def test_unknown_environment_is_2(tmp_path: Path) -> None:
    r = nsbuild(tmp_path, "env", "show", "no-such-env")
    assert r.returncode == 2, explain(r)


def test_unknown_backend_is_2(tmp_path: Path) -> None:
    r = nsbuild(tmp_path, "build", "--env", "any", "--backend", "no-such", str(tiny_dsc(tmp_path)))
    assert r.returncode == 2, explain(r)
    assert "no-such" in r.stderr


def test_backend_failure_is_125_also_in_the_json(tmp_path: Path) -> None:
    server = tmp_path / "no-such-virt-server"
    r = nsbuild(tmp_path, "build", "--json", "--env", "any", "--backend", "autopkgtest",
                str(tiny_dsc(tmp_path)), "--", str(server))
    assert r.returncode == 125, explain(r)
    assert json.loads(r.stdout)["exit_status"] == 125
    assert str(server) in r.stderr


@pytest.mark.userns
def test_sandbox_failure_is_125(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-root"
    r = nsbuild(tmp_path, "run", "--root", str(missing), "--", "true")
    assert r.returncode == 125, explain(r)
    assert str(missing) in r.stderr


def test_interrupted_build_is_130_also_in_the_json(tmp_path: Path) -> None:
    # A virt server that never greets, and quits when told to.
    argv = [sys.executable, "-m", "nsbuild", "build", "--json", "--env", "any", "--backend",
            "autopkgtest", str(tiny_dsc(tmp_path)), "--", "/bin/sh", "-c", "read -r quit"]
    # As from a terminal: a test runner started in the background inherits
    # SIGINT ignored, and Python would keep it so.
    with subprocess.Popen(argv, cwd=tmp_path, env=_env(tmp_path), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                          ) as proc:  # fmt: skip
        assert proc.stderr is not None
        # Printed once the build runs, where SIGINT ends it as an interruption.
        assert "Prepare" in proc.stderr.readline()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, f"{proc.returncode}\n{out}\n{err}"
    assert json.loads(out)["exit_status"] == 130
