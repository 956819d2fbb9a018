"""The 32-bit personality (Sandbox.personality): what the sandbox's command
and the commands entering it see, and that the runtime's own hardening does
not depend on the persona nsbuild itself runs under."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox_helpers import NSBUILD
from waiting import HANG_GUARD, wait_for

from nsbuild.sandbox import Process, Sandbox, caller_idmap, host_view, spawn
from nsbuild.sandbox.enter import persona, sandbox_pids, start
from nsbuild.sandbox.spec import SpecError
from nsbuild.sandbox.syscalls import MACHINE, PER_LINUX32

pytestmark = pytest.mark.userns

# What uname says under PER_LINUX32, on the machines that have a 32-bit mode.
THIRTY_TWO = {"x86_64": "i686", "aarch64": "armv8l"}.get(MACHINE)
needs_32 = pytest.mark.skipif(THIRTY_TWO is None, reason=f"{MACHINE} has no 32-bit persona")


def _spec(tmp: Path, argv: tuple[str, ...], personality: int | None) -> Sandbox:
    return Sandbox(argv=argv, idmap=caller_idmap(), mounts=host_view(str(tmp)), cwd=str(tmp),
                   env=(("PATH", "/usr/bin:/bin"),), personality=personality)  # fmt: skip


def _output(tmp: Path, start_it: object) -> tuple[int, str]:
    out = tmp / "out"
    with open(out, "wb") as f, open(os.devnull, "rb") as null:
        proc = start_it(null.fileno(), f.fileno())  # type: ignore[operator]
    return proc.wait(), out.read_text()


@needs_32
def test_the_command_runs_under_the_32_bit_personality(tmp_path: Path) -> None:
    spec = _spec(tmp_path, ("sh", "-c", "uname -m; cat /proc/self/personality"), PER_LINUX32)
    status, out = _output(tmp_path, lambda i, o: spawn(spec, stdin=i, stdout=o))
    assert (status, out) == (0, f"{THIRTY_TWO}\n00000008\n")


def test_without_a_personality_the_machine_is_its_own(tmp_path: Path) -> None:
    spec = _spec(tmp_path, ("uname", "-m"), None)
    status, out = _output(tmp_path, lambda i, o: spawn(spec, stdin=i, stdout=o))
    assert (status, out) == (0, f"{MACHINE}\n")


@pytest.mark.parametrize("bad", [0x0040008, 0x0400000, -1, 1 << 32])
def test_flags_are_no_persona(tmp_path: Path, bad: int) -> None:
    # ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC...: ways to weaken the command, not personas.
    with pytest.raises(SpecError, match="personality must be a persona without flags"):
        _spec(tmp_path, ("true",), bad).validate()


@pytest.fixture
def linux32_sandbox(tmp_path: Path) -> Iterator[Process]:
    spec = _spec(tmp_path, ("sleep", "infinity"), PER_LINUX32)
    with open(os.devnull, "rb") as null:
        proc = spawn(spec, stdin=null.fileno(), stdout=null.fileno())
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@needs_32
def test_commands_entering_take_the_sandboxs_persona(linux32_sandbox: Process,
                                                      tmp_path: Path) -> None:  # fmt: skip
    _init, pid = sandbox_pids(linux32_sandbox)
    assert persona(pid) == PER_LINUX32
    script = ("uname -m; grep Seccomp: /proc/self/status | tr -d '\\t'",)
    status, out = _output(tmp_path, lambda i, o: start(pid, ("sh", "-c", *script),
                                                        stdin=i, stdout=o))  # fmt: skip
    # The runtime's hardening is there too: the seccomp filter (mode 2).
    assert (status, out) == (0, f"{THIRTY_TWO}\nSeccomp:2\n")
    status, out = _output(tmp_path, lambda i, o: start(pid, ("uname", "-m"), stdin=i, stdout=o,
                                                        personality=0))  # fmt: skip
    assert (status, out) == (0, f"{MACHINE}\n")


def _entered_persona(tmp: Path, argv: tuple[str, ...], taken: int, what: str) -> str:
    """The persona a command entering the sandbox of `argv` runs under, once
    `argv` has taken the persona `taken` on itself."""
    spec = _spec(tmp, argv, None)
    with open(os.devnull, "rb") as null:
        proc = spawn(spec, stdin=null.fileno(), stdout=null.fileno())
    try:
        _init, pid = sandbox_pids(proc)
        wait_for(lambda: Path(f"/proc/{pid}/personality").read_text() == f"{taken:08x}\n", what)
        status, out = _output(tmp, lambda i, o: start(pid, ("cat", "/proc/self/personality"),
                                                       stdin=i, stdout=o))  # fmt: skip
        assert status == 0
        return out
    finally:
        proc.kill()
        proc.wait()


def test_a_flag_the_command_set_on_itself_does_not_pass_to_commands_entering(
        tmp_path: Path) -> None:  # fmt: skip
    # setarch -R: ADDR_NO_RANDOMIZE on the sandbox's own command.
    argv = ("setarch", MACHINE, "-R", "sleep", "infinity")
    out = _entered_persona(tmp_path, argv, 0x0040000, "setarch -R to set ADDR_NO_RANDOMIZE")
    assert out == "00000000\n"


PER_BSD = 0x0006


def test_a_persona_the_command_gave_itself_does_not_pass_to_commands_entering(
        tmp_path: Path) -> None:  # fmt: skip
    """The sandbox's command is the sandbox's: a persona it took on itself
    (PER_BSD here) is nothing the sandbox's owner asked for."""
    script = (f"import ctypes, os; ctypes.CDLL(None).personality({PER_BSD}); "
              "os.execvp('sleep', ['sleep', 'infinity'])")  # fmt: skip
    out = _entered_persona(tmp_path, ("python3", "-c", script), PER_BSD, "PER_BSD taken")
    assert out == "00000000\n"


@needs_32
def test_nsbuild_run_under_linux32_keeps_its_seccomp_filter(tmp_path: Path) -> None:
    """nsbuild started under a 32-bit persona (linux32) still picks its own
    machine's system call numbers and seccomp filter: uname no longer names it."""
    r = subprocess.run(["linux32", *NSBUILD, "run", "--", "sh", "-c",
                        "uname -m; grep Seccomp: /proc/self/status | tr -d '\\t'"],
                       cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                       timeout=HANG_GUARD)  # fmt: skip
    assert (r.returncode, r.stdout) == (0, f"{THIRTY_TWO}\nSeccomp:2\n"), r.stderr

