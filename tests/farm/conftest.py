"""A real build farm for the tests: a Buildbot master and two workers on
127.0.0.1, made and started by `nsbuild farm` as a user would, and stopped
at the end of the session.

The master and the workers share the session's nsbuild config (the bookworm
test tarball); each worker has a cache of its own, as workers on two
machines would. Ports are free ones, asked of the kernel.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from inputs import bookworm_config
from waiting import wait_for

WORKERS = ("w1", "w2")


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's nsbuild config with the bookworm test environment, in this
    test's environment variables (for farm code called in-process)."""
    bookworm_config(tmp_path / "config")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "config"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Farm:
    root: Path
    vars: dict[str, str]  # the session's environment: config and the submitter's cache
    master: Path
    url: str
    pb_port: int

    def worker_vars(self, name: str) -> dict[str, str]:
        return {**self.vars, "XDG_CACHE_HOME": str(self.root / f"cache-{name}")}

    def nsbuild(self, *args: str, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        return subprocess.run([sys.executable, "-m", "nsbuild", *args], env=env or self.vars,
                              cwd=cwd, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)  # fmt: skip

    def get(self, path: str) -> object:
        import json
        import urllib.request

        with urllib.request.urlopen(f"{self.url}api/v2/{path}", timeout=30) as r:
            return json.loads(r.read())


def _connected(farm: Farm) -> bool:
    found = farm.get("workers?field=name&field=connected_to")
    assert isinstance(found, dict)
    return sorted(w["name"] for w in found["workers"] if w["connected_to"]) == list(WORKERS)


@pytest.fixture(scope="session")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    if os.geteuid() == 0:
        pytest.skip("farm tests run as an unprivileged user (the workers' builds map subuids)")
    root = tmp_path_factory.mktemp("farm")
    bookworm_config(root / "config")
    env = dict(os.environ)
    env["XDG_CONFIG_HOME"] = str(root / "config")
    env["XDG_CACHE_HOME"] = str(root / "cache")
    www, pb = free_port(), free_port()
    made = Farm(root, env, root / "master", f"http://127.0.0.1:{www}/", pb)
    started: list[tuple[Path, dict[str, str]]] = []
    try:
        proc = made.nsbuild("farm", "master", str(made.master), "--port-www", str(www),
                            "--port-pb", str(pb))  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        started.append((made.master, env))
        assert proc.stdout.strip() == made.url
        for name in WORKERS:
            wenv = made.worker_vars(name)
            proc = made.nsbuild("farm", "worker", str(root / name), "--master",
                                f"127.0.0.1:{pb}", "--name", name, env=wenv)  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            started.append((root / name, wenv))
        wait_for(lambda: _connected(made), "both workers connected to the master")
        yield made
    finally:
        for folder, fenv in reversed(started):
            made.nsbuild("farm", "stop", str(folder), env=fenv)
        _clean_caches(made)


def _clean_caches(farm: Farm) -> None:
    """Dependency layers hold files of the subuid range, which pytest's own
    clean-up could not delete."""
    from nsbuild.envs.remove import remove_tree

    for name in ("", *WORKERS):
        cache = farm.root / (f"cache-{name}" if name else "cache")
        if cache.exists():
            vars = farm.worker_vars(name) if name else farm.vars
            subprocess.run([sys.executable, "-m", "nsbuild", "gc"], env=vars, capture_output=True)
            remove_tree(cache)


def dsc_of(tree: Path) -> Path:
    """A source package of an unpacked tree, made beside it by dpkg-source."""
    subprocess.run(["dpkg-source", "-b", tree.name], cwd=tree.parent, check=True,
                   capture_output=True)  # fmt: skip
    name = tree.name.rsplit("-", 1)[0]
    (dsc,) = tree.parent.glob(f"{name}_*.dsc")
    return dsc


def table_rows(table: str) -> dict[str, list[str]]:
    """package -> [version, worker, status, duration] of `farm submit --wait`'s table."""
    lines = table.strip().splitlines()
    assert lines[0].split() == ["package", "version", "worker", "status", "duration"]
    rows = {}
    for line in lines[1:]:
        package, version, worker, rest = line.split(None, 3)
        status, duration = rest.rsplit(None, 1)
        rows[package] = [version, worker, status, duration]
    return rows
