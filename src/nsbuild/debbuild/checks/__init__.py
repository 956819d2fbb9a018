"""Checks after a successful build: lintian, an install check, autopkgtest.

Each runs in a fresh session of the build's environment, after the results
were delivered, with its own section in the .build log; its outcome is a
CheckResult: "pass", "fail" (it found a problem in the package) or "error"
(it could not run). A check never undoes the build: as sbuild does by
default, the build stays successful and its results stay in --out; the
checks' outcomes are said on the terminal, in the log and in --json.

    lintian.py      --run-lintian: lintian on the .changes (kept as a layer)
    install.py      --run-piuparts: install, configure, purge; files left behind
    autopkgtest.py  --run-autopkgtest: the host's autopkgtest, nsbuild's virt server
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from nsbuild.debbuild.checks.inputs import CheckInputs
from nsbuild.debbuild.result import BuildRequest, CheckResult
from nsbuild.errors import NsbuildError
from nsbuild.printable import printable

if TYPE_CHECKING:
    from nsbuild.debbuild.checks.autopkgtest import Running

__all__ = ["CheckInputs", "run_checks", "summary_fields", "summary_lines", "terminal_line"]


def _in_session(req: BuildRequest) -> list[tuple[str, Callable[[CheckInputs], CheckResult]]]:
    """The checks asked for that run in a session of their own, in sbuild's
    order, each as (name, run)."""
    from nsbuild.debbuild.checks import install, lintian

    chosen: list[tuple[str, Callable[[CheckInputs], CheckResult]]] = []
    if req.run_lintian:
        chosen.append((lintian.NAME, lintian.run))
    if req.run_piuparts:
        chosen.append((install.NAME, install.run))
    return chosen


def run_checks(inputs: CheckInputs) -> list[CheckResult]:
    """Run the checks the request asks for, reported in sbuild's order
    (lintian, piuparts, autopkgtest); never raises for a check's own failure.

    autopkgtest, a host program with testbeds of its own, starts first and
    runs beside the others, which wait on lintian and apt in their sessions:
    the checks take about the time of the longest, not of all together."""
    from nsbuild.debbuild.checks import autopkgtest

    results: list[CheckResult] = []
    in_session = _in_session(inputs.req)
    if not in_session and not inputs.req.run_autopkgtest:
        return results
    skipped = _not_for_cross(inputs) if inputs.cross() else []
    in_session = [(n, c) for n, c in in_session if n not in {s.name for s in skipped}]
    with ExitStack() as stack:
        inputs = _with_source(stack, inputs)
        started: Running | NsbuildError | None = None
        if inputs.req.run_autopkgtest and not inputs.cross():
            inputs.say(f"      check: {autopkgtest.NAME} (beside the others)")
            try:
                started = autopkgtest.Running(inputs)
                stack.callback(started.stop)
            except NsbuildError as e:
                started = e  # said in its place, after the others
        for name, check in in_session:
            inputs.say(f"      check: {name}")
            results.append(_run_one(inputs, name, check))
        if started is not None:
            results.append(_run_one(inputs, autopkgtest.NAME, _finisher(started)))
    return results + skipped


def _not_for_cross(inputs: CheckInputs) -> list[CheckResult]:
    """The checks that install the packages, which a cross build's are not
    for (the environment's dpkg would need the host architecture's whole
    system): each said, in sbuild's order, as not run and why."""
    from nsbuild.debbuild.checks import autopkgtest, install

    req, host, build = inputs.req, inputs.host_architecture, inputs.architecture
    why = f"not run: the packages are for {host}, the environment is {build} (a cross build)"
    out = []
    for name, asked in ((install.NAME, req.run_piuparts), (autopkgtest.NAME, req.run_autopkgtest)):
        if asked:
            inputs.log.section(name)
            inputs.log.line(f"{name}: {why}")
            inputs.say(f"      check: {name}: skipped ({why})")
            out.append(CheckResult(name, "skipped", why))
    return out


def _finisher(started: Running | NsbuildError) -> Callable[[CheckInputs], CheckResult]:
    def finish(inputs: CheckInputs) -> CheckResult:
        if isinstance(started, NsbuildError):
            inputs.log.section("autopkgtest")
            raise started
        return started.finish()

    return finish


def _run_one(
    inputs: CheckInputs, name: str, check: Callable[[CheckInputs], CheckResult]
) -> CheckResult:
    start = time.monotonic()
    try:
        result = check(inputs)
    except NsbuildError as e:
        # It could not run: said in its section, and the next check runs.
        inputs.log.line(f"{name}: error: {e}")
        result = CheckResult(name, "error", str(e), seconds=time.monotonic() - start)
    inputs.say(f"      check: {terminal_line(result)}")
    return result


def _with_source(stack: ExitStack, inputs: CheckInputs) -> CheckInputs:
    """`inputs`, with the source package when the .changes lists none and
    the build was given a .dsc: checked and copied as a build takes it."""
    req = inputs.req
    if inputs.source_files or inputs.source_in_changes() or not req.input.is_file():
        return inputs
    from nsbuild.debbuild.dsc import load_dsc

    keep = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nsbuild-checks-")))
    try:
        return replace(inputs, source_files=load_dsc(req.input, keep=keep).paths())
    except NsbuildError as e:
        # The checks that need it say so; the others run.
        inputs.log.line(f"The source package is not available to the checks: {e}")
        return inputs


def terminal_line(check: CheckResult) -> str:
    """One line for the terminal: name, status, summary (escaped: the
    summary may quote what the package made)."""
    text = f"{check.name}: {check.status}"
    if check.summary:
        text += f" ({printable(check.summary, 300)})"
    return text


def summary_lines(checks: list[CheckResult]) -> list[str]:
    """The lines `nsbuild build` prints on stderr once the build is over, a
    failing check first so that it is not missed under the others."""
    order = {"fail": 0, "error": 1}
    ranked = sorted(checks, key=lambda c: order.get(c.status, 2))
    return [f"check {terminal_line(c)}" for c in ranked]


def summary_fields(checks: list[CheckResult]) -> list[tuple[str, str]]:
    """The .build log summary's fields of the checks, in sbuild's words:
    `Lintian: warn` for a pass with warnings (`info` with infos only),
    `Autopkgtest: no tests`, else the status (`Install: fail`)."""
    return [(c.name.capitalize(), _sbuild_word(c)) for c in checks]


def _sbuild_word(check: CheckResult) -> str:
    if check.status != "pass":
        return check.status
    tags = check.details.get("tags", {})
    if check.name == "lintian" and isinstance(tags, dict):
        return "warn" if tags.get("warning") else "info" if tags.get("info") else "pass"
    if check.name == "autopkgtest" and check.details.get("exit_status") == 8:
        return "no tests"
    return "pass"
