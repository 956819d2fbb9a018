"""--run-piuparts: nsbuild's install check, piuparts' core in a fresh session.

Debian's piuparts wants root on the host (it makes and enters chroots, as
sbuild's `sudo -- piuparts` shows); this check does what piuparts checks
first, rootless, in a session of the build's environment:

    1. list the session's files (snapshot.py)
    2. install the built .debs with apt, the environment's mirrors reachable
       for their dependencies
    3. check that they configure: `dpkg --audit` says nothing, each package
       is "ii"
    4. purge them, autoremove what they pulled in, and purge anything still
       installed that was not before (as piuparts restores the selection)
    5. list the files again: anything new was left behind by the purge,
       anything missing or changed was touched by it

Status "fail" on the first step that goes wrong, naming it and the files.
"""

from __future__ import annotations

import time
from pathlib import Path

from nsbuild.debbuild import apt
from nsbuild.debbuild.checks import snapshot
from nsbuild.debbuild.checks.inputs import CheckInputs
from nsbuild.debbuild.checks.session import CheckError, copy_results_in, open_session
from nsbuild.debbuild.checks.tools import apt_install, apt_network, apt_update
from nsbuild.debbuild.result import CheckResult
from nsbuild.debbuild.steps import Steps
from nsbuild.printable import printable

NAME = "install"
# Files named in the result and the summary: the first ones.
MAX_NAMED = 50
INSTALLED = ["dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${binary:Package}\\n"]


def run(inputs: CheckInputs) -> CheckResult:
    log = inputs.log
    log.section("install check (piuparts' core: install, configure, purge)")
    start = time.monotonic()
    debs = [p for p in inputs.artifacts if p.name.endswith(".deb")]
    if not debs:
        return CheckResult(NAME, "pass", "no .deb to install", {}, time.monotonic() - start)
    names = sorted({p.name.split("_", 1)[0] for p in debs})
    with open_session(inputs.req, inputs.environment) as backend:
        if not backend.capabilities.root_inside:
            raise CheckError("the backend has no root inside: nothing can be installed")
        steps = Steps(backend, log)
        failed, details = _check(steps, debs, names)
    details["packages"] = names
    summary = failed or f"{len(names)} package(s) installed, configured and purged cleanly"
    log.line(f"install: {'fail' if failed else 'pass'} ({summary})")
    return CheckResult(NAME, "fail" if failed else "pass", summary, details,
                       time.monotonic() - start)  # fmt: skip


Outcome = tuple[str | None, dict[str, object]]  # what failed (None: nothing), details


def _check(steps: Steps, debs: list[Path], names: list[str]) -> Outcome:
    """The steps above, in order; the first that fails ends the check."""
    backend, log = steps.backend, steps.log
    network = apt_network(steps)
    inside = copy_results_in(backend, debs, f"{backend.work_dir}/install")
    before = snapshot.take(steps)
    selection = _selection(steps)
    log.line(f"{len(before)} files, {len(selection)} packages before the install")
    apt_update(steps, network)
    status = apt_install(steps, ["apt-get", *apt.APT_OPTS, "install", *inside], network)
    if status != 0:
        return f"installing failed (apt-get exit status {status}); see the log", {
            "stage": "install"}
    status, audit = steps.ask(["dpkg", "--audit"])
    log.write(audit)
    states = _states(steps, names)
    unconfigured = [n for n in names if states.get(n) != "ii"]
    if status != 0 or audit.strip() or unconfigured:
        what = ", ".join(unconfigured) or "dpkg --audit reports problems"
        return f"not configured after the install: {printable(what, 300)}", {
            "stage": "configure", "unconfigured": unconfigured}  # fmt: skip
    purge = ["apt-get", *apt.APT_OPTS, "purge", *names]
    if (status := steps.run(purge, env=apt.APT_ENV)) != 0:
        return f"purging failed (apt-get exit status {status}); see the log", {"stage": "purge"}
    steps.run(["apt-get", *apt.APT_OPTS, "--purge", "autoremove"], env=apt.APT_ENV)
    extra = sorted(set(_selection(steps)) - set(selection))
    if extra:
        # Pulled in, and not marked automatic: piuparts restores the selection.
        steps.run(["dpkg", "--purge", *extra], env=apt.APT_ENV)
    still = sorted(set(_selection(steps)) - set(selection))
    if still:
        return (f"still installed after the purge: {printable(', '.join(still), 300)}",
                {"stage": "purge", "still_installed": still})  # fmt: skip
    try:
        after = snapshot.take(steps)
    except snapshot.TooMany as e:
        # Before the install the listing fitted: the rest is the package's.
        log.line(f"The session's files after the purge: {e}, not listed")
        return (f"files left after purge: {e} after the purge, "
                f"{len(before)} files before the install"), {
                    "stage": "files", "too_many_files": True}  # fmt: skip
    diff = snapshot.compare(before, after)
    details: dict[str, object] = {
        "stage": "files",
        "left_behind": [printable(p, 300) for p in diff.left[:MAX_NAMED]],
        "removed": [printable(p, 300) for p in diff.removed[:MAX_NAMED]],
        "changed": [printable(p, 300) for p in diff.changed[:MAX_NAMED]],
    }
    for label, paths in (("left behind after the purge", diff.left),
                         ("removed by the install and purge", diff.removed),
                         ("changed by the install and purge", diff.changed)):  # fmt: skip
        if paths:
            log.line(f"{len(paths)} file(s) {label}:")
            for p in paths:
                log.line(f"  {printable(p, 4096)}")
    if not diff:
        return None, details
    parts = [f"{len(paths)} file(s) {label}" for label, paths in
             (("left after purge", diff.left), ("removed", diff.removed),
              ("changed", diff.changed)) if paths]  # fmt: skip
    first = (diff.left or diff.removed or diff.changed)[0]
    return f"{', '.join(parts)}: {printable(first, 200)}", details


def _selection(steps: Steps) -> list[str]:
    """Every package dpkg knows of (installed, or with its configuration left)."""
    return [n for n, state in _states(steps).items() if state != "un"]


def _states(steps: Steps, names: list[str] | None = None) -> dict[str, str]:
    """Package (without :arch) -> dpkg's two-letter state (ii, rc, ...)."""
    with steps.log.command_output() as err:  # dpkg-query's complaints: the log's
        _, text = steps.backend.check_output([*INSTALLED, *(names or [])], stderr=err)
    states: dict[str, str] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2:
            states[words[-1].split(":", 1)[0]] = words[0]
    return states
