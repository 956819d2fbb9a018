"""autopkgtest-virt-nsbuild with no network option: apt reaches the mirrors, nothing else does.

What a user of `autopkgtest PKG.dsc -- nsbuild ENV` sees on a fresh machine
(an empty nsbuild cache): the tests' dependencies are installed from the
environment's mirrors, as with autopkgtest-virt-unshare; a test reaching
anything else is refused; a test that declares needs-internet is told, in
one line, what to pass. Real autopkgtest, apt and archive; no list is
cached beforehand.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from inputs import tarball
from virt_helpers import SYSTEM_PATH, VENV_BIN, Env, RawServer, run, sessions, tiny_package

from nsbuild.envs.remove import remove_tree

pytestmark = pytest.mark.userns

ADVICE = (
    "autopkgtest-virt-nsbuild: test online declares Restrictions: needs-internet, but this "
    "testbed reaches only the environment's mirrors: to give it the internet, pass --net host "
    "to the server (autopkgtest ... -- nsbuild --net host bookworm)"
)
FETCHING = "no package lists of bookworm cached yet: apt-get update from its mirrors"
# A test that asks a host outside the mirrors, through the proxy apt uses.
ONLINE = """perl -MHTTP::Tiny -e '
my $r = HTTP::Tiny->new->get("http://example.org/");
print "$r->{status} $r->{content}"; exit($r->{success} ? 0 : 1)'"""


@pytest.fixture
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """Its own XDG folders: nothing unpacked, no apt list or .deb cached."""
    root = tmp_path_factory.mktemp("fresh-home")
    config = root / "config" / "nsbuild" / "chroot.d"
    config.mkdir(parents=True)
    (config / "bookworm").write_text(
        f"Name: bookworm\nType: tarball\nPath: {tarball()}\nSuite: bookworm\n"
        "Architecture: amd64\nMirror: http://deb.debian.org/debian\n"
    )
    env = dict(os.environ)
    env.update(XDG_CONFIG_HOME=str(root / "config"), XDG_CACHE_HOME=str(root / "cache"),
               PATH=f"{VENV_BIN}:{SYSTEM_PATH}")  # fmt: skip
    yield Env(env, root / "cache")
    subprocess.run([sys.executable, "-m", "nsbuild", "gc"], env=env, capture_output=True)
    remove_tree(root / "cache")


def _dsc(parent: Path, tests: str) -> Path:
    """A source package written for the test, with `tests` as its
    debian/tests/control (scripts: debian/tests/NAME, made by the caller)."""
    tree = tiny_package(parent)
    (tree / "debian" / "tests").mkdir()
    (tree / "debian" / "tests" / "control").write_text(tests)
    return tree


def _script(tree: Path, name: str, text: str) -> None:
    path = tree / "debian" / "tests" / name
    path.write_text(f"#!/bin/sh\nset -e\n{text}\n")
    path.chmod(0o755)


def _source(tree: Path) -> Path:
    subprocess.run(["dpkg-source", "-b", tree.name], cwd=tree.parent, check=True,
                   capture_output=True)  # fmt: skip
    (dsc,) = tree.parent.glob("*.dsc")
    return dsc


def _summary(out: Path) -> dict[str, str]:
    return dict(line.split()[:2] for line in (out / "summary").read_text().splitlines())


@pytest.mark.slow
def test_autopkgtest_with_no_options_installs_test_dependencies_from_the_mirrors(
    fresh: Env, tmp_path: Path
) -> None:
    tree = _dsc(tmp_path / "src", "Tests: uses-jq\nDepends: jq\n\n"
                                  "Tests: online\nDepends: @\nRestrictions: needs-internet\n")
    _script(tree, "uses-jq", "echo '{\"answer\": 42}' | jq .answer")
    _script(tree, "online", ONLINE)
    out = tmp_path / "out"
    proc = run(fresh, ["autopkgtest", str(_source(tree)), "-o", str(out),
                       "--", "nsbuild", "bookworm"])  # fmt: skip
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    # autopkgtest's 4: at least one test failed (online, on purpose).
    assert proc.returncode == 4, tail
    assert _summary(out) == {"uses-jq": "PASS", "online": "FAIL"}, tail
    assert (out / "uses-jq-stdout").read_text() == "42\n"
    # The lists came from the mirror at open, the .debs too (and stay cached).
    assert FETCHING in proc.stderr
    debs = fresh.cache / "nsbuild" / "apt" / "bookworm" / "apt-archives"
    assert list(debs.glob("jq_*.deb")), sorted(p.name for p in debs.iterdir())
    # Anything but the mirrors is refused.
    refused = (out / "online-stdout").read_text()
    assert refused.startswith("403 nsbuild egress proxy:"), refused
    # ...and said when the testbed closes.
    assert "autopkgtest-virt-nsbuild: network: 1 attempt denied: example.org:80" in proc.stderr
    # The needs-internet test is told what to pass, once, in autopkgtest's output.
    told = [line for line in proc.stderr.splitlines() if "needs-internet" in line]
    assert told == [ADVICE], tail
    assert sessions(fresh) == []


