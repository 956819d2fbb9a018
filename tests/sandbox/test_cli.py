"""The command line: usage errors, --debug, entry points, and the run path's
import rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sandbox_helpers import NSBUILD, USAGE, explain, nonblank_lines, nsbuild, ok, one_line_error
from waiting import HANG_GUARD

pytestmark = pytest.mark.userns


@pytest.mark.parametrize(
    "args",
    [
        ["--bogus", "--", "true"],
        ["--net", "bogus", "--", "true"],
        ["--setenv", "NOEQUALS", "--", "true"],
        [],
        ["--"],
        ["--bind"],
    ],
    ids=["unknown-option", "bad-net", "bad-setenv", "no-command", "empty-command", "missing-arg"],
)
def test_bad_usage_exits_2_with_one_line(tmp_path: Path, args: list[str]) -> None:
    r = nsbuild(*args, cwd=tmp_path)
    assert r.returncode == USAGE, explain(r)
    one_line_error(r)
    assert r.stdout == ""


def test_no_subcommand_is_a_usage_error(tmp_path: Path) -> None:
    r = subprocess.run([*NSBUILD], cwd=tmp_path, capture_output=True, text=True,
                       timeout=HANG_GUARD, check=False)
    assert r.returncode == USAGE, explain(r)


def test_help(tmp_path: Path) -> None:
    r = subprocess.run([*NSBUILD, "run", "--help"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=HANG_GUARD, check=False)
    assert r.returncode == 0, explain(r)
    for option in ("--root", "--bind", "--ro-bind", "--tmpfs", "--chdir", "--hostname",
                   "--net", "--setenv", "--unsetenv", "--clearenv", "--user"):
        assert option in r.stdout, option


def test_quiet_by_default(tmp_path: Path) -> None:
    r = ok(nsbuild("--", "true", cwd=tmp_path))
    assert (r.stdout, r.stderr) == ("", "")


@pytest.mark.parametrize("where", ["global", "run"])
def test_debug_prints_the_setup_steps_on_stderr(tmp_path: Path, where: str) -> None:
    d = tmp_path / "debug-bind-source"
    d.mkdir()
    args = ["--bind", f"{d}:/debug-bind", "--", "echo", "hello"]
    if where == "global":
        r = ok(nsbuild(*args, cwd=tmp_path, debug=True))
    else:
        r = ok(nsbuild("--debug", *args, cwd=tmp_path))
    assert r.stdout == "hello\n"  # stdout stays the command's own
    lines = nonblank_lines(r.stderr)
    assert len(lines) >= 5, r.stderr
    assert any("/debug-bind" in line for line in lines), r.stderr
    assert any("uid" in line.lower() or "id map" in line.lower() for line in lines), r.stderr
    assert "Traceback" not in r.stderr


def test_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "nsbuild"
    assert script.exists(), f"console script {script} is installed with the package"
    r = subprocess.run([str(script), "run", "--", "echo", "ok"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=HANG_GUARD, check=False)
    assert (r.returncode, r.stdout) == (0, "ok\n"), explain(r)


def test_console_script_without_site_and_isolated(tmp_path: Path) -> None:
    # The setup puts `-IS` on the script's #! line: no `site` at start-up, and
    # neither PYTHONPATH nor the current directory decide what gets imported.
    script = Path(sys.executable).parent / "nsbuild"
    decoy = tmp_path / "nsbuild"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise SystemExit('decoy imported')\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}
    for args, want in ((["run", "--", "echo", "ok"], "ok\n"), (["env", "list"], None)):
        r = subprocess.run([sys.executable, "-IS", str(script), *args], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=HANG_GUARD, check=False)
        assert r.returncode == 0 and "decoy" not in r.stderr, explain(r)
        assert want is None or r.stdout == want, explain(r)


def imports(tmp_path: Path, *args: str) -> set[str]:
    r = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=HANG_GUARD, check=False)
    assert r.returncode == 0, explain(r)
    names = {line.split("|")[-1].strip() for line in r.stderr.splitlines()
             if line.startswith("import time:") and "|" in line}
    names.discard("imported package")
    return names


# The run path's rule, stated in nsbuild/cli/main.py's docstring: what a
# plain `nsbuild run` must not import.
NOT_ON_THE_RUN_PATH = {"argparse", "dataclasses", "enum", "re", "signal", "socket",
                       "threading", "typing"}
RUN_PATH_PACKAGES = ("nsbuild.cli.main", "nsbuild.sandbox", "nsbuild.net",
                     "nsbuild.envs.masks", "nsbuild.envs.errors")


def test_the_run_path_imports_only_what_its_rule_allows(tmp_path: Path) -> None:
    # As the console script starts it (-I -S); what the interpreter loads by
    # itself is not nsbuild's.
    script = Path(sys.executable).parent / "nsbuild"
    baseline = imports(tmp_path, "-IS", "-c", "pass")
    loaded = imports(tmp_path, "-IS", str(script), "run", "--", "true") - baseline
    assert "nsbuild.sandbox.runner" in loaded, sorted(loaded)
    ours = {n for n in loaded if n.split(".")[0] == "nsbuild"}
    foreign = {n for n in loaded - ours if n.split(".")[0] not in sys.stdlib_module_names}
    assert not foreign, sorted(foreign)
    assert not loaded & NOT_ON_THE_RUN_PATH, sorted(loaded & NOT_ON_THE_RUN_PATH)
    others = {n for n in ours if not n.startswith(RUN_PATH_PACKAGES)
              and n not in ("nsbuild", "nsbuild.cli", "nsbuild.envs", "nsbuild.errors",
                            "nsbuild.printable")}
    assert not others, sorted(others)
