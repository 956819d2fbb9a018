"""`nsbuild build`'s options with sbuild's meaning, as a user sees them: the
refusals of what nsbuild does not do, and builds in a real bookworm
environment where -P, --add-depends and --extra-repository change what the
dependency phase installs."""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nsbuild.debbuild import extrarepo
from nsbuild.debbuild.result import BuildRequest

from .conftest import Env, make_package


def _nsbuild(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "config"),
               XDG_CACHE_HOME=str(tmp_path / "cache"))  # fmt: skip
    return subprocess.run([sys.executable, "-m", "nsbuild", *args], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def _one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "usage:" not in r.stderr and "Traceback" not in r.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# -- refused before any work --


@pytest.mark.parametrize(
    ("args", "named", "why"),
    [
        (("--keyid", "0xABCD"), "--keyid", "debsign"),
        (("-k", "0xABCD"), "-k", "debsign"),
        (("--chroot-mode=schroot",), "--chroot-mode", "--backend"),
        (("--chroot-mode", "unshare"), "--chroot-mode", "--backend"),
        (("--arch=arm64",), "--arch", "environment's architecture"),
        (("-b",), "-b", "build-progress"),
        (("--batch",), "--batch", "build-progress"),
        (("--purge-deps=never",), "--purge-deps", "session"),
        (("--build-dep-resolver=aspcud",), "--build-dep-resolver", "apt"),
        (("--apt-upgrade",), "--apt-upgrade", "never upgrades"),
        (("--apt-clean",), "--apt-clean", "thrown away anyway"),
        (("--no-apt-update",), "--no-apt-update", "always updates"),
        (("--setup-hook", "/bin/true"), "--setup-hook", "--chroot-setup-commands"),
        (("-n",), "-n", "always writes"),
    ],
)
def test_sbuilds_unsupported_options_are_refused_in_one_line(
    tmp_path: Path, args: tuple[str, ...], named: str, why: str
) -> None:
    r = _nsbuild(tmp_path, "build", *args, "hello_2.10-3.dsc")
    line = _one_line_error(r, f"{named} is not supported", why)
    assert line.startswith("nsbuild: sbuild's ")


def test_options_that_contradict_each_other_are_refused(tmp_path: Path) -> None:
    _one_line_error(_nsbuild(tmp_path, "build", "-A", "--no-arch-all", "x.dsc"),
                    "-A cannot be used together with --no-arch-all")  # fmt: skip
    _one_line_error(_nsbuild(tmp_path, "build", "--make-binNMU", "rebuild", "-A", "x.dsc"),
                    "--arch-all cannot be used together with --make-binNMU")  # fmt: skip
    _one_line_error(_nsbuild(tmp_path, "build", "--no-arch-any", "--no-arch-all", "x.dsc"),
                    "nothing to build")  # fmt: skip
    _one_line_error(_nsbuild(tmp_path, "build", "--purge-build", "sometimes", "x.dsc"),
                    "--purge-build", "sometimes")  # fmt: skip
    _one_line_error(_nsbuild(tmp_path, "build", "-j", "0", "x.dsc"), "-j", "at least 1")


def test_sbuilds_harmless_options_are_accepted(tmp_path: Path) -> None:
    """What nsbuild does anyway: accepted; the build goes on to its next question."""
    r = _nsbuild(tmp_path, "build", "--apt-update", "--no-apt-upgrade", "--no-apt-clean",
                 "--no-arch-any", "--no-arch-all", "x.dsc")  # fmt: skip
    _one_line_error(r, "nothing to build")


def test_selection_has_sbuilds_meaning(tmp_path: Path) -> None:
    """-A adds arch:all packages to the default, it does not build them alone."""

    def selection(*args: str) -> tuple[object, ...]:
        r = _nsbuild(tmp_path, "config", "--json", *args)
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)["settings"]
        return s["arch-any"]["value"], s["arch-all"]["value"], s["source"]["value"]

    assert selection() == (True, True, False)
    assert selection("-A") == (True, True, False)
    assert selection("--arch-any") == (True, True, False)
    assert selection("--no-arch-any") == (False, True, False)
    assert selection("--no-arch-all", "-s") == (True, False, True)


