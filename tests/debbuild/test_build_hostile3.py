"""Results and dependency layers as a hostile build shapes them.

A source's author writes its Binary: field, its debian/rules and its
.changes; an environment's apt configuration decides what apt installs
unchecked. Each test is such an attack, and what the user sees afterwards.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from inputs import TARBALL

from nsbuild.backends import Backend, BackendOptions, CopyRefused, open_backend
from nsbuild.debbuild.apt import unchecked_sources

from .conftest import Env

pytestmark = [pytest.mark.slow, pytest.mark.userns]


def _raw_package(parent: Path, name: str, binary: str, extra_control: str = "",
                 build_depends: str = "") -> Path:  # fmt: skip
    """A native source tree with no debhelper: `binary` is the shell text of
    its binary target (run in the tree; results go to ..)."""
    tree = parent / f"{name}-1.0"
    (tree / "debian" / "source").mkdir(parents=True)
    deps = f"Build-Depends: {build_depends}\n" if build_depends else ""
    (tree / "debian" / "control").write_text(
        f"Source: {name}\nSection: misc\nPriority: optional\n"
        f"Maintainer: nsbuild tests <tests@nsbuild.invalid>\n{deps}"
        "Standards-Version: 4.6.2\nRules-Requires-Root: no\n\n"
        f"Package: {name}\nArchitecture: all\nDescription: test package\n t\n" + extra_control
    )
    (tree / "debian" / "changelog").write_text(
        f"{name} (1.0) bookworm; urgency=medium\n\n  * Test package.\n\n"
        " -- nsbuild tests <tests@nsbuild.invalid>  Mon, 01 Jan 2024 00:00:00 +0000\n"
    )
    (tree / "debian" / "source" / "format").write_text("3.0 (native)\n")
    rules = "#!/usr/bin/make -f\nbuild build-arch build-indep:\n\ttrue\nclean:\n\ttrue\n"
    rules += "binary binary-arch binary-indep:\n"
    rules += "".join(f"\t{line}\n" for line in binary.strip().splitlines())
    (tree / "debian" / "rules").write_text(rules)
    (tree / "debian" / "rules").chmod(0o755)
    return tree


OWN_DEB = "rm -rf debian/tmp; mkdir -p debian/tmp/DEBIAN\n" \
          "dpkg-gencontrol -p{name} -Pdebian/tmp\ndpkg-deb -b debian/tmp ..\n"  # fmt: skip


# -- a declared binary at another version ---------------------------------


def _evil(parent: Path) -> Path:
    """`evil` declares a binary package `hello` and builds it at hello's
    version, with a file of its own in it."""
    binary = OWN_DEB.format(name="evil") + textwrap.dedent("""\
        rm -rf debian/tmp2; mkdir -p debian/tmp2/DEBIAN
        echo trojan > debian/tmp2/TROJAN
        dpkg-gencontrol -phello -v2.10-3 -Pdebian/tmp2
        dpkg-deb -b debian/tmp2 ..
        """)
    hello = "\nPackage: hello\nArchitecture: any\nDescription: not hello\n t\n"
    return _raw_package(parent, "evil", binary, hello)


def test_declared_binary_at_another_version_never_replaces_a_file_of_out(
    bookworm: Env, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    users = out / "hello_2.10-3_amd64.deb"
    users.write_text("ORIGINAL USER FILE\n")
    result = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(out),
                              str(_evil(tmp_path)))  # fmt: skip
    assert result.returncode != 0, result.stderr
    assert users.read_text() == "ORIGINAL USER FILE\n"
    said = [ln for ln in result.stderr.splitlines() if "hello_2.10-3_amd64.deb" in ln]
    assert len(said) == 1 and "not replaced" in said[0], result.stderr
    # A failed build writes nothing to --out.
    assert sorted(p.name for p in out.iterdir()) == ["hello_2.10-3_amd64.deb"]


def test_declared_binary_at_another_version_is_collected_into_a_new_name(
    bookworm: Env, tmp_path: Path
) -> None:
    """As a gcc-defaults does: a binary at a version of its own is a result,
    when nothing of its name is in --out."""
    out = tmp_path / "out"
    result = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(out),
                              str(_evil(tmp_path)))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (out / "hello_2.10-3_amd64.deb").is_file()
    assert (out / "evil_1.0_all.deb").is_file()


def test_a_rebuild_replaces_its_own_results(bookworm: Env, tmp_path: Path) -> None:
    tree = _raw_package(tmp_path, "again", OWN_DEB.format(name="again"))
    out = tmp_path / "out"
    for _ in range(2):
        result = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(out), str(tree))
        assert result.returncode == 0, result.stderr
    assert (out / "again_1.0_all.deb").is_file()


# -- sparse and fake results -------------------------------------------------


def _large_files(folder: Path) -> list[str]:
    return [f"{p} {p.lstat().st_size}" for p in folder.rglob("*")
            if p.is_file() and p.lstat().st_size > 1 << 20]  # fmt: skip


def _allocated(env: Env, tmp_path: Path) -> int:
    """Bytes on disk under the test's folder and nsbuild's cache, but for the
    store (the environment may be unpacked there by this very build)."""
    store = env.cache / "nsbuild" / "store"
    paths = [p for top in (tmp_path, env.cache) for p in top.rglob("*")
             if not p.is_relative_to(store)]  # fmt: skip
    return sum(p.lstat().st_blocks * 512 for p in paths)


def test_sparse_result_is_refused_before_it_fills_the_disk(bookworm: Env, tmp_path: Path) -> None:
    binary = OWN_DEB.format(name="sparse") + textwrap.dedent("""\
        truncate -s 2G ../sparse_9.9_all.deb
        dpkg-distaddfile sparse_9.9_all.deb misc optional
        """)
    tree = _raw_package(tmp_path, "sparse", binary)
    out = tmp_path / "out"
    before = _allocated(bookworm, tmp_path)
    result = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(out), str(tree))
    assert result.returncode != 0, result.stderr
    said = [ln for ln in result.stderr.splitlines() if "sparse_9.9_all.deb" in ln]
    assert len(said) == 1 and "is sparse" in said[0], result.stderr
    assert not out.exists() or not any(out.iterdir())
    # Nothing large was written anywhere: not in --out, not left beside it,
    # not in nsbuild's cache, and no more than a little was allocated there.
    assert _large_files(tmp_path) == []
    assert _large_files(bookworm.cache / "nsbuild" / "logs") == []
    assert _allocated(bookworm, tmp_path) < before + (512 << 20)


def test_a_deb_that_is_no_debian_package_is_refused(bookworm: Env, tmp_path: Path) -> None:
    binary = textwrap.dedent("""\
        echo 'not a package' > ../fake_1.0_all.deb
        dpkg-distaddfile fake_1.0_all.deb misc optional
        """)
    tree = _raw_package(tmp_path, "fake", binary)
    out = tmp_path / "out"
    result = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(out), str(tree))
    assert result.returncode != 0, result.stderr
    said = [ln for ln in result.stderr.splitlines() if "fake_1.0_all.deb" in ln]
    assert len(said) == 1 and "not a Debian package" in said[0], result.stderr
    assert not out.exists() or not any(out.iterdir())


# -- apt sources that let unsigned packages in --------------------------------


UNCHECKED = {
    "one-line trusted=true": ("/etc/apt/sources.list.d/x.list",
                              "deb [trusted=true] http://deb.debian.org/debian bookworm contrib"),
    "one-line trusted=1": ("/etc/apt/sources.list.d/x.list",
                           "deb [arch=amd64 trusted=1] http://deb.debian.org/debian sid main"),
    "one-line allow-insecure": ("/etc/apt/sources.list.d/x.list",
                                "deb [allow-insecure=yes] http://deb.debian.org/debian sid main"),
    "deb822 Trusted: true": ("/etc/apt/sources.list.d/x.sources",
                             "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: sid\n"
                             "Components: main\nTrusted: true"),
    "local repository": ("/etc/apt/sources.list.d/x.list", "deb file:/srv/repo ./"),
    "AllowUnauthenticated": ("/etc/apt/apt.conf.d/99x", 'APT::Get::AllowUnauthenticated "true";'),
    "AllowInsecureRepositories": ("/etc/apt/apt.conf.d/99x",
                                  'Acquire::AllowInsecureRepositories "on";'),
    "sources moved": ("/etc/apt/apt.conf.d/99x",
                      'Dir::Etc::sourceparts "/srv/parts";'
                      ' Dir::Etc::sourcelist "/srv/parts/main.list";'),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(UNCHECKED))
def test_every_spelling_of_an_unchecked_source_is_seen(backend: Backend, case: str) -> None:
    assert not unchecked_sources(backend)  # the environment as it is
    path, text = UNCHECKED[case]
    script = 'mkdir -p /srv/parts && printf "%s\\n" "$2" > "$1"'
    if case == "sources moved":
        script += ' && echo "deb [trusted=yes] http://x.invalid/ sid main" > /srv/parts/main.list'
    assert backend.run(["sh", "-c", script, "write", path, text]) == 0
    assert unchecked_sources(backend)


def _repo_env(bookworm: Env, tmp_path: Path, name: str, sources: tuple[str, str]) -> str:
    """An environment named `name`: bookworm plus an unsigned local
    repository (the source entry `sources` names it) holding `helper`,
    whose postinst wraps dpkg-buildpackage for every later build."""
    root = tmp_path / "root"
    helper = tmp_path / "helper"
    (helper / "DEBIAN").mkdir(parents=True)
    (helper / "DEBIAN" / "control").write_text(
        "Package: helper\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: nsbuild tests <tests@nsbuild.invalid>\nDescription: helper\n h\n"
    )
    postinst = helper / "DEBIAN" / "postinst"
    postinst.write_text(
        "#!/bin/sh\nmkdir -p /usr/local/bin\n"
        "printf '#!/bin/sh\\necho WRAPPED-BY-LAYER >&2\\nexec /usr/bin/dpkg-buildpackage \"$@\"\\n'"
        " > /usr/local/bin/dpkg-buildpackage\nchmod 755 /usr/local/bin/dpkg-buildpackage\n"
    )
    postinst.chmod(0o755)
    repo = root / "srv" / "repo"
    repo.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(helper), str(repo)],
                   check=True, capture_output=True)  # fmt: skip
    packages = subprocess.run(["dpkg-scanpackages", "."], cwd=repo, check=True,
                              capture_output=True, text=True).stdout  # fmt: skip
    (repo / "Packages").write_text(packages)
    where, text = sources
    (root / where).parent.mkdir(parents=True)
    (root / where).write_text(text + "\n")
    tarball = tmp_path / f"{name}.tar"
    shutil.copyfile(TARBALL, tarball)
    subprocess.run(["tar", "-rf", str(tarball), "--owner=0", "--group=0", "-C", str(root),
                    f"./{where}", "./srv/repo"], check=True)  # fmt: skip
    chroot_d = Path(bookworm.vars["XDG_CONFIG_HOME"]) / "nsbuild" / "chroot.d"
    (chroot_d / name).write_text(
        f"Name: {name}\nType: tarball\nPath: {tarball}\nSuite: bookworm\n"
        "Architecture: amd64\nMirror: http://deb.debian.org/debian\n"
    )
    return name


LOCAL_REPOS = {
    "bwtrusted": ("etc/apt/sources.list.d/local.list", "deb [trusted=true] file:/srv/repo ./"),
    "bwtrusted822": ("etc/apt/sources.list.d/local.sources",
                     "Types: deb\nURIs: file:/srv/repo\nSuites: ./\nTrusted: true"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(LOCAL_REPOS))
def test_no_layer_is_kept_from_an_unsigned_repository(
    bookworm: Env, tmp_path: Path, name: str
) -> None:
    env = _repo_env(bookworm, tmp_path, name, LOCAL_REPOS[name])
    logs = []
    for pkg in ("pkga", "pkgb"):
        tree = _raw_package(tmp_path, pkg, OWN_DEB.format(name=pkg), build_depends="helper")
        out = tmp_path / f"out-{pkg}"
        result = bookworm.nsbuild("build", "--env", env, "--out", str(out), str(tree))
        assert result.returncode == 0, result.stderr
        logs.append((out / f"{pkg}_1.0_amd64.build").read_text())
    assert "No dependency layer is kept" in logs[0]
    assert "Stored dependency layer" not in logs[0]
    assert "Kept dependency layer" not in logs[0]
    assert "Using cached dependency layer" not in logs[1]
    assert "WRAPPED-BY-LAYER" in logs[0]  # the helper's script did run


def test_both_backends_refuse_to_copy_out_a_sparse_file(backend: Backend, tmp_path: Path) -> None:
    with open_backend("autopkgtest", BackendOptions(args=("null",))) as null:
        for b in (backend, null):
            script = f"truncate -s 2M {b.work_dir}/holes.deb"
            status, text = b.check_output(["sh", "-c", script])
            assert status == 0, text
            with pytest.raises(CopyRefused, match=r"holes\.deb is sparse \(2097152 bytes"):
                b.copy_out(f"{b.work_dir}/holes.deb", tmp_path / "holes.deb")
            assert list(tmp_path.iterdir()) == []


def test_results_have_a_bound_all_together(bookworm: Env, tmp_path: Path) -> None:
    """Each under the bound of one file, together over the bound of a build."""
    binary = OWN_DEB.format(name="many") + "".join(
        f"truncate -s 5G ../many_{v}_all.deb\ndpkg-distaddfile many_{v}_all.deb misc optional\n"
        for v in ("2.0", "3.0")
    )
    tree = _raw_package(tmp_path, "many", binary)
    out = tmp_path / "out"
    result = bookworm.nsbuild("build", "--env", "bookworm", "--out", str(out), str(tree))
    assert result.returncode != 0, result.stderr
    said = [ln for ln in result.stderr.splitlines() if "bytes of results, over the bound" in ln]
    assert len(said) == 1, result.stderr
    assert _large_files(tmp_path) == []
