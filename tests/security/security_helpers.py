"""Helpers of the escape suite and the fault tests: run a probe inside a sandbox
and read its findings, an environment home on the CI tarball.

Named uniquely (not `helpers.py`): tests import it by module name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from inputs import tarball
from waiting import HANG_GUARD

NSBUILD = (sys.executable, "-m", "nsbuild")
PY = "/usr/bin/python3"

# Prepended to every probe: `attempt(name, fn)` records what an attempt gave,
# and `done()` prints the record as one JSON line for the test to judge.
PROBE_PRELUDE = '''
import ctypes, errno, json, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
RESULTS = {}
def attempt(name, fn):
    try:
        value = fn()
        RESULTS[name] = {"ok": True, "value": repr(value)[:300]}
    except OSError as e:
        RESULTS[name] = {"ok": False, "errno": errno.errorcode.get(e.errno, str(e.errno)),
                         "error": str(e)[:300]}
    except Exception as e:
        RESULTS[name] = {"ok": False, "errno": None, "error": f"{type(e).__name__}: {e}"[:300]}
def syscall(n, *args):
    r = libc.syscall(ctypes.c_long(n), *args)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r
def done():
    print("PROBE " + json.dumps(RESULTS), flush=True)
'''


def probe_argv(code: str, *args: str) -> list[str]:
    """argv running a probe (PROBE_PRELUDE + code) with the host's python inside."""
    return [PY, "-c", PROBE_PRELUDE + textwrap.dedent(code) + "\ndone()\n", *args]


def results(r: subprocess.CompletedProcess[str]) -> dict[str, dict[str, object]]:
    for line in r.stdout.splitlines():
        if line.startswith("PROBE "):
            found: dict[str, dict[str, object]] = json.loads(line[len("PROBE "):])
            return found
    raise AssertionError(f"the probe printed no result\n{explain(r)}")


def explain(r: subprocess.CompletedProcess[str]) -> str:
    return f"exit status {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"


def run_nsbuild(*args: str, cwd: Path | str, env: Mapping[str, str] | None = None,
                pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`python -m nsbuild ARGS...` as a user runs it, output captured."""
    return subprocess.run(
        [*NSBUILD, *args], cwd=cwd, env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=HANG_GUARD,
        check=False, pass_fds=pass_fds,
    )


def probe(code: str, *nsbuild_args: str, cwd: Path | str, args: tuple[str, ...] = (),
          pass_fds: tuple[int, ...] = ()) -> dict[str, dict[str, object]]:
    """Run a probe in `nsbuild run NSBUILD_ARGS -- ...`; its results by attempt name."""
    r = run_nsbuild("run", *nsbuild_args, "--", *probe_argv(code, *args), cwd=cwd,
                    pass_fds=pass_fds)
    assert r.returncode == 0, explain(r)
    return results(r)


def failed(res: dict[str, dict[str, object]], name: str, *errnos: str) -> None:
    """Assert the attempt `name` failed (with one of `errnos`, when given)."""
    got = res[name]
    assert got["ok"] is False, f"attempt {name!r} SUCCEEDED: {got}"
    if errnos:
        assert got["errno"] in errnos, f"attempt {name!r} failed, but with {got}"


@dataclass(frozen=True)
class EnvHome:
    """XDG folders where the environment `bookworm` exists."""

    config: Path
    cache: Path

    def vars(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["XDG_CONFIG_HOME"], env["XDG_CACHE_HOME"] = str(self.config), str(self.cache)
        env.update(extra)
        return env


def env_home_for(factory: pytest.TempPathFactory) -> Iterator[EnvHome]:
    if os.geteuid() == 0:
        pytest.skip("environment tests run as the unprivileged test user")
    base = factory.getbasetemp()
    config = base / "nsbuild-security-config"
    cache = base / "nsbuild-security-cache"
    chroot_d = config / "nsbuild" / "chroot.d"
    chroot_d.mkdir(parents=True, exist_ok=True)
    cache.mkdir(exist_ok=True)
    (chroot_d / "bookworm").write_text(
        f"Name: bookworm\nType: tarball\nPath: {tarball()}\nSuite: bookworm\n"
        "Architecture: amd64\nMirror: http://deb.debian.org/debian\n"
    )
    home = EnvHome(config, cache)
    yield home
    # Files of the subordinate range: only a user namespace can delete them.
    from nsbuild.envs.remove import remove_tree

    subprocess.run([*NSBUILD, "gc"], env=home.vars(), capture_output=True, check=False)
    if cache.exists():
        remove_tree(cache)


def tiny_package(parent: Path, name: str) -> Path:
    """A native package that builds with nothing but dpkg-dev (no Build-Depends)."""
    tree = parent / f"{name}-1.0"
    (tree / "debian" / "source").mkdir(parents=True)
    (tree / "debian" / "source" / "format").write_text("3.0 (native)\n")
    (tree / "debian" / "control").write_text(textwrap.dedent(f"""\
        Source: {name}
        Maintainer: nsbuild tests <tests@nsbuild.invalid>
        Standards-Version: 4.6.2
        Rules-Requires-Root: no

        Package: {name}
        Architecture: all
        Description: nsbuild fault-injection package
         Built while being killed.
        """))
    (tree / "debian" / "changelog").write_text(
        f"{name} (1.0) bookworm; urgency=medium\n\n  * Test.\n\n"
        " -- nsbuild tests <tests@nsbuild.invalid>  Mon, 01 Jan 2024 00:00:00 +0000\n")
    rules = textwrap.dedent(f"""\
        #!/usr/bin/make -f
        build build-arch build-indep:
        \tsleep 2
        binary binary-arch binary-indep:
        \tmkdir -p debian/tmp/DEBIAN
        \tdpkg-gencontrol -p{name} -Pdebian/tmp
        \tdpkg-deb --build debian/tmp ..
        clean:
        \trm -rf debian/tmp debian/files
        """)
    (tree / "debian" / "rules").write_text(rules)
    (tree / "debian" / "rules").chmod(0o755)
    return tree