def test_values_may_begin_with_a_dash_as_in_sbuild(tmp_path: Path) -> None:
    r = _nsbuild(tmp_path, "config", "--json", "--debbuildopt", "-v1.0", "--debbuildopts",
                 "-sa -i", "--debbuildopt=-nc", "--lintian-opts", "-i -I")  # fmt: skip
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["settings"]
    assert s["debbuildopts"]["value"] == ["-v1.0", "-sa", "-i", "-nc"]
    assert s["lintian-opts"]["value"] == ["-i", "-I"]


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("deb ftp://example.org/debian bookworm main", ("http:// or https://",)),
        ("deb http://example.org/debian bookworm", ("needs at least one",)),
        ("deb [trusted=yes] http://example.org/debian bookworm main", ("--extra-repository-key",)),
        ("deb-src http://example.org/debian bookworm main", ("expected 'deb URL SUITE",)),
        ("deb http://user:pw@example.org/debian bookworm main", ("no user, password",)),
        ("deb http://2130706433/debian bookworm main", ("numeric host name",)),
        ("deb http://[::1/debian bookworm main", ("not a valid URL",)),
        ("deb http://[example.org]/debian bookworm main", ("not a valid URL",)),
        ("deb http://example.org:0/debian bookworm main", ("port 0",)),
        # str.split() takes U+2028 for a space: a second line for a reader
        # of the line that splits it as Python does.
        ("deb http://example.org/debian bookworm main\u2028deb http://evil.example/ ./",
         ("line separator",)),
    ],
)
def test_a_bad_extra_repository_is_refused_before_any_work(
    tmp_path: Path, line: str, words: tuple[str, ...]
) -> None:
    r = _nsbuild(tmp_path, "build", "--extra-repository", line, "x.dsc")
    _one_line_error(r, "--extra-repository", *words)


def test_a_bad_extra_repository_key_is_refused_before_any_work(tmp_path: Path) -> None:
    repo = "deb http://example.org/debian bookworm main"
    bad = tmp_path / "bad.asc"
    bad.write_text("not a key\n")
    big = tmp_path / "big.gpg"
    big.write_bytes(b"\x99" * (extrarepo.MAX_KEY + 1))
    # A FIFO no one writes would block a plain open; a link to a device reads forever.
    fifo = tmp_path / "fifo.asc"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.gpg"
    zero.symlink_to("/dev/zero")
    for key, why in ((bad, "not an OpenPGP public key"), (big, "larger than"),
                     (tmp_path, "not a regular file"), (tmp_path / "nosuch", "No such file"),
                     (fifo, "not a regular file"), (zero, "not a regular file")):
        r = _nsbuild(tmp_path, "build", "--extra-repository", repo,
                     "--extra-repository-key", str(key), "x.dsc")  # fmt: skip
        _one_line_error(r, f"--extra-repository-key {key}", why)
    r = _nsbuild(tmp_path, "build", "--extra-repository-key", str(bad), "x.dsc")
    _one_line_error(r, "--extra-repository")


# -- a signed repository of our own, served on the loopback --


@dataclass
class Repo:
    url: str
    armoured: Path
    binary: Path


def _run(*argv: str, **kw: object) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=120, **kw)  # type: ignore[call-overload]


