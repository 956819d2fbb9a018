"""Buildbot steps of an nsbuild build: fetch the source, build it with
`nsbuild build`, upload what it made.

The steps' logic runs in the master; the worker runs commands and moves
files. What a worker sends back (its stdout, the names in a build's summary)
is read bounded and checked, and nothing it names is written anywhere on
the master but under the build's own results folder, by a name checked here.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from buildbot.process import buildstep, remotecommand
from buildbot.process.results import CANCELLED, EXCEPTION, FAILURE, RETRY, SUCCESS, WARNINGS
from buildbot.steps.transfer import FileDownload, FileUpload
from twisted.internet import defer, threads

from nsbuild.farm import outcome
from nsbuild.farm.settings import RESULTS_DIR, SOURCES_DIR

SRC, OUT = "src", "out"  # in a build's workdir: the source, nsbuild's --out
# In a build's workdir: nsbuild's --log-file, the .build log as it is
# written, which the worker streams to the master as the log BUILD_LOG.
LOG_FILE, BUILD_LOG = "build.log", "build"
MAX_FILE = outcome.MAX_FILE
# What of a command's stderr and of the .build log (under the source's
# control) goes into the master's database, and of its stdout (the summary,
# a .dsc's name) is kept.
LOG_LIMIT = 64 << 20
STDOUT_LIMIT = outcome.SUMMARY_LIMIT

RESULTS = {outcome.BUILT: SUCCESS, outcome.FAILED: FAILURE, outcome.DEP_WAIT: WARNINGS,
           outcome.ERROR: EXCEPTION}  # fmt: skip

# apt-get source, inside a sandbox of the worker's environment: its apt
# sources gain their deb-src twins (one-line and deb822 files), and the
# .dsc fetched is named on stdout's last line. A name (or version) the
# archive does not have is bad input, told apart by its exit status.
NO_SUCH_SOURCE = 64
FETCH_SCRIPT = r"""set -e
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
  [ -f "$f" ] && sed -n 's/^deb /deb-src /p' "$f"
done > /etc/apt/sources.list.d/nsbuild-farm-src.list
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] && sed -i 's/^Types: deb$/Types: deb deb-src/' "$f"
done
apt-get -q update >&2
name=${1%%=*}
found=$(apt-cache showsrc --only-source "$name" 2>/dev/null || true)
if ! printf '%s\n' "$found" | grep -q '^Package: '; then
  echo "the archive has no source package $name" >&2; exit @NO_SUCH_SOURCE@
fi
if [ "$name" != "$1" ] && ! printf '%s\n' "$found" | grep -qxF "Version: ${1#*=}"; then
  echo "the archive has no version ${1#*=} of the source package $name" >&2
  exit @NO_SUCH_SOURCE@
fi
apt-get -q source --download-only "$1" >&2
ls -1 -- *.dsc | tail -n 1
""".replace("@NO_SUCH_SOURCE@", str(NO_SUCH_SOURCE))


def worker_nsbuild(step: buildstep.BuildStep) -> str:
    """The worker's nsbuild, as it said at connection (info/nsbuild-command)."""
    info = step.build.getWorkerInfo()
    found = info.getProperty("nsbuild-command") if info is not None else None
    found = found.strip() if isinstance(found, str) else ""
    return found if found.startswith("/") else "nsbuild"


# Buildbot refuses a step name over 50 characters (an exception mid-build),
# and makes a name unique by adding "_N".
STEP_NAME_LIMIT = 47


def step_name(verb: str, file: str) -> str:
    """`verb file`, the file's name cut in the middle to fit Buildbot's limit."""
    name = f"{verb} {file}"
    if len(name) <= STEP_NAME_LIMIT:
        return name
    room = STEP_NAME_LIMIT - len(verb) - 2  # the space and "~"
    return f"{verb} {file[:room // 2]}~{file[len(file) - (room - room // 2):]}"


def worker_egress(step: buildstep.BuildStep) -> list[str]:
    """`--egress-engine nftables` for a worker whose builds use the kernel
    firewall (run as root: info/nsbuild-egress-engine), else nothing."""
    info = step.build.getWorkerInfo()
    found = info.getProperty("nsbuild-egress-engine") if info is not None else None
    wanted = isinstance(found, str) and found.strip() == "nftables"
    return ["--egress-engine", "nftables"] if wanted else []


def _master_dir(step: buildstep.BuildStep) -> Path:
    return Path(step.master.basedir)


