"""autopkgtest-virt-nsbuild against a hostile testbed: what the host side takes from it.

Root in a testbed may shape every file, link and tar stream the server's own
process (outside the testbed) reads, extracts or hands to the client. Each
test makes the testbed do what an attacker would, then checks what a user of
the host sees: no file written through a link, no link, device or setuid file
copied up, no host file handed out through the shared downtmp, no huge file
read whole, no directory other users can reach.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from virt_helpers import Env, RawServer, sessions

from nsbuild.backends.virtproto import VirtServer, VirtServerError

pytestmark = pytest.mark.userns


@pytest.fixture
def server(server_env: Env) -> Iterator[VirtServer]:
    srv = VirtServer(["autopkgtest-virt-nsbuild", "bookworm"])
    try:
        yield srv
    finally:
        srv.stop()


def _ok(cmd: list[str], script: str) -> str:
    done = subprocess.run([*cmd, "sh", "-c", script], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _shared(env: Env) -> Path:
    """The host folder of the open testbed's downtmp (not offered to clients,
    but a client that names it gets the same checks)."""
    (session,) = sessions(env)
    return env.cache / "nsbuild" / "sessions" / session / "downtmp"


def _copyup_error(server: VirtServer, inside: str, host: str) -> str | None:
    """None when the copyup succeeded, else the client's one-line error."""
    try:
        server.copyup(inside, host)
    except VirtServerError as e:
        return str(e)
    return None


def test_copyup_never_writes_through_a_symlink_it_did_not_make(
    server: VirtServer, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    out = tmp_path / "out"
    server.open()
    ex = server.execute_command()
    _ok(ex, f"mkdir -p /srv/t && ln -s {victim} /srv/t/a && echo data > /srv/t/f")
    server.copyup("/srv/t/", f"{out}/")
    assert (out / "f").read_text() == "data\n"
    assert not os.path.lexists(out / "a"), "a symlink of the testbed was made on the host"

    # A symlink already there (left by anything earlier), and a testbed whose
    # own `tar` emits members under it and under the link of the first copy.
    os.symlink(victim, out / "b")
    _ok(ex, "mkdir -p /root/e/a /root/e/b && echo PWNED > /root/e/a/.bashrc && "
            "echo PWNED > /root/e/b/.bashrc && "
            "tar -C /root/e -cf /root/evil.tar ./a/.bashrc ./b/.bashrc && "
            "printf '#!/bin/sh\\nexec cat /root/evil.tar\\n' > /usr/bin/tar")  # fmt: skip
    error = _copyup_error(server, "/srv/t/", f"{out}/")
    assert not (victim / ".bashrc").exists(), "copyup wrote through a symlink on the host"
    assert error is not None and "b: a symlink on the host" in error, error


def test_copyup_takes_no_links_devices_or_setuid_bits(server: VirtServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    server.open()
    ex = server.execute_command()
    _ok(ex, "mkdir -p /srv/u/sgid && cd /srv/u && echo data > f && ln f hard && "
            "mkfifo fifo && ln -s /etc/passwd link && cp /usr/bin/id suid && chmod 4755 suid && "
            "chmod 2775 sgid && echo g > sgid/g && chmod 6755 sgid/g")  # fmt: skip
    server.copyup("/srv/u/", f"{out}/")
    names = sorted(p.name for p in out.iterdir())
    # Of f and hard, the first the testbed's tar met is a file, the other a
    # hard link to it, which is not made.
    assert names in (["f", "sgid", "suid"], ["hard", "sgid", "suid"]), names
    assert (out / names[0]).read_text() == "data\n"
    assert (out / "sgid" / "g").read_text() == "g\n"
    for path in (out / "suid", out / "sgid", out / "sgid" / "g"):
        mode = path.lstat().st_mode
        assert not mode & (stat.S_ISUID | stat.S_ISGID), f"{path}: {oct(mode)}"
    assert os.access(out / "suid", os.X_OK)
    # One file copied up alone: the same.
    server.copyup("/srv/u/suid", str(tmp_path / "one"))
    assert not (tmp_path / "one").stat().st_mode & (stat.S_ISUID | stat.S_ISGID)
    # The caller's own links, outside the testbed's reach, are followed.
    (tmp_path / "via").symlink_to(out)
    server.copyup("/srv/u/sgid/", f"{tmp_path}/via/")
    assert (out / "g").read_text() == "g\n"


def test_the_shared_downtmp_answers_no_for_a_testbeds_symlink(
    server: VirtServer, server_env: Env, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("HOST ONLY\n")
    server.open()
    ex = server.execute_command()
    shared = _shared(server_env)
    # A regular file (setuid by the testbed) is answered, without its setuid bit.
    _ok(ex, "cp /usr/bin/id /tmp/autopkgtest/tool && chmod 4755 /tmp/autopkgtest/tool")
    server.copyup("/tmp/autopkgtest/tool", str(shared / "tool"))
    assert not (shared / "tool").stat().st_mode & stat.S_ISUID
    # A process left in the testbed swaps a log for a symlink to a host file.
    _ok(ex, f"ln -sf {secret} /tmp/autopkgtest/1-stderr")
    error = _copyup_error(server, "/tmp/autopkgtest/1-stderr", str(shared / "1-stderr"))
    assert error is not None and "not a regular file" in error, error


def test_the_shared_downtmp_answers_no_for_a_tree_holding_a_symlink(
    server: VirtServer, server_env: Env, tmp_path: Path
) -> None:
    server.open()
    ex = server.execute_command()
    shared = _shared(server_env)
    _ok(ex, "mkdir -p /tmp/autopkgtest/art/sub && echo log > /tmp/autopkgtest/art/sub/log")
    server.copyup("/tmp/autopkgtest/art/", f"{shared}/art/")
    _ok(ex, f"ln -s {tmp_path} /tmp/autopkgtest/art/sub/home")
    error = _copyup_error(server, "/tmp/autopkgtest/art/", f"{shared}/art/")
    assert error is not None and "art/sub/home: not a regular file" in error, error


def test_the_downtmp_is_private_to_its_owner(server: VirtServer, server_env: Env) -> None:
    server.open()
    ex = server.execute_command()
    shared = _shared(server_env)
    # Writable by every user of the testbed, as autopkgtest wants it...
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    # ...but no other user of the host reaches it: its session folder is the
    # owner's alone.
    session = shared.parent
    st = session.stat()
    assert st.st_uid == os.getuid()
    assert stat.S_IMODE(st.st_mode) & 0o077 == 0, oct(st.st_mode)
    # The folder is nsbuild's own: setuid programs made there by the testbed
    # (dpkg installs some) are allowed.
    _ok(ex, "cp /usr/bin/id /tmp/autopkgtest/s && chmod 4755 /tmp/autopkgtest/s")


def _bytes_read(pid: int) -> int:
    """What process `pid` read so far, by read(2) and its kin."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/PID/io")


def test_a_huge_file_of_the_testbed_is_never_read_whole(server_env: Env) -> None:
    cache = server_env.cache / "nsbuild" / "apt" / "bookworm"
    release = "/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease"
    kept = cache / "apt-lists" / os.path.basename(release)
    # An earlier test may have left a real InRelease there: it must stay as it was.
    before_kept = kept.read_bytes() if kept.exists() else None
    srv = VirtServer(["autopkgtest-virt-nsbuild", "bookworm"])
    try:
        srv.open()
        ex = srv.execute_command()
        # Sparse: it takes no space, but reading it whole reads 1 GiB.
        _ok(ex, f"truncate -s 1G {release}")
        before = _bytes_read(srv.proc.pid)
        srv.close()  # the apt cache harvest looks at what the testbed left
        read = _bytes_read(srv.proc.pid) - before
    finally:
        srv.stop()
    assert read < 256 << 20, f"the server read {read >> 20} MiB"
    assert (kept.read_bytes() if kept.exists() else None) == before_kept


def test_what_the_servers_own_commands_print_reaches_the_terminal_escaped(
    server_env: Env, tmp_path: Path
) -> None:
    proc = subprocess.Popen(["autopkgtest-virt-nsbuild", "bookworm"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None

    def say(line: str) -> str:
        proc.stdin.write(line.encode() + b"\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        return proc.stdout.readline().decode()  # type: ignore[union-attr]

    try:
        assert proc.stdout.readline() == b"ok\n"
        assert say("open").startswith("ok ")
        ex = [unquote(a) for a in say("print-execute-command").split()[1].split(",")]
        # The testbed's `cat`, which copyup runs, now writes a terminal title
        # and clears the screen.
        _ok(ex, "printf '#!/bin/sh\\nprintf \"\\\\033]0;PWNED\\\\007\\\\033[2J\" >&2\\nexit 1\\n' "
                "> /usr/bin/cat && chmod 755 /usr/bin/cat")  # fmt: skip
        assert say(f"copyup /etc/hostname {tmp_path}/hostname") == "copy-failed\n"
        proc.stdin.write(b"quit\n")
        proc.stdin.close()
        assert proc.wait(timeout=120) == 0
        err = proc.stderr.read().decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "\x1b" not in err and "\x07" not in err, repr(err)
    assert "\\x1b]0;PWNED\\x07\\x1b[2J" in err, err


def test_the_client_escapes_what_a_server_says(tmp_path: Path) -> None:
    # Any virt server's stderr may carry what its testbed printed.
    program = tmp_path / "autopkgtest-virt-loud"
    program.write_text("#!/bin/sh\nprintf '\\033]0;PWNED\\007\\n' >&2\n"
                       "printf '\\033[2Jnot the protocol\\n'\nsleep 5\n")  # fmt: skip
    program.chmod(0o755)
    with pytest.raises(VirtServerError) as failed:
        VirtServer([str(program)])
    said = str(failed.value)
    assert "\x1b" not in said and "\x07" not in said, repr(said)
    assert "\\x1b[2Jnot the protocol" in said and "\\x1b]0;PWNED\\x07" in said, said


@pytest.fixture
def raw(server_env: Env) -> Iterator[RawServer]:
    srv = RawServer("bookworm")
    try:
        yield srv
    finally:
        srv.kill()


def _tar(*members: tuple[tarfile.TarInfo, bytes], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def test_copyup_refuses_a_hostile_tar_stream(raw: RawServer, tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    out.mkdir(parents=True)
    (out / "dir").mkdir()
    cases = {
        "climbs": (_tar((_member("../../escaped"), b"x")), "climbs out with .."),
        "absolute": (_tar((_member(f"{tmp_path}/absolute"), b"x")), "an absolute name"),
        "pax": (_tar((_member("p", pax_headers={"comment": "x" * (1 << 20)}), b"x"),
                     fmt=tarfile.PAX_FORMAT), "an extended tar header of"),
        "long-name": (_tar((_member("n" * 8192), b"x")), "an extended tar header of"),
        "sparse": (_tar((_member("s", tarfile.GNUTYPE_SPARSE), b"")), "an entry of type S"),
        "over-a-dir": (_tar((_member("dir"), b"x")), "dir: a directory on the host"),
        "garbage": (b"\x1b]0;PWNED\x07" * 100, "bad"),
    }  # fmt: skip
    assert raw.say("open").startswith("ok ")
    ex = raw.execute_command()
    for name, (stream, _) in cases.items():
        (tmp_path / f"{name}.tar").write_bytes(stream)
        assert raw.say("copydown", str(tmp_path / f"{name}.tar"), f"/root/{name}.tar") == "ok"
    # The testbed's `tar` emits the stream named in /root/which.
    _ok(ex, "printf '#!/bin/sh\\nexec cat /root/$(cat /root/which).tar\\n' > /usr/bin/tar && "
            "chmod 755 /usr/bin/tar && mkdir -p /srv/t")  # fmt: skip
    for name in cases:
        _ok(ex, f"echo {name} > /root/which")
        assert raw.say("copyup", "/srv/t/", f"{out}/") == "copy-failed", name
    # A link in the stream is left out, in a line that says so; the rest is copied.
    links = _tar((_member("ln\x1b[2J", tarfile.SYMTYPE, linkname=str(tmp_path)), b""),
                 (_member("kept"), b"kept\n"))  # fmt: skip
    (tmp_path / "links.tar").write_bytes(links)
    assert raw.say("copydown", str(tmp_path / "links.tar"), "/root/links.tar") == "ok"
    _ok(ex, "echo links > /root/which")
    assert raw.say("copyup", "/srv/t/", f"{out}/") == "ok"
    (out / "kept").unlink()
    err = raw.quit()
    assert "copyup: not copied (a symlink): ln\\x1b[2J" in err, err
    for name, (_, why) in cases.items():
        assert why in err, (name, err)
    assert "\x1b" not in err
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "absolute").exists()
    assert sorted(p.name for p in out.iterdir()) == ["dir"]


def test_copies_through_the_downtmp_never_follow_its_symlinks_on_the_host(
    raw: RawServer, server_env: Env, tmp_path: Path
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "key").write_text("HOST ONLY\n")
    assert raw.say("open").startswith("ok ")
    shared = str(_shared(server_env))
    ex = raw.execute_command()
    _ok(ex, f"ln -s {secrets} /tmp/autopkgtest/link && mkdir /srv/in")
    # Host paths through the testbed's link: nothing of the host goes in...
    assert raw.say("copydown", f"{shared}/link/", "/srv/in/tree/") == "copy-failed"
    assert raw.say("copydown", f"{shared}/link/key", "/srv/in/key") == "copy-failed"
    assert _ok(ex, "ls -A /srv/in") == ""
    # ...and nothing is written there.
    _ok(ex, "echo testbed > /srv/in/file")
    assert raw.say("copyup", "/srv/in/file", f"{shared}/link/key") == "copy-failed"
    assert raw.say("copyup", "/srv/in/", f"{shared}/link/") == "copy-failed"
    assert (secrets / "key").read_text() == "HOST ONLY\n"
    assert sorted(p.name for p in secrets.iterdir()) == ["key"]
    err = raw.quit()
    assert err.count("link: a symlink on the host, not followed") == 4, err
