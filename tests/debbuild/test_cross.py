"""Cross-building (--host-arch, sbuild's --host) on the amd64 test
environment: real builds of the C test package (tests/debbuild/cpackage.py)
for arm64 and armhf (on an environment of the main archive alone), and of
hello for arm64.

Each crossbuild-essential install downloads tens of megabytes the first
time, so the builds are few and each is asked several questions: the
arm64 greeter build of the module fixture serves most tests."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import Env, fixture_dsc, private_home
from .cpackage import PACKAGES, c_package


@dataclass
class Built:
    run: subprocess.CompletedProcess[str]
    out: Path
    summary: dict[str, object]

    def log(self) -> str:
        log = self.summary["log"]
        assert isinstance(log, str)
        return Path(log).read_text(errors="replace")

    def debs(self) -> dict[str, Path]:
        return {p.name.split("_")[0]: p for p in self.out.glob("*.deb")}


def _build(env: Env, source: Path, out: Path, *args: str) -> Built:
    out.mkdir(exist_ok=True)
    r = env.nsbuild("build", "--env", "bookworm", "--out", str(out), "--json", *args, str(source))
    summary = json.loads(r.stdout) if r.stdout.strip() else {}
    return Built(r, out, summary)


def _ok(built: Built) -> Built:
    if built.run.returncode != 0:
        log = built.summary.get("log")
        tail = Path(log).read_text(errors="replace")[-6000:] if isinstance(log, str) else ""
        pytest.fail(f"{built.run.stderr}\n{tail}")
    return built


def _field(deb: Path, name: str) -> str:
    r = subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _file_of(deb: Path, member: str, tmp: Path) -> str:
    """What `file` says of one file of a .deb."""
    where = tmp / "unpacked" / deb.name
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(where)], check=True)
    r = subprocess.run(["file", "-b", str(where / member)], capture_output=True, text=True)
    return r.stdout


@pytest.fixture(scope="module")
def greeter_arm64(bookworm: Env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """greeter cross-built for arm64, with --host-arch."""
    tmp = tmp_path_factory.mktemp("cross-arm64")
    yield _ok(_build(bookworm, c_package(tmp), tmp / "out", "--host-arch", "arm64"))


def test_greeter_cross_built_for_arm64_is_arm64(greeter_arm64: Built, tmp_path: Path) -> None:
    debs = greeter_arm64.debs()
    assert set(debs) == set(PACKAGES) | {"greeter-dbgsym", "libgreeter1-dbgsym"}
    for deb in debs.values():
        assert deb.name.endswith("_1.0_arm64.deb"), deb.name
        assert _field(deb, "Architecture") == "arm64"
    # The program links the host architecture's libraries: dpkg-shlibdeps
    # found them (libc6, zlib1g and libgreeter1, all for arm64).
    depends = _field(debs["greeter"], "Depends")
    assert "libgreeter1" in depends and "zlib1g" in depends and "libc6" in depends
    program = _file_of(debs["greeter"], "usr/bin/greeter", tmp_path)
    assert "ELF 64-bit LSB" in program and "ARM aarch64" in program, program
    library = _file_of(debs["libgreeter1"], "usr/lib/aarch64-linux-gnu/libgreeter.so.1", tmp_path)
    assert "ELF 64-bit LSB shared object" in library and "ARM aarch64" in library, library


def test_cross_results_are_named_and_described_by_the_host_architecture(
    greeter_arm64: Built,
) -> None:
    changes = greeter_arm64.out / "greeter_1.0_arm64.changes"
    text = changes.read_text()
    assert "\nArchitecture: arm64\n" in text  # no `all`: none asked for (-A)
    assert (greeter_arm64.out / "greeter_1.0_arm64.buildinfo").is_file()
    assert (greeter_arm64.out / "greeter_1.0_arm64.build").is_file()
    s = greeter_arm64.summary
    assert s["architecture"] == s["host_architecture"] == "arm64"
    assert s["build_architecture"] == s["environment_architecture"] == "amd64"
    log = greeter_arm64.log()
    assert "\nHost Architecture: arm64\n" in log
    assert "\nBuild Architecture: amd64\n" in log
    # sbuild's defaults for a cross build, and dpkg-buildpackage -a.
    assert "DEB_BUILD_PROFILES=cross nocheck" in log
    assert "DEB_BUILD_OPTIONS=nocheck " in log
    assert "CONFIG_SITE=/etc/dpkg-cross/cross-config.arm64" in log
    assert "dpkg-buildpackage: info: host architecture arm64" in log
    assert "crossbuild-essential-arm64:native" in log
    assert "nsbuild: cross-building for arm64 on amd64" in greeter_arm64.run.stderr


def test_a_second_cross_build_reuses_its_layer_and_a_native_one_does_not(
    bookworm: Env, greeter_arm64: Built, tmp_path: Path
) -> None:
    first = greeter_arm64.summary["dependency_layer"]
    assert isinstance(first, dict)
    assert first["cached"] is False
    # The arm64 package lists were fetched for the first cross build.
    assert "arm64 Packages" in greeter_arm64.log()
    # The same package, natively: its own layer, amd64 packages.
    native = _ok(_build(bookworm, c_package(tmp_path / "n"), tmp_path / "n-out"))
    layer = native.summary["dependency_layer"]
    assert isinstance(layer, dict) and layer["key"] != first["key"]
    assert native.summary["architecture"] == native.summary["build_architecture"] == "amd64"
    assert {_field(d, "Architecture") for d in native.debs().values()} == {"amd64"}
    assert "DEB_BUILD_PROFILES" not in native.log()
    assert (tmp_path / "n-out" / "greeter_1.0_amd64.changes").is_file()
    # Cross again: the first build's layer, and the arm64 lists the native
    # build's update left in the shared cache (not fetched again).
    again = _ok(_build(bookworm, c_package(tmp_path / "a"), tmp_path / "a-out",
                       "--host", "arm64"))  # fmt: skip
    assert again.summary["dependency_layer"] == {"key": first["key"], "cached": True}
    assert "arm64 Packages" not in again.log()


@pytest.fixture(scope="module")
def main_archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """An amd64 environment of Debian's main archive alone, made by `nsbuild
    env create`: every armhf package there has the version of its amd64
    one (Multi-Arch: same needs both), where a security archive's armhf
    lists may lag behind its amd64 ones (seen here: a list whose size did
    not match its Release file)."""
    if os.geteuid() == 0:
        pytest.skip("build tests run as an unprivileged user (the sandbox maps subuids)")
    home = private_home(tmp_path_factory.mktemp("cross-main-home"))
    env = next(home)
    r = env.nsbuild("env", "create", "bookworm", "--suite", "bookworm",
                    "--mirror", "http://deb.debian.org/debian")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    yield env
    next(home, None)


def test_greeter_cross_built_for_armhf(main_archive: Env, tmp_path: Path) -> None:
    built = _ok(_build(main_archive, c_package(tmp_path), tmp_path / "out", "--host-arch=armhf"))
    debs = built.debs()
    assert {_field(d, "Architecture") for d in debs.values()} == {"armhf"}
    program = _file_of(debs["greeter"], "usr/bin/greeter", tmp_path)
    assert "ELF 32-bit LSB" in program and "ARM, EABI5" in program, program
    library = _file_of(debs["libgreeter1"], "usr/lib/arm-linux-gnueabihf/libgreeter.so.1",
                       tmp_path)  # fmt: skip
    assert "ELF 32-bit LSB shared object" in library and "ARM, EABI5" in library, library
    assert (tmp_path / "out" / "greeter_1.0_armhf.changes").is_file()
    assert built.summary["host_architecture"] == "armhf"


def test_hello_cross_built_for_arm64_as_a_binnmu_with_profiles_and_checks(
    bookworm: Env, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    built = _ok(_build(bookworm, fixture_dsc("hello_2.10-3"), out, "--host", "arm64",
                       "-P", "cross", "--make-binNMU", "Rebuild.", "-m", "T <t@nsbuild.invalid>",
                       "--run-lintian", "--run-piuparts", "--run-autopkgtest"))  # fmt: skip
    deb = out / "hello_2.10-3+b1_arm64.deb"
    assert _field(deb, "Architecture") == "arm64"
    # sbuild's binNMU entry names the host architecture.
    changes = (out / "hello_2.10-3+b1_arm64.changes").read_text()
    assert "Binary-only non-maintainer upload for arm64" in changes
    assert "ARM aarch64" in _file_of(deb, "usr/bin/hello", tmp_path)
    assert "DEB_BUILD_PROFILES=cross\n" in built.log()  # -P's alone: no nocheck profile
    # lintian reads the foreign packages; the checks that would install
    # them cannot, and say why in one line each.
    checks = {c["name"]: c for c in built.summary["checks"]}  # type: ignore[attr-defined]
    assert checks["lintian"]["status"] in ("pass", "fail")
    assert checks["lintian"]["details"]
    for name in ("install", "autopkgtest"):
        assert checks[name]["status"] == "skipped"
        assert "for arm64" in checks[name]["summary"]
        assert f"check {name}: skipped (not run: the packages are for arm64" in built.run.stderr
    assert "Traceback" not in built.run.stderr


def test_a_dependency_with_no_host_candidate_exits_3_naming_it(
    bookworm: Env, tmp_path: Path
) -> None:
    # libipt-dev is built for amd64 and i386 only.
    tree = c_package(tmp_path, build_depends="libipt-dev")
    built = _build(bookworm, tree, tmp_path / "out", "--host-arch", "arm64")
    assert built.run.returncode == 3, built.run.stderr
    assert "libipt-dev:arm64" in built.run.stderr
    assert built.summary["status"] == "dependency-failed"
    assert not list((tmp_path / "out").iterdir())


def _one_line(r: subprocess.CompletedProcess[str], *words: str) -> str:
    """The one line of an error exiting 2: the whole of stderr when refused
    at once, else the one message besides the progress lines and the log's."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    if len(lines) > 1:
        lines = [ln for ln in lines if ln.startswith("nsbuild build: ") and " log: " not in ln]
    assert len(lines) == 1, r.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_an_architecture_dpkg_does_not_know_exits_2(bookworm: Env, tmp_path: Path) -> None:
    tree = c_package(tmp_path)
    r = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(tmp_path),
                         "--host-arch", "vax", str(tree))  # fmt: skip
    _one_line(r, "--host-arch vax", "not an architecture dpkg knows")
    assert "Install build dependencies" not in r.stderr


def test_a_build_architecture_other_than_the_environments_exits_2(
    bookworm: Env, tmp_path: Path
) -> None:
    tree = c_package(tmp_path)
    r = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(tmp_path),
                         "--build=arm64", str(tree))  # fmt: skip
    _one_line(r, "--build=arm64", "is amd64", "nsbuild env create NAME --arch arm64", "-c NAME")


@pytest.mark.parametrize("args", [("--host-arch", "ARM64"), ("--host=a/b",), ("--build=",)])
def test_a_bad_architecture_name_exits_2_at_once(
    bookworm: Env, tmp_path: Path, args: tuple[str, ...]
) -> None:
    r = bookworm.nsbuild("build", *args, str(tmp_path / "x.dsc"))
    _one_line(r, "bad architecture name")