class BoundedShellCommand(remotecommand.RemoteShellCommand):  # type: ignore[misc]
    """A shell command whose stdout and stderr the master keeps (in memory,
    in the stdio log) only up to a budget each: a worker, and a build's own
    output, decide how much they send."""

    budgets: dict[str, outcome.Budget]

    def _take(self, stream: str, data: Any) -> str:
        if not isinstance(data, str):
            data = bytes(data).decode(errors="replace")
        return self.budgets[stream].take(data)

    def addStdout(self, data: Any) -> Any:
        kept = self._take("stdout", data)
        return super().addStdout(kept) if kept else defer.succeed(None)

    def addStderr(self, data: Any) -> Any:
        kept = self._take("stderr", data)
        return super().addStderr(kept) if kept else defer.succeed(None)

    def add_stdout_lines(self, data: Any, is_flushed: bool) -> Any:
        kept = self._take("stdout", data)
        return super().add_stdout_lines(kept, is_flushed) if kept else defer.succeed(None)

    def add_stderr_lines(self, data: Any, is_flushed: bool) -> Any:
        kept = self._take("stderr", data)
        return super().add_stderr_lines(kept, is_flushed) if kept else defer.succeed(None)

    def addToLog(self, logname: str, data: Any) -> Any:
        # A log file the worker follows (logfiles=): only those given a budget.
        kept = self._take(logname, data) if logname in self.budgets else ""
        return super().addToLog(logname, kept) if kept else defer.succeed(None)


@defer.inlineCallbacks
def bounded_command(step: Any, argv: list[str]) -> Any:
    """ShellMixin's remote command for `argv`, stdout collected, both
    streams bounded (ShellMixin builds a RemoteShellCommand itself, with
    nothing to choose the class: it is given the bounded one's methods)."""
    cmd = yield step.makeRemoteShellCommand(command=argv, collectStdout=True)
    cmd.__class__ = BoundedShellCommand
    cmd.budgets = {"stdout": outcome.Budget(STDOUT_LIMIT), "stderr": outcome.Budget(LOG_LIMIT),
                   **{name: outcome.Budget(LOG_LIMIT) for name in step.logfiles}}  # fmt: skip
    return cmd


