"""Real clients and real servers, end to end, in a real bookworm environment.

- the real `autopkgtest` runs hello's own tests in autopkgtest-virt-nsbuild,
  and reports a failing test as failing;
- the real sbuild builds hello with --chroot-mode=autopkgtest, rootless;
- `nsbuild build --backend autopkgtest` builds through autopkgtest-virt-nsbuild,
  autopkgtest-virt-unshare (on the same tarball) and autopkgtest-virt-null.

Each package build costs about a minute: these are the few slow tests.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from inputs import TARBALL, fixture_dsc
from virt_helpers import VENV_BIN, Env, run, sessions, tiny_package

pytestmark = [pytest.mark.slow, pytest.mark.userns]

HELLO_DEBS = ["hello-dbgsym_2.10-3_amd64.deb", "hello_2.10-3_amd64.deb"]


def _tail(proc: subprocess.CompletedProcess[str], lines: int = 40) -> str:
    return "\n".join((proc.stdout + proc.stderr).splitlines()[-lines:])


def _summary(out: Path) -> dict[str, str]:
    """autopkgtest's summary file: test name -> result word."""
    found = {}
    for line in (out / "summary").read_text().splitlines():
        name, result = line.split()[:2]
        found[name] = result
    return found


def test_autopkgtest_runs_hellos_own_tests(tools: Env, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # The dependencies come from the archive, hence --net allow (the mirrors
    # only) and an apt-get update (the tarball has no package lists). nocheck:
    # hello's `make check` leaves tests/*.log in the built tree, which its
    # upstream-tests would then try to run, on any server.
    proc = run(tools, ["autopkgtest", str(fixture_dsc("hello_2.10-3")), "-o", str(out),
                       "--env", "DEB_BUILD_OPTIONS=nocheck", "--setup-commands", "apt-get update",
                       "--", "nsbuild", "--net", "allow", "bookworm"])  # fmt: skip
    assert proc.returncode == 0, _tail(proc)
    assert _summary(out) == {"command1": "PASS", "upstream-tests": "PASS"}
    assert "Hello, world!" in (out / "command1-stdout").read_text()
    assert sessions(tools) == []


def test_autopkgtest_reports_a_failing_test_as_failing(tools: Env, tmp_path: Path) -> None:
    tree = tiny_package(
        tmp_path,
        tests={
            "whoami": "id -un",
            "fails": "echo 'this test fails on purpose'; exit 3",
            "as-root": "# needs-root\nid -un",
        },
    )
    out = tmp_path / "out"
    # -B: nothing to build; the tests run from the unbuilt tree (`//`), with
    # the default network (the mirrors).
    proc = run(tools, ["autopkgtest", "-B", f"{tree}//", "-o", str(out),
                       "--", "nsbuild", "bookworm"])  # fmt: skip
    assert proc.returncode == 4, _tail(proc)  # autopkgtest: at least one test failed
    assert _summary(out) == {"whoami": "PASS", "fails": "FAIL", "as-root": "PASS"}
    assert "this test fails on purpose" in (out / "fails-stdout").read_text()
    # Tests run as the server's suggested user unless they need root.
    assert (out / "whoami-stdout").read_text() == "nsbuild\n"
    assert (out / "as-root-stdout").read_text() == "root\n"
    assert sessions(tools) == []


def test_sbuild_builds_hello_through_the_nsbuild_server(tools: Env, tmp_path: Path) -> None:
    # sbuild looks for the server on its own $path, not the caller's PATH.
    config = tmp_path / "sbuildrc"
    config.write_text(f"$path = '{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                      "/usr/bin:/sbin:/bin';\n1;\n")  # fmt: skip
    env = Env({**tools.vars, "SBUILD_CONFIG": str(config)}, tools.cache)
    results = tmp_path / "results"
    results.mkdir()
    proc = run(env, ["sbuild", "--chroot-mode=autopkgtest", "--autopkgtest-virt-server=nsbuild",
                     "--autopkgtest-virt-server-opts=--net allow bookworm", "-d", "bookworm",
                     "--no-run-lintian", "--no-run-piuparts", "--no-run-autopkgtest",
                     str(fixture_dsc("hello_2.10-3"))], cwd=results)  # fmt: skip
    assert proc.returncode == 0, _tail(proc)
    assert sorted(p.name for p in results.glob("*.deb")) == HELLO_DEBS
    log = (results / "hello_2.10-3_amd64.build").read_text()
    assert re.search(r"^Status: successful$", log, re.M)
    assert sessions(tools) == []


def _build(env: Env, out: Path, source: Path, *server: str) -> dict[str, object]:
    proc = run(env, ["nsbuild", "build", "--json", "--out", str(out), "--backend", "autopkgtest",
                     str(source), "--", *server])  # fmt: skip
    assert proc.returncode == 0, _tail(proc)
    summary: dict[str, object] = json.loads(proc.stdout)
    return summary


def _debs(summary: dict[str, object]) -> list[str]:
    artifacts = summary["artifacts"]
    assert isinstance(artifacts, list)
    return sorted(a["name"] for a in artifacts if a["name"].endswith(".deb"))


def test_nsbuild_builds_hello_through_its_own_server_with_every_guarantee(
    tools: Env, tmp_path: Path
) -> None:
    summary = _build(tools, tmp_path, fixture_dsc("hello_2.10-3"),
                     "autopkgtest-virt-nsbuild", "bookworm")  # fmt: skip
    assert summary["status"] == "successful"
    assert _debs(summary) == HELLO_DEBS
    # Network per command: dependencies with the mirrors, the build with none.
    assert summary["limitations"] == []
    deb = tmp_path / "hello_2.10-3_amd64.deb"
    fields = subprocess.run(["dpkg-deb", "--field", str(deb), "Package", "Version"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert fields == "Package: hello\nVersion: 2.10-3\n"
    assert sessions(tools) == []


def test_nsbuild_builds_hello_through_autopkgtest_virt_unshare(tools: Env, tmp_path: Path) -> None:
    summary = _build(tools, tmp_path, fixture_dsc("hello_2.10-3"),
                     "autopkgtest-virt-unshare", "--tarball", str(TARBALL))  # fmt: skip
    assert summary["status"] == "successful"
    assert _debs(summary) == HELLO_DEBS
    # The guarantee this server cannot give is said plainly.
    assert summary["limitations"] == [
        "network during build: not restricted — backend autopkgtest "
        "(autopkgtest-virt-unshare) cannot enforce it"
    ]
    log = (tmp_path / "hello_2.10-3_amd64.build").read_text()
    assert "Limitation: network during build: not restricted" in log


def test_nsbuild_builds_through_autopkgtest_virt_null_like_a_local_build(
    tools: Env, tmp_path: Path
) -> None:
    tree = tiny_package(tmp_path / "src")
    null = _build(tools, tmp_path / "null", tree, "null")
    assert null["status"] == "successful"
    limits = "\n".join(str(x) for x in null["limitations"])  # type: ignore[attr-defined]
    assert "build dependencies: cannot be installed" in limits
    assert "(autopkgtest-virt-null)" in limits
    local = run(tools, ["nsbuild", "build", "--json", "--env", "bookworm",
                        "--out", str(tmp_path / "local"), str(tree)])  # fmt: skip
    assert local.returncode == 0, _tail(local)
    assert _debs(null) == _debs(json.loads(local.stdout)) == ["tiny_1.0_all.deb"]
