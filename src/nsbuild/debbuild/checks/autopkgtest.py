"""--run-autopkgtest: the package's tests on the built .debs, as sbuild runs
them: the host's `autopkgtest` on the .changes (and the .dsc when the
.changes lists no source), here through nsbuild's own virt server on the
build's environment, so each test gets a fresh session of it.

autopkgtest's exit status is the verdict (as sbuild reads it):

    0, 2   pass (2: some tests were skipped, or flaky ones failed)
    8      pass: the package has no tests (the summary says so)
    4, 6   fail: at least one test failed
    12     fail: the package is erroneous (its test dependencies cannot be
           installed, say)
    16, 20 error: the testbed, or autopkgtest, failed; nothing was learnt

Test names in its summary file come from the package: escaped, bounded.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from nsbuild.debbuild.checks.inputs import CheckInputs
from nsbuild.debbuild.checks.session import CheckError
from nsbuild.debbuild.result import BuildRequest, CheckResult
from nsbuild.printable import printable

NAME = "autopkgtest"
SERVER = "autopkgtest-virt-nsbuild"
# What of autopkgtest's summary file is read, and how many tests are named.
MAX_SUMMARY = 1 << 20
MAX_TESTS = 200
# A test's line of the summary file; other lines quote what failed.
_RESULT = re.compile(r"^(\S+) +(PASS|FAIL|SKIP|FLAKY|NEUTRAL)\b", re.M)
_VERDICTS = {0: "pass", 2: "pass", 8: "pass", 4: "fail", 6: "fail", 12: "fail", 14: "fail"}


class Running:
    """autopkgtest, started: it runs on the host beside the checks that run
    in a session of their own (lintian, the install check), its output kept
    apart until `finish()` puts it in its section of the log."""

    def __init__(self, inputs: CheckInputs) -> None:
        program = shutil.which("autopkgtest")
        if program is None:
            raise CheckError("autopkgtest is not installed on this machine (package autopkgtest)")
        dsc = inputs.dsc()
        if dsc is None:
            raise CheckError("no source package to take the tests from: the .changes lists none")
        sources = [] if inputs.source_in_changes() else [str(dsc)]
        self.inputs = inputs
        self.start = time.monotonic()
        self._stack = ExitStack()
        tmp = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="nsbuild-ap-")))
        self.summary_file = tmp / "summary"
        self.argv = [program, *sources, str(inputs.changes), f"--summary-file={self.summary_file}",
                     *with_server(inputs.req, inputs.environment)]  # fmt: skip
        self.output = self._stack.enter_context(tempfile.TemporaryFile(dir=tmp))
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self.output,
                                         stderr=subprocess.STDOUT)  # fmt: skip
        except OSError as e:
            self._stack.close()
            raise CheckError(f"cannot run {program}: {e.strerror}") from None

    def finish(self) -> CheckResult:
        """Wait for autopkgtest, then say in the log what it did."""
        try:
            status = self.proc.wait()
            took = time.monotonic() - self.start
            log = self.inputs.log
            log.section("autopkgtest")
            log.line(f"$ {' '.join(self.argv)}")
            self.output.seek(0)
            with log.command_output() as fd, os.fdopen(os.dup(fd), "wb") as out:
                shutil.copyfileobj(self.output, out)
            log.line(f"[nsbuild: autopkgtest exited {status} after {took:.1f}s]")
            tests = read_summary(self.summary_file)
        finally:
            self.stop()
        verdict = _VERDICTS.get(status, "error")
        summary = describe(status, tests)
        log.line(f"autopkgtest: {verdict} ({summary})")
        details: dict[str, object] = {"exit_status": status, "tests": tests}
        return CheckResult(NAME, verdict, summary, details, took)

    def stop(self) -> None:
        """End autopkgtest if it still runs (it tears its testbed down on
        SIGTERM), and drop what it left; idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        self._stack.close()


def run(inputs: CheckInputs) -> CheckResult:
    return Running(inputs).finish()


def with_server(req: BuildRequest, environment: str) -> list[str]:
    """The user's --autopkgtest-opts, then `-- SERVER...` unless they name
    one: nsbuild's own on the build's environment (the local backend), or
    the virt server the build ran through (the autopkgtest backend)."""
    opts = list(req.autopkgtest_opts)
    if "--" in opts:
        return opts
    if req.backend == "local":
        # The server's default network: the environment's mirrors and
        # nothing else, for apt to install the tests' dependencies.
        return [*opts, "--", server_program(), environment]
    if req.backend == "autopkgtest" and req.backend_args:
        return [*opts, "--", *req.backend_args]
    raise CheckError(f"autopkgtest: no virt server for backend {req.backend}: "
                     "name one in --autopkgtest-opts ('-- SERVER ARGS')")  # fmt: skip


def server_program() -> str:
    """nsbuild's virt server of this very installation (beside its Python,
    as a venv has it), else the one on PATH."""
    beside = Path(sys.executable).parent / SERVER
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(SERVER)
    if found is None:
        raise CheckError(f"{SERVER} not found beside {sys.executable} nor on PATH")
    return found


def read_summary(path: Path) -> dict[str, str]:
    """Test name -> result word (PASS, FAIL, SKIP, FLAKY...), from the summary
    file autopkgtest wrote: names escaped, the first MAX_TESTS."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    with os.fdopen(fd, "rb") as f:
        text = f.read(MAX_SUMMARY).decode(errors="replace")
    tests: dict[str, str] = {}
    for m in _RESULT.finditer(text):
        if len(tests) < MAX_TESTS:
            tests[printable(m.group(1), 100)] = m.group(2)
    return tests


def describe(status: int, tests: dict[str, str]) -> str:
    """'3 tests: 2 PASS, 1 FAIL'; 'the package has no tests' for status 8."""
    if status == 8:
        return "the package has no tests"
    if not tests:
        return f"autopkgtest exit status {status}, no test ran"
    words: dict[str, int] = {}
    for result in tests.values():
        words[result] = words.get(result, 0) + 1
    counts = ", ".join(f"{n} {w}" for w, n in sorted(words.items()))
    plural = "s" if len(tests) != 1 else ""
    return f"{len(tests)} test{plural}: {counts}" + (
        f" (autopkgtest exit status {status})" if status not in (0, 2, 4, 6) else ""
    )
