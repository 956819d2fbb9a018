"""Cross-building's options and sbuild's defaults for it, without a build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nsbuild.debbuild import binnmu, cross
from nsbuild.debbuild.collect import ResultNames
from nsbuild.debbuild.dsc import load_dsc
from nsbuild.debbuild.errors import BuildInputError
from nsbuild.debbuild.phases import build_env, dpkg_buildpackage_argv
from nsbuild.debbuild.result import BuildRequest

CROSS = cross.Arches("amd64", "arm64")
NATIVE = cross.Arches("amd64", "amd64")


def _req(**kw: object) -> BuildRequest:
    return BuildRequest(input=Path("p_1.dsc"), **kw)  # type: ignore[arg-type]


def test_a_cross_build_takes_sbuilds_defaults() -> None:
    req = cross.adjust(_req(host_arch="arm64"), CROSS)
    assert req.profiles == ("cross", "nocheck")
    assert req.arch_all is False and req.arch_any is True
    argv = dpkg_buildpackage_argv(req, CROSS)
    assert "-aarm64" in argv and "-Pcross,nocheck" in argv and "--build=any" in argv


def test_what_was_chosen_stays_chosen() -> None:
    req = cross.adjust(_req(host_arch="arm64", profiles=("cross",), arch_all_given=True), CROSS)
    assert req.profiles == ("cross",)
    assert req.arch_all is True
    assert "--build=any,all" in dpkg_buildpackage_argv(req, CROSS)


def test_the_environments_own_architecture_is_a_native_build() -> None:
    req = _req(host_arch="amd64")
    assert cross.adjust(req, NATIVE) is req
    assert cross.arches(req, "amd64", "bookworm") == NATIVE
    assert not NATIVE.cross
    argv = dpkg_buildpackage_argv(req, NATIVE)
    assert not any(a.startswith("-a") for a in argv)
    assert cross.core_depends(NATIVE) == ["build-essential", "fakeroot"]
    assert "CONFIG_SITE" not in build_env("0", "u", req, NATIVE)


def test_nothing_left_to_build_is_refused() -> None:
    with pytest.raises(BuildInputError, match="nothing to build"):
        cross.adjust(_req(host_arch="arm64", arch_any=False), CROSS)


def test_the_cross_core_dependencies_are_sbuilds() -> None:
    assert cross.core_depends(CROSS) == [
        "build-essential:native", "fakeroot:native", "crossbuild-essential-arm64:native",
        "libc-dev:arm64", "libstdc++-dev:arm64",
    ]  # fmt: skip


def test_nocheck_joins_the_build_options_unless_the_caller_set_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DEB_BUILD_OPTIONS", raising=False)
    env = build_env("0", "u", _req(jobs=2), CROSS)
    assert env["DEB_BUILD_OPTIONS"] == "nocheck parallel=2"
    assert env["CONFIG_SITE"] == "/etc/dpkg-cross/cross-config.arm64"
    # Set, even empty: the caller's choice (sbuild's rule).
    monkeypatch.setenv("DEB_BUILD_OPTIONS", "")
    assert build_env("0", "u", _req(jobs=2), CROSS)["DEB_BUILD_OPTIONS"] == "parallel=2"


def test_build_of_another_architecture_names_how_to_get_one() -> None:
    with pytest.raises(BuildInputError) as e:
        cross.arches(_req(build_arch="arm64"), "amd64", "bookworm")
    assert "nsbuild env create NAME --arch arm64" in str(e.value)
    assert cross.arches(_req(build_arch="amd64", host_arch="armhf"), "amd64", "b") == (
        cross.Arches("amd64", "armhf")
    )


def _nsbuild(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "config"))
    return subprocess.run([sys.executable, "-m", "nsbuild", *args], env=env,
                          capture_output=True, text=True)  # fmt: skip


def test_the_host_architecture_is_a_setting_of_the_file(tmp_path: Path) -> None:
    (tmp_path / "config" / "nsbuild").mkdir(parents=True)
    (tmp_path / "config" / "nsbuild" / "config.toml").write_text('[build]\nhost-arch = "armhf"\n')
    r = _nsbuild(tmp_path, "config")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("host-arch"))
    assert "armhf" in line and "config.toml" in line
    r = _nsbuild(tmp_path, "config", "--host", "arm64")
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("host-arch"))
    assert "arm64" in line and "command line" in line


@pytest.mark.parametrize("option", ["-a", "--arch"])
def test_sbuilds_arch_option_points_to_both_ways(tmp_path: Path, option: str) -> None:
    r = _nsbuild(tmp_path, "build", option, "arm64", "x.dsc")
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert "--host-arch ARCH" in r.stderr and "nsbuild env create NAME --arch ARCH" in r.stderr


@pytest.mark.parametrize("where", ["command line", "file"])
def test_an_odd_or_huge_architecture_is_one_bounded_line(tmp_path: Path, where: str) -> None:
    """A value of the user's own, but echoed to a terminal: its escape
    sequence shown, not obeyed, and 100 kB of it cut to a line."""
    value = "arm\x1b]0;title\x07" + "a" * 100_000
    args = ["build", "x.dsc"]
    if where == "file":
        (tmp_path / "config" / "nsbuild").mkdir(parents=True)
        text = '[build]\nhost-arch = "' + value.replace("\x1b", "\\u001b").replace(
            "\x07", "\\u0007") + '"\n'
        (tmp_path / "config" / "nsbuild" / "config.toml").write_text(text)
    else:
        args[1:1] = ["--host", value]
    r = _nsbuild(tmp_path, *args)
    assert r.returncode == 2, r.stderr[:300]
    assert len(r.stderr.splitlines()) == 1 and len(r.stderr) < 5000, r.stderr[:300]
    assert "bad architecture name" in r.stderr and "\x1b" not in r.stderr, r.stderr[:300]


def test_a_cross_builds_results_are_of_the_host_architecture_only(hello_copy: Path) -> None:
    """What the .changes of a cross build (arch-all left out) may list: its
    host architecture's .debs, never another's, nor an _all.deb it was not
    asked to build."""
    pkg = load_dsc(hello_copy)
    req = cross.adjust(_req(host_arch="arm64"), CROSS)
    own = ResultNames(pkg, "arm64", req.source, build=binnmu.build_type(req))
    assert own.result("hello_2.10-3_arm64.deb")
    assert own.result("hello-dbgsym_2.10-3_arm64.deb")
    for other in ("hello_2.10-3_amd64.deb", "hello_2.10-3_all.deb", "hello_2.10-3_armhf.deb"):
        assert not own.result(other), other
    with_all = ResultNames(pkg, "arm64", False, build="any,all")
    assert with_all.result("hello_2.10-3_all.deb")
