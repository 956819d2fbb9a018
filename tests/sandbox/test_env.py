"""Environment: inherited by default, --setenv, --unsetenv, --clearenv."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sandbox_helpers import USAGE, explain, nsbuild, ok, one_line_error

pytestmark = pytest.mark.userns


def env_with(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}


def test_environment_is_inherited_by_default(tmp_path: Path) -> None:
    r = ok(nsbuild("--", "printenv", "NSB_TEST", cwd=tmp_path, env=env_with(NSB_TEST="from host")))
    assert r.stdout == "from host\n"


def test_setenv(tmp_path: Path) -> None:
    r = ok(nsbuild("--setenv", "NSB_A=1", "--setenv", "NSB_B=x=y z", "--", "sh", "-c",
                   'printf "%s|%s\\n" "$NSB_A" "$NSB_B"', cwd=tmp_path))
    assert r.stdout == "1|x=y z\n"


def test_setenv_overrides_the_inherited_value(tmp_path: Path) -> None:
    r = ok(nsbuild("--setenv", "NSB_TEST=inside", "--", "printenv", "NSB_TEST",
                   cwd=tmp_path, env=env_with(NSB_TEST="host")))
    assert r.stdout == "inside\n"


def test_setenv_empty_value(tmp_path: Path) -> None:
    r = ok(nsbuild("--setenv", "NSB_EMPTY=", "--", "sh", "-c",
                   'test "${NSB_EMPTY+set}" = set && echo "[$NSB_EMPTY]"', cwd=tmp_path))
    assert r.stdout == "[]\n"


def test_unsetenv(tmp_path: Path) -> None:
    r = nsbuild("--unsetenv", "NSB_TEST", "--", "printenv", "NSB_TEST",
                cwd=tmp_path, env=env_with(NSB_TEST="host"))
    assert (r.returncode, r.stdout) == (1, ""), explain(r)


def test_clearenv(tmp_path: Path) -> None:
    r = ok(nsbuild("--clearenv", "--", "/usr/bin/env", cwd=tmp_path,
                   env=env_with(NSB_TEST="host")))
    names = {line.split("=", 1)[0] for line in r.stdout.splitlines()}
    # Nothing of the caller's environment; nsbuild may set a few basics (PATH...).
    assert not names & {"NSB_TEST", "PYTEST_CURRENT_TEST"}, r.stdout
    assert len(names) <= 4, r.stdout


def test_clearenv_then_setenv(tmp_path: Path) -> None:
    r = ok(nsbuild("--clearenv", "--setenv", "NSB_ONLY=1", "--", "/usr/bin/env", cwd=tmp_path,
                   env=env_with(NSB_TEST="host")))
    lines = r.stdout.splitlines()
    assert "NSB_ONLY=1" in lines
    assert not any(line.startswith("NSB_TEST=") for line in lines)


@pytest.mark.parametrize("bad", ["NOEQUALS", "=value"])
def test_bad_setenv_is_a_usage_error(tmp_path: Path, bad: str) -> None:
    r = nsbuild("--setenv", bad, "--", "true", cwd=tmp_path)
    assert r.returncode == USAGE, explain(r)
    one_line_error(r)
