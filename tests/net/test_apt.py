"""apt inside a real Debian environment reaches a local repository through
`--net allow`, and is refused for a second server; both are in the network log.

The repository is made here: a tiny .deb (dpkg-deb), indices from apt-ftparchive,
served on the host's 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from net_helpers import static_server
from security_helpers import EnvHome, env_home_for

pytestmark = [pytest.mark.userns, pytest.mark.slow]


@pytest.fixture(scope="session")
def env_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvHome]:
    """The environment `bookworm` on the CI tarball, in folders of this test
    run (the escape suite's, so the base is unpacked once per run)."""
    yield from env_home_for(tmp_path_factory)


def make_repository(root: Path) -> Path:
    pkg, repo = root / "pkg", root / "repo"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr/share/doc/nsb-hello").mkdir(parents=True)
    (pkg / "usr/share/doc/nsb-hello/README").write_text("hello\n")
    (pkg / "DEBIAN/control").write_text(
        "Package: nsb-hello\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: nsbuild tests <tests@example.org>\nDescription: a test package\n"
    )
    repo.mkdir()
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-b", str(pkg), str(repo / "nsb-hello_1.0_all.deb")],
        check=True,
        capture_output=True,
    )
    for index in ("packages", "release"):
        out = subprocess.run(
            ["apt-ftparchive", index, "."], cwd=repo, check=True, capture_output=True
        ).stdout
        (repo / index.capitalize()).write_bytes(out)
    return repo


def test_apt_reaches_the_allowed_repository_only(tmp_path: Path, env_home: EnvHome) -> None:
    repo = make_repository(tmp_path)
    log = tmp_path / "net.jsonl"
    with static_server(str(repo)) as port, static_server(str(repo)) as other:
        script = (
            f'echo "deb [trusted=yes] http://127.0.0.1:{port}/ ./" > /etc/apt/sources.list; '
            f'echo "deb [trusted=yes] http://127.0.0.1:{other}/ ./" >> /etc/apt/sources.list; '
            "rm -f /etc/apt/sources.list.d/*; apt-get update; "
            "cd /tmp && apt-get download nsb-hello && dpkg-deb -f nsb-hello_1.0_all.deb Package"
        )
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "nsbuild",
                "run",
                "--env",
                "bookworm",
                "--allow",
                f"127.0.0.1:{port}",
                "--net-log",
                str(log),
                "--",
                "sh",
                "-c",
                script,
            ],
            cwd=tmp_path,
            env=env_home.vars(),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=600,
        )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "nsb-hello"
    # apt is told why: the proxy's 403 (apt retries it, and says so).
    assert f"http://127.0.0.1:{other}/./Packages  403  Forbidden" in r.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {(x["port"], x["decision"]) for x in records} == {(port, "allow"), (other, "deny")}
    assert "nsbuild: network: " in r.stderr and f"127.0.0.1:{other}" in r.stderr


def test_a_mirror_of_the_config_on_loopback_is_reached_with_allow_from_env(
    tmp_path: Path, env_home: EnvHome
) -> None:
    """An environment's `Mirror:` is the user's own config: on loopback (a
    local apt cache) it is allowed by --allow-from-env, while apt sources read
    from the environment's root may reach global addresses only."""
    repo = make_repository(tmp_path)
    chroot_d = env_home.config / "nsbuild" / "chroot.d"
    tarball = (chroot_d / "bookworm").read_text().split("Path: ")[1].split("\n")[0]
    with static_server(str(repo)) as port:
        (chroot_d / "localmirror").write_text(
            f"Name: localmirror\nType: tarball\nPath: {tarball}\nSuite: bookworm\n"
            f"Mirror: http://127.0.0.1:{port}/\n"
        )
        script = (
            f'echo "deb [trusted=yes] http://127.0.0.1:{port}/ ./" > /etc/apt/sources.list; '
            "rm -f /etc/apt/sources.list.d/*; apt-get update >/dev/null; "
            "cd /tmp && apt-get download nsb-hello >/dev/null && echo downloaded"
        )
        try:
            r = subprocess.run(
                [sys.executable, "-m", "nsbuild", "run", "--env", "localmirror", "--net", "allow",
                 "--allow-from-env", "--", "sh", "-c", script],
                cwd=tmp_path, env=env_home.vars(), capture_output=True, text=True,
                stdin=subprocess.DEVNULL, timeout=600,
            )  # fmt: skip
        finally:
            (chroot_d / "localmirror").unlink()
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "downloaded", r.stdout + r.stderr
