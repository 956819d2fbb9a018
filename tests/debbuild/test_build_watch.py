"""Watching a build, and what is left when it ends: the log's path from the
start, the build's output live with -v, the sections of the .build log that
sbuild's readers look for, an interrupted build's log, and the results of a
successful build that --out could not take. Real builds, as the user sees them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

import pytest
from waiting import wait_for

from nsbuild.debbuild.log import BuildLog

from .conftest import Env, kept_log, make_package, processes

SAID_LOG = "nsbuild: log, as the build runs: "


def _sleeping(proc: subprocess.Popen[str], cmdline: bytes) -> bool:
    assert proc.poll() is None, proc.communicate()[1]
    return bool(processes(cmdline))


# -- the log, as the build runs and once it is interrupted ---------------------


@pytest.mark.slow
@pytest.mark.userns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_log_is_named_at_the_start_and_kept_when_the_build_is_interrupted(
    bookworm: Env, tmp_path: Path, sig: signal.Signals
) -> None:
    pause = f"sleep 864{23 if sig == signal.SIGINT else 29}"
    tree = make_package(tmp_path, "nsb-watch", build=f"echo nsb-watch: compiling\n{pause}")
    out = tmp_path / "out"
    proc = bookworm.popen("build", "--env", "bookworm", "--out", str(out), str(tree))
    assert proc.stderr is not None
    said = []
    # The path comes before any phase's work: the second progress line.
    while not any(line.startswith(SAID_LOG) for line in said):
        line = proc.stderr.readline()
        assert line, (said, proc.communicate())
        said.append(line.rstrip("\n"))
    assert said[0].startswith("nsbuild: [1/4] Prepare:"), said
    live = Path(said[-1].removeprefix(SAID_LOG))
    assert live.name == "nsb-watch_1.0_amd64.build"

    cmdline = pause.replace(" ", "\0").encode() + b"\0"
    wait_for(lambda: _sleeping(proc, cmdline), "the package's build runs", timeout=900)
    # The user reads what the build said so far, while it runs.
    text = live.read_text()
    assert "nsb-watch: compiling" in text
    assert "| Build environment" in text

    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr  # either way: interrupted
    assert "Traceback" not in stderr
    assert not out.exists()
    kept = kept_log(bookworm, stderr, "nsb-watch_1.0_amd64.build").read_text()
    assert "nsb-watch: compiling" in kept
    assert f"interrupted ({sig.name})" in kept
    assert "Status: interrupted" in kept
    assert "Fail-Stage: build" in kept
    assert not live.exists()


# -- -v, and the sections of a successful build's log ------------------------


@pytest.mark.slow
@pytest.mark.userns
def test_verbose_shows_the_build_live_escaped_and_the_log_has_sbuilds_sections(
    bookworm: Env, tmp_path: Path
) -> None:
    # Output with a terminal control sequence: the user's terminal is not the build's.
    share = "debian/nsb-live/usr/share/nsb-live"
    tree = make_package(tmp_path, "nsb-live", build="printf 'nsb-live: \\033]0;owned\\007 made\\n'",
                        install=f"mkdir -p {share}\necho data > {share}/data.txt")  # fmt: skip
    out = tmp_path / "out"
    before = time.time()
    result = bookworm.nsbuild("build", "-v", "--json", "--env", "bookworm", "--out", str(out),
                              str(tree))  # fmt: skip
    after = time.time()
    assert result.returncode == 0, result.stderr
    stderr = result.stderr
    # Shown as it ran: before the phase after the build began, and escaped.
    assert "nsb-live: \\x1b]0;owned\\x07 made" in stderr
    assert stderr.index("nsb-live: \\x1b]0;owned") < stderr.index("nsbuild: [4/4] Collect")
    assert "\x1b" not in stderr and "\x07" not in stderr
    # The whole log is shown, as sbuild -v does: its summary too.
    assert "Status: successful" in stderr

    log = (out / "nsb-live_1.0_amd64.build").read_text()
    assert "nsb-live: \x1b]0;owned\x07 made" in log  # the log keeps what the build wrote
    start = log.index("| Build environment")
    env_section = log[start:log.index("| Build" + " " * 71, start)]
    versions = [ln for ln in env_section.splitlines() if ln.startswith("Package versions: ")]
    assert len(versions) == 1
    installed = versions[0].split()[2:]
    assert any(p.startswith("debhelper_13") for p in installed), installed
    assert any(p.startswith("dpkg-dev_1.21") for p in installed), installed
    assert "Toolchain package versions: " in env_section
    assert "Kernel: Linux " in env_section

    contents = log[log.index("| Package contents"):log.index("| Summary")]
    assert "\nnsb-live_1.0_all.deb\n--------------------\n" in contents
    assert " new Debian package, version 2.0." in contents  # dpkg-deb -I
    assert " Package: nsb-live\n" in contents
    assert "./usr/share/nsb-live/data.txt\n" in contents  # dpkg-deb -c
    assert "Fail-Stage" not in log

    doc = json.loads(result.stdout)
    started = datetime.fromisoformat(doc["started"]).timestamp()
    assert before <= started <= after
    assert sum(p["seconds"] for p in doc["phases"]) <= doc["total_seconds"] <= after - before
    assert doc["nsbuild_version"] == version("nsbuild")


# -- an unknown environment ----------------------------------------------------


def test_unknown_environment_is_one_line_before_any_progress(bookworm: Env, tmp_path: Path) -> None:
    tree = make_package(tmp_path, "nsb-noenv")
    result = bookworm.nsbuild("build", "--env", "nosuch", "--out", str(tmp_path / "out"), str(tree))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "'nosuch'" in lines[0] and "known: " in lines[0] and "bookworm" in lines[0]
    assert not (tmp_path / "out").exists()


# -- a successful build that --out cannot take --------------------------------


def _unwritable(out: Path) -> None:
    out.chmod(0)


def _removed_under_a_read_only_parent(out: Path) -> None:
    out.rmdir()
    out.parent.chmod(0o555)


@pytest.mark.slow
@pytest.mark.userns
@pytest.mark.parametrize("spoil", [_unwritable, _removed_under_a_read_only_parent],
                         ids=["mode-000", "removed"])  # fmt: skip
def test_results_that_out_cannot_take_are_kept_and_named(
    bookworm: Env, tmp_path: Path, spoil: object
) -> None:
    assert callable(spoil)
    pause = f"sleep 864{31 if spoil is _unwritable else 37}"
    tree = make_package(tmp_path, "nsb-keep", build=f"{pause} || echo let go")
    out = tmp_path / "parent" / "out"
    out.mkdir(parents=True)
    proc = bookworm.popen("build", "--json", "--env", "bookworm", "--out", str(out), str(tree))
    cmdline = pause.replace(" ", "\0").encode() + b"\0"
    try:
        wait_for(lambda: _sleeping(proc, cmdline), "the package's build runs", timeout=900)
        # --out goes bad while the package builds (checked fine at the start).
        spoil(out)
        for pid in processes(cmdline):
            os.kill(pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        out.parent.chmod(0o755)
        if out.exists():
            out.chmod(0o755)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr
    said = [ln for ln in stderr.splitlines() if ln.startswith("nsbuild build: ")]
    assert len(said) == 2, stderr  # the error, one line; then the log
    assert str(out) in said[0]
    assert "the build succeeded: its results and logs are kept in " in said[0]
    log = kept_log(bookworm, stderr, "nsb-keep_1.0_amd64.build")
    kept = log.parent
    assert said[0].endswith(f"kept in {kept}")
    assert sorted(p.name for p in kept.iterdir()) == [
        "nsb-keep_1.0_all.deb",
        "nsb-keep_1.0_amd64.build",
        "nsb-keep_1.0_amd64.buildinfo",
        "nsb-keep_1.0_amd64.changes",
        "nsb-keep_1.0_amd64.network.jsonl",
    ]
    assert "let go" in log.read_text()
    assert "Status: successful" in log.read_text()
    assert not out.exists() or list(out.iterdir()) == []
    doc = json.loads(stdout)
    assert (doc["status"], doc["exit_status"], doc["fail_stage"]) == ("successful", 2, "deliver")
    for art in doc["artifacts"]:
        assert Path(art["path"]) == kept / art["name"]
    deb = subprocess.run(["dpkg-deb", "-f", str(kept / "nsb-keep_1.0_all.deb"), "Package"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert deb.stdout.strip() == "nsb-keep"


# -- the log's own parts, without a build --------------------------------------


def test_log_bounds_a_commands_output_and_escapes_what_it_shows(tmp_path: Path) -> None:
    shown = tmp_path / "shown"
    with shown.open("w", encoding="utf-8", errors="backslashreplace") as echo:
        log = BuildLog(tmp_path / "x.build", echo)
        log.line("nsbuild's own line")
        with log.command_output(limit=1000) as fd:
            # A real command writing far past the limit, a character split
            # across its writes and a terminal escape among them.
            script = "printf '\\033[2J\\342'; printf '\\202\\254 euro\\n'; head -c 300000 /dev/zero"
            subprocess.run(["sh", "-c", script], stdout=fd, check=True)
        log.close()
    kept = (tmp_path / "x.build").read_bytes()
    assert kept.startswith(b"nsbuild's own line\n\x1b[2J\xe2\x82\xac euro\n")
    assert kept.count(b"\0") == 1000 - len(b"\x1b[2J\xe2\x82\xac euro\n")
    assert kept.endswith(b"[nsbuild: output cut after 1000 bytes; 300000 more bytes not kept]\n"
                         .replace(b"300000", str(300000 - kept.count(b"\0")).encode()))  # fmt: skip
    text = shown.read_text()
    assert text.startswith("nsbuild's own line\n\\x1b[2J\u20ac euro\n")
    assert "\x1b" not in text
    assert "output cut after 1000 bytes" in text
