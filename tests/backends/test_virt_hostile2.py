"""autopkgtest-virt-nsbuild against a hostile testbed or layer, continued.

- the real autopkgtest never reads or writes the testbed's scratch folder by
  a host path, so a symlink planted there redirects nothing on the host;
- symlinks in an environment's layer never bring a host folder (apt's lists)
  or host files (apt keys) into a testbed or the server;
- a command entered into a testbed whose environment binds a shared host
  folder writable cannot make setuid files; in a plain testbed it can;
- a copyup stops at a size limit: a sparse file does not fill the host.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from inputs import TARBALL
from virt_helpers import Env, RawServer, run, sessions, tiny_package

from nsbuild.backends.virtproto import VirtServer

pytestmark = pytest.mark.userns


def _exec(cmd: list[str], script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, "sh", "-c", script], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)  # fmt: skip


def _ok(cmd: list[str], script: str) -> str:
    done = _exec(cmd, script)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def server(server_env: Env) -> Iterator[VirtServer]:
    srv = VirtServer(["autopkgtest-virt-nsbuild", "bookworm"])
    try:
        yield srv
    finally:
        srv.stop()


# -- the scratch folder is the testbed's alone --


def test_the_scratch_folder_is_not_offered_to_the_host(server: VirtServer) -> None:
    scratch = server.open()
    # Without downtmp-host a client copies everything with copyup/copydown,
    # which go through the testbed; the scratch folder is still there.
    assert not [c for c in server.capabilities() if c.startswith("downtmp-host")]
    ex = server.execute_command()
    assert _ok(ex, f"test -d {scratch} && test -w {scratch} && stat -c %a {scratch}") == "1777\n"


@pytest.mark.slow
def test_autopkgtest_follows_no_link_planted_in_the_scratch_folder(
    tools: Env, tmp_path: Path
) -> None:
    # Where autopkgtest writes on the host while it prepares a test: the
    # package it builds to install a test's dependencies, N-autopkgtest-satdep.deb
    # in the scratch folder when the server shares it (adt_testbed.py,
    # TempPath and install_apt). A first test, as root inside (the link's
    # owner is then the caller: the host's protected_symlinks lets it be
    # followed), points those names at a host file; the second test's
    # dependencies are installed next, into the same testbed.
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    # The victim's folder is made inside too: a copydown through the links
    # writes there, in the testbed, and the run goes on.
    plant = (f'mkdir -p {victim.parent} && for i in $(seq 1 60); do ln -sf {victim} '
             '"$AUTOPKGTEST_TMP/../$i-autopkgtest-satdep.deb"; done; echo planted')  # fmt: skip
    tree = tiny_package(tmp_path, tests={"plant": f"# needs-root\n{plant}", "after": "echo ran"})
    out = tmp_path / "out"
    proc = run(tools, ["autopkgtest", "-B", f"{tree}//", "-o", str(out),
                       "--", "nsbuild", "bookworm"])  # fmt: skip
    assert victim.read_bytes() == b"precious\n", "autopkgtest wrote through the testbed's link"
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (out / "plant-stdout").read_text() == "planted\n"
    assert (out / "after-stdout").read_text() == "ran\n"
    assert sessions(tools) == []


# -- symlinks in an environment's layer --


def _climb(layer: Path, below: str, target: Path) -> str:
    """A relative link target that, placed at layer/below, names `target` on
    the host (as many `..` as it takes to reach /)."""
    depth = len(layer.parts) - 1 + below.count("/")
    return "../" * depth + str(target).lstrip("/")


def test_a_layers_symlinks_bring_no_host_folder_into_a_testbed(
    server_env: Env, tmp_path: Path
) -> None:
    from nsbuild.envs.config import load_config
    from nsbuild.envs.session import throwaway
    from nsbuild.sandbox import spawn
    from nsbuild.virtserver.aptcache import AptCache
    from nsbuild.virtserver.testbed import Testbed

    home = tmp_path / "home"
    (home / "keys").mkdir(parents=True)
    (home / "id_rsa").write_text("HOST SECRET\n")
    (home / "keys" / "mine.gpg").write_bytes(b"HOST KEY BYTES")
    # A layer as a tarball with such members unpacks it: apt's lists folder
    # and its keys folder are symlinks that climb out to the victim's home.
    layer = tmp_path / "layer"
    (layer / "var/lib/apt").mkdir(parents=True)
    (layer / "etc/apt").mkdir(parents=True)
    (layer / "var/lib/apt/lists").symlink_to(_climb(layer, "var/lib/apt/lists", home))
    (layer / "etc/apt/trusted.gpg.d").symlink_to(_climb(layer, "etc/apt/trusted.gpg.d",
                                                        home / "keys"))  # fmt: skip
    assert (layer / "var/lib/apt/lists/id_rsa").read_text() == "HOST SECRET\n"
    # Inside, the link resolves in the testbed's root: the layer holds that
    # folder too, so the mount over it has a place to go.
    (layer / str(home).lstrip("/")).mkdir(parents=True)

    config = load_config().get("bookworm")
    with throwaway(config, [layer]) as session:
        cache = AptCache(config.name, session.dir)
        cache.snapshot(session.lowers)
        keyring = (session.dir / "apt" / "trusted.gpg").read_bytes()
        testbed = Testbed(str(session.dir), apt_cache=True)
        testbed.downtmp_host.mkdir()
        spec = testbed.sandbox(session, ["sh", "-c", "cat /var/lib/apt/lists/id_rsa 2>&1; "
                                                     "ls -A /var/lib/apt/lists"])  # fmt: skip
        r, w = os.pipe()
        try:
            proc = spawn(spec, stdout=w, stderr=w)
        finally:
            os.close(w)
        with open(r, "rb") as f:
            seen = f.read().decode(errors="replace")
        proc.wait()
    assert "HOST SECRET" not in seen, f"the testbed saw the host folder: {seen}"
    assert b"HOST KEY BYTES" not in keyring, "the server read a host file as an apt key"


# -- setuid files beside a shared writable bind --


def _env_with_shared_bind(tmp_path: Path, shared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config of its own: `bookworm` again (the same tarball: the same
    unpacked base), with a host folder bound writable, as other users may
    reach it."""
    config = tmp_path / "config"
    (config / "nsbuild" / "chroot.d").mkdir(parents=True)
    (config / "nsbuild" / "chroot.d" / "shared").write_text(
        f"Name: bookworm\nType: tarball\nPath: {TARBALL}\nSuite: bookworm\n"
        f"Architecture: amd64\nMirror: http://deb.debian.org/debian\n"
        f"Bind-Mounts: {shared}:/srv/shared\n"
    )
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))


