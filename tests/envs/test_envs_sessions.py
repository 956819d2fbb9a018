"""Sessions on a real Debian bookworm buildd environment."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from envs_helpers import NSBUILD, chroot_d, mounts_under, nsbuild, processes_with
from waiting import wait_for

from nsbuild.envs.errors import EnvError
from nsbuild.envs.session import begin_session, end_session, get_session, throwaway
from nsbuild.sandbox import PIPE, run, spawn

pytestmark = [pytest.mark.userns, pytest.mark.slow]


def output(session_id: str, *cmd: str, net: str = "none") -> str:
    return nsbuild("session", "run", "--net", net, session_id, "--", *cmd).stdout


def test_throwaway_root_is_writable_and_forgotten(bookworm: str) -> None:
    with throwaway(bookworm) as s:
        proc = spawn(s.sandbox(["sh", "-c", "echo x > /etc/mark; id -u; cat /etc/debian_version; "
                                "echo $LANG $TZ $HOME; hostname"]), stdout=PIPE)  # fmt: skip
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
        assert proc.wait() == 0
        assert out.splitlines()[0] == "0" and out.splitlines()[1].startswith("12.")
        assert out.splitlines()[2:] == ["C.UTF-8 UTC /root", "nsbuild"]
        assert (s.upper / "etc" / "mark").exists()
        upper = s.upper
    assert not upper.exists()
    with throwaway(bookworm) as s2:
        assert run(s2.sandbox(["test", "!", "-e", "/etc/mark"])) == 0


def test_throwaway_session_is_volatile_and_mounts_again(bookworm: str) -> None:
    # fsync is a no-op in a throwaway session; each command mounts its overlay
    # anew, and the kernel's crash mark of the previous (volatile) mount must
    # not stop the next one. Persistent sessions keep fsync.
    with throwaway(bookworm) as s:
        for i in range(3):
            script = ("touch /root/log; grep -c x /root/log; echo x >> /root/log; "
                      "grep -o fsync=volatile /proc/mounts")
            proc = spawn(s.sandbox(["sh", "-c", script]), stdout=PIPE)
            assert proc.stdout is not None
            out = proc.stdout.read().decode().split()
            assert proc.wait() == 0
            assert out[-1] == "fsync=volatile"
            assert out[0] == str(i)  # what earlier commands wrote is there
    kept = begin_session(bookworm)
    try:
        assert run(kept.sandbox(["sh", "-c", "! grep -q fsync=volatile /proc/mounts"])) == 0
    finally:
        end_session(kept.id)


def test_two_sessions_do_not_see_each_other(bookworm: str) -> None:
    a, b = (
        nsbuild("session", "begin", bookworm).stdout.strip(),
        nsbuild("session", "begin", "stable").stdout.strip(),
    )
    try:
        output(a, "sh", "-c", "echo from-a > /root/a")
        assert output(a, "cat", "/root/a") == "from-a\n"  # files persist between commands
        r = nsbuild("session", "run", b, "--", "cat", "/root/a", check=False)
        assert r.returncode == 1 and "No such file" in r.stderr
        ids = nsbuild("session", "list").stdout
        assert a in ids and b in ids
    finally:
        nsbuild("session", "end", a, b)
    assert a not in nsbuild("session", "list").stdout
    with pytest.raises(EnvError, match=f"no session '{a}'"):
        get_session(a)


def test_apt_install_in_a_session_leaves_the_base_untouched(bookworm: str) -> None:
    s = begin_session(bookworm)
    try:
        r = nsbuild("session", "run", "--net", "host", s.id, "--", "sh", "-c",
                    "apt-get update && apt-get install -y hello && hello")  # fmt: skip
        assert r.stdout.endswith("Hello, world!\n")
        assert "unsandboxed" not in r.stderr  # apt dropped to _apt: a real subuid range
        assert not os.path.exists(Path(s.lowers[-1]) / "usr" / "bin" / "hello")
        assert (s.upper / "usr" / "bin" / "hello").exists()
    finally:
        end_session(s.id)
    with throwaway(bookworm) as fresh:
        assert run(fresh.sandbox(["sh", "-c", "! command -v hello"])) == 0


def test_end_refuses_while_a_command_runs(bookworm: str) -> None:
    s = begin_session(bookworm)
    proc = subprocess.Popen([*NSBUILD, "session", "run", s.id, "--", "sleep", "3600.5"])
    try:
        wait_for(lambda: processes_with("3600.5") and len(processes_with("3600.5")) > 1, "sleep")
        r = nsbuild("session", "end", s.id, check=False)
        assert r.returncode == 2 and "in use by a running command" in r.stderr
    finally:
        proc.kill()
        proc.wait()
    wait_for(lambda: not processes_with("3600.5"), "sleep gone")
    end_session(s.id)


def _cache(xdg: Path) -> Path:
    return Path(os.environ["XDG_CACHE_HOME"]) / "nsbuild"


def test_sigkill_during_run_then_gc_leaves_nothing(bookworm: str, xdg: Path) -> None:
    marker = f"{os.getpid()}.77"
    proc = subprocess.Popen([*NSBUILD, "run", "--env", bookworm, "--", "sleep", marker])
    wait_for(lambda: len(processes_with(marker)) > 1, "sandboxed sleep")
    sessions = _cache(xdg) / "sessions"
    (session_dir,) = [p for p in sessions.iterdir() if not p.name.startswith(".")]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_for(lambda: not processes_with(marker), "sandbox dies with its parent")
    assert session_dir.name in nsbuild("session", "list").stdout  # owner gone, not yet removed
    out = nsbuild("gc").stdout
    assert f"removed session {session_dir.name} (owner pid {proc.pid} gone)" in out
    assert not session_dir.exists()
    assert mounts_under(_cache(xdg)) == []
    # The base stays: an environment refers to it.
    assert "bookworm (aliases: stable): ready" in nsbuild("env", "list").stdout


def test_sigkill_during_session_begin_then_gc(xdg: Path, bookworm_tarball: Path) -> None:
    # A cache of its own: begin must be caught while unpacking the base.
    (chroot_d(xdg) / "bookworm").write_text(f"Name: bookworm\nPath: {bookworm_tarball}\n")
    cache = xdg / "cache" / "nsbuild"
    proc = subprocess.Popen([*NSBUILD, "session", "begin", "bookworm"], stderr=subprocess.PIPE)
    wait_for(lambda: (cache / "store" / "bases").is_dir()
             and any(p.name.startswith(".tmp-") for p in (cache / "store" / "bases").iterdir())
             and any((cache / "store" / "bases").glob(".tmp-*/root/usr")), "unpacking")  # fmt: skip
    proc.kill()
    proc.wait()
    wait_for(lambda: not processes_with(str(cache / "store" / "bases")), "tar gone")
    out = nsbuild("gc").stdout
    assert "removed unfinished session" in out and "removed unfinished base" in out
    assert os.listdir(cache / "sessions") == [] and os.listdir(cache / "store" / "bases") == []
    assert mounts_under(cache) == []


def test_gc_never_touches_live_sessions(bookworm: str) -> None:
    s = begin_session(bookworm)
    try:
        with throwaway(bookworm) as t:
            out = nsbuild("gc").stdout
            assert s.id not in out and t.id not in out
            assert s.dir.exists() and t.dir.exists()
    finally:
        end_session(s.id)


def test_extra_lowers_sit_between_base_and_upper(bookworm: str, tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    (layer / "opt").mkdir(parents=True)
    (layer / "opt" / "dep").write_text("cached\n")
    with throwaway(bookworm, extra_lowers=(layer,)) as s:
        assert run(s.sandbox(["sh", "-c", "grep -qx cached /opt/dep && echo new > /opt/dep"])) == 0
    assert (layer / "opt" / "dep").read_text() == "cached\n"


def test_allow_from_env_covers_the_environments_own_apt_sources(bookworm: str) -> None:
    # The chroot.d entry names no Mirror: the allowlist must still hold every
    # archive of the base's apt sources (mmdebstrap adds -security).
    with throwaway(bookworm) as s:
        mirrors = s.mirrors()
        proc = spawn(s.sandbox(["sh", "-c", "cat /etc/apt/sources.list"]), stdout=PIPE)
        assert proc.stdout is not None
        inside = proc.stdout.read().decode()
        assert proc.wait() == 0
        # The session's own changes never widen it.
        (s.upper / "etc" / "apt").mkdir(parents=True, exist_ok=True)
        (s.upper / "etc" / "apt" / "sources.list").write_text("deb http://evil.example/ x y\n")
        assert s.mirrors() == mirrors
    urls = {w for line in inside.splitlines() for w in line.split() if "://" in w}
    assert urls and urls <= set(mirrors)
    assert any("security" in m for m in mirrors)