def _signed_repository(root: Path, package: str) -> tuple[Path, Path, Path]:
    """A flat apt repository holding `package` (arch all), its InRelease signed
    by a key made for it; returns (repository, armoured key, binary key)."""
    gnupg = root / "gnupg"
    gnupg.mkdir(mode=0o700)
    env = dict(os.environ, GNUPGHOME=str(gnupg))
    _run("gpg", "--batch", "--passphrase", "", "--quick-gen-key",
         "nsbuild tests <tests@nsbuild.invalid>", "ed25519", "sign", "never", env=env)
    pkg = root / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: nsbuild tests <tests@nsbuild.invalid>\n"
        "Description: a package of the test's own repository\n"
    )
    (pkg / "usr" / "share" / package).mkdir(parents=True)
    (pkg / "usr" / "share" / package / "marker").write_text("from the extra repository\n")
    repo = root / "repo"
    repo.mkdir()
    deb = repo / f"{package}_1.0_all.deb"
    _run("dpkg-deb", "--root-owner-group", "--build", str(pkg), str(deb))
    packages = subprocess.run(["apt-ftparchive", "packages", "."], cwd=repo, check=True,
                              capture_output=True, timeout=60).stdout  # fmt: skip
    (repo / "Packages").write_bytes(packages)
    release = subprocess.run(["apt-ftparchive", "release", "."], cwd=repo, check=True,
                             capture_output=True, timeout=60).stdout  # fmt: skip
    (repo / "Release").write_bytes(release)
    _run("gpg", "--batch", "--clearsign", "-o", str(repo / "InRelease"), str(repo / "Release"),
         env=env)  # fmt: skip
    armoured, binary = root / "key.asc", root / "key.gpg"
    _run("gpg", "--batch", "--armor", "--export", "-o", str(armoured), env=env)
    _run("gpg", "--batch", "--export", "-o", str(binary), env=env)
    return repo, armoured, binary


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def extra_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Repo]:
    root = tmp_path_factory.mktemp("extra-repo")
    repo, armoured, binary = _signed_repository(root, "nsbtest-extra-dep")
    handler = functools.partial(_Quiet, directory=str(repo))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Repo(f"http://127.0.0.1:{server.server_address[1]}/", armoured, binary)
    finally:
        server.shutdown()
        server.server_close()
        # The agent gpg started for this key's home.
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], capture_output=True, timeout=60,
                       env=dict(os.environ, GNUPGHOME=str(root / "gnupg")))  # fmt: skip


def test_extra_repository_keys_are_checked_and_its_host_allowed(extra_repo: Repo) -> None:
    line = f"deb {extra_repo.url} ./"
    req = BuildRequest(input=Path("x.dsc"), extra_repositories=(line,),
                       extra_repository_keys=(extra_repo.armoured, extra_repo.binary))  # fmt: skip
    extrarepo.check_request(req)
    keys = extrarepo.keys(req)
    assert [k.name for k in keys] == ["nsbuild-extra-1.asc", "nsbuild-extra-2.gpg"]
    port = extra_repo.url.rsplit(":", 1)[1].rstrip("/")
    # Its host, and nothing else, joins the dependency phase's allowlist.
    assert extrarepo.allowed_hosts(req) == (f"127.0.0.1:{port}",)
    assert extrarepo.allowed_hosts(BuildRequest(input=Path("x.dsc"))) == ()
    assert extrarepo.sources([extrarepo.parse(line)], keys) == (
        f"deb [signed-by={extrarepo.KEYRINGS}/nsbuild-extra-1.asc,"
        f"{extrarepo.KEYRINGS}/nsbuild-extra-2.gpg] {extra_repo.url} ./\n"
    )


# -- builds --


