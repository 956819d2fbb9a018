"""Faults of the disk: an environment's tarball deleted, a cache that fills up.
Both end in one clear line, and nothing half-made stays behind."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from inputs import tarball
from security_helpers import NSBUILD, EnvHome, explain


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    # Progress lines ("unpacking ... (once)") are not errors.
    lines = [ln for ln in r.stderr.splitlines()
             if ln.strip() and not ln.startswith("nsbuild: unpacking ")]
    assert "Traceback" not in r.stderr, explain(r)
    assert len(lines) == 1 and lines[0].startswith("nsbuild"), explain(r)
    return lines[0]


@pytest.mark.userns
@pytest.mark.slow
def test_a_deleted_environment_tarball_is_one_clear_line(
    tmp_path: Path, env_home: EnvHome
) -> None:
    """An environment whose tarball was used (its base unpacked) and then deleted,
    and one whose tarball never existed."""
    link = tmp_path / "gone.tar"
    link.symlink_to(tarball())
    chroot_d = env_home.config / "nsbuild" / "chroot.d"
    (chroot_d / "gone").write_text(f"Name: gone\nPath: {link}\n\n"
                                   f"Name: never\nPath: {tmp_path / 'never.tar'}\n")
    try:
        r = subprocess.run([*NSBUILD, "run", "--env", "gone", "--", "true"], cwd=tmp_path,
                           env=env_home.vars(), capture_output=True, text=True, check=False)
        assert r.returncode == 0, explain(r)
        link.unlink()
        for name, path in (("gone", link), ("never", tmp_path / "never.tar")):
            r = subprocess.run([*NSBUILD, "run", "--env", name, "--", "true"], cwd=tmp_path,
                               env=env_home.vars(), capture_output=True, text=True,
                               check=False)
            assert r.returncode == 2, explain(r)
            line = _one_line(r)
            assert str(path) in line and "No such file" in line, line
    finally:
        (chroot_d / "gone").unlink()


def _test_user() -> tuple[int, int]:
    """An unprivileged user with a subordinate range (CI's test user)."""
    name = os.environ.get("NSBUILD_TEST_USER", "nsbtest")
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        pytest.skip(f"no test user {name!r} (set NSBUILD_TEST_USER)")
    return pw.pw_uid, pw.pw_gid


def _with_full_cache(check_message: bool) -> None:
    """The user's cache is a 64 MiB filesystem of its own: unpacking the
    environment fills it. Root makes the small filesystem; nsbuild runs as the
    test user, the way users run it; the rest of the host never sees a byte."""
    image = tarball()
    uid, gid = _test_user()
    top = Path(tempfile.mkdtemp(prefix="nsbuild-fullcache-"))
    cache, config = top / "cache", top / "config"
    try:
        top.chmod(0o755)
        cache.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M,mode=0755", "tmpfs",
                        str(cache)], check=True)
        chroot_d = config / "nsbuild" / "chroot.d"
        chroot_d.mkdir(parents=True)
        (chroot_d / "bookworm").write_text(f"Name: bookworm\nPath: {image}\n")
        for p in (cache, config, config / "nsbuild", chroot_d, chroot_d / "bookworm"):
            os.chown(p, uid, gid)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(top),
               "XDG_CONFIG_HOME": str(config), "XDG_CACHE_HOME": str(cache)}
        as_user = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--",
                   sys.executable, "-m", "nsbuild"]
        r = subprocess.run([*as_user, "run", "--env", "bookworm", "--", "true"], cwd="/",
                           env=env, capture_output=True, text=True, check=False)
        assert r.returncode != 0, explain(r)
        line = _one_line(r)
        if check_message:
            assert "No space left on device" in line or "ENOSPC" in line, line
            return
        r = subprocess.run([*as_user, "gc"], cwd="/", env=env, capture_output=True, text=True,
                           check=False)
        assert r.returncode == 0, explain(r)
        left = [str(p.relative_to(cache)) for p in cache.rglob("*")
                if p.name.startswith(".tmp-")]
        assert left == [], left
        bases = cache / "nsbuild" / "store" / "bases"
        assert not bases.exists() or os.listdir(bases) == []
    finally:
        subprocess.run(["umount", str(cache)], check=False)
        subprocess.run(["rm", "-rf", str(top)], check=False)


@pytest.mark.root
def test_a_full_cache_fails_in_one_line_and_gc_leaves_it_clean() -> None:
    _with_full_cache(check_message=False)


@pytest.mark.root
def test_a_full_cache_is_named_as_such() -> None:
    _with_full_cache(check_message=True)