_SETUID = "cp /usr/bin/id {dir}/suid && chmod 4755 {dir}/suid"


def test_commands_beside_a_shared_writable_bind_make_no_setuid_file(
    server_env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    _env_with_shared_bind(tmp_path, shared, monkeypatch)
    srv = VirtServer(["autopkgtest-virt-nsbuild", "--net", "none", "bookworm"])
    try:
        srv.open()
        ex = srv.execute_command()
        # In the bind; in the testbed's own folders too (a file there may be
        # moved into the bind); and with another network mode.
        for cmd, folder in ((ex, "/srv/shared"), (ex, "/tmp"),
                            ([*ex, "--nsbuild-net", "allow"], "/tmp")):  # fmt: skip
            done = _exec(cmd, _SETUID.format(dir=folder))
            assert done.returncode != 0, f"a setuid file was made in {folder}"
            assert "chmod: changing permissions" in done.stderr, done.stderr
            assert "Operation not permitted" in done.stderr, done.stderr
    finally:
        srv.stop()
    if (shared / "suid").exists():
        assert not (shared / "suid").stat().st_mode & (stat.S_ISUID | stat.S_ISGID)


def test_a_plain_testbed_makes_setuid_files(server: VirtServer) -> None:
    # dpkg installs setuid programs: a testbed whose binds are private allows it.
    server.open()
    ex = server.execute_command()
    _ok(ex, _SETUID.format(dir="/tmp") + " && test -u /tmp/suid")


# -- a size limit for copyup --


def test_copyup_stops_at_its_size_limit(server_env: Env, tmp_path: Path) -> None:
    srv = RawServer("--copy-limit", "1M", "bookworm")
    try:
        assert srv.say("open").startswith("ok ")
        ex = srv.execute_command()
        # Sparse: 64 MiB on the host once copied, nothing in the testbed.
        _ok(ex, "mkdir -p /srv/big /srv/small && truncate -s 64M /srv/big/sparse && "
                "head -c 4096 /dev/zero > /srv/big/first && echo small > /srv/small/f")  # fmt: skip
        assert srv.say("copyup", "/srv/big/sparse", str(tmp_path / "sparse")) == "copy-failed"
        assert not (tmp_path / "sparse").exists()
        assert srv.say("copyup", "/srv/big/", f"{tmp_path}/tree/") == "copy-failed"
        assert not (tmp_path / "tree" / "sparse").exists()
        # Below the limit, copies go on as before.
        assert srv.say("copyup", "/srv/small/", f"{tmp_path}/small/") == "ok"
        assert srv.say("copyup", "/srv/small/f", str(tmp_path / "f")) == "ok"
        assert (tmp_path / "small" / "f").read_text() == (tmp_path / "f").read_text() == "small\n"
        err = srv.quit()
    finally:
        srv.kill()
    over = "more than 1 MiB to copy (the server's --copy-limit"
    assert f"copyup of /srv/big/sparse: {over}" in err, err
    assert f"copyup of /srv/big/: ./sparse: more than 1048576 bytes in all: {over}" in err, err
    written = sum(p.stat().st_blocks * 512 for p in tmp_path.rglob("*") if p.is_file())
    assert written < 2 << 20, f"{written} bytes written on the host"
