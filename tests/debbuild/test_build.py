"""`nsbuild build` end to end, in a real bookworm environment, as the user sees it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from waiting import wait_for

from .conftest import Env, fixture_dsc, kept_log, make_package, processes

pytestmark = [pytest.mark.slow, pytest.mark.userns]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sessions(env: Env) -> list[str]:
    d = env.cache / "nsbuild" / "sessions"
    return sorted(os.listdir(d)) if d.is_dir() else []


def _deps_entries(env: Env) -> list[str]:
    d = env.cache / "nsbuild" / "deps"
    return sorted(os.listdir(d)) if d.is_dir() else []


def _layers_with(env: Env, package: str) -> list[str]:
    """Published dependency layers that installed `package`."""
    found = []
    for name in _deps_entries(env):
        meta = env.cache / "nsbuild" / "deps" / name / "layer.json"
        if meta.is_file() and any(
            p.startswith(f"install {package} ") for p in json.loads(meta.read_text())["packages"]
        ):
            found.append(name)
    return found


def _build(env: Env, source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return env.nsbuild("build", "--env", "bookworm", "--out", str(out), *extra, str(source))


def test_hello_builds_installs_and_reuses_its_dependency_layer(
    bookworm: Env, tmp_path: Path
) -> None:
    dsc = fixture_dsc("hello_2.10-3")
    first = _build(bookworm, dsc, tmp_path / "one", "--json")
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["status"] == "successful"
    assert summary["exit_status"] == 0
    assert (summary["package"], summary["version"]) == ("hello", "2.10-3")
    assert (summary["architecture"], summary["environment"]) == ("amd64", "bookworm")
    assert [p["name"] for p in summary["phases"]] == [
        "Prepare",
        "Install build dependencies",
        "Build",
        "Collect",
    ]
    assert all(p["seconds"] >= 0 for p in summary["phases"])
    assert Path(summary["log"]) == tmp_path / "one" / "hello_2.10-3_amd64.build"
    assert Path(summary["network_log"]).is_file()
    # hello's build tries nothing: no attempt, so none denied.
    assert summary["network"]["denied"] == []
    # Only the JSON document is on stdout; the .debs are listed in it.
    assert not first.stdout.lstrip().startswith("/")
    names = sorted(a["name"] for a in summary["artifacts"])
    assert "hello_2.10-3_amd64.deb" in names
    assert "hello_2.10-3_amd64.changes" in names
    assert "hello_2.10-3_amd64.buildinfo" in names
    for art in summary["artifacts"]:
        assert _sha256(Path(art["path"])) == art["sha256"]
        assert Path(art["path"]).stat().st_size == art["size"]
    log = (tmp_path / "one" / "hello_2.10-3_amd64.build").read_text()
    assert "Status: successful" in log
    assert "| Build " in log and "| Summary " in log
    assert summary["dependency_layer"]["cached"] is False

    # The .deb installs in a fresh session and hello greets.
    deb = tmp_path / "one" / "hello_2.10-3_amd64.deb"
    script = f"dpkg -i /build/{deb.name} >/dev/null && hello"
    from nsbuild.backends import BackendOptions, open_backend

    old = dict(os.environ)
    os.environ.update(bookworm.vars)
    try:
        with open_backend("local", BackendOptions(env="bookworm")) as backend:
            backend.copy_in(deb, f"/build/{deb.name}")
            status, text = backend.check_output(["sh", "-c", script])
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert status == 0
    assert text.strip() == "Hello, world!"

    # The second build finds the same resolution and reuses the layer.
    second = _build(bookworm, dsc, tmp_path / "two", "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["dependency_layer"]["cached"] is True
    log2 = (tmp_path / "two" / "hello_2.10-3_amd64.build").read_text()
    assert "Using cached dependency layer" in log2
    listing = [
        subprocess.run(
            ["dpkg-deb", "-c", str(d / "hello_2.10-3_amd64.deb")], capture_output=True, text=True
        ).stdout
        for d in (tmp_path / "one", tmp_path / "two")
    ]
    assert listing[0] == listing[1]
    assert _sessions(bookworm) == []


def test_pv_builds(bookworm: Env, tmp_path: Path) -> None:
    result = _build(bookworm, fixture_dsc("pv_1.6.20-1"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "pv_1.6.20-1_amd64.deb").is_file()
    assert "Status: successful" in (tmp_path / "pv_1.6.20-1_amd64.build").read_text()


def test_network_attempts_during_build_are_logged(bookworm: Env, tmp_path: Path) -> None:
    tree = make_package(
        tmp_path,
        "nsb-netprobe",
        build="getent hosts example.org || echo no network, as expected\n"
        "(exec 3<>/dev/tcp/93.184.215.14/80) 2>/dev/null || echo no route, as expected",
    )
    out = tmp_path / "out"
    result = _build(bookworm, tree, out, "--json")
    assert result.returncode == 0, result.stderr
    records = [
        json.loads(line)
        for line in (out / "nsb-netprobe_1.0_amd64.network.jsonl").read_text().splitlines()
    ]
    assert any(r["host"] == "example.org" and r["decision"] != "allow" for r in records)
    denied = json.loads(result.stdout)["network"]["denied"]
    assert any(r["host"] == "example.org" for r in denied)


def test_failing_build_exits_1_keeps_only_its_log_and_opens_a_shell(
    bookworm: Env, tmp_path: Path
) -> None:
    tree = make_package(
        tmp_path,
        "nsb-fails",
        build="echo left by the failed build > failed-marker\n"
        "echo this package does not build; false",
        # A dependency set of its own: its layer is made by this build.
        build_depends="bc",
    )
    out = tmp_path / "out"
    # --shell-on-failure: with no terminal, the shell reads its commands from
    # stdin, here a pipe, and answers on stderr: stdout may carry --json.
    proc = bookworm.popen(
        "build", "--env", "bookworm", "--out", str(out), "--shell-on-failure", str(tree),
        stdin=subprocess.PIPE, new_session=True,
    )  # fmt: skip
    stdout, stderr = proc.communicate('echo "in shell: $(pwd): $(cat failed-marker)"\nexit\n')
    assert proc.returncode == 1, stderr
    assert "in shell: /build/nsb-fails-1.0: left by the failed build" in stderr
    assert stdout == ""
    # The step that failed, and the last thing it said.
    said = "dpkg-buildpackage failed: debian/rules binary subprocess returned exit status 2"
    assert said in stderr
    # Nothing reaches --out; the logs are kept in nsbuild's cache, and named.
    assert not out.exists()
    log_path = kept_log(bookworm, stderr, "nsb-fails_1.0_amd64.build")
    log = log_path.read_text()
    assert "this package does not build" in log
    assert "Status: failed" in log
    assert (log_path.parent / "nsb-fails_1.0_amd64.network.jsonl").is_file()
    assert _sessions(bookworm) == []
    # The dependencies were installed fine: their layer is stored for the
    # next attempt, and nothing half-stored is left.
    match = re.search(r"^Kept dependency layer ([0-9a-f]{16}) ", log, re.MULTILINE)
    assert match, log
    assert [n[:16] for n in _layers_with(bookworm, "bc")] == [match.group(1)]
    assert not [n for n in _deps_entries(bookworm) if n.startswith(".tmp-")]


LISTENER = """\
use IO::Socket::INET;
my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 47613,
                              Listen => 5, Proto => 'tcp', ReuseAddr => 0)
    or die "cannot listen on 127.0.0.1:47613: $!\\n";
