"""nsbuild run by host root: the sandbox still runs on an unprivileged range."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox_helpers import (
    PY,
    cmdline,
    explain,
    nonblank_lines,
    nsbuild,
    nsbuild_argv,
    ok,
    processes_with_arg,
    py,
    sh,
    subrange,
)
from waiting import HANG_GUARD

pytestmark = pytest.mark.root

CREATE = """
import errno, sys
try:
    open(sys.argv[1], "w").close()
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))
else:
    print("ok")
"""


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory the sandbox's (unprivileged) ids may traverse: pytest's
    base for root lives under /tmp/pytest-of-root, mode 0700."""
    d = Path(tempfile.mkdtemp(prefix="nsbuild-root-test-", dir="/var/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def host_ids(pid: int) -> list[int]:
    """Real, effective, saved and fs uids and gids of a process, as the host sees them."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines())
    return [int(x) for x in fields["Uid"].split() + fields["Gid"].split()]


def test_uid_0_inside_is_not_host_root(base: Path) -> None:
    marker = f"nsbuild-root-test-{uuid.uuid4().hex}"
    code = "import sys, time, os; print(os.getuid(), flush=True); sys.stdin.read()"
    p = subprocess.Popen(nsbuild_argv("--", *py(code, marker)), cwd=base,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline() == "0\n"
        # The command itself, not nsbuild (whose argv holds the marker too).
        (pid,) = [q for q in processes_with_arg(marker) if cmdline(q)[:1] == [PY]]
        ids = host_ids(pid)
        assert 0 not in ids, ids
        rng = subrange("/etc/subuid", 0)
        if rng is not None:
            assert all(i in rng for i in ids[:4]), (ids, rng)
        p.stdin.close()
        assert p.wait(timeout=HANG_GUARD) == 0
    finally:
        p.kill()
        p.wait()


def test_files_created_inside_belong_to_an_unprivileged_host_uid(base: Path) -> None:
    out = base / "out"
    out.mkdir()
    out.chmod(0o777)
    ok(nsbuild("--bind", f"{out}:/out", "--", *sh(
        "touch /out/as-root && setpriv --reuid 100 --regid 100 --clear-groups touch /out/as-100"
    ), cwd=base))
    as_root, as_100 = (out / "as-root").stat(), (out / "as-100").stat()
    assert as_root.st_uid != 0 and as_root.st_gid != 0
    assert as_100.st_uid != 0 and as_100.st_uid == as_root.st_uid + 100
    rng = subrange("/etc/subuid", 0)
    if rng is not None:
        assert as_root.st_uid in rng and as_100.st_uid in rng, (as_root.st_uid, rng)


def test_host_root_owned_directory_is_not_writable_inside(base: Path) -> None:
    d = base / "root-owned"
    d.mkdir()
    d.chmod(0o755)
    assert d.stat().st_uid == 0
    r = ok(nsbuild("--bind", f"{d}:/d", "--", *py(CREATE, "/d/x"), cwd=base))
    assert r.stdout.strip() == "EACCES", r.stdout
    assert not (d / "x").exists()


def test_host_root_files_are_not_readable_inside(base: Path) -> None:
    secret = base / "secret"
    secret.write_text("secret")
    secret.chmod(0o600)
    r = nsbuild("--", "cat", str(secret), cwd=base)
    assert r.returncode != 0 and "secret" not in r.stdout, explain(r)


def test_root_home_is_not_visible(base: Path) -> None:
    r = ok(nsbuild("--", *sh("ls -A /root 2>/dev/null | wc -l"), cwd=base))
    assert r.stdout.strip() == "0"


def test_root_without_subordinate_range_still_not_host_root(base: Path) -> None:
    empty = base / "empty"
    empty.write_text("")
    env = {**os.environ, "NSBUILD_SUBUID_FILE": str(empty), "NSBUILD_SUBGID_FILE": str(empty)}
    out = base / "out"
    out.mkdir()
    out.chmod(0o777)
    r = ok(nsbuild("--bind", f"{out}:/out", "--", *sh("id -u; touch /out/f"),
                   cwd=base, env=env))
    assert r.stdout.strip() == "0"
    assert (out / "f").stat().st_uid != 0
    lines = nonblank_lines(r.stderr)
    assert len(lines) == 1 and "warning" in lines[0], explain(r)


def test_no_new_privs_and_isolation_hold_for_root(base: Path) -> None:
    r = ok(nsbuild("--", *sh("grep NoNewPrivs /proc/self/status; ls /sys/class/net"),
                   cwd=base))
    assert r.stdout.split() == ["NoNewPrivs:", "1", "lo"]


def test_directory_private_to_root_is_reachable_but_not_writable(tmp_path: Path) -> None:
    # pytest's tmp_path for root is under /tmp/pytest-of-root (mode 0700): the
    # sandbox (root's subordinate ids, never host root) could not walk there.
    # The current directory is bound all the same (its mount tree is cloned on
    # the host side); its files stay out of reach of writes, as host root's.
    assert tmp_path.parent.parent.stat().st_mode & 0o077 == 0
    project = tmp_path / "project"
    project.mkdir(mode=0o755)
    (project / "input").write_text("from the host\n")
    r = nsbuild("--", *sh("pwd; cat input; touch made || echo refused"), cwd=project)
    assert r.returncode == 0, explain(r)
    assert r.stdout.splitlines() == [str(project), "from the host", "refused"], explain(r)
    assert not (project / "made").exists()


def test_no_mount_of_the_sandbox_propagates_to_a_shared_host_mount(base: Path) -> None:
    # As root, --root and bind sources are cloned trees (open_tree), which keep
    # the host mount's peer group: on a shared mount (systemd makes / shared),
    # the setup's mounts on them must still stay in the sandbox.
    root, src = base / "root", base / "src"
    for d in (root, src):
        d.mkdir()
        d.chmod(0o755)
    for d in ("proc", "dev", "sys", "tmp", "run", "usr", "src", "etc", "var"):
        (root / d).mkdir()  # the sandbox's root may not make them in root's directory
    (root / "etc" / "resolv.conf").touch()
    for d in ("bin", "lib", "lib64"):
        (root / d).symlink_to(f"usr/{d}")
    run = " ".join(nsbuild_argv("--root", str(root), "--bind", "/usr:/usr",
                                "--bind", f"{src}:/src", "--", "/usr/bin/true"))
    script = (f"mount --bind {base} {base} && mount --make-shared {base} && {run} && "
              f"findmnt -rn -o TARGET -R {base}")
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=HANG_GUARD, check=False)
    assert r.returncode == 0, explain(r)
    assert r.stdout.split() == [str(base)], r.stdout
