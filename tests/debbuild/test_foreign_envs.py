"""Environments of other architectures, made with `nsbuild env create --arch`
and used as a user does: an i386 one, run natively under the 32-bit
personality (as sbuild's linux32 schroots), and an arm64 one, emulated by
qemu-user through binfmt_misc. Each builds a package for its architecture.

Each environment is created once per module (about a minute for i386, two
for arm64 here); the arm64 build runs every program under emulation."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from inputs import emulation

from nsbuild.envs import arches

from .conftest import Env, fixture_dsc, private_home
from .cpackage import PACKAGES, c_package

pytestmark = [pytest.mark.slow, pytest.mark.userns]

# Only the main archive: these environments need nothing of -security and
# -updates, and each archive more is one more index that may be mid-sync.
MIRROR = "http://deb.debian.org/debian"
SAY_MACHINE = "echo machine: $(uname -m) $(dpkg --print-architecture)"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """nsbuild with config and cache folders of this module's own."""
    if os.geteuid() == 0:
        pytest.skip("build tests run as an unprivileged user (the sandbox maps subuids)")
    yield from private_home(tmp_path_factory.mktemp("foreign-home"))


def _create(home: Env, name: str, arch: str) -> str:
    r = home.nsbuild("env", "create", name, "--suite", "bookworm", "--arch", arch,
                     "--mirror", MIRROR)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"created environment {name!r}" in r.stdout
    return name


@pytest.fixture(scope="module")
def i386(home: Env) -> str:
    return _create(home, "bookworm-i386", "i386")


@pytest.fixture(scope="module")
def arm64(home: Env) -> str:
    emulation("arm64")
    return _create(home, "bookworm-arm64", "arm64")