# Now listening: say so where the test (outside) can see it, then wait for it.
$0 = 'nsb-port-listening';
$SIG{USR1} = sub { print "released\\n"; exit 0 };
sleep 600;
die "never released\\n";
"""


def test_two_builds_at_once_listen_on_the_same_port(bookworm: Env, tmp_path: Path) -> None:
    # A test suite on a fixed port: each build has its own network namespace,
    # so both bind 127.0.0.1:47613 at the same time. No --env: the changelog
    # says bookworm, and the environment of that name is used.
    tree = make_package(tmp_path, "nsb-port", check="perl debian/listen.pl")
    (tree / "debian" / "listen.pl").write_text(LISTENER)
    procs = [bookworm.popen("build", "--out", str(tmp_path / f"out{i}"), str(tree)) for i in (1, 2)]
    try:
        # Both must be listening at once before either is let go: the proof
        # that they overlapped, not merely ran one after the other.
        def both_listen() -> bool:
            finished = [p for p in procs if p.poll() is not None]
            assert not finished, finished[0].communicate()[1]
            return len(processes(b"nsb-port-listening")) >= 2

        wait_for(both_listen, "both builds listen on 127.0.0.1:47613", timeout=900)
        for pid in processes(b"nsb-port-listening"):
            os.kill(pid, signal.SIGUSR1)
        results = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (proc, (_out, err)) in enumerate(zip(procs, results, strict=True), 1):
        assert proc.returncode == 0, err
        log = (tmp_path / f"out{i}" / "nsb-port_1.0_amd64.build").read_text()
        assert "released" in log
        assert "Distribution: bookworm" in log
        assert (tmp_path / f"out{i}" / "nsb-port_1.0_all.deb").is_file()


def test_unsatisfiable_build_depends_exits_3_naming_them(bookworm: Env, tmp_path: Path) -> None:
    tree = make_package(tmp_path, "nsb-unsat", build_depends="nsbuild-no-such-package (>= 1)")
    result = _build(bookworm, tree, tmp_path / "out")
    assert result.returncode == 3
    assert "nsbuild-no-such-package (>= 1)" in result.stderr


def test_corrupted_dsc_exits_2_before_any_environment(
    bookworm: Env, hello_copy: Path, tmp_path: Path
) -> None:
    f = hello_copy.parent / "hello_2.10-3.debian.tar.xz"
    data = bytearray(f.read_bytes())
    data[200] ^= 0xFF
    f.write_bytes(bytes(data))
    # "missing" names a tarball that does not exist: touching it would fail differently.
    result = bookworm.nsbuild("build", "--env", "missing", str(hello_copy))
    assert result.returncode == 2
    assert "checksum mismatch for hello_2.10-3.debian.tar.xz" in result.stderr
    f.unlink()
    result = bookworm.nsbuild("build", "--env", "missing", str(hello_copy))
    assert result.returncode == 2
    assert "hello_2.10-3.debian.tar.xz is missing" in result.stderr


def test_unknown_environment_exits_2(bookworm: Env, tmp_path: Path) -> None:
    result = bookworm.nsbuild(
        "build", "--env", "no-such-env", "--out", str(tmp_path), str(fixture_dsc("pv_1.6.20-1"))
    )
    assert result.returncode == 2
    assert "no-such-env" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_sigint_during_build_exits_130_and_leaves_nothing(bookworm: Env, tmp_path: Path) -> None:
    # A dependency set of its own: its layer is kept by this build, which
    # must not publish it half-written.
    tree = make_package(tmp_path, "nsb-slow", build="sleep 86417", build_depends="dc")
    out = tmp_path / "out"
    proc = bookworm.popen("build", "--env", "bookworm", "--out", str(out), str(tree))

    def building() -> bool:
        assert proc.poll() is None, proc.communicate()[1]
        return bool(processes(b"sleep\x0086417\x00"))

    # Interrupted in the middle of the package's own build (debian/rules runs).
    wait_for(building, "the package's build runs", timeout=900)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    assert proc.returncode == 130
    assert not out.exists() or list(out.iterdir()) == []
    assert _sessions(bookworm) == []
    assert _layers_with(bookworm, "dc") == []
    assert not [n for n in _deps_entries(bookworm) if n.startswith(".tmp-")]
    with open("/proc/self/mountinfo") as f:
        assert "nsbuild" not in f.read()
