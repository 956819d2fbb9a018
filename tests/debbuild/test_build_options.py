"""sbuild's everyday options in the Prepare and Build phases, and what a
maintainer met on first use there: real builds in a real bookworm
environment, checked as the user sees them (the results, their versions and
fields, what the package saw while it built, the session kept to enter)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from nsbuild.cli.exits import exit_status
from nsbuild.debbuild import binnmu, phases
from nsbuild.debbuild.collect import ResultNames
from nsbuild.debbuild.driver import build
from nsbuild.debbuild.dsc import load_dsc
from nsbuild.debbuild.errors import BuildInputError
from nsbuild.debbuild.inputs import check_build_path, check_out
from nsbuild.debbuild.result import BuildRequest
from nsbuild.errors import NsbuildError

from .conftest import Env, make_package

# What the test packages' build step records, installed into their .deb.
RECORD = (
    'printf "%s\\n" "pwd=$$(pwd)" "profiles=$$DEB_BUILD_PROFILES" '
    '"options=$$DEB_BUILD_OPTIONS" "marker=$$(cat prebuilt.o 2>/dev/null || echo absent)" '
    "> record.txt"
)
INSTALL = "install -D -m 0644 record.txt debian/{name}/usr/share/{name}/record.txt"


def _package(parent: Path, name: str, *, arch: str = "all") -> Path:
    tree = make_package(parent, name, build=RECORD, install=INSTALL.format(name=name))
    control = tree / "debian" / "control"
    control.write_text(control.read_text().replace("Architecture: all", f"Architecture: {arch}"))
    return tree


def _member(deb: Path, path: str) -> bytes:
    """A file of a .deb's data, read with dpkg-deb on the host."""
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True,
                          capture_output=True).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.extractfile(path)
        assert member is not None, path
        return member.read()


def _changelog(deb: Path, name: str) -> str:
    """The changelog entries a .deb carries (dpkg may keep a binNMU's in a
    file of its own, changelog.Debian.ARCH.gz or changelog.ARCH.gz), the
    binNMU's first."""
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True,
                          capture_output=True).stdout  # fmt: skip
    texts = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            if re.fullmatch(rf"\./usr/share/doc/{name}/changelog(\.Debian)?(\.amd64)?\.gz",
                            member.name):  # fmt: skip
                f = tar.extractfile(member)
                assert f is not None
                texts.append((".amd64." not in member.name, gzip.decompress(f.read()).decode()))
    assert texts, f"no changelog in {deb.name}"
    return "".join(text for _, text in sorted(texts))


def _record(deb: Path, name: str) -> dict[str, str]:
    text = _member(deb, f"./usr/share/{name}/record.txt").decode()
    return dict(line.split("=", 1) for line in text.splitlines())


def _fields(changes: Path) -> dict[str, str]:
    from debian.deb822 import Changes

    with changes.open() as f:
        return {k: str(v) for k, v in Changes(f).items()}


def _sessions(env: Env) -> list[str]:
    d = env.cache / "nsbuild" / "sessions"
    return sorted(n for n in os.listdir(d) if not n.startswith(".")) if d.is_dir() else []


# -- binNMU, -m/-e, -d, -P, --debbuildopts, DEB_BUILD_OPTIONS -------------------