def _run(home: Env, *args: str) -> str:
    r = home.nsbuild(*args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _listed(home: Env, name: str) -> str:
    """The line of `nsbuild env list` about environment `name`."""
    (line,) = [x for x in _run(home, "env", "list").splitlines() if x.startswith(f"{name}: ")]
    return line


def _built(home: Env, env: str, source: Path, out: Path) -> tuple[dict[str, Path], str]:
    """Build `source` in `env`: its .debs by package, and its .build log."""
    out.mkdir()
    r = home.nsbuild("build", "--env", env, "--out", str(out), "--json",
                     "--starting-build-commands", SAY_MACHINE, str(source))  # fmt: skip
    summary = json.loads(r.stdout) if r.stdout.strip() else {}
    assert r.returncode == 0, (r.stderr[-3000:], summary.get("message"))
    log = Path(summary["log"]).read_text(errors="replace")
    return {p.name.split("_")[0]: p for p in out.glob("*.deb")}, log


def _field(deb: Path, name: str) -> str:
    r = subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _file_of(deb: Path, member: str, tmp: Path) -> str:
    """What `file` says of one file of a .deb."""
    where = tmp / deb.name
    subprocess.run(["dpkg-deb", "-x", str(deb), str(where)], check=True)
    r = subprocess.run(["file", "-b", str(where / member)], capture_output=True, text=True)
    return r.stdout


# ------------------------------------------------------------------- i386


def test_the_i386_environment_is_listed_with_how_it_runs(home: Env, i386: str) -> None:
    line = _listed(home, i386)
    assert line.startswith(f"{i386}: ready; ") and line.endswith(" MiB; i386 (linux32)"), line
    (row,) = [r for r in json.loads(_run(home, "env", "list", "--json")) if r["name"] == i386]
    assert (row["name"], row["architecture"], row["runs"], row["cannot_run"]) == (
        i386, "i386", "linux32", None)
    assert "i386" in row["description"]


def test_run_in_i386_says_i686_as_dpkg_says_i386(home: Env, i386: str) -> None:
    out = _run(home, "run", "--env", i386, "--", "sh", "-c", "uname -m; dpkg --print-architecture")
    assert out == "i686\ni386\n"


def test_a_session_of_i386_says_i686(home: Env, i386: str) -> None:
    session = _run(home, "session", "begin", i386).strip()
    try:
        out = _run(home, "session", "run", session, "--", "sh", "-c",
                   "uname -m; dpkg --print-architecture")  # fmt: skip
        assert out == "i686\ni386\n"
    finally:
        _run(home, "session", "end", session)


def test_the_virt_servers_testbed_of_i386_says_i686(home: Env, i386: str) -> None:
    """autopkgtest's commands enter the testbed through the virt server's
    execute command: they take the environment's persona too."""
    proc = subprocess.Popen(["autopkgtest-virt-nsbuild", i386], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=home.vars)  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None

    def say(line: str) -> str:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(f"{line}\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    try:
        assert proc.stdout.readline() == "ok\n"
        assert say("open").startswith("ok ")
        answer = say("print-execute-command")
        assert answer.startswith("ok "), answer
        execute = [urllib.parse.unquote(a) for a in answer[3:].split(",")]
        r = subprocess.run([*execute, "sh", "-c", "uname -m; dpkg --print-architecture"],
                           capture_output=True, text=True, env=home.vars)  # fmt: skip
        assert r.stdout == "i686\ni386\n", r.stderr
        assert say("close") == "ok"
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_i386_programs_meet_the_seccomp_filter_of_their_abi(home: Env, i386: str) -> None:
    """The filter has a branch for the i386 ABI: a 32-bit program's keyctl
    (288 there; 250 on x86_64) fails with ENOSYS as a 64-bit one's does,
    and the caller's session keyring stays out of reach."""
    if arches.machine_arch() != "amd64":
        pytest.skip("the i386 system call numbers are those of i386 on amd64")
    script = 'my $r = syscall(288, 0, -3, 0); print "$r ", $! + 0, "\\n"'
    out = _run(home, "run", "--env", i386, "--", "perl", "-e", script)
    assert out == f"-1 {errno.ENOSYS}\n"


# setuid in a host folder bound writable: the seccomp filter's branch for the
# program's ABI must refuse it as on the machine's own, for coreutils' chmod
# (fchmodat) and for perl_chmod (the old chmod call, where the ABI has one).
SETID_SCRIPT = ("cp /bin/true /w/x && cp /bin/true /w/y; chmod 4755 /w/x; "
                "perl -e '{} or print \"perl: $!\\n\"'; "
                "test -u /w/x || test -u /w/y || echo no setuid")


def _setid_refused(home: Env, env: str, tmp: Path, perl_chmod: str) -> None:
    folder = tmp / "w"
    folder.mkdir()
    r = home.nsbuild("run", "--env", env, "--bind", f"{folder}:/w", "--",
                     "sh", "-c", SETID_SCRIPT.format(perl_chmod))  # fmt: skip
    assert "Operation not permitted" in r.stderr, r.stderr
    assert r.stdout == "perl: Operation not permitted\nno setuid\n", (r.stdout, r.stderr)
    for name in ("x", "y"):
        assert (folder / name).stat().st_mode & 0o6000 == 0, name


def test_i386_programs_cannot_make_setuid_files_in_a_shared_bind(
        home: Env, i386: str, tmp_path: Path) -> None:  # fmt: skip
    # 15: chmod in i386's table (on x86_64, 90).
    _setid_refused(home, i386, tmp_path, 'my $p = "/w/y"; syscall(15, $p, 04755) == 0')


def test_i386_builds_hello_as_32_bit_intel(home: Env, i386: str, tmp_path: Path) -> None:
    debs, log = _built(home, i386, fixture_dsc("hello_2.10-3"), tmp_path / "out")
    assert set(debs) == {"hello", "hello-dbgsym"}
    for deb in debs.values():
        assert deb.name.endswith("_2.10-3_i386.deb"), deb.name
        assert _field(deb, "Architecture") == "i386"
    said = _file_of(debs["hello"], "usr/bin/hello", tmp_path)
    assert re.search(r"ELF 32-bit LSB .*Intel (80386|i386)", said), said
    # The build's own commands ran under the 32-bit personality.
    assert "machine: i686 i386" in log


# ------------------------------------------------------------------ arm64


def test_run_in_arm64_is_emulated(home: Env, arm64: str) -> None:
    out = _run(home, "run", "--env", arm64, "--", "sh", "-c", "uname -m; dpkg --print-architecture")
    assert out == "aarch64\narm64\n"
    assert _listed(home, arm64).endswith(" MiB; arm64 (qemu-user)")


def test_emulated_programs_cannot_make_setuid_files_in_a_shared_bind(
        home: Env, arm64: str, tmp_path: Path) -> None:  # fmt: skip
    """qemu-user makes the host's system calls for the arm64 program: the
    machine's own filter applies to what it asks for."""
    _setid_refused(home, arm64, tmp_path, 'chmod(04755, "/w/y")')


def test_arm64_builds_greeter_natively(home: Env, arm64: str, tmp_path: Path) -> None:
    debs, log = _built(home, arm64, c_package(tmp_path), tmp_path / "out")
    assert set(debs) == {*PACKAGES, "libgreeter1-dbgsym", "greeter-dbgsym"}
    for deb in debs.values():
        assert deb.name.endswith("_1.0_arm64.deb"), deb.name
        assert _field(deb, "Architecture") == "arm64"
    said = _file_of(debs["greeter"], "usr/bin/greeter", tmp_path)
    assert "ELF 64-bit LSB" in said and "ARM aarch64" in said, said
    assert "machine: aarch64 arm64" in log
    # A native build runs its test suite: the program ran, under emulation.
    assert re.search(r"^\s*make -j\d+ check", log, re.M), log[-3000:]
