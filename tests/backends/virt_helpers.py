"""Helpers shared by the backend tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote, unquote

from debbuild.conftest import Env

HERE = Path(__file__).resolve().parent
VENV_BIN = str(Path(sys.executable).parent)
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run(
    env: Env, argv: list[str], *, cwd: Path | None = None, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a program as a user would, output captured (a hang ends at the
    test's time limit, or at `timeout` seconds)."""
    return subprocess.run(
        argv,
        env=env.vars,
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def sessions(env: Env) -> list[str]:
    """The session folders of the test session's cache (live or left behind)."""
    d = env.cache / "nsbuild" / "sessions"
    return sorted(os.listdir(d)) if d.is_dir() else []


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def tiny_package(parent: Path, tests: dict[str, str] | None = None) -> Path:
    """A native source tree that builds one Architecture: all .deb with nothing
    but dpkg-dev (no debhelper: it also builds where nothing can be installed).
    `tests` maps autopkgtest names to shell text; `needs-root` in a name's text
    as a first-line comment sets that restriction."""
    tree = parent / "tiny-1.0"
    (tree / "debian" / "source").mkdir(parents=True)
    (tree / "debian" / "control").write_text(
        "Source: tiny\nSection: misc\nPriority: optional\n"
        "Maintainer: nsbuild tests <tests@nsbuild.invalid>\n"
        "Standards-Version: 4.6.2\nRules-Requires-Root: no\n\n"
        "Package: tiny\nArchitecture: all\n"
        "Description: nsbuild test package without build dependencies\n"
        " Built by hand, without debhelper.\n"
    )
    (tree / "debian" / "changelog").write_text(
        "tiny (1.0) bookworm; urgency=medium\n\n  * Test package.\n\n"
        " -- nsbuild tests <tests@nsbuild.invalid>  Mon, 01 Jan 2024 00:00:00 +0000\n"
    )
    (tree / "debian" / "source" / "format").write_text("3.0 (native)\n")
    (tree / "debian" / "copyright").write_text("Written for nsbuild's tests.\n")
    rules = tree / "debian" / "rules"
    rules.write_text(
        "#!/usr/bin/make -f\n"
        "build build-arch build-indep:\n\ttrue\n"
        "binary binary-arch binary-indep:\n"
        "\tmkdir -p debian/tmp/DEBIAN debian/tmp/usr/share/doc/tiny\n"
        "\techo hello > debian/tmp/usr/share/doc/tiny/greeting\n"
        "\tdpkg-gencontrol -ptiny -Pdebian/tmp\n"
        "\tdpkg-deb --root-owner-group --build debian/tmp ..\n"
        "clean:\n\trm -rf debian/tmp debian/files\n"
    )
    rules.chmod(0o755)
    if tests:
        (tree / "debian" / "tests").mkdir()
        stanzas = []
        for name, text in tests.items():
            script = tree / "debian" / "tests" / name
            script.write_text(f"#!/bin/sh\n{text}\n")
            script.chmod(0o755)
            stanza = f"Tests: {name}\nDepends: dpkg\n"
            if text.startswith("# needs-root"):
                stanza += "Restrictions: needs-root\n"
            stanzas.append(stanza)
        (tree / "debian" / "tests" / "control").write_text("\n".join(stanzas))
    return tree


class RawServer:
    """autopkgtest-virt-nsbuild spoken to line by line: a refused copy does not
    end it (VirtServer raises on any answer but ok)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(["autopkgtest-virt-nsbuild", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        assert self._line() == "ok"

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().decode().strip()

    def say(self, *words: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write((" ".join(quote(w) for w in words) + "\n").encode())
        self.proc.stdin.flush()
        return self._line()

    def execute_command(self) -> list[str]:
        return [unquote(a) for a in self.say("print-execute-command").split()[1].split(",")]

    def quit(self) -> str:
        """The server's stderr, once it quit."""
        assert self.proc.stdin is not None and self.proc.stderr is not None
        self.proc.stdin.write(b"quit\n")
        self.proc.stdin.close()
        assert self.proc.wait(timeout=120) == 0
        return self.proc.stderr.read().decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