def _build(env: Env, tree: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return env.nsbuild("build", "--env", "bookworm", "--out", str(out), "--json", *extra,
                       str(tree))  # fmt: skip


@pytest.mark.slow
@pytest.mark.userns
def test_profiles_drop_a_nocheck_dependency_and_add_depends_installs(
    bookworm: Env, tmp_path: Path
) -> None:
    tree = make_package(tmp_path, "nocheckdep", build_depends="nosuchpkg <!nocheck>",
                        build="test -x /usr/bin/hello")  # fmt: skip
    # Without the profile, the dependency stands: nothing provides it.
    r = _build(bookworm, tree, tmp_path / "no")
    assert r.returncode == 3, r.stderr
    assert "nosuchpkg" in r.stderr
    # With it, the dependency is gone; --add-depends brings what the build uses.
    r = _build(bookworm, tree, tmp_path / "yes", "-P", "nocheck", "--add-depends", "hello")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    log = Path(doc["log"]).read_text()
    assert "Build profiles: nocheck" in log
    assert "hello" in next(ln for ln in log.splitlines() if ln.startswith("Build-Depends: "))
    # A layer resolved without the profile is not one resolved with it.
    layer = doc["dependency_layer"]
    assert layer is not None and layer["cached"] is False
    r = _build(bookworm, tree, tmp_path / "again", "-P", "nocheck", "--add-depends", "hello")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["dependency_layer"] == {"key": layer["key"], "cached": True}


@pytest.mark.slow
@pytest.mark.userns
def test_an_extra_repository_with_its_key_serves_a_build_dependency(
    bookworm: Env, tmp_path: Path, extra_repo: Repo
) -> None:
    marker = "/usr/share/nsbtest-extra-dep/marker"
    tree = make_package(
        tmp_path, "extrauser", build_depends="nsbtest-extra-dep",
        # The dependency is installed; the repository is gone by the build.
        build=f"test -f {marker}\ntest ! -e {extrarepo.SOURCES}",
    )  # fmt: skip
    line = f"deb {extra_repo.url} ./"
    # Without its key, apt refuses the repository: the dependencies cannot be installed.
    r = _build(bookworm, tree, tmp_path / "nokey", "--extra-repository", line)
    assert r.returncode == 3, r.stderr
    # apt's first error names the cause (its last only sums up).
    assert "apt-get update failed: E: The repository" in r.stderr, r.stderr
    r = _build(bookworm, tree, tmp_path / "key", "--extra-repository", line,
               "--extra-repository-key", str(extra_repo.armoured))  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    log = Path(doc["log"]).read_text()
    assert f"signed-by={extrarepo.KEYRINGS}/nsbuild-extra-1.asc" in log
    assert any(ln.startswith("  install nsbtest-extra-dep 1.0 all") for ln in log.splitlines())
    first = doc["dependency_layer"]
    assert first is not None and first["cached"] is False
    # The same key, binary: the same packages, but a layer of another key's word.
    r = _build(bookworm, tree, tmp_path / "binary", "--extra-repository", line,
               "--extra-repository-key", str(extra_repo.binary))  # fmt: skip
    assert r.returncode == 0, r.stderr
    layer = json.loads(r.stdout)["dependency_layer"]
    assert layer is not None and layer["cached"] is False and layer["key"] != first["key"]
    # The same repository and key again: the layer is reused.
    r = _build(bookworm, tree, tmp_path / "again", "--extra-repository", line,
               "--extra-repository-key", str(extra_repo.armoured))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["dependency_layer"] == {"key": first["key"], "cached": True}
    # Nothing the repository served is in the environment's shared apt
    # caches: checked against its key alone, a package there would stand in
    # for the archive's of the same name and size in the next builds.
    caches = bookworm.cache / "nsbuild" / "apt" / "bookworm"
    assert (caches / "apt-lists").is_dir()
    taken = [p.name for p in (caches / "apt-archives").iterdir()]
    assert not [n for n in taken if n.startswith("nsbtest-extra-dep")], taken
    lists = [p.name for p in (caches / "apt-lists").iterdir()]
    assert not [n for n in lists if n.startswith("127.0.0.1")], lists


@pytest.mark.slow
@pytest.mark.userns
def test_commands_before_the_dependency_phase_keep_layers_out(
    bookworm: Env, tmp_path: Path
) -> None:
    tree = make_package(tmp_path, "withsetup")
    r = _build(bookworm, tree, tmp_path / "out", "--chroot-setup-commands", "true")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["dependency_layer"] is None
    log = Path(doc["log"]).read_text()
    assert "No dependency layer is used or kept: external commands " \
           "(--chroot-setup-commands) may change the session" in log
