"""The checks after the build (--run-lintian, --run-piuparts, --run-autopkgtest),
as a user sees them: real lintian, apt and autopkgtest in fresh sessions of a
real bookworm environment, on packages written for the tests (qa_packages.py).

The slow tests build two packages: one every check passes, one with a
problem for each check. The rest reads what the checks make of hostile
output, without a sandbox.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nsbuild.debbuild.checks import summary_fields, summary_lines, terminal_line
from nsbuild.debbuild.checks.autopkgtest import describe as describe_tests
from nsbuild.debbuild.checks.autopkgtest import read_summary, with_server
from nsbuild.debbuild.checks.lintian import count_tags
from nsbuild.debbuild.checks.lintian import describe as describe_tags
from nsbuild.debbuild.checks.snapshot import IGNORED, Entry, compare
from nsbuild.debbuild.result import BuildRequest, CheckResult

from .conftest import Env
from .qa_packages import (
    HOSTILE_NAME,
    LEFT_BEHIND,
    LINTIAN_ERROR,
    as_dsc,
    bad_package,
    clean_package,
)

CHECKS = ("--run-lintian", "--run-piuparts", "--run-autopkgtest")


def _build(env: Env, dsc: Path, out: Path, *opts: str) -> tuple[dict, str]:
    proc = env.nsbuild("build", "--env", "bookworm", "--out", str(out), "--json", *opts, str(dsc))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def _section(log: Path, title: str) -> str:
    """The text of one section of a .build log, up to the next one."""
    text = log.read_text(errors="replace")
    start = text.index(f"| {title}")
    end = text.find("\n+---", text.index("\n+---", start + 1) + 1)
    return text[start : end if end > 0 else None]


@pytest.mark.slow
@pytest.mark.userns
def test_checks_pass_on_a_clean_package_and_lintian_is_kept_as_a_layer(
    bookworm: Env, tmp_path: Path
) -> None:
    dsc = as_dsc(clean_package(tmp_path))
    doc, stderr = _build(bookworm, dsc, tmp_path / "one", *CHECKS)
    assert doc["status"] == "successful"
    checks = {c["name"]: c for c in doc["checks"]}
    assert list(checks) == ["lintian", "install", "autopkgtest"]  # sbuild's order
    assert {n: c["status"] for n, c in checks.items()} == dict.fromkeys(checks, "pass")
    assert checks["lintian"]["details"]["tags"].get("error", 0) == 0
    assert checks["lintian"]["details"]["layer"]["cached"] is False
    assert checks["install"]["details"]["left_behind"] == []
    assert checks["autopkgtest"]["details"]["tests"] == {"command1": "PASS"}
    assert checks["autopkgtest"]["summary"] == "1 test: 1 PASS"
    for name in checks:
        assert f"check: {name}: pass" in stderr
    log = Path(doc["log"])
    assert "all is well" in _section(log, "autopkgtest")
    assert "Setting up qa-clean" in _section(log, "install check")
    first = _section(log, "lintian")
    assert "Setting up lintian" in first

    # The second run builds on the layer the first kept: no lintian to
    # download or install.
    doc, _ = _build(bookworm, dsc, tmp_path / "two", "--run-lintian")
    [lintian] = doc["checks"]
    assert lintian["status"] == "pass"
    assert lintian["details"]["layer"] == checks["lintian"]["details"]["layer"] | {"cached": True}
    second = _section(Path(doc["log"]), "lintian")
    assert "Using cached dependency layer" in second
    assert "Setting up lintian" not in second
    assert not re.search(r"^\$ apt-get .* install lintian$", second, re.M)
    assert "$ lintian " in second


@pytest.mark.slow
@pytest.mark.userns
def test_checks_report_a_lintian_error_a_failing_test_and_a_file_left_behind(
    bookworm: Env, tmp_path: Path
) -> None:
    dsc = as_dsc(bad_package(tmp_path))
    out = tmp_path / "out"
    doc, stderr = _build(bookworm, dsc, out, *CHECKS)
    # The build itself succeeded, and its results are where they belong.
    assert doc["status"] == "successful"
    assert (out / "qa-bad_1.0_all.deb").is_file()
    checks = {c["name"]: c for c in doc["checks"]}
    assert {n: c["status"] for n, c in checks.items()} == dict.fromkeys(checks, "fail")

    lintian = checks["lintian"]
    assert lintian["details"]["tags"]["error"] == 1
    assert lintian["details"]["tag_names"]["error"] == [LINTIAN_ERROR]
    assert lintian["summary"].startswith("1 error, ")
    assert "check: lintian: fail (1 error, " in stderr

    install = checks["install"]
    assert LEFT_BEHIND in install["details"]["left_behind"]
    assert install["summary"].startswith("3 file(s) left after purge: ")
    assert f"{LEFT_BEHIND}" in _section(Path(doc["log"]), "install check")
    # A name the package chose is escaped wherever nsbuild shows it.
    assert HOSTILE_NAME.replace("\x1b", "\\x1b") in install["details"]["left_behind"]
    assert HOSTILE_NAME.replace("\x1b", "\\x1b") in _section(Path(doc["log"]), "install check")
    assert "\x1b" not in stderr

    tests = checks["autopkgtest"]
    assert tests["details"] == {"exit_status": 4, "tests": {"command1": "FAIL"}}
    assert "this test fails on purpose" in _section(Path(doc["log"]), "autopkgtest")
    assert f"E: qa-bad: {LINTIAN_ERROR}" in _section(Path(doc["log"]), "lintian")


# -- what the checks make of what they read: no sandbox needed --


def test_lintian_tags_are_counted_and_only_well_formed_names_kept() -> None:
    output = (
        "E: pkg: some-error [usr/bin/x]\n"
        "E: pkg source: some-error\n"
        "W: pkg: a-warning [usr/share/\x1b]0;owned\x07]\n"
        "W: pkg: Bad\x1b[2Jname\n"
        "I: pkg: an-info\n"
        "O: pkg: overridden-tag\n"
        "N: a note, not a tag\n"
        "E: no tag here\n"
    )
    counts, names = count_tags(output)
    assert counts == {"error": 2, "warning": 1, "info": 1, "overridden": 1}
    assert names["error"] == ["some-error"]
    # What the package chose (a file name) is not part of a name; a line
    # whose "tag" is not one lintian could print is not counted.
    assert names["warning"] == ["a-warning"]
    assert describe_tags(counts) == "2 errors, 1 warning, 1 info, 1 overridden"
    assert describe_tags({}) == "no tags"


def test_autopkgtest_summary_names_are_escaped_and_error_lines_ignored(tmp_path: Path) -> None:
    summary = tmp_path / "summary"
    summary.write_text(
        "command1             PASS\n"
        "evil\x1b[31mname     FAIL non-zero exit status 1\n"
        "upstream             SKIP Test needs-internet\n"
        'blame: arg:"sh -ec\n  apt-get --quiet ...\n'
    )
    tests = read_summary(summary)
    assert tests == {"command1": "PASS", "evil\\x1b[31mname": "FAIL", "upstream": "SKIP"}
    assert describe_tests(6, tests) == "3 tests: 1 FAIL, 1 PASS, 1 SKIP"
    assert describe_tests(8, {}) == "the package has no tests"
    assert describe_tests(16, {}) == "autopkgtest exit status 16, no test ran"
    # A link there is not followed.
    (tmp_path / "link").symlink_to(summary)
    assert read_summary(tmp_path / "link") == {}


def test_autopkgtest_runs_on_nsbuilds_server_unless_the_user_names_one() -> None:
    local = with_server(BuildRequest(Path("x.dsc"), autopkgtest_opts=("--shell-fail",)), "bw")
    assert local[:2] == ["--shell-fail", "--"]
    assert local[2].endswith("/autopkgtest-virt-nsbuild") and local[3:] == ["bw"]
    through = with_server(BuildRequest(Path("x.dsc"), backend="autopkgtest",
                                       backend_args=("autopkgtest-virt-null",)), "bw")  # fmt: skip
    assert through == ["--", "autopkgtest-virt-null"]
    own = ("--", "schroot", "sid")
    assert with_server(BuildRequest(Path("x.dsc"), autopkgtest_opts=own), "bw") == list(own)


def test_files_left_removed_or_changed_are_found_and_logs_and_caches_ignored() -> None:
    def entry(kind: str = "f", size: str = "1", mtime: str = "1", target: str = "") -> Entry:
        return Entry(kind, "644", "0:0", size, mtime, target)

    before = {"/etc/a": entry(), "/usr/bin/gone": entry(), "/usr": entry("d"),
              "/usr/lib/l": entry("l", target="x")}  # fmt: skip
    after = {"/etc/a": entry(size="2"), "/usr": entry("d", size="9", mtime="9"),
             "/usr/lib/l": entry("l", target="y"), "/var/lib/qa/state": entry()}  # fmt: skip
    diff = compare(before, after)
    assert diff.left == ["/var/lib/qa/state"]
    assert diff.removed == ["/usr/bin/gone"]
    assert diff.changed == ["/etc/a", "/usr/lib/l"]  # a folder's size and time do not count
    for ignored in ("/var/log/apt/history.log", "/var/cache/debconf/config.dat",
                    "/var/lib/dpkg/status", "/etc/ld.so.cache", "/etc/passwd-"):  # fmt: skip
        assert IGNORED.match(ignored), ignored
    for kept in ("/var/lib/qa/state", "/etc/qa.conf", "/var/log", "/etc/passwd.d"):
        assert not IGNORED.match(kept), kept


def test_terminal_lines_escape_the_summary_and_put_failures_first() -> None:
    checks = [
        CheckResult("lintian", "pass", "1 warning", {"tags": {"warning": 1}}),
        CheckResult("install", "fail", "1 file(s) left after purge: /etc/\x1b[2Jx"),
        CheckResult("autopkgtest", "error", "autopkgtest exit status 16, no test ran"),
    ]
    assert terminal_line(checks[1]) == (
        "install: fail (1 file(s) left after purge: /etc/\\x1b[2Jx)"
    )
    assert [line.split(":")[0] for line in summary_lines(checks)] == [
        "check install", "check autopkgtest", "check lintian"]  # fmt: skip
    # In the .build log's summary, sbuild's words.
    assert summary_fields(checks) == [
        ("Lintian", "warn"), ("Install", "fail"), ("Autopkgtest", "error")]  # fmt: skip
    no_tests = CheckResult("autopkgtest", "pass", "", {"exit_status": 8})
    assert summary_fields([no_tests]) == [("Autopkgtest", "no tests")]