class FetchSource(buildstep.BuildStep):
    """Put the source in the workdir's src/: the .dsc and its files from the
    master (property `dsc`, a path under its sources/), or `name[=version]`
    (property `source`) by apt-get source in the worker's environment."""

    name = "fetch source"

    def __init__(self, env: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.nsbuild_env = env

    @defer.inlineCallbacks
    def run(self) -> Any:
        dsc = str(self.getProperty("dsc") or "")
        source = str(self.getProperty("source") or "")
        if bool(dsc) == bool(source):
            yield self.addCompleteLog("error", "give exactly one of the properties dsc, source\n")
            return EXCEPTION
        if dsc:
            steps = self._downloads(dsc)
            if isinstance(steps, str):
                yield self.addCompleteLog("error", steps + "\n")
                return EXCEPTION
            self.build.addStepsAfterCurrentStep(steps)
            self.setProperty("nsbuild_input", f"{SRC}/{Path(dsc).name}", "nsbuild")
            self.descriptionDone = [f"{Path(dsc).name} from the master"]
            return SUCCESS
        try:
            outcome.split_source(source)
        except ValueError as e:
            yield self.addCompleteLog("error", f"{e}\n")
            return EXCEPTION
        self.build.addStepsAfterCurrentStep([FetchFromArchive(self.nsbuild_env, source,
                                                              haltOnFailure=True)])
        self.descriptionDone = [f"{source} from the archive"]
        return SUCCESS

    def _downloads(self, dsc: str) -> list[buildstep.BuildStep] | str:
        """One download per file of the .dsc, or why there is none."""
        from nsbuild.farm.dscfiles import DscError, dsc_files

        root = (_master_dir(self) / SOURCES_DIR).resolve()
        path = (_master_dir(self) / dsc).resolve()
        if not path.is_relative_to(root) or not outcome.plain_name(path.name):
            return f"not a .dsc under the master's {SOURCES_DIR}/: {dsc!r}"
        try:
            names = [path.name, *dsc_files(path)]
        except DscError as e:
            return str(e)
        # Bad input, not a build that failed: said before any download.
        lacking = [n for n in names if not (path.parent / n).is_file()]
        if lacking:
            return f"the master lacks files the .dsc lists: {', '.join(lacking)[:300]}"
        return [
            FileDownload(mastersrc=str(path.parent / n), workerdest=f"{SRC}/{n}",
                         maxsize=MAX_FILE, mode=0o644, name=step_name("download", n),
                         haltOnFailure=True)
            for n in names
        ]  # fmt: skip


class FetchFromArchive(buildstep.ShellMixin, buildstep.BuildStep):
    """apt-get source, in a throw-away sandbox of the worker's environment
    whose network reaches only the environment's mirrors."""

    name = "apt-get source"

    def __init__(self, env: str, source: str, **kw: Any) -> None:
        kw = self.setupShellMixin({**kw, "logEnviron": False, "sigtermTime": 30})
        super().__init__(**kw)
        self.nsbuild_env, self.source = env, source
        self.said = ""  # why the build ends here, for the build's own text

    def getResultSummary(self) -> dict[str, str]:
        if not self.said:
            return super().getResultSummary()  # type: ignore[no-any-return]
        return {"step": self.said, "build": self.said}

    @defer.inlineCallbacks
    def run(self) -> Any:
        argv = [worker_nsbuild(self), "run", "--env", self.nsbuild_env, "--net", "allow",
                "--allow-from-env", *worker_egress(self), "--bind", f"{SRC}:/src",
                "--chdir", "/src", "--",
                "sh", "-c", FETCH_SCRIPT, "sh", self.source]  # fmt: skip
        cmd = yield bounded_command(self, argv)
        yield self.runCommand(cmd)
        if cmd.rc == NO_SUCH_SOURCE:
            # Bad input (buildd's error), not a build that failed.
            self.setProperty("nsbuild_status", outcome.ERROR, "nsbuild")
            self.said = f"no source package {self.source} in {self.nsbuild_env}"
            return EXCEPTION
        if cmd.didFail():
            self.descriptionDone = [f"apt-get source {self.source} failed"]
            return FAILURE
        # The last line names the .dsc; a name that is not a plain one is not used.
        name = outcome.plain_name(cmd.stdout[-300:].strip().rsplit("\n", 1)[-1])
        if not name or not name.endswith(".dsc"):
            yield self.addCompleteLog("error", "apt-get source named no .dsc\n")
            return FAILURE
        self.setProperty("nsbuild_input", f"{SRC}/{name}", "nsbuild")
        self.descriptionDone = [f"fetched {name}"]
        return SUCCESS


# Note: ShellMixin's `env` is the command's environment; the nsbuild
# environment's name is `nsbuild_env` in these steps.


class NsbuildBuild(buildstep.ShellMixin, buildstep.BuildStep):
    """`nsbuild build`; the .build log, as it is written (--log-file), is
    the step's log `build` (the worker follows the file, and sends what it
    gains every few seconds); the stdio log has nsbuild's own lines, not the
    build's output a second time. The result is buildd's: built (SUCCESS),
    failed (FAILURE), dep-wait (WARNINGS, naming the unmet dependencies in
    the build's text and the property nsbuild_unmet), error (EXCEPTION).
    Then the build's files are uploaded to the master."""

    name = "nsbuild build"

    def __init__(self, env: str, **kw: Any) -> None:
        kw = self.setupShellMixin({**kw, "logEnviron": False, "sigtermTime": 30,
                                   "warnOnWarnings": True,
                                   "logfiles": {BUILD_LOG: LOG_FILE}})  # fmt: skip
        super().__init__(**kw)
        self.nsbuild_env = env
        self.summary_text = ""
        self.stdout_text = ""

    @defer.inlineCallbacks
    def run(self) -> Any:
        argv = [worker_nsbuild(self), "build", "--json", "--log-file", LOG_FILE,
                *worker_egress(self), "--env", self.nsbuild_env, "--out", OUT,
                str(self.getProperty("nsbuild_input"))]  # fmt: skip
        cmd = yield bounded_command(self, argv)
        yield self.runCommand(cmd)
        if self.stopped and getattr(self.build, "stopped_reason", None) == "Master Shutdown":
            # Buildbot's own shutdown: build again once the master is back
            # (the interrupted command would otherwise make it CANCELLED).
            return RETRY
        if self.stopped:
            return CANCELLED
        self.stdout_text = cmd.stdout[: outcome.SUMMARY_LIMIT]
        summary = outcome.read_summary(self.stdout_text)
        yield self.addCompleteLog("summary.json", self.stdout_text)
        state = outcome.judge(cmd.rc, summary)
        if state == outcome.ERROR and outcome.state(cmd.rc) != outcome.ERROR:
            summary = {**summary, "message": f"the build's summary does not agree with its "
                                             f"exit status {cmd.rc}"}  # fmt: skip
        try:
            found = outcome.files(summary)
        except ValueError as e:
            found, state = {}, outcome.ERROR
            summary = {**summary, "message": str(e)}
        self._properties(summary, state)
        yield self._upload(found)
        return RESULTS[state]

    def _properties(self, summary: dict[str, Any], state: str) -> None:
        pkg, ver = outcome.text(summary, "package", 100), outcome.text(summary, "version", 100)
        self.setProperty("nsbuild_status", state, "nsbuild")
        self.setProperty("nsbuild_package", pkg, "nsbuild")
        self.setProperty("nsbuild_version", ver, "nsbuild")
        if state == outcome.DEP_WAIT:
            self.setProperty("nsbuild_unmet", outcome.unmet(summary), "nsbuild")
        self.summary_text = outcome.describe(state, summary)

    @defer.inlineCallbacks
    def _upload(self, found: dict[str, outcome.Upload]) -> Any:
        """The build's files to the master's results/BUILDER/NUMBER/, each
        no larger than its summary claims, then their sha256 checked."""
        dest = f"{RESULTS_DIR}/{self.build.builder.name}/{self.build.number}"
        self.setProperty("nsbuild_results", dest, "nsbuild")
        folder = _master_dir(self) / dest
        # A folder of this number from before a database reset holds
        # another build's files.
        yield threads.deferToThread(shutil.rmtree, folder, True)
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(self.stdout_text)
        self.setProperty("nsbuild_files", sorted(found), "nsbuild")
        uploads: list[buildstep.BuildStep] = [
            FileUpload(workersrc=u.path, masterdest=f"{dest}/{name}", maxsize=u.maxsize,
                       mode=0o644, alwaysRun=True, flunkOnFailure=True,
                       name=step_name("upload", name))
            for name, u in sorted(found.items())
        ]  # fmt: skip
        if found:
            uploads.append(CheckUploads(folder, found))
        self.build.addStepsAfterCurrentStep(uploads)

    def getResultSummary(self) -> dict[str, str]:
        if not self.summary_text:
            return super().getResultSummary()  # type: ignore[no-any-return]
        if self.results == SUCCESS:
            return {"step": self.summary_text}
        return {"step": self.summary_text, "build": self.summary_text}


class CheckUploads(buildstep.BuildStep):
    """The uploaded files against the sha256 the summary claims: a failed,
    cut or swapped upload makes the build an error, not a success. The
    network log, once checked, is attached as the log `network`."""

    name = "check uploads"
    alwaysRun = True

    def __init__(self, folder: Path, found: dict[str, outcome.Upload], **kw: Any) -> None:
        super().__init__(**kw)
        self.folder, self.found = folder, found

    @defer.inlineCallbacks
    def run(self) -> Any:
        bad = yield threads.deferToThread(_mismatches, self.folder, self.found)
        if not bad:
            for name in sorted(n for n in self.found if n.endswith(".network.jsonl"))[:1]:
                text = yield threads.deferToThread(_head, self.folder / name, NET_LOG_LIMIT)
                yield self.addCompleteLog("network", text)
            return SUCCESS
        self.setProperty("nsbuild_status", outcome.ERROR, "nsbuild")
        yield self.addCompleteLog("error", "".join(f"{n}: missing or not as the summary "
                                                   "says\n" for n in bad))  # fmt: skip
        self.descriptionDone = [f"uploads wrong: {', '.join(bad)[:200]}"]
        return EXCEPTION


NET_LOG_LIMIT = 1 << 20  # of the network log, in the master's database


def _head(path: Path, limit: int) -> str:
    """The start of a file as text (JSON lines: escaped already), said cut."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    cut = f"[nsbuild farm: cut at {limit} bytes; the whole file is with the results]\n"
    return data[:limit].decode(errors="replace") + (cut if len(data) > limit else "")


def _mismatches(folder: Path, found: dict[str, outcome.Upload]) -> list[str]:
    bad = []
    for name, u in sorted(found.items()):
        path = folder / name
        if not path.is_file() or path.is_symlink():
            bad.append(name)
            continue
        if u.sha256 is not None:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            if digest.hexdigest() != u.sha256:
                bad.append(name)
    return bad
