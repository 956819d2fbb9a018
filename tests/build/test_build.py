"""`nsbuild build` end to end, in a real bookworm environment, as the user sees it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import Env, fixture_dsc, make_package

pytestmark = pytest.mark.slow


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sessions(env: Env) -> list[str]:
    d = env.cache / "nsbuild" / "sessions"
    return sorted(os.listdir(d)) if d.is_dir() else []


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
    assert [p["name"] for p in summary["phases"]] == [
        "Prepare",
        "Install build dependencies",
        "Build",
        "Collect",
    ]
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


def test_failing_build_exits_1_and_keeps_its_log(bookworm: Env, tmp_path: Path) -> None:
    tree = make_package(tmp_path, "nsb-fails", build="echo this package does not build; false")
    out = tmp_path / "out"
    result = _build(bookworm, tree, out)
    assert result.returncode == 1
    log = (out / "nsb-fails_1.0_amd64.build").read_text()
    assert "this package does not build" in log
    assert "Status: failed" in log
    assert not list(out.glob("*.deb")) and not list(out.glob("*.changes"))


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
    tree = make_package(tmp_path, "nsb-slow", build="echo started; sleep 600")
    out = tmp_path / "out"
    proc = bookworm.popen("build", "--env", "bookworm", "--out", str(out), str(tree))
    assert proc.stderr is not None
    # Wait for phase 3 as the user would: by reading the progress lines.
    for line in proc.stderr:
        if "[3/4] Build" in line:
            break
    time.sleep(2)  # let dpkg-buildpackage get going inside
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    assert proc.returncode == 130
    assert not out.exists() or list(out.iterdir()) == []
    assert _sessions(bookworm) == []
    with open("/proc/self/mountinfo") as f:
        assert "nsbuild" not in f.read()