@pytest.mark.slow
@pytest.mark.userns
def test_a_binnmu_with_sbuilds_options(bookworm: Env, tmp_path: Path) -> None:
    tree = _package(tmp_path, "nsb-nmu", arch="any")
    out = tmp_path / "out"
    # The user's own parallel=1 is kept when no --jobs is given (as sbuild).
    env = dict(bookworm.vars, DEB_BUILD_OPTIONS="parallel=1 nodoc")
    done = subprocess.run(
        [*_nsbuild(), "build", "--env", "bookworm", "--out", str(out), "--json",
         "--make-binNMU", "Rebuild against libnsb2.", "--binNMU", "3",
         "-m", "Build Daemon <buildd@nsbuild.invalid>",
         "-e", "An Uploader <uploader@nsbuild.invalid>",
         "-d", "bookworm-backports", "-P", "nocheck,nsb.one,nsb-two",
         # In order: the later one wins.
         "--debbuildopt=--changes-option=-DUrgency=low",
         "--debbuildopts=--changes-option=-DUrgency=high", str(tree)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    names = sorted(a["name"] for a in result["artifacts"])
    # --make-binNMU implies --no-arch-all; the results carry +b3, exactly.
    assert names == ["nsb-nmu_1.0+b3_amd64.buildinfo", "nsb-nmu_1.0+b3_amd64.changes",
                     "nsb-nmu_1.0+b3_amd64.deb"]  # fmt: skip
    changes = _fields(out / "nsb-nmu_1.0+b3_amd64.changes")
    assert changes["Version"] == "1.0+b3"
    assert changes["Source"] == "nsb-nmu (1.0)"
    assert changes["Binary-Only"] == "yes"
    assert changes["Distribution"] == "bookworm-backports"
    assert changes["Maintainer"] == "Build Daemon <buildd@nsbuild.invalid>"
    assert changes["Changed-By"] == "An Uploader <uploader@nsbuild.invalid>"
    assert changes["Urgency"] == "high"
    deb = out / "nsb-nmu_1.0+b3_amd64.deb"
    # sbuild's entry, word for word; dpkg keeps a binNMU's in its own file.
    entry = _changelog(deb, "nsb-nmu")
    head, _, rest = entry.partition("\n -- ")
    assert head == (
        "nsb-nmu (1.0+b3) bookworm-backports; urgency=low, binary-only=yes\n\n"
        "  * Binary-only non-maintainer upload for amd64; no source changes.\n"
        "  * Rebuild against libnsb2.\n"
    )
    assert re.match(
        r"Build Daemon <buildd@nsbuild.invalid>  [A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} "
        r"\d\d:\d\d:\d\d \+0000\n", rest,
    ), rest  # fmt: skip
    seen = _record(deb, "nsb-nmu")
    assert seen["profiles"] == "nocheck nsb.one nsb-two"
    # dpkg-buildpackage adds nocheck for the nocheck profile.
    assert seen["options"] == "parallel=1 nodoc nocheck"
    assert seen["pwd"] == "/build/nsb-nmu-1.0"
    log = Path(result["log"]).read_text()
    assert "-Pnocheck,nsb.one,nsb-two" in log


@pytest.mark.slow
@pytest.mark.userns
def test_append_to_version_and_jobs(
    bookworm_here: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = _package(tmp_path, "nsb-append", arch="any")
    out = tmp_path / "out"
    monkeypatch.setenv("DEB_BUILD_OPTIONS", "parallel=1")
    request = BuildRequest(input=tree, env="bookworm", out=out, append_to_version="~bpo12+1",
                           maintainer="Back Porter <bp@nsbuild.invalid>", jobs=3)  # fmt: skip
    result = build(request, progress=None)
    assert result.status == "successful", result.message
    deb = out / "nsb-append_1.0~bpo12+1_amd64.deb"
    assert _record(deb, "nsb-append")["options"] == "parallel=3"
    changes = _fields(out / "nsb-append_1.0~bpo12+1_amd64.changes")
    assert changes["Version"] == "1.0~bpo12+1"
    entry = _changelog(deb, "nsb-append")
    assert entry.startswith(
        "nsb-append (1.0~bpo12+1) bookworm; urgency=low, binary-only=yes\n\n"
        "  * Append ~bpo12+1 to version number; no source changes\n\n"
        " -- Back Porter <bp@nsbuild.invalid>  "
    )


# -- a tree as it is, --build-path, --source-only-changes, --purge-build ---------


@pytest.mark.slow
@pytest.mark.userns
def test_tree_as_it_is_at_a_build_path_kept_to_enter(bookworm: Env, tmp_path: Path) -> None:
    tree = _package(tmp_path, "nsb-kept")
    # dpkg-source leaves *.o out of a source package: only the tree has it;
    # and the package's clean removes it: only a build without clean keeps it.
    (tree / "prebuilt.o").write_text("present\n")
    rules = tree / "debian" / "rules"
    rules.write_text(rules.read_text() + "\noverride_dh_clean:\n\tdh_clean\n\trm -f prebuilt.o\n")
    out = tmp_path / "out"
    done = bookworm.nsbuild(
        "build", "--env", "bookworm", "--out", str(out), "--json", "--no-clean-source",
        "--build-path", "/srv/nsb/place", "--source-only-changes", "--purge-build", "never",
        str(tree),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    seen = _record(out / "nsb-kept_1.0_all.deb", "nsb-kept")
    assert seen["marker"] == "present"
    assert seen["pwd"] == "/srv/nsb/place/nsb-kept-1.0"
    # The source-only .changes, as dpkg-genchanges -S makes it, beside the other.
    names = sorted(a["name"] for a in result["artifacts"])
    assert "nsb-kept_1.0_source.changes" in names
    assert "nsb-kept_1.0_amd64.changes" in names
    source_only = _fields(out / "nsb-kept_1.0_source.changes")
    assert source_only["Architecture"] == "source"
    assert "nsb-kept_1.0.dsc" in source_only["Files"]
    assert ".deb" not in source_only["Files"]
    # The session is kept, listed, entered by the command given, and ended.
    assert result["session"].startswith("nsbuild session shell ")
    session_id = result["session"].split()[-1]
    assert session_id in _sessions(bookworm)
    listed = bookworm.nsbuild("session", "list")
    assert session_id in listed.stdout, listed.stderr
    inside = bookworm.nsbuild(
        "session", "run", session_id, "--", "sh", "-c",
        "cat /srv/nsb/place/nsb-kept-1.0/record.txt; ls /srv/nsb/place /build",
    )  # fmt: skip
    assert inside.returncode == 0, inside.stderr
    assert "pwd=/srv/nsb/place/nsb-kept-1.0" in inside.stdout
    assert "nsb-kept_1.0_all.deb" in inside.stdout
    assert "nsb-kept_1.0.dsc" in inside.stdout
    ended = bookworm.nsbuild("session", "end", session_id)
    assert ended.returncode == 0, ended.stderr
    assert session_id not in _sessions(bookworm)


@pytest.mark.slow
@pytest.mark.userns
def test_purge_build_successful_keeps_a_failed_builds_session(
    bookworm: Env, tmp_path: Path
) -> None:
    tree = make_package(tmp_path, "nsb-keepfail",
                        build="echo left by the failed build > failed-marker\nfalse")  # fmt: skip
    done = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(tmp_path / "out"),
                            "--json", "--purge-build", "successful", str(tree))  # fmt: skip
    assert done.returncode == 1, done.stderr
    session_id = json.loads(done.stdout)["session"].split()[-1]
    inside = bookworm.nsbuild("session", "run", session_id, "--",
                              "cat", "/build/nsb-keepfail-1.0/failed-marker")  # fmt: skip
    assert inside.stdout == "left by the failed build\n", inside.stderr
    assert bookworm.nsbuild("session", "end", session_id).returncode == 0
    # A successful build's session goes, as with sbuild.
    tree = make_package(tmp_path / "ok", "nsb-keepok")
    done = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(tmp_path / "out2"),
                            "--json", "--purge-build", "successful", str(tree))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["session"] is None
    assert _sessions(bookworm) == []


@pytest.mark.slow
@pytest.mark.userns
def test_a_build_path_that_is_not_empty_is_refused(bookworm_here: Env, tmp_path: Path) -> None:
    tree = _package(tmp_path, "nsb-full")
    request = BuildRequest(input=tree, env="bookworm", out=tmp_path / "out", build_path="/etc/apt")
    with pytest.raises(BuildInputError) as info:
        build(request, progress=None)
    said = "--build-path /etc/apt: making the build path failed: /etc/apt is not empty"
    assert str(info.value) == said
    assert exit_status(info.value) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.userns
def test_a_build_path_swapped_for_a_link_is_not_collected(bookworm: Env, tmp_path: Path) -> None:
    """/var/tmp lets the build user rename the build directory it owns: the
    results are looked for there, never through the link left in its place."""
    tree = make_package(
        tmp_path, "nsb-swapdir",
        builddeb="mv /var/tmp/nsb-p /var/tmp/nsb-q && ln -s nsb-q /var/tmp/nsb-p",
    )  # fmt: skip
    out = tmp_path / "out"
    done = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(out),
                            "--build-path", "/var/tmp/nsb-p", str(tree))  # fmt: skip
    assert done.returncode == 1, done.stderr
    said = "refusing to collect from /var/tmp/nsb-p: /var/tmp/nsb-p is not a plain directory"
    assert said in done.stderr
    assert not out.exists()


# -- dpkg-source fails: named, in Prepare, before any dependency ----------------


def _truncate_orig(dsc: Path) -> str:
    """Cut hello's upstream tarball in half and give the .dsc its new sums."""
    orig = dsc.parent / "hello_2.10.orig.tar.gz"
    data = orig.read_bytes()[: orig.stat().st_size // 2]
    orig.write_bytes(data)
    sums = {"md5": hashlib.md5(data).hexdigest(), "sha1": hashlib.sha1(data).hexdigest(),
            "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip
    lines = []
    for line in dsc.read_text().splitlines():
        words = line.split()
        if len(words) == 3 and words[2] == orig.name:
            algo = {32: "md5", 40: "sha1", 64: "sha256"}[len(words[0])]
            line = f" {sums[algo]} {len(data)} {orig.name}"
        lines.append(line)
    dsc.write_text("\n".join(lines) + "\n")
    return orig.name


@pytest.mark.slow
@pytest.mark.userns
def test_a_source_that_does_not_unpack_is_named_before_dependencies(
    bookworm: Env, hello_copy: Path
) -> None:
    name = _truncate_orig(hello_copy)
    load_dsc(hello_copy)  # the sums match: only unpacking finds it out
    out = hello_copy.parent / "out"
    done = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(out), "--json",
                            str(hello_copy))  # fmt: skip
    assert done.returncode == 2, done.stderr
    said = [line for line in done.stderr.splitlines() if "dpkg-source" in line]
    assert len(said) == 1, done.stderr
    assert f"hello 2.10-3: dpkg-source -x failed on {name}: " in said[0]
    assert "dpkg-buildpackage" not in done.stderr
    result = json.loads(done.stdout)
    assert result["fail_stage"] == "unpack"
    assert result["phases"] == []
    log = Path(result["log"]).read_text()
    assert "Fail-Stage: unpack" in log
    assert "Install build dependencies" not in log and "apt-get" not in log
    assert not out.exists()


# -- --shell-on-failure: the terminal or stderr, the build's environment --------


@pytest.mark.slow
@pytest.mark.userns
def test_shell_on_failure_keeps_stdout_for_json(bookworm: Env, tmp_path: Path) -> None:
    tree = make_package(tmp_path, "nsb-shell", build="echo this package does not build; false")
    env = dict(bookworm.vars, DEB_BUILD_OPTIONS="nocheck")
    proc = subprocess.run(
        [*_nsbuild(), "build", "--env", "bookworm", "--out", str(tmp_path / "out"),
         "--shell-on-failure", "--json", str(tree)],
        input='echo "in shell: $(pwd) [$DEB_BUILD_OPTIONS] $HOME $SOURCE_DATE_EPOCH"\nexit\n',
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    # stdout is the JSON document alone.
    doc = json.loads(proc.stdout)
    assert doc["status"] == "failed"
    cpus = os.cpu_count()
    assert f"in shell: /build/nsb-shell-1.0 [nocheck parallel={cpus}] /nonexistent 1704067200" \
        in proc.stderr  # fmt: skip
    assert "Permission denied" not in proc.stderr
    assert ".bashrc" not in proc.stderr


def _nsbuild() -> list[str]:
    import sys

    return [sys.executable, "-m", "nsbuild"]


# -- checked before any work ----------------------------------------------------


@pytest.mark.userns
def test_out_that_cannot_be_written_is_refused_first(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root passes any mode: test_out_mode_000_as_root says what root gets")
    closed = tmp_path / "closed"
    closed.mkdir(mode=0)
    try:
        for out, why in (
            (closed, f"--out {closed}: cannot write there: permission denied"),
            (closed / "sub", f"--out {closed}/sub: cannot write there: permission denied "
                             f"(cannot make it in {closed})"),
        ):  # fmt: skip
            with pytest.raises(BuildInputError) as info:
                check_out(out)
            assert str(info.value) == why
            assert exit_status(info.value) == 2
        # Through the build: refused before any environment is touched.
        tree = make_package(tmp_path, "nsb-out")
        with pytest.raises(NsbuildError) as e:
            build(BuildRequest(input=tree, env="no-such-env", out=closed), progress=None)
        assert str(e.value) == f"--out {closed}: cannot write there: permission denied"
    finally:
        closed.chmod(0o755)
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(BuildInputError, match=r"--out .*/file/x: .*/file is not a directory$"):
        check_out(a_file / "x")
    with pytest.raises(BuildInputError, match=r"--out .*/file: not a directory$"):
        check_out(a_file)


@pytest.mark.root
def test_out_mode_000_as_root(tmp_path: Path) -> None:
    """Root writes through any mode: nothing to refuse then."""
    closed = tmp_path / "closed"
    closed.mkdir(mode=0)
    check_out(closed)
    check_out(closed / "sub")


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("build/x", "not an absolute path"),
        ("/build/x/", "not normalised"),
        ("/build/../x", "not normalised"),
        ("/build//x", "not normalised"),
        ("/build", "give a directory below a top one"),
        ("/build/a b", "only letters, digits"),
        ("/tmp/x", "/tmp is not kept between the build's commands"),
    ],
)
def test_build_path_is_absolute_and_normalised(path: str, why: str) -> None:
    with pytest.raises(BuildInputError) as info:
        check_build_path(path)
    assert str(info.value).startswith(f"--build-path {path}: {why}")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("options", "why"),
    [
        ({"binnmu": 2}, "--binNMU needs --make-binNMU TEXT or --append-to-version"),
        ({"append_to_version": "-1", "maintainer": "A <a@b>"}, "--append-to-version '-1'"),
        ({"append_to_version": "+x", "source": True, "maintainer": "A <a@b>"},
         "--append-to-version cannot be used with --source"),
        ({"make_binnmu": "x\x1b[2J", "maintainer": "A <a@b>"}, "--make-binNMU: "),
        ({"make_binnmu": "rebuild", "maintainer": "nobody"}, "--maintainer 'nobody'"),
        ({"make_binnmu": "rebuild"}, "--make-binNMU/--append-to-version: no maintainer"),
    ],
)
def test_binnmu_options_are_checked(
    options: dict[str, object], why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DEBFULLNAME", raising=False)
    monkeypatch.delenv("DEBEMAIL", raising=False)
    with pytest.raises(BuildInputError) as info:
        binnmu.check(BuildRequest(input=Path("x.dsc"), **options))  # type: ignore[arg-type]
    assert str(info.value).startswith(why)


def test_binnmu_versions_and_build_type() -> None:
    req = BuildRequest(input=Path("x.dsc"), make_binnmu="rebuild")
    assert binnmu.version("1:2.0-1", req) == "1:2.0-1+b1"
    assert binnmu.build_type(req) == "any"
    req = BuildRequest(input=Path("x.dsc"), make_binnmu="r", binnmu=0, append_to_version="~x1")
    assert binnmu.version("2.0-1", req) == "2.0-1~x1"
    assert binnmu.version("2.0-1", BuildRequest(input=Path("x.dsc"))) == "2.0-1"


def test_binnmu_entry_as_sbuild_writes_it() -> None:
    req = BuildRequest(input=Path("x.dsc"), make_binnmu="Rebuild.\nSecond line.",
                       append_to_version="~x1", maintainer="A B <a@b.invalid>")  # fmt: skip
    # 2024-02-29 13:05:09 UTC, a Thursday.
    assert binnmu.entry("nsb", "1.0~x1+b1", "sid", "arm64", req, when=1709211909) == (
        "nsb (1.0~x1+b1) sid; urgency=low, binary-only=yes\n\n"
        "  * Append ~x1 to version number; no source changes\n"
        "  * Binary-only non-maintainer upload for arm64; no source changes.\n"
        "  * Rebuild.    Second line.\n\n"
        " -- A B <a@b.invalid>  Thu, 29 Feb 2024 13:05:09 +0000\n\n"
    )


def test_results_are_taken_at_exactly_the_builds_version(hello_copy: Path) -> None:
    pkg = load_dsc(hello_copy)
    plain = ResultNames(pkg, "amd64", False)
    assert plain.own_version("hello_2.10-3_amd64.deb")
    assert not plain.own_version("hello_2.10-3+b1_amd64.deb")
    nmu = ResultNames(pkg, "amd64", False, "2.10-3+b1")
    assert nmu.own_version("hello_2.10-3+b1_amd64.deb")
    assert not nmu.own_version("hello_2.10-3+b2_amd64.deb")
    assert not nmu.own_version("hello_2.10-3_amd64.deb")
    assert nmu.changes == {f"hello_2.10-3+b1_{a}.changes" for a in ("amd64", "all", "source")}
    assert not nmu.result("hello_2.10-3_amd64.changes")


def test_deb_build_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEB_BUILD_OPTIONS", "nocheck parallel=1")
    assert phases.build_options(None) == "nocheck parallel=1"
    assert phases.build_options(4) == "nocheck parallel=4"
    monkeypatch.setenv("DEB_BUILD_OPTIONS", "nodoc")
    assert phases.build_options(None) == f"nodoc parallel={os.cpu_count()}"