def test_a_default_testbed_fetches_the_lists_once_and_net_none_fetches_nothing(
    fresh: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "PATH"):
        monkeypatch.setenv(key, fresh.vars[key])
    lists = "ls /var/lib/apt/lists/ | grep -c Release || true"
    # Explicit --net none: nothing fetched, nothing reachable.
    srv = RawServer("--net", "none", "bookworm")
    try:
        assert srv.say("open").startswith("ok ")
        ex = srv.execute_command()
        assert _out(ex, lists) == "0\n"
        err = srv.quit()
    finally:
        srv.kill()
    assert FETCHING not in err
    # The default: the lists are fetched at open, once for every later testbed.
    srv = RawServer("bookworm")
    try:
        assert srv.say("open").startswith("ok ")
        ex = srv.execute_command()
        assert _out(ex, lists) != "0\n"
        assert "Candidate: 1." in _out(ex, "apt-cache policy jq")
        assert srv.say("revert").startswith("ok ")
        ex = srv.execute_command()
        assert _out(ex, lists) != "0\n"
        err = srv.quit()
    finally:
        srv.kill()
    assert err.count(FETCHING) == 1, err
    assert sessions(fresh) == []


def test_needs_internet_is_read_as_autopkgtest_reads_it(tmp_path: Path) -> None:
    from nsbuild.virtserver.internet import declaring, needing

    control = (
        "# a comment\n"
        "Tests: a, b\nRestrictions: allow-stderr,\n needs-internet\n\n"
        "Test-Command: true\nRestrictions: needs-internet\n\n"
        "Test-Command: false\n\n"
        "Test-Command: true\nFeatures: test-name=named\nRestrictions: needs-internet\n\n"
        "Tests: c\nRestrictions: needs-root\n"
    )
    assert needing(control) == ["a", "b", "command1", "named"]
    # Read from the tree as it crossed over: debian/tests/control, or
    # tests/control when the tree is the debian folder itself.
    tree = tmp_path / "pkg"
    (tree / "debian" / "tests").mkdir(parents=True)
    (tree / "debian" / "tests" / "control").write_text(control)
    assert declaring(f"{tree}/", None) == ["a", "b", "command1", "named"]
    assert declaring(f"{tree}/debian/", None) == ["a", "b", "command1", "named"]
    assert declaring(f"{tmp_path}/", None) == []


def test_a_hostile_control_file_is_not_followed_read_whole_or_printed_raw(
    tmp_path: Path,
) -> None:
    from nsbuild.virtserver.internet import advice, declaring
    from nsbuild.virtserver.testbed import NetPolicy

    downtmp = tmp_path / "downtmp"
    secret = tmp_path / "secret"
    (secret / "tests").mkdir(parents=True)
    (secret / "tests" / "control").write_text("Tests: secret\nRestrictions: needs-internet\n")
    # Under the testbed's folder: a symlinked folder, a symlinked file, a
    # FIFO and a huge sparse file are all left unread.
    cases = {"dirlink": None, "filelink": None, "fifo": None, "huge": None}
    for name in cases:
        (downtmp / name / "debian").mkdir(parents=True)
    (downtmp / "dirlink" / "debian").rmdir()
    (downtmp / "dirlink" / "debian").symlink_to(secret)
    (downtmp / "filelink" / "debian" / "tests").symlink_to(secret / "tests")
    (downtmp / "fifo" / "debian" / "tests").mkdir()
    os.mkfifo(downtmp / "fifo" / "debian" / "tests" / "control")
    (downtmp / "huge" / "debian" / "tests").mkdir()
    with open(downtmp / "huge" / "debian" / "tests" / "control", "w") as f:
        f.write("Tests: huge\nRestrictions: needs-internet\n")
        f.truncate(64 << 20)
    for name in cases:
        assert declaring(f"{downtmp}/{name}/", str(downtmp)) == [], name
    # What is printed is escaped: one line, no terminal control.
    line = advice(["evil\x1b[2J\nname"], NetPolicy(mode="none"), "bookworm")
    assert "\x1b" not in line and "\n" not in line
    assert "this testbed has no network" in line
    shutil.rmtree(downtmp)


def _out(ex: list[str], script: str) -> str:
    done = subprocess.run([*ex, "sh", "-c", script], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout
