"""--run-lintian: lintian on the build's .changes, in a fresh session.

lintian comes from the environment's mirrors once and is kept as a layer
(tools.py); it then runs as the unprivileged check user with no network, on
private copies of the .changes and what it lists (and the .dsc when the
source was not built, as sbuild does). Its exit status is the verdict, as
sbuild's: 0 pass; otherwise fail when it printed tags (those at its
--fail-on level, errors by default, make it fail), error when it printed
none (lintian could not run). Everything it printed quotes the
package and is hostile text: it goes to the log as it is, and only counts
and well-formed tag names reach the result.
"""

from __future__ import annotations

import re
import time
from contextlib import ExitStack

from nsbuild.debbuild.checks.inputs import CheckInputs
from nsbuild.debbuild.checks.session import (
    CheckError,
    check_user,
    copy_results_in,
    open_session,
    read_output,
)
from nsbuild.debbuild.checks.tools import install_tools
from nsbuild.debbuild.result import CheckResult
from nsbuild.debbuild.steps import Steps

NAME = "lintian"
# lintian's one-letter codes, as its tag lines begin ("E: pkg: tag ...").
SEVERITIES = {
    "E": "error",
    "W": "warning",
    "I": "info",
    "P": "pedantic",
    "X": "experimental",
    "O": "overridden",
    "C": "classification",
    "M": "masked",
}
_TAG = re.compile(r"^([EWIPXOCM]): \S+(?: \S+)?: ([a-z0-9][a-z0-9.+-]{0,99})(?: |$)", re.M)
# Tag names kept in the result: the first ones of each severity.
MAX_TAGS = 50


def run(inputs: CheckInputs) -> CheckResult:
    log = inputs.log
    log.section("lintian")
    start = time.monotonic()
    with ExitStack() as stack:
        backend = open_session(inputs.req, inputs.environment)
        stack.callback(backend.close)
        steps = Steps(backend, log)
        tools = install_tools(stack, steps, ["lintian"], inputs.architecture,
                              inputs.environment, inputs.req.use_cache)  # fmt: skip
        folder = f"{backend.work_dir}/lintian"
        inside = copy_results_in(backend, inputs.check_files(), folder)
        changes = f"{folder}/{inputs.changes.name}"
        dsc = [p for p in inside if p.endswith(".dsc")]
        # The .changes of a build without the source lists no .dsc: lintian
        # gets it too, as sbuild gives it.
        extra = dsc if not inputs.source_in_changes() else []
        user = check_user(steps)
        if user != "root" and steps.run(["chown", "-R", f"{user}:{user}", folder]) != 0:
            raise CheckError("cannot hand the results to the check user")
        argv = ["lintian", *inputs.req.lintian_opts, changes, *extra]
        status = steps.run(argv, user=user, cwd=folder, network="none",
                           env={"HOME": "/nonexistent", "LC_ALL": "C.UTF-8"})  # fmt: skip
        output = read_output(steps)
        backend.close()
        tools.publish(steps)
    counts, tags = count_tags(output)
    details: dict[str, object] = {"exit_status": status, "tags": counts, "tag_names": tags}
    if tools.layer is not None:
        details["layer"] = tools.layer.to_json()
    # Which status says "tags at the --fail-on level" changed between
    # lintian's versions (1 before 2.105, 2 since; a run-time error is the
    # other): a failure that printed tags is theirs, one that printed none
    # is lintian's own.
    verdict = "pass" if status == 0 else "fail" if counts else "error"
    summary = describe(counts) if verdict != "error" else f"lintian exit status {status}"
    log.line(f"lintian: {verdict} ({summary})")
    return CheckResult(NAME, verdict, summary, details, time.monotonic() - start)


def count_tags(output: str) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Tag counts by severity, and the first tag names of each, from lintian's output."""
    counts: dict[str, int] = {}
    names: dict[str, list[str]] = {}
    for m in _TAG.finditer(output):
        severity = SEVERITIES[m.group(1)]
        counts[severity] = counts.get(severity, 0) + 1
        seen = names.setdefault(severity, [])
        if len(seen) < MAX_TAGS and m.group(2) not in seen:
            seen.append(m.group(2))
    return counts, names


def describe(counts: dict[str, int]) -> str:
    """'1 error, 3 warnings' in lintian's order of severity; 'no tags' when none."""
    parts = []
    for severity in SEVERITIES.values():
        n = counts.get(severity, 0)
        if n:
            plural = "s" if n != 1 and severity in ("error", "warning") else ""
            parts.append(f"{n} {severity}{plural}")
    return ", ".join(parts) or "no tags"
